"""The numerics fingerprint, the portable mode, and what they change in keys, tags and reports.

The bit-identity tests run a short training and evaluation (``numerics_child.py``) in fresh
processes pinned to 1 and to 2 cores: TensorFlow chooses oneDNN when it is imported and its
default thread count from the cores it may use, so neither can be varied within this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from art_study import numerics
from art_study.cli import main
from art_study.config import ConfigError, config_from_mapping, load_config
from art_study.errors import ArtStudyError
from art_study.study.cache import StageRecord
from art_study.study.executor import stage_numerics_tags
from art_study.study.plan import plan_runs, study_key
from art_study.tracking import is_environment_tag

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("numerics_child.py")
TINY = REPO / "configs" / "tiny.yaml"


# -- config and keys -------------------------------------------------------------------------------
def test_numerics_config_takes_a_mode_or_a_mapping_and_refuses_others() -> None:
    base = {"name": "x", "train": {"epochs": 1}}
    assert config_from_mapping(base).numerics.mode == "fast"
    portable = config_from_mapping({**base, "numerics": "portable"}).numerics
    assert (portable.mode, portable.intra_op_threads, portable.inter_op_threads) == \
        ("portable", 2, 2)
    mapped = config_from_mapping({**base, "numerics": {"mode": "portable",
                                                       "intra_op_threads": 4}}).numerics
    assert (mapped.mode, mapped.intra_op_threads) == ("portable", 4)
    with pytest.raises(ConfigError, match=r"numerics\.mode"):
        config_from_mapping({**base, "numerics": "exact"})
    with pytest.raises(ConfigError, match="intra_op_threads"):
        config_from_mapping({**base, "numerics": {"intra_op_threads": 0}})


def test_numerics_stays_out_of_keys_unless_strict() -> None:
    cfg = load_config(TINY)
    data = {0: "data-0"}
    runs = plan_runs(cfg, data)
    portable = load_config(TINY, ["numerics=portable"])
    assert [r.key for r in plan_runs(portable, data)] == [r.key for r in runs]
    assert study_key(portable, runs) == study_key(cfg, runs)
    strict = load_config(TINY, ["study.numerics_strict=true"])
    assert study_key(strict, runs) == study_key(cfg, runs)  # the switch itself: not the study
    keyed = plan_runs(strict, data, numerics_id="0123456789ab")
    assert not {s.key for r in keyed for s in r.stages} & {s.key for r in runs for s in r.stages}
    other = plan_runs(strict, data, numerics_id="ba9876543210")
    assert [r.key for r in other] != [r.key for r in keyed]


# -- the fingerprint -------------------------------------------------------------------------------
def test_fingerprint_reports_this_process() -> None:
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    fp = numerics.fingerprint()
    assert fp["onednn"] == ("on" if _pywrap_util_port.IsMklEnabled() else "off")
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    assert fp["intra_op_threads"] == str(intra or len(os.sched_getaffinity(0)))
    assert fp["tensorflow"] == tf.__version__
    model, flags = numerics.cpu_info()
    assert fp["cpu"] == model
    assert fp["isa"].split() == [f for f in numerics.ISA_FLAGS if f in flags]
    assert fp["onednn_policy"] == ("on" if numerics.onednn_policy(flags) else "off")
    assert fp["id"] == numerics.fingerprint_id(fp) == numerics.fingerprint()["id"]
    assert numerics.fingerprint_id({**fp, "intra_op_threads": "64"}) != fp["id"]
    assert numerics.fingerprint_id({**fp, "platform": "elsewhere"}) == fp["id"]
    assert all(is_environment_tag(t) for t in numerics.tags(fp))
    assert fp["id"] in numerics.summary(fp)


def test_portable_refused_once_tensorflow_runs_without_it(capsys) -> None:
    """The process of the tests imported TensorFlow in fast mode: portable cannot be had any
    more, and saying so beats recording a fast run as portable."""
    assert "tensorflow" in sys.modules
    with pytest.raises(ArtStudyError, match="TF_ENABLE_ONEDNN_OPTS=0"):
        numerics.prepare("portable")
    assert main(["run", str(TINY), "--numerics", "portable"]) == 1
    assert "numerics: portable needs oneDNN off" in capsys.readouterr().err


def test_stage_tags_name_the_fingerprint_and_flag_another_machines() -> None:
    here = numerics.fingerprint()
    elsewhere = {**here, "cpu": "another CPU", "onednn": "off"}
    elsewhere["id"] = numerics.fingerprint_id(elsewhere)
    records = [StageRecord("k1", "none", 1, [], 1.0, {"numerics": here}),
               StageRecord("k2", "distillation", 1, [], 1.0, {"numerics": elsewhere}),
               StageRecord("k3", "none", 1, [], 1.0, {})]  # an entry older than fingerprints
    tags = stage_numerics_tags(records, here["id"])
    assert tags["stage1.numerics"].endswith(f"({here['id']})")
    assert "another CPU" in tags["stage2.numerics"]
    assert tags["stage3.numerics"] == "unknown"
    assert {k for k in tags if k.endswith("_differs")} == {"stage2.numerics_differs"}


def test_describe_mixed_names_each_fingerprint() -> None:
    one = pd.DataFrame({"tags.numerics.id": ["a", "a", None],
                        "tags.numerics.onednn": ["on", "on", None]})
    assert numerics.describe_mixed(one) is None
    assert numerics.describe_mixed(pd.DataFrame({"x": [1]})) is None
    mixed = pd.DataFrame({"numerics.id": ["a", "b", "a"], "numerics.onednn": ["on", "off", "on"],
                          "numerics.cpu": ["X", "Y", "X"],
                          "numerics.intra_op_threads": ["2", "8", "2"]})
    text = numerics.describe_mixed(mixed)
    assert text is not None and "2 numerics fingerprints" in text
    assert "2 under a (oneDNN on, X, threads 2)" in text and "1 under b (oneDNN off" in text


def test_describe_differs_counts_runs_with_parts_computed_elsewhere() -> None:
    """A run counts when any of its stages or resumed attack chunks came from another
    fingerprint; a store without such tags, or with none true, gets no sentence."""
    assert numerics.describe_differs(pd.DataFrame({"tags.numerics.id": ["a"]})) is None
    runs = pd.DataFrame({"tags.stage1.numerics_differs": ["true", None, None, None],
                         "tags.attack.autoattack-standard.numerics_differs":
                             ["true", "true", None, None]})
    text = numerics.describe_differs(runs)
    assert text is not None and text.startswith("2 of these runs use parts computed under")
    assert numerics.describe_differs(runs.iloc[2:]) is None


# -- bit for bit, under 1 and 2 cores --------------------------------------------------------------
def _child(mode: str, cores: set[int], mnist_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(CHILD), mode, str(mnist_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


@pytest.fixture(scope="module")
def pinned(mnist_dir: Path) -> dict[tuple[str, int], dict]:
    """The child's result per (mode, cores), the four processes run side by side."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("this process may use only one core: nothing to compare 1 core with")
    procs = {(mode, n): _child(mode, set(cores[:n]), mnist_dir)
             for mode in ("portable", "fast") for n in (1, 2)}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_portable_is_bit_identical_under_1_and_2_cores(pinned, record_property) -> None:
    one, two = pinned["portable", 1], pinned["portable", 2]
    for got in (one, two):
        fp = got["fingerprint"]
        assert (fp["mode"], fp["onednn"], fp["contraction"]) == ("portable", "off", "eigen")
        assert (fp["intra_op_threads"], fp["inter_op_threads"]) == ("2", "2")
    assert one["weights"] == two["weights"]
    assert one["metrics"] == two["metrics"]
    record_property("portable_weights", one["weights"])


