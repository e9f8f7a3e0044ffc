"""The round report: a page per round, written beside the round's queries and logged to the
feedback run in MLflow (docs/methods.md, "Round report"), and the round's figures in the
project's metrics/ folder for `dvc metrics` and `dvc plots`. The page itself is drawn in
xbl/report/page.py, the metrics files in xbl/report/rounds.py; this step gathers what they
show and writes the files."""

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
from xbl.report.rounds import METRICS_ROOT, write_round_metrics
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
    model's weights. The figures go to metrics/ first: they need no model, so a page that
    cannot be drawn still leaves them."""
    client = tracking.client_for(Path(project))
    round_metrics(client, Path(project), round_number, table, promotion, runs.get("candidate"))
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
    for path in (out / "report.html", out / "report.png", *grids.values()):
        tracking.log_file(client, feedback_run, path, "report")
    return str(out / "report.html")


# how services/tracking.py names what it logs on a run: a learning curve `curve/<name>` at
# step=epoch, the promotion's paired figures `promotion/<figure>`
CURVE_PREFIX = "curve/"
DECISION_PREFIX = "promotion/"


def round_metrics(
    client, project: Path, round_number: int, table: list[dict], promotion: dict, run: str | None
) -> list[Path]:
    """The round's figures in the project's metrics/ (xbl/report/rounds.py), the candidate's
    learning curves and recorded decision read from its `run`: `xbl report` passes only the
    verdict, so the p-value comes from the run where `promotion` lacks it. A run this store
    does not hold gives neither: the page, drawn from run ids alone, still gets its figures."""
    curves, recorded = [], {}
    if run is not None and tracking.run_exists(client, run):
        logged = client.get_run(run).data.metrics
        recorded = {
            k.removeprefix(DECISION_PREFIX): v
            for k, v in logged.items()
            if k.startswith(DECISION_PREFIX)
        }
        curves = learning_curves(client, run, [k for k in logged if k.startswith(CURVE_PREFIX)])
    decision = {**recorded, **promotion}
    return write_round_metrics(project / METRICS_ROOT, round_number, table, decision, curves)


def learning_curves(client, run: str, names: list[str]) -> list[dict]:
    """The run's curves `names` as MLflow holds them: one dict per epoch, `epoch` and each
    curve's value (an epoch a retried attempt logged again is still one row)."""
    epochs: dict[int, dict] = {}
    for name in names:
        for point in client.get_metric_history(run, name):
            row = epochs.setdefault(point.step, {"epoch": point.step})
            row[name.removeprefix(CURVE_PREFIX)] = point.value
    return [epochs[e] for e in sorted(epochs)]


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
