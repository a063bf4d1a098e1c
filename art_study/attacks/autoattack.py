"""AutoAttack's standard version as a cascade: APGD-CE → APGD-T → FAB-T → Square, escalated to
the stronger "plus" set when AutoAttack's own Square check fires.

Croce & Hein (2020) run APGD-CE, targeted APGD-DLR (9 target classes), FAB-T (9 targets) and
Square (5 000 queries), each on the images still robust after the previous ones; an image is
robust only if it survives all of them (an AND over the components). The components are
art-study's compiled implementations (:mod:`.apgd`, :mod:`.fab`, :mod:`.square`).

The reference warns (``checks.check_square_sr``) when Square, a black-box attack, still breaks
more than 0.2 % of the images after the white-box components: the gradients the white-box
attacks followed are then suspect, and the figure unreliable. Here the warning triggers the
remedy it names: the images still robust are attacked again by stronger settings (APGD-CE and
APGD-DLR with ``plus_restarts`` restarts each, Square with ``plus_square_restarts`` restarts of
5 000 queries; 5 and 5 by default). The reference's "plus" version has the same APGD budgets,
adds untargeted FAB with 5 restarts and runs Square once: the extra Square restarts are the
remedy the check's message names. Both figures are returned: the standard one after
``square``, the escalated one after ``plus-square``; an image broken by either counts broken, so
the headline is the lower.

The images are attacked in chunks of ``chunk_images`` (:data:`CHUNK_IMAGES` by default), each
chunk through every component before the next chunk starts, each seeded by itself from one draw
of the caller-seeded NumPy RNG (an image is attacked alone; only which random numbers it gets
depends on its chunk). That makes
a long evaluation resumable: with checkpoints (:meth:`AutoAttackStandard.resume_from`,
:mod:`.checkpoints`) every finished chunk is saved, and a run stopped midway computes only the
chunks it has not saved, with the verdicts of an uninterrupted run. The Square check reads the
figures of all chunks together, and the escalation then runs chunk by chunk the same way. Each
chunk keeps the numerics fingerprint of the process that computed it: a study resumed on
another machine reuses the chunks (their key says what they are, not where they were
computed, as the stage cache's does) and the outcome says how many each fingerprint computed.

ART's ``AutoAttack`` class is no substitute: it scores each component by its returned point
only, and its APGD starts at the configured ``eps_step`` rather than 2·ε.
"""

from __future__ import annotations

import time
from typing import ClassVar

import keras
import numpy as np

from art_study import numerics
from art_study.attacks.apgd import APGD, _predict, apgd_targeted, check_target_classes
from art_study.attacks.base import FORWARD, QUERY, Attack, Outcome, Passes
from art_study.attacks.checkpoints import Checkpoints, digest, model_digest
from art_study.attacks.fab import FABT
from art_study.attacks.square import Square
from art_study.diagnostics import square_check

#: The components in the order they run (the names in metric keys).
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
#: The escalation's components, run only when the Square check fires.
PLUS_COMPONENTS = ("plus-apgd-ce", "plus-apgd-dlr", "plus-square")
#: Images per chunk: the unit of work that is seeded by itself and checkpointed. A stopped
#: evaluation loses the chunk it was in (about 6 min of a 2-core CPU on a robust MNIST model at
#: 250); smaller chunks cost no more here (``benchmarks/autoattack_chunks.py``: 250, 500 and
#: 1 000 within 2 %).
CHUNK_IMAGES = 250


def accuracies(after: dict[str, np.ndarray], clean_fooled: np.ndarray) -> dict[str, float]:
    """Robust accuracy after each component, from the cumulative verdicts of a cascade, with
    ``clean`` first (the table AutoAttack's checks read)."""
    return {"clean": 1.0 - float(np.mean(clean_fooled)),
            **{name: 1.0 - float(np.mean(f)) for name, f in after.items()}}


