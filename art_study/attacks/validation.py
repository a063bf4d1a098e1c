"""The checks of a configured attack, before any training: its name, its arguments, and ART's
own checks of their values on a throw-away model of the dataset's input shape and classes.

Unknown names list what exists, unknown arguments list what the attack accepts; a value an
attack refuses gives the attack's name and its first line of complaint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from art_study.attacks.base import AttackFactory
from art_study.config import AttackConfig
from art_study.errors import ConfigError


def unknown_attack(name: str, available: Iterable[str]) -> ConfigError:
    return ConfigError(f"unknown attack {name!r}; available: {', '.join(available)}")


def check_arguments(cfg: AttackConfig, factory: AttackFactory) -> None:
    """Refuse an argument the attack does not take, listing those it does."""
    accepted = factory.parameters()
    bad = sorted(set(cfg.args) - set(accepted))
    if bad:
        raise ConfigError(
            f"attack {cfg.name!r} ({factory.what}) does not take {', '.join(bad)}; "
            f"it takes: {', '.join(accepted)} (eps, eps_step, batch_size are set by art-study)")


def check_values(name: str, build: Callable[[], object]) -> None:
    """Build the attack (its constructor checks the values) and turn its complaint into a
    one-line :class:`ConfigError`."""
    try:
        build()
    except (ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"attack {name!r}: {msg}") from None


@functools.cache
def throwaway_model(input_shape: tuple[int, int, int], n_classes: int):
    """A one-layer model of the dataset's input shape and classes, for the attacks' parameter
    checks (an attack may check a value against them: target classes, image size). Built once
    per shape and process: every plan of a study, and every test that plans one, checks on
    the same."""
    import keras

    model = keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(n_classes)])
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model
