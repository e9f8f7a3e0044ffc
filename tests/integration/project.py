"""A throw-away xbl project (git + DVC + MLflow SQLite), as the integration tests build it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

TINY_TRAIN = {"epochs": 4, "patience": 2, "batch_size": 64}


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
    """Make a project a Prefect worker can run: the flows, tasks and services beside its xbl
    (the webhook receiver and the team stack run outside it), and prefect.yaml with its
    schedules paused: the deployment still carries the cron of the project's params.yaml, but
    a run at :00 must not race a test's run."""
    for package in ("flows", "tasks", "services"):
        shutil.copytree(
            REPO / package, project / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        for schedule in deployment.get("schedules", []):
            schedule["active"] = False
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return project
