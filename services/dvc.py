"""The one DVC module: stages, pushes, data versions and checkouts, through DVC's CLI.

DVC locks its workspace, so callers run one command at a time; a lock held by another
process is retried briefly rather than failing the round.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from services.offline import OFFLINE_ENV

REMOTE_NAME = "local"
REMOTE_DIR = ".dvc-remote"


class DvcError(RuntimeError):
    pass


def dvc(project: Path, *args: str, attempts: int = 5) -> str:
    """Run `dvc ARGS` in the project; returns stdout."""
    cmd = [sys.executable, "-m", "dvc", *args]
    # Stage commands say `python`: make it this interpreter, whatever PATH the caller had.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE_ENV, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    for attempt in range(attempts):
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout
        if "Unable to acquire lock" not in proc.stderr or attempt == attempts - 1:
            raise DvcError(f"`dvc {' '.join(args)}` failed in {project}:\n{proc.stderr.strip()}")
        time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def ensure_repo(project: Path) -> None:
    """DVC-initialise the project (inside git when there is one) with a local default remote."""
    project = Path(project)
    if not (project / ".dvc").is_dir():
        scm = (project / ".git").exists()
        dvc(project, "init", *([] if scm else ["--no-scm"]))
        dvc(project, "config", "core.analytics", "false")
    if not dvc(project, "remote", "list").strip():
        (project / REMOTE_DIR).mkdir(exist_ok=True)
        # Given relative to the project; DVC stores it relative to .dvc/, so it moves along.
        dvc(project, "remote", "add", "-d", REMOTE_NAME, REMOTE_DIR)


def repro(project: Path, stage: str) -> None:
    dvc(project, "repro", stage)


def push(project: Path, *targets: str) -> None:
    dvc(project, "push", *targets)


def add(project: Path, path: str) -> str:
    """Track a folder (e.g. a round's feedback masks) and return its content hash."""
    dvc(project, "add", path)
    meta = yaml.safe_load((Path(project) / f"{path}.dvc").read_text())
    return meta["outs"][0]["md5"]


def locked_out_hash(project: Path, stage: str, out: str) -> str:
    """The content hash dvc.lock records for a stage output: the data version."""
    lock = yaml.safe_load((Path(project) / "dvc.lock").read_text())
    for entry in lock["stages"][stage]["outs"]:
        if entry["path"].rstrip("/") == out.rstrip("/"):
            return entry["md5"]
    raise DvcError(f"dvc.lock has no output {out!r} for stage {stage!r}")


def checkout_lock(project: Path, lock_text: str, targets: list[str]) -> None:
    """Restore the data a dvc.lock describes: from the cache, else from the remote."""
    restore(project, "dvc.lock", lock_text, targets)


def restore(project: Path, pointer: str, text: str, targets: list[str]) -> None:
    """Write a DVC pointer (dvc.lock or a .dvc file) and check out what it describes: from
    the cache, else from the remote."""
    (Path(project) / pointer).write_text(text)
    try:
        dvc(project, "checkout", "--force", *targets)
    except DvcError:
        dvc(project, "pull", "--force", *targets)
