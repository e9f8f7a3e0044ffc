"""Restore the exact data an MLflow run used, from its logged dvc.lock (and, for a feedback
run, its logged feedback.dvc: the annotators' masks it learnt from)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from services import dvc, tracking
from xbl.paths import FEEDBACK_ROOT

FEEDBACK_POINTER = "feedback.dvc"  # as logged on a feedback run


def checkout_run_data(project: Path, run_id: str) -> str:
    """Write the run's dvc.lock (and feedback.dvc) into the project and check the data out;
    returns the data version."""
    client = tracking.client_for(project)
    run = client.get_run(run_id)
    version = run.data.tags.get(tracking.DATA_VERSION_TAG)
    if version is None:
        raise ValueError(f"run {run_id} has no {tracking.DATA_VERSION_TAG} tag: not an xbl run")
    logged = {a.path for a in client.list_artifacts(run_id)}
    if "dvc.lock" not in logged:
        raise ValueError(
            f"run {run_id} ({run.info.run_name}) logged no dvc.lock: check out one "
            "of its model runs (baseline, feedback-round-N) instead"
        )
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(client.download_artifacts(run_id, "dvc.lock", tmp)).read_text()
        pointer = (
            Path(client.download_artifacts(run_id, FEEDBACK_POINTER, tmp)).read_text()
            if FEEDBACK_POINTER in logged
            else None
        )
    dvc.checkout_lock(project, lock, ["prepare"])
    if pointer is not None:
        dvc.restore(project, f"{FEEDBACK_ROOT}.dvc", pointer, [f"{FEEDBACK_ROOT}.dvc"])
    return version
