"""The round report: a page per round, written beside the round's queries and logged to the
feedback run in MLflow (docs/methods.md, "Round report")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task

from services import screenshot, tracking
from xbl.data.prepared import PreparedData
from xbl.feedback.cost import annotation_budget
from xbl.report.page import (
    crop_white_bottom,
    page_height,
    probe_indices,
    report_figure,
    report_html,
    saliency_grid,
)
from xbl.train.checkpoint import load_model

QUERIES_SHOWN = 8
PAGE_WIDTH = 1100  # the page's own max-width


@task(retries=2, retry_delay_seconds=[5, 15])
def round_report(
    project: str,
    dataset: str,
    round_number: int,
    checkpoints: dict[str, str],
    runs: dict[str, str],
    queries_json: str | None,
    manifests: list[str],
    table: list[dict],
    promotion: dict,
    feedback_run: str,
    out_dir: str,
) -> str:
    """report.html with its two saliency grids (the round's queries, the fixed probes) and
    report.png, a picture of the page, in `out_dir`, logged under `report/` in the feedback
    run. `checkpoints` maps a column title
    (a role: baseline, champion, candidate) to that model's weights."""
    data = PreparedData.load(Path(dataset))
    models = {title: load_model(path)[0] for title, path in checkpoints.items()}
    out = Path(out_dir)
    grids = {}
    if queries_json and Path(queries_json).is_file():
        asked = [q["index"] for q in json.loads(Path(queries_json).read_text())][:QUERIES_SHOWN]
        saliency_grid(models, data, np.array(asked), out / "queries.png")
        grids["The round's queries: where each model looks"] = "queries.png"
    saliency_grid(models, data, probe_indices(data), out / "probes.png")
    grids["Held-out probes, the same every round"] = "probes.png"
    budget = annotation_budget(manifests)
    page = report_html(round_number, table, promotion, budget, grids, runs)
    (out / "report.html").write_text(page)
    paths = {title: out / name for title, name in grids.items()}
    report_png(out / "report.html", round_number, table, promotion, budget, paths, runs)
    client = tracking.client_for(Path(project))
    for name in ("report.html", "report.png", *grids.values()):
        tracking.log_file(client, feedback_run, out / name, "report")
    return str(out / "report.html")


def report_png(
    page: Path,
    round_number: int,
    table: list[dict],
    promotion: dict,
    budget: dict,
    grids: dict[str, Path],
    runs: dict[str, str],
) -> str:
    """report.png beside the page: the page itself rendered by headless Chromium when there
    is one, else the same content drawn with matplotlib. Returns which of the two drew it."""
    png = page.with_suffix(".png")
    height = page_height(table, runs, list(grids.values()), PAGE_WIDTH)
    if screenshot.screenshot(page, png, PAGE_WIDTH, height):
        crop_white_bottom(png)
        return "chromium"
    report_figure(round_number, table, promotion, budget, grids, runs, png, PAGE_WIDTH)
    return "matplotlib"
