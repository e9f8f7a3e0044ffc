"""The round report: a page per round, written beside the round's queries and logged to the
feedback run in MLflow (docs/methods.md, "Round report"). The page itself is drawn in
xbl/report/page.py; this step gathers what it shows and writes the files."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from services import screenshot, tracking
from tasks import is_transient
from xbl.data.prepared import PreparedData
from xbl.feedback.cost import annotation_budget
from xbl.labelstudio.agreement import read_agreement
from xbl.report.page import (
    PAGE_WIDTH,
    RoundPage,
    crop_white_bottom,
    page_height,
    report_figure,
    report_html,
    round_grids,
)
from xbl.train.checkpoint import load_model


@task(retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=is_transient)
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
    run. `checkpoints` maps a column title (a role: baseline, champion, candidate) to that
    model's weights."""
    data = PreparedData.load(Path(dataset))
    models = {title: load_model(path)[0] for title, path in checkpoints.items()}
    out = Path(out_dir)
    grids = round_grids(models, data, _asked(queries_json), out)
    annotators = read_agreement(manifests[-1]) if manifests else None
    page = RoundPage(
        round_number, table, promotion, annotation_budget(manifests), grids, runs, annotators
    )
    (out / "report.html").write_text(report_html(page))
    report_png(out / "report.html", page)
    client = tracking.client_for(Path(project))
    for path in (out / "report.html", out / "report.png", *grids.values()):
        tracking.log_file(client, feedback_run, path, "report")
    return str(out / "report.html")


def _asked(queries_json: str | None) -> list[int] | None:
    """The dataset indices the round asked about, in the order asked; None without queries."""
    if not (queries_json and Path(queries_json).is_file()):
        return None
    return [q["index"] for q in json.loads(Path(queries_json).read_text())]


def report_png(html_file: Path, page: RoundPage) -> str:
    """report.png beside the page: the page itself rendered by headless Chromium when there
    is one, else the same content drawn with matplotlib. Returns which of the two drew it."""
    png = html_file.with_suffix(".png")
    if screenshot.screenshot(html_file, png, PAGE_WIDTH, page_height(page)):
        crop_white_bottom(png)
        return "chromium"
    report_figure(page, png)
    return "matplotlib"
