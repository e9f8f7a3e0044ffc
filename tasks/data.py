"""Data steps: build and version the dataset with DVC, version the annotators' masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task

from services import dvc
from tasks import is_transient
from xbl.paths import FEEDBACK_ROOT

PREPARE_STAGE = "prepare"


@dataclass(frozen=True)
class DataRef:
    path: str  # the prepared dataset folder
    version: str  # DVC content hash of the prepared output
    out: str  # the DVC-tracked output folder, relative to the project


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=is_transient)
def prepare_data(project: str, out: str, params_file: str = dvc.DEFAULT_PARAMS) -> DataRef:
    """Run the DVC `prepare` stage on the run's settings file (its output: `data.out`), push
    it, return its version."""
    root = Path(project)
    dvc.ensure_repo(root)
    dvc.repro(root, PREPARE_STAGE, params_file)
    dvc.push(root, PREPARE_STAGE)
    version = dvc.locked_out_hash(root, PREPARE_STAGE, out)
    return DataRef(path=str(root / out), version=version, out=out)


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=is_transient)
def version_feedback(project: str, feedback_root: str = FEEDBACK_ROOT) -> str:
    """Track every round's masks with DVC, push them, and return their content hash."""
    root = Path(project)
    dvc.ensure_repo(root)
    version = dvc.add(root, feedback_root)
    dvc.push(root, f"{feedback_root}.dvc")
    return version
