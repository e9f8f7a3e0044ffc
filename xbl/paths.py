"""Where a project keeps what each round makes, named once: the round's working folder (queries,
saliency PNGs, report) and its feedback masks (one DVC-tracked folder for every round)."""

from __future__ import annotations

from pathlib import Path

ROUNDS_ROOT = "data/rounds"  # every round's queries, saliency PNGs and report
FEEDBACK_ROOT = "data/feedback"  # every round's masks, one DVC-tracked folder
FEEDBACK_MANIFEST = "manifest.csv"


def round_name(n: int) -> str:
    return f"round-{n}"


def round_dir(project: str | Path, n: int) -> Path:
    """Round `n`'s queries, saliency PNGs and report."""
    return Path(project) / ROUNDS_ROOT / round_name(n)


def feedback_dir(project: str | Path, n: int) -> Path:
    """Round `n`'s masks and their manifest."""
    return Path(project) / FEEDBACK_ROOT / round_name(n)


def feedback_manifest(project: str | Path, n: int) -> Path:
    return feedback_dir(project, n) / FEEDBACK_MANIFEST