def test_default_mode_under_1_and_2_cores_as_found(pinned, record_property) -> None:
    """Not assumed either way: whether fast mode's numbers depend on the core count is what
    this machine's kernels do. The test checks the two runs really had 1 and 2 threads and
    records what it found."""
    one, two = pinned["fast", 1], pinned["fast", 2]
    assert one["fingerprint"]["intra_op_threads"] == "1"
    assert two["fingerprint"]["intra_op_threads"] == "2"
    assert one["fingerprint"]["onednn"] == two["fingerprint"]["onednn"] != "unknown"
    same = one["weights"] == two["weights"] and one["metrics"] == two["metrics"]
    found = (f"fast mode (oneDNN {one['fingerprint']['onednn']}) under 1 and 2 cores: "
             f"{'bit-identical' if same else 'different'} weights and metrics "
             f"({one['metrics']} vs {two['metrics']})")
    record_property("fast_mode_1_vs_2_cores", found)
    print(found)


def test_portable_against_default_where_default_runs_eigen(pinned, record_property) -> None:
    """Where TensorFlow's policy leaves oneDNN's ops off, fast mode runs Eigen's ops with the
    machine's thread count (2 here), as portable mode does; its contractions still use oneDNN's
    sgemm, which portable turns off, so equality is recorded, not assumed."""
    _, flags = numerics.cpu_info()
    if numerics.onednn_policy(flags):
        pytest.skip("TensorFlow turns oneDNN on by default on this CPU (it has "
                    f"{', '.join(f for f in numerics.ONEDNN_POLICY_FLAGS if f in flags)}): "
                    "fast mode does not run Eigen here")
    fast, portable = pinned["fast", 2], pinned["portable", 2]
    assert fast["fingerprint"]["onednn"] == "off"
    same = fast["weights"] == portable["weights"] and fast["metrics"] == portable["metrics"]
    record_property("portable_vs_fast_eigen", "identical" if same else "different")
    print(f"portable vs fast (Eigen by policy): {'identical' if same else 'different'}")


def test_runs_listing_shows_each_fingerprint_once() -> None:
    from art_study.inventory import CHILD_COLUMNS, NUMERICS_TAGS, Inventory, _fingerprints, render

    here = numerics.fingerprint()
    tags = {f"tags.numerics.{t}": [here[t], None] for t in NUMERICS_TAGS}
    store = pd.DataFrame({"run_id": ["r1", "r0"], **tags})
    shown = _fingerprints(store)
    assert shown == {here["id"]: numerics.summary({t: here[t] for t in NUMERICS_TAGS})}
    kids = pd.DataFrame([["r1", "none", 2, 0, "FINISHED", 0.9, "no", here["id"]]],
                        columns=CHILD_COLUMNS)
    studies = pd.DataFrame([{"study": "s", "run_id": "p"}])
    text = render(Inventory("sqlite:///x", studies, {"p": kids}, numerics=shown))
    assert text.count(here["id"]) == 2  # the run's row and the legend's line
    assert f"oneDNN {here['onednn']}" in text
