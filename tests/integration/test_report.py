"""The round report's PNG: the HTML page rendered by headless Chromium where /usr/bin/chromium
exists, else the same content drawn with matplotlib; written beside report.html and logged to
the feedback run in MLflow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from services import screenshot, tracking
from tasks.report import report_png, round_report
from xbl.config import DataConfig
from xbl.data.build import build_dataset
from xbl.report.page import PAGE_WIDTH, RoundPage, report_html
from xbl.train.checkpoint import initial_model, save_checkpoint

TABLE = [
    {"role": "baseline = champion", "model": "baseline", "audit_accuracy": 0.75, "test": 0.74},
    {"role": "candidate", "model": "feedback-round-2", "audit_accuracy": 0.947, "test": 0.958},
]
PROMOTION = {"promoted": True, "reason": "audit accuracy 0.947 against the champion's 0.750"}
BUDGET = {"answers": 50, "annotator_seconds": 90.0}
RUNS = {"baseline": "a" * 32, "candidate": "b" * 32}

needs_chromium = pytest.mark.skipif(
    not screenshot.available(), reason="no /usr/bin/chromium: the matplotlib path is tested"
)


@pytest.fixture
def no_chromium(monkeypatch):
    monkeypatch.setattr(screenshot, "CHROMIUM", Path("/nonexistent/chromium"))


def assert_a_picture_of_the_page(png: Path) -> None:
    """A PNG of plausible size (the page's width, the height of text plus two grids) that is
    not blank: dark text and the dark saliency maps on white."""
    assert png.is_file() and 10_000 < png.stat().st_size < 5_000_000
    with Image.open(png) as img:
        assert img.format == "PNG"
        width, height = img.size
        gray = np.asarray(img.convert("L"), dtype=float)
    assert width == PAGE_WIDTH and 900 < height < 8000
    assert gray.std() > 20  # not one flat colour
    assert 0.02 < (gray < 128).mean() < 0.9  # ink and paper both


def write_page(folder: Path) -> tuple[Path, RoundPage]:
    """A report page with two grids of noise pictures, as report_html writes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    grids = {}
    for name, title in [("queries.png", "The round's queries"), ("probes.png", "Probes")]:
        fig, axes = plt.subplots(4, 3, figsize=(4.8, 6.4))
        for ax in axes.flat:
            ax.imshow(rng.random((28, 28)), cmap="inferno")
            ax.axis("off")
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        grids[title] = folder / name
    page = RoundPage(2, TABLE, PROMOTION, BUDGET, grids, RUNS)
    (folder / "report.html").write_text(report_html(page))
    return folder / "report.html", page


@needs_chromium
def test_chromium_renders_the_page_into_a_png(tmp_path):
    html_file, page = write_page(tmp_path)

    started = time.monotonic()
    drawn_by = report_png(html_file, page)

    assert drawn_by == "chromium" and time.monotonic() - started < 60
    assert_a_picture_of_the_page(tmp_path / "report.png")


def test_without_chromium_matplotlib_draws_the_same_content(tmp_path, no_chromium):
    html_file, page = write_page(tmp_path)

    assert report_png(html_file, page) == "matplotlib"
    assert_a_picture_of_the_page(tmp_path / "report.png")


def test_a_failing_browser_falls_back_to_matplotlib(tmp_path, monkeypatch):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'cannot open display' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(screenshot, "CHROMIUM", fake)
    html_file, page = write_page(tmp_path)

    assert report_png(html_file, page) == "matplotlib"
    assert_a_picture_of_the_page(tmp_path / "report.png")


@pytest.fixture(scope="module")
def finished_round(tmp_path_factory):
    """A project with prepared data, two models' checkpoints, queries and an MLflow store."""
    root = tmp_path_factory.mktemp("report")
    project = root / "project"
    data = build_dataset(DataConfig(), project, project / "data" / "prepared")
    checkpoints = {}
    for title, seed in [("baseline = champion", 0), ("candidate", 1)]:
        model = initial_model("small_cnn", data, seed)
        meta = {"model": "small_cnn", "in_channels": 1, "n_classes": 10, "image_size": 28}
        checkpoints[title] = str(save_checkpoint(model, root / f"{seed}.pt", meta))
    queries = root / "queries.json"
    queries.write_text(json.dumps([{"index": int(i)} for i in data.indices("train")[:4]]))
    client = tracking.client_for(project)
    return project, checkpoints, queries, client, client.create_experiment("report-png")


@pytest.mark.parametrize("browser", ["chromium", "matplotlib"])
def test_the_round_report_task_writes_and_logs_the_png(
    finished_round, tmp_path, monkeypatch, browser
):
    """The task as a round runs it: report.png beside report.html, both under report/ in the
    feedback run."""
    if browser == "chromium" and not screenshot.available():
        pytest.skip("no /usr/bin/chromium")
    if browser == "matplotlib":
        monkeypatch.setattr(screenshot, "CHROMIUM", tmp_path / "no-chromium")
    project, checkpoints, queries, client, experiment = finished_round
    run = client.create_run(experiment).info.run_id
    out = project / "data" / "rounds" / f"round-{browser}"

    page = round_report.fn(
        str(project),
        str(project / "data" / "prepared"),
        2,
        checkpoints,
        RUNS,
        str(queries),
        [],
        TABLE,
        PROMOTION,
        run,
        str(out),
    )

    assert page == str(out / "report.html")
    assert_a_picture_of_the_page(out / "report.png")
    uri = tracking.tracking_uri(project)
    logged = {a.path for a in MlflowClient(uri, uri).list_artifacts(run, "report")}
    assert logged == {
        f"report/{name}" for name in ("report.html", "report.png", "queries.png", "probes.png")
    }
