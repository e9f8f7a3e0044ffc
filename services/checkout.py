"""Restore the exact data an MLflow run used, from its logged dvc.lock (and, for a feedback
run, its logged feedback.dvc: the annotators' masks it learnt from).

The prepared data is replaced by the run's version (it is derived, and every version stays in
DVC's cache and remote). The masks are never replaced: a later round's masks, or a mask
collected again since the run, are annotators' work that the next round must still learn from.
The run's masks are added where they are missing, and a differing current mask is kept and
named."""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services import dvc, tracking
from xbl.errors import ConfigError
from xbl.paths import FEEDBACK_ROOT

log = logging.getLogger(__name__)

FEEDBACK_POINTER = "feedback.dvc"  # as logged on a feedback run
PREPARE_STAGE = "prepare"


@dataclass(frozen=True)
class MasksRestored:
    """What restoring a run's masks did to data/feedback (paths relative to it)."""

    restored: tuple[str, ...] = ()  # the run's files that were missing: written back
    kept: tuple[str, ...] = ()  # files that differ from the run's: the current one kept
    later: tuple[str, ...] = ()  # files the run did not have (later rounds): kept

    def lines(self) -> list[str]:
        """What a user reads after the checkout."""
        out = [f"{FEEDBACK_ROOT}: {len(self.restored)} mask file(s) of the run written back"]
        if self.later:
            out.append(
                f"  kept {len(self.later)} file(s) the run did not have: {_rounds(self.later)}"
            )
        if self.kept:
            out.append(
                f"  kept {len(self.kept)} current file(s) that differ from the run's "
                f"(collected again since): {', '.join(self.kept)}"
            )
        return out


@dataclass(frozen=True)
class RunData:
    version: str  # the prepared data's DVC hash
    masks: MasksRestored | None  # None: the run learnt from no masks


def checkout_run_data(project: Path, run_id: str) -> str:
    """Restore the run's prepared data and add back its masks; returns the data version.
    When data/feedback is not exactly the run's masks, a warning says how it differs."""
    restored = restore_run_data(project, run_id)
    masks = restored.masks
    if masks is not None:
        differs = masks.restored or masks.kept or masks.later
        (log.warning if differs else log.info)("%s", "\n".join(masks.lines()))
    return restored.version


def restore_run_data(project: Path, run_id: str) -> RunData:
    """The run's prepared data checked out (dvc.lock updated), its masks added back without
    removing or overwriting any mask in the project."""
    version, lock, pointer = _logged_pointers(Path(project), run_id)
    dvc.checkout_lock(project, lock, PREPARE_STAGE)
    masks = None if pointer is None else restore_masks(Path(project), pointer)
    return RunData(version, masks)


def _logged_pointers(project: Path, run_id: str) -> tuple[str, str, str | None]:
    """(data version, dvc.lock text, feedback.dvc text or None) as the run logged them."""
    client = tracking.client_for(project)
    run = client.get_run(run_id)
    version = run.data.tags.get(tracking.DATA_VERSION_TAG)
    if version is None:
        raise ConfigError(f"run {run_id} has no {tracking.DATA_VERSION_TAG} tag: not an xbl run")
    logged = {a.path for a in client.list_artifacts(run_id)}
    if "dvc.lock" not in logged:
        raise ConfigError(
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
    return version, lock, pointer


def restore_masks(project: Path, pointer_text: str) -> MasksRestored:
    """Add the masks a feedback.dvc pointer describes to data/feedback: missing files are
    written back, every file already there stays as it is."""
    with dvc.checked_out_copy(project, pointer_text) as theirs:
        return merge_missing(theirs, project / FEEDBACK_ROOT)


def merge_missing(theirs: Path, ours: Path) -> MasksRestored:
    """Copy the files of `theirs` that `ours` lacks; never overwrite or delete a file."""
    restored, kept = [], []
    for src in sorted(p for p in theirs.rglob("*") if p.is_file()):
        rel = src.relative_to(theirs)
        dst = ours / rel
        if not dst.exists():
            _copy_whole(src, dst)
            restored.append(rel.as_posix())
        elif not filecmp.cmp(src, dst, shallow=False):
            kept.append(rel.as_posix())
    theirs_files = {p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file()}
    later = sorted(
        p.relative_to(ours).as_posix()
        for p in ours.rglob("*")
        if p.is_file() and p.relative_to(ours) not in theirs_files
    )
    return MasksRestored(tuple(restored), tuple(kept), tuple(later))


def _copy_whole(src: Path, dst: Path) -> None:
    """A file appears whole or not at all (a reader never takes half a mask)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _rounds(paths: tuple[str, ...]) -> str:
    """The top folders (round-N) the paths fall in."""
    return ", ".join(sorted({p.split("/", 1)[0] for p in paths}))
