"""The simulated annotator and reviewer: answers and verdicts from the dataset's known masks, with their modelled seconds."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from xbl.labelstudio.interface import (
    APPLIES,
    APPLIES_NAME,
    ATTENTION_LABEL,
    IGNORE_LABEL,
    IMAGE_NAME,
    RATING_NAME,
    RATINGS,
    REVIEW_CHOICES,
    REVIEW_NAME,
)
from xbl.labelstudio.payloads import cell_rectangle
from xbl.labelstudio.results import Cell


def oracle_ignore_cells(
    cells: Iterable[Cell], cell: int, relevance_mask: np.ndarray, max_overlap: float
) -> list[Cell]:
    """The shown cells a careful annotator marks "ignore": those whose share of pixels inside
    the relevance mask (the true evidence) is below `max_overlap`."""
    relevance = np.asarray(relevance_mask, dtype=bool)
    chosen = []
    for row, col in cells:
        patch = relevance[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
        if patch.size and patch.mean() < max_overlap:
            chosen.append((int(row), int(col)))
    return chosen


def oracle_annotation(
    cells: Iterable[Cell],
    cell: int,
    height: int,
    width: int,
    relevance_mask: np.ndarray,
    max_overlap: float,
    scope: str | None = None,
) -> list[dict]:
    """The result a person would submit: each shown cell relabelled "ignore" or kept as
    "model attention" (so the kept cells are the shown ones on the evidence, and become the
    keep mask), and the explanation rated "good" only when nothing is to be ignored. On a
    cluster task (`scope` given: all or review) the answer applies to the members in that
    scope when something was marked, to none when nothing was."""
    cells = [(int(r), int(c)) for r, c in cells]
    ignored = set(oracle_ignore_cells(cells, cell, relevance_mask, max_overlap))
    result = [
        cell_rectangle(
            r, c, cell, height, width, IGNORE_LABEL if (r, c) in ignored else ATTENTION_LABEL
        )
        for r, c in cells
    ]
    result.append(
        {
            "id": "rating",
            "from_name": RATING_NAME,
            "to_name": IMAGE_NAME,
            "type": "choices",
            "value": {"choices": [RATINGS[1] if ignored else RATINGS[0]]},
        }
    )
    if scope is not None:
        said = {v: k for k, v in APPLIES.items()}[scope if ignored else "none"]
        result.append(_choice_region(APPLIES_NAME, said))
    return result


def _choice_region(name: str, value: str) -> dict:
    return {
        "id": name,
        "from_name": name,
        "to_name": IMAGE_NAME,
        "type": "choices",
        "value": {"choices": [value]},
    }


def oracle_accepts(mask: np.ndarray, relevance_mask: np.ndarray, max_overlap: float) -> bool:
    """The simulated reviewer's click: accept a nonempty carried mask when at most
    `max_overlap` of it lies on the evidence (the rule it applies to cells)."""
    mask = np.asarray(mask, dtype=bool)
    on_evidence = (mask & np.asarray(relevance_mask, dtype=bool)).sum()
    return bool(mask.any() and on_evidence <= max_overlap * mask.sum())


def review_result(accept: bool) -> list[dict]:
    return [_choice_region(REVIEW_NAME, REVIEW_CHOICES[0 if accept else 1])]


def oracle_seconds(seconds: dict[str, float], kind: str, relabelled: int = 0) -> float:
    """The simulated annotator's time on one task by the per-action time model (docs/methods.md,
    "Annotation cost"): `task` to open and read an image task, plus `region` per region
    relabelled, plus `montage` on a cluster task; `review` per review task."""
    if kind == "review":
        return float(seconds["review"])
    extra = seconds["montage"] if kind == "cluster" else 0.0
    return float(seconds["task"] + seconds["region"] * relabelled + extra)
