"""The one DVC module: stages, pushes, data versions and checkouts, through DVC's CLI.

DVC locks its workspace, so callers run one command at a time; a lock held by another
process is retried briefly rather than failing the round.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from services.faults import crash_point
from services.offline import OFFLINE_ENV
from xbl.errors import ConfigError, XblError
from xbl.files import write_whole

REMOTE_NAME = "local"
REMOTE_DIR = ".dvc-remote"
DEFAULT_PARAMS = "params.yaml"
# dvc.yaml's variable that names the settings file its stage reads and dvc.lock records.
PARAMS_VAR = "params_file"
STAGE_USER_ERROR = 2  # a stage's exit code for "fix this input" (xbl/data/prepare.py)
_PARAMS_VAR_LINE = re.compile(rf"^(\s*-\s*{PARAMS_VAR}:\s*)(\S+)(.*)$", re.MULTILINE)


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
    _ignore_bytecode(project)
    if not dvc(project, "remote", "list").strip():
        (project / REMOTE_DIR).mkdir(exist_ok=True)
        # Given relative to the project; DVC stores it relative to .dvc/, so it moves along.
        dvc(project, "remote", "add", "-d", REMOTE_NAME, REMOTE_DIR)


def _ignore_bytecode(project: Path) -> None:
    """Python's bytecode caches beside a stage's code dependencies would make the stage look
    changed after every import, and dvc.lock would record them."""
    ignore = project / ".dvcignore"
    have = ignore.read_text().splitlines() if ignore.exists() else []
    missing = [p for p in ("__pycache__/", "*.pyc") if p not in have]
    if missing:
        with ignore.open("a") as out:
            out.write("".join(f"{p}\n" for p in missing))


def repro(project: Path, stage: str, params_file: str = DEFAULT_PARAMS) -> None:
    """Reproduce a stage with the settings of `params_file` (a path in the project). A stage
    that exits with 2 named an input the user must fix: that is an XblError (never retried)."""
    with stage_params(project, params_file):
        try:
            dvc(project, "repro", stage)
        except DvcError as err:
            if not str(err).endswith(f", exited with {STAGE_USER_ERROR}"):
                raise
            told = [line for line in str(err).splitlines()[1:] if not line.startswith("ERROR:")]
            raise XblError("\n".join(told) or str(err)) from None


def params_in_project(project: Path, params_file: str) -> str:
    """The settings file as DVC names it: a path inside the project, relative to it."""
    root = Path(project).resolve()
    path = (root / params_file).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"settings file {params_file} is outside the project {root}: DVC records a "
            "stage's settings only from files inside it; copy the file into the project"
        )
    if not path.is_file():
        raise ConfigError(f"settings file not found: {path}")
    name = path.relative_to(root).as_posix()
    if not re.fullmatch(r"[\w./-]+", name):
        raise ConfigError(
            f"settings file {name!r}: DVC's stage command takes it unquoted, so its path may "
            "hold only letters, digits, '_', '-', '.' and '/'; rename it"
        )
    return name


@contextmanager
def stage_params(project: Path, params_file: str) -> Iterator[None]:
    """dvc.yaml's stage reads `params_file` for the length of the block, then params.yaml.

    DVC has no flag for a stage's settings file, and its record (dvc.lock) must name the file
    and values the data really came from: so the one variable that names it is set in dvc.yaml
    and set back, leaving `dvc repro` by hand on params.yaml."""
    spec = Path(project) / "dvc.yaml"
    name = params_in_project(project, params_file)
    if name == DEFAULT_PARAMS and _params_var(spec.read_text()) in (None, DEFAULT_PARAMS):
        yield
        return
    _write_params_var(spec, name)
    try:
        yield
    finally:
        _write_params_var(spec, DEFAULT_PARAMS)


def _params_var(text: str) -> str | None:
    found = _PARAMS_VAR_LINE.search(text)
    return found[2] if found else None


def _write_params_var(spec: Path, value: str) -> None:
    text = spec.read_text()
    if _params_var(text) is None:
        raise ConfigError(
            f"{spec} names no `{PARAMS_VAR}` under `vars`, so its stage reads params.yaml "
            f"only: copy this repository's dvc.yaml, or run without --params"
        )
    if _params_var(text) != value:
        write_whole(spec, _PARAMS_VAR_LINE.sub(rf"\g<1>{value}\g<3>", text, count=1))


def push(project: Path, *targets: str) -> None:
    dvc(project, "push", *targets)


def add(project: Path, path: str) -> str:
    """Track a folder (e.g. a round's feedback masks) and return its content hash."""
    dvc(project, "add", path)
    crash_point("dvc-add")  # fault drill: added (cached, .dvc written), not pushed
    meta = yaml.safe_load((Path(project) / f"{path}.dvc").read_text())
    return meta["outs"][0]["md5"]


def locked_out_hash(project: Path, stage: str, out: str) -> str:
    """The content hash dvc.lock records for a stage output: the data version."""
    lock = yaml.safe_load((Path(project) / "dvc.lock").read_text())
    for entry in lock["stages"][stage]["outs"]:
        if entry["path"].rstrip("/") == out.rstrip("/"):
            return entry["md5"]
    raise DvcError(f"dvc.lock has no output {out!r} for stage {stage!r}")


def checkout_lock(project: Path, lock_text: str, stage: str) -> None:
    """Write a dvc.lock and restore the stage's outputs it describes (from the cache, else the
    remote); nothing outside those outputs is touched."""
    write_whole(Path(project) / "dvc.lock", lock_text)
    try:
        dvc(project, "checkout", "--force", stage)
    except DvcError:
        dvc(project, "pull", "--force", stage)


@contextmanager
def checked_out_copy(project: Path, pointer_text: str) -> Iterator[Path]:
    """What a .dvc pointer describes, checked out (from the cache, else the remote) into a
    scratch folder of the project for the length of the block; the workspace's own copy of
    that output is not touched."""
    meta = yaml.safe_load(pointer_text)
    project = Path(project)
    scratch = Path(tempfile.mkdtemp(prefix=".xbl-checkout-", dir=project))
    try:
        pointer = scratch / f"{Path(meta['outs'][0]['path']).name}.dvc"
        pointer.write_text(
            yaml.safe_dump({**meta, "outs": [{**meta["outs"][0], "path": pointer.stem}]})
        )
        target = pointer.relative_to(project).as_posix()
        try:
            dvc(project, "checkout", target)
        except DvcError:
            dvc(project, "pull", target)
        yield pointer.with_suffix("")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
