"""The MLflow UI checked in a real browser: a small study served by `art-study ui`, rendered by
headless Chromium (Debian's `chromium`, driven by Playwright), runs, tags and the compare view.

Screenshots of every step land in `test-artifacts/ui/` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "test-artifacts" / "ui"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PAGE_TIMEOUT_MS = 60_000  # the test machine is slow and shared
SERVER_TIMEOUT_S = 180


def _numbers_on_row(page, label) -> list[float]:
    """The numbers shown on the table row of `label` (the elements level with it, to its right)."""
    row = label.bounding_box()
    middle = row["y"] + row["height"] / 2
    cells = page.get_by_text(re.compile(r"^\s*-?\d+(\.\d+)?(e-?\d+)?\s*$"))
    numbers = []
    for i in range(cells.count()):
        box = cells.nth(i).bounding_box()
        if box and box["y"] <= middle <= box["y"] + box["height"] and box["x"] > row["x"]:
            numbers.append(float(cells.nth(i).inner_text()))
    return numbers


def check_run_page(page, client, base: str, experiment_id: str, run_id: str) -> None:
    """A run's page says what it is: its description (the one-line summary) and its dataset
    (name and digest); its artifact view shows the robustness curve as an image."""
    from art_study.run_page import CURVE_ARTIFACT, NOTE_TAG

    run = client.get_run(run_id)
    note = run.data.tags[NOTE_TAG]
    assert note.startswith("clean accuracy ")
    page.get_by_text(note, exact=True).first.wait_for()
    dataset = run.inputs.dataset_inputs[0].dataset
    shown = page.get_by_text(re.compile(rf"{dataset.name}.*{dataset.digest[:8]}")).first
    shown.wait_for()
    shown.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "04-run-description-dataset.png", full_page=True)

    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{CURVE_ARTIFACT}")
    page.get_by_text(CURVE_ARTIFACT, exact=True).first.wait_for()  # the preview's title
    widest = "() => Math.max(0, ...Array.from(document.images, img => img.naturalWidth))"
    page.wait_for_function(f"({widest})() >= 600")  # the figure, not an icon, is shown
    page.screenshot(path=SHOTS / "05-run-robustness-curve.png", full_page=True)


def _browser_prerequisites():
    """Playwright's sync API; fails (never skips) with what to install when something is missing."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium "
                    "(`apt-get install -y --no-install-recommends chromium`, as .ci/run does)",
                    pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[dev]'` (make install)",
                    pytrace=False)
    return sync_playwright


def _two_run_study(store: Path, mnist_dir: Path):
    """The tiny study cut to two child runs: the control and adversarial training alone."""
    from art_study.config import load_config
    from art_study.study import run_study

    uri = f"sqlite:///{store / 'mlflow.db'}"
    cfg = load_config(TINY, [
        f"tracking.uri={uri}", f"data.dir={mnist_dir}",
        "study.blocks=[{depths: [2], sequences: [control, [adversarial_training]]}]",
        "study.register=true"])
    result = run_study(cfg, progress=False)
    assert len(result.runs) == 2 and not result.failed
    return uri, result


@pytest.mark.browser
def test_mlflow_ui_renders_runs_tags_and_compare_view(tmp_path, mnist_dir, mlflow_ui) -> None:
    sync_playwright = _browser_prerequisites()  # before the study: fail fast without a browser
    import mlflow

    uri, result = _two_run_study(tmp_path, mnist_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name("art-study").experiment_id
    kids = {r.spec.sequence: r.run_id for r in result.runs}
    assert set(kids) == {"none", "adversarial_training"}

    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    # `art-study ui` prints its loopback address and serves the store's experiments there.
    first, base, served = mlflow_ui(uri)
    assert base.startswith("http://127.0.0.1:") and base in first
    assert "art-study" in served
    profile = tmp_path / "chromium-profile"  # a fresh user-data-dir for every run
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        context.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
        page = context.new_page()
        try:
            # 1. The experiment's runs table: the study's parent run, expanded to its children.
            page.goto(f"{base}/#/experiments/{experiment_id}/runs")
            page.get_by_text("tiny", exact=True).first.wait_for()
            if not page.get_by_text("none | 2conv | seed 0").count():
                page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            for name in ("none | 2conv | seed 0", "adversarial_training | 2conv | seed 0"):
                page.get_by_text(name, exact=True).first.wait_for()
            page.screenshot(path=SHOTS / "01-experiment-runs.png", full_page=True)

            # 2. A child run's page lists our tags, e.g. `sequence: adversarial_training`.
            page.goto(f"{base}/#/experiments/{experiment_id}/runs/{kids['adversarial_training']}")
            page.get_by_text("adversarial_training | 2conv | seed 0").first.wait_for()
            for key, value in (("sequence", "adversarial_training"), ("depth", "2")):
                tag = page.get_by_title(key, exact=True).first.locator("xpath=..")
                tag.wait_for()
                assert tag.inner_text().replace("\n", "") == f"{key}: {value}"
            page.get_by_role("link", name="tiny", exact=True).first.wait_for()  # parent run
            page.screenshot(path=SHOTS / "02-run-tags.png", full_page=True)
            check_run_page(page, client, base, experiment_id, kids["adversarial_training"])

            # The study registered both models (study.register), with their robustness as tags.
            versions = client.search_model_versions("name = 'tiny'")
            assert sorted(v.run_id for v in versions) == sorted(kids.values())
            page.goto(f"{base}/#/models/tiny/versions/1")
            page.get_by_text("robustness.clean_accuracy").first.wait_for()
            page.screenshot(path=SHOTS / "06-registered-version-tags.png", full_page=True)

            # 3. The compare view of the two children: `clean/accuracy` with each run's value
            # on its row (MLflow 3: #/compare-runs?runs=[ids]&experiments=[ids], JSON).
            runs = quote(json.dumps(sorted(kids.values())))
            experiments = quote(json.dumps([experiment_id]))
            page.goto(f"{base}/#/compare-runs?runs={runs}&experiments={experiments}")
            page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
            label = page.get_by_text("clean/accuracy", exact=True).first
            label.wait_for()
            label.scroll_into_view_if_needed()
            shown = _numbers_on_row(page, label)
            for run_id in sorted(kids.values()):
                value = client.get_run(run_id).data.metrics["clean/accuracy"]
                assert any(abs(v - value) < 1e-3 for v in shown), (
                    f"clean/accuracy {value} of run {run_id} not on its row: {shown}")
            page.screenshot(path=SHOTS / "03-compare-runs.png", full_page=True)
        except Exception:
            page.screenshot(path=SHOTS / "failure.png", full_page=True)
            raise
        finally:
            context.close()
