"""Restore the exact data an MLflow run used, from its logged dvc.lock."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks import dvc, tracking


def checkout_run_data(project: Path, run_id: str) -> str:
    """Write the run's dvc.lock into the project and check its data out; returns the version."""
    client = tracking.client_for(project)
    run = client.get_run(run_id)
    version = run.data.tags.get(tracking.DATA_VERSION_TAG)
    if version is None:
        raise ValueError(f"run {run_id} has no {tracking.DATA_VERSION_TAG} tag: not an xbl run")
    with tempfile.TemporaryDirectory() as tmp:
        lock = Path(client.download_artifacts(run_id, "dvc.lock", tmp)).read_text()
    dvc.checkout_lock(project, lock, ["prepare"])
    return version