class AutoAttackStandard(Attack):
    """The cascade with the reference's budgets by default: 100 APGD and FAB iterations, 9
    target classes, 5 000 Square queries with ``p_init`` 0.8, one restart each; ``escalate``:
    run the plus set when the Square check fires."""

    note: ClassVar[str] = ("APGD-CE, APGD-T, FAB-T, Square as a cascade; escalated to APGD-CE, "
                           "APGD-DLR (plus_restarts) and Square (plus_square_restarts) when "
                           "AutoAttack's Square check fires")

    @classmethod
    def budget(cls, settings: dict) -> dict[str, float]:
        """FAB-T's targets (as many as APGD-T's) and the escalation's restarts."""
        return {"fab_target_classes": float(settings.get("n_target_classes", 9)),
                "plus_restarts": float(settings.get("plus_restarts", 5)),
                "plus_square_restarts": float(settings.get("plus_square_restarts", 5))}

    @classmethod
    def passes(cls, settings: dict) -> Passes:
        """APGD-CE on every image; the rest on the images it left robust: APGD-T and FAB-T (a
        forward pass more per iteration) towards each target, Square's queries, and the
        escalation, counted as if the Square check fired (it fired on 7 of 9 robust MNIST
        models on 1 000 images)."""
        it, targets, queries = (settings["max_iter"], settings["n_target_classes"],
                                settings["n_queries"])
        rest = targets * it * (2 + FORWARD) + queries * QUERY
        if settings["escalate"]:
            rest += (2 * settings["plus_restarts"] * it
                     + settings["plus_square_restarts"] * queries * QUERY)
        return Passes(it, rest)

    def __init__(self, model: keras.Model, *, max_iter: int = 100, n_target_classes: int = 9,
                 n_queries: int = 5000, p_init: float = 0.8, batch_size: int = 500,
                 escalate: bool = True, plus_restarts: int = 5,
                 plus_square_restarts: int = 5, chunk_images: int = CHUNK_IMAGES):
        check_target_classes(n_target_classes, model)
        for name, value in (("plus_restarts", plus_restarts),
                            ("plus_square_restarts", plus_square_restarts),
                            ("chunk_images", chunk_images)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.max_iter, self.n_target_classes = model, max_iter, n_target_classes
        self.batch_size, self.escalate, self.plus_restarts = batch_size, escalate, plus_restarts
        self.n_queries, self.p_init = n_queries, p_init
        self.plus_square_restarts = plus_square_restarts
        self.chunk_images = chunk_images
        self.apgd_ce = APGD(model, loss="ce", n_iter=max_iter, batch_size=batch_size)
        self.apgd_t = APGD(model, loss="dlr-targeted", n_iter=max_iter, batch_size=batch_size)
        self.fab_t = FABT(model, n_iter=max_iter, n_target_classes=n_target_classes,
                          batch_size=batch_size)
        self.square = Square(model, n_queries=n_queries, p_init=p_init,
                             batch_size=max(batch_size, 1000))
        # the escalation's attacks (their loops are traced only if an escalation runs them)
        self.plus_apgd = {
            f"plus-apgd-{loss}": APGD(model, loss=loss, n_iter=max_iter,
                                      n_restarts=plus_restarts, batch_size=batch_size)
            for loss in ("ce", "dlr")}
        #: per component of the last cascade: (wall s, process CPU s, images it attacked),
        #: summed over its chunks (a chunk loaded from a checkpoint brings its recorded cost)
        self.costs: dict[str, tuple[float, float, int]] = {}
        #: the last cascade's Square check, and whether it escalated
        self.check = None
        self.escalated = False
        #: where finished chunks are saved (:meth:`resume_from`), and how many the last
        #: cascade loaded from there
        self.checkpoints: Checkpoints | None = None
        self.resumed = 0
        #: the last cascade's chunks per numerics fingerprint id that computed them
        self.computed_by: dict[str, int] = {}

    def resume_from(self, checkpoints: Checkpoints) -> None:
        """Save every finished chunk in ``checkpoints`` and load the ones already there, under
        a scope of this model's weights and the standard components' settings (the
        escalation's are added for its own chunks: changing them leaves the standard chunks
        valid)."""
        self.checkpoints = checkpoints.scoped(
            model_digest(self.model), self.max_iter, self.n_target_classes, self.n_queries,
            self.p_init, self.batch_size, self.chunk_images)

    def cascade(self, x: np.ndarray, y: np.ndarray, eps: float
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(fooled, x_adv, fooled_after)``: ``fooled_after[c]`` is the cumulative verdict after
        component ``c`` (so ``1 - mean`` is the robust accuracy after it), with the
        :data:`PLUS_COMPONENTS` too when the Square check fired. Images the model misclassifies
        clean count as fooled from the start."""
        x = np.asarray(x, np.float32)
        y = np.asarray(y)
        x_adv = x.copy()
        fooled = _predict(self.model, x, self.batch_size) != y
        clean_fooled = fooled.copy()
        after: dict[str, np.ndarray] = {}
        self.costs, self.resumed, self.computed_by = {}, 0, {}
        base = int(np.random.randint(0, 2**31 - 1))  # every chunk's seed derives from it
        state = np.random.get_state()  # what follows the cascade draws as if nothing resumed
        try:
            self._phase("standard", COMPONENTS, x, y, eps, base, fooled, x_adv, after)
            self.check = square_check(accuracies(after, clean_fooled))
            self.escalated = bool(self.escalate and self.check.passed is False)
            if self.escalated:
                self._phase("plus", PLUS_COMPONENTS, x, y, eps, base, fooled, x_adv, after)
        finally:
            np.random.set_state(state)
        return fooled, x_adv, after

    def __call__(self, x: np.ndarray, y: np.ndarray, eps: float | None) -> Outcome:
        fooled, x_adv, after = self.cascade(x, y, eps)
        return Outcome(x_adv, fooled, after, {name: c[0] for name, c in self.costs.items()},
                       dict(self.computed_by))

    def _phase(self, phase: str, names, x, y, eps, base, fooled, x_adv, after) -> None:
        """``names`` on every chunk of images in turn, updating ``fooled``, ``x_adv``,
        ``after`` and :attr:`costs`."""
        for name in names:
            after[name] = fooled.copy()
        totals = {name: np.zeros(3) for name in names}
        for i, start in enumerate(range(0, len(x), self.chunk_images)):
            s = slice(start, start + self.chunk_images)
            done = self._chunk(phase, i, names, x[s], y[s], eps, base, fooled[s], x_adv[s])
            fooled[s] = done["fooled"]
            x_adv[s][done["fooled"]] = done["x_adv_fooled"]
            for k, name in enumerate(names):
                after[name][s] = done[f"after_{name}"]
                totals[name] += done["costs"][k]
        for name, (wall, cpu, n) in totals.items():
            self.costs[name] = (float(wall), float(cpu), int(n))

    def _chunk(self, phase: str, i: int, names, x, y, eps, base, fooled, x_adv
               ) -> dict[str, np.ndarray]:
        """Chunk ``i`` through ``names``, seeded by ``(base, phase, i)``; from its checkpoint
        when one was saved for exactly these inputs."""
        plus = (self.plus_restarts, self.plus_square_restarts) if phase == "plus" else ()
        where = (self.checkpoints.scoped(phase, *plus, i, float(eps), base, x, y, fooled)
                 if self.checkpoints is not None else None)
        saved = where.load("chunk") if where is not None else None
        if saved is not None:
            self.resumed += 1
            self._computed_by(str(saved.get("numerics", "unknown")))
            return saved
        np.random.seed(int(digest(base, phase, i)[:8], 16) % (2**31 - 1))
        fooled, x_adv = fooled.copy(), x_adv.copy()
        after: dict[str, np.ndarray] = {}
        costs = self._run(names, x, y, eps, fooled, x_adv, after)
        here = numerics.fingerprint()["id"]
        self._computed_by(here)
        done = {"fooled": fooled, "x_adv_fooled": x_adv[fooled],
                **{f"after_{name}": after[name] for name in names},
                "costs": np.array([costs[name] for name in names], np.float64),
                "numerics": np.array(here)}
        if where is not None:
            where.save("chunk", done)
        return done

    def _computed_by(self, fingerprint_id: str) -> None:
        self.computed_by[fingerprint_id] = self.computed_by.get(fingerprint_id, 0) + 1

    def _run(self, names, x, y, eps, fooled, x_adv, after) -> dict[str, tuple]:
        """Each component on the images still robust, updating ``fooled`` and ``x_adv``; the
        (wall s, CPU s, images) of each."""
        costs = {}
        for name in names:
            todo = np.flatnonzero(~fooled)
            t0, c0 = time.perf_counter(), time.process_time()
            if len(todo):
                f, xa = self._component(name, x[todo], y[todo], eps)
                fooled[todo[f]] = True
                x_adv[todo[f]] = xa[f]
            after[name] = fooled.copy()
            costs[name] = (time.perf_counter() - t0, time.process_time() - c0, len(todo))
        return costs

    def _component(self, name: str, x: np.ndarray, y: np.ndarray, eps: float):
        if name == "apgd-ce":
            return self.apgd_ce.attack(x, y, eps)
        if name == "apgd-t":
            return apgd_targeted(self.apgd_t, x, y, eps, n_target_classes=self.n_target_classes)
        if name == "fab-t":
            return self.fab_t.attack(x, y, eps)
        if name == "square":
            return self.square.attack(x, y, eps)
        if name in self.plus_apgd:
            return self.plus_apgd[name].attack(x, y, eps)
        if name == "plus-square":
            return self._restarts(self.square, x, y, eps)
        raise ValueError(f"unknown component {name!r}")

    def _restarts(self, attack: Square, x: np.ndarray, y: np.ndarray, eps: float):
        """``attack`` ``plus_square_restarts`` times, each on the images still robust."""
        fooled = np.zeros(len(x), bool)
        x_adv = x.copy()
        for _ in range(self.plus_square_restarts):
            todo = np.flatnonzero(~fooled)
            if not len(todo):
                break
            f, xa = attack.attack(x[todo], y[todo], eps)
            fooled[todo[f]] = True
            x_adv[todo[f]] = xa[f]
        return fooled, x_adv
