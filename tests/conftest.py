"""Shared fixtures: a throw-away xbl project (git + DVC + MLflow SQLite) and Prefect."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services import offline as _offline  # noqa: F401

pytest_plugins = ["tests.ls_server"]

REPO = Path(__file__).resolve().parent.parent

TINY_TRAIN = {"epochs": 4, "patience": 2, "batch_size": 64}


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    """A real (temporary) Prefect server for every flow the tests run."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def make_project(root: Path, **overrides) -> Path:
    """A copy of this repo's pipeline files in a fresh git repo, with settings overridden.

    The DVC stage runs `python -m xbl.data.prepare` inside the project: it imports the project's
    copy of the whole xbl package, not only the files dvc.yaml lists as dependencies."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "xbl", root / "xbl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "README.md").write_text("raw data\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # what a clone ignores, tests ignore
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def as_worker_project(project: Path) -> Path:
    """Make a project a Prefect worker can run: the flows, tasks and services beside its xbl,
    and prefect.yaml without its hourly schedule (a run at :00 must not race a test's run)."""
    for package in ("flows", "tasks", "services"):
        shutil.copytree(
            REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        deployment.pop("schedules", None)
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return project


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    return make_project(tmp_path / "project", train=TINY_TRAIN)
