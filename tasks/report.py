"""The round report: a page per round, written beside the round's queries and logged to the
feedback run in MLflow (docs/methods.md, "Round report")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task

from services import tracking
from xbl.checkpoint import load_model
from xbl.data import PreparedData
from xbl.feedback import annotation_budget
from xbl.report import probe_indices, report_html, saliency_grid

QUERIES_SHOWN = 8


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
    """report.html with its two saliency grids (the round's queries, the fixed probes) in
    `out_dir`, logged under `report/` in the feedback run. `checkpoints` maps a column title
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
    page = report_html(round_number, table, promotion, annotation_budget(manifests), grids, runs)
    (out / "report.html").write_text(page)
    client = tracking.client_for(Path(project))
    for name in ("report.html", *grids.values()):
        tracking.log_file(client, feedback_run, out / name, "report")
    return str(out / "report.html")
