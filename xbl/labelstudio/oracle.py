"""The simulated annotator and reviewer (`labelstudio.annotator: oracle`), perfect or imperfect:
what it knows (each image's relevance mask), what it marks and accepts, its modelled seconds.

Pure: services/labelstudio.py reads the tasks and submits what `Oracle` answers; the
benchmarks (bench/) ask the same rules for many images at once (`oracle_marks`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
from xbl.labelstudio.payloads import cell_rectangle, decode_mask
from xbl.labelstudio.results import Cell, relabelled_regions

if TYPE_CHECKING:  # the type only: reading the data needs no torch here
    from xbl.data.prepared import PreparedData

log = logging.getLogger(__name__)

# an annotation's result and its lead time in seconds, as Label Studio stores them
Answer = tuple[list[dict], float]

IMPERFECTIONS = ("wrong", "incomplete")


# --- what it knows ----------------------------------------------------------------------------


class _RelevanceByID(Mapping):
    """Read on first look: a round answers a handful of a pool's images, and a prepared
    dataset reads its masks from disk row by row."""

    def __init__(self, data: PreparedData, positions: dict[str, int]):
        self._data, self._positions = data, positions

    def __getitem__(self, image_id: str) -> np.ndarray:
        return self._data.relevance[self._positions[image_id]]

    def __contains__(self, image_id: object) -> bool:  # Mapping's own would read the mask
        return image_id in self._positions

    def __iter__(self) -> Iterator[str]:
        return iter(self._positions)

    def __len__(self) -> int:
        return len(self._positions)


def relevance_lookup(
    data: PreparedData, image_ids: Iterable[str] | None = None
) -> Mapping[str, np.ndarray]:
    """Image id -> relevance mask (the true evidence) from the prepared data, for `image_ids`
    (None: every image). An id the data does not hold is left out, so its task goes
    unanswered."""
    positions = {str(image_id): i for i, image_id in enumerate(data.ids)}
    if image_ids is not None:
        wanted = (str(image_id) for image_id in image_ids)
        positions = {image_id: positions[image_id] for image_id in wanted if image_id in positions}
    return _RelevanceByID(data, positions)


# --- what it marks ----------------------------------------------------------------------------


def _off_evidence(relevance: np.ndarray, row: int, col: int, cell: int, max_overlap: float) -> bool:
    """Less than `max_overlap` of the cell lies on the evidence; a cell outside the image holds
    no pixel to judge, and is left alone."""
    patch = relevance[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
    return bool(patch.size and patch.mean() < max_overlap)


def oracle_ignore_cells(
    cells: Iterable[Cell], cell: int, relevance_mask: np.ndarray, max_overlap: float
) -> list[Cell]:
    """The shown cells a careful annotator marks "ignore": those whose share of pixels inside
    the relevance mask (the true evidence) is below `max_overlap`."""
    relevance = np.asarray(relevance_mask, dtype=bool)
    return [
        (int(row), int(col))
        for row, col in cells
        if _off_evidence(relevance, row, col, cell, max_overlap)
    ]


def oracle_marks(
    shown: np.ndarray, cell: int, relevance: np.ndarray, max_overlap: float
) -> np.ndarray:
    """`oracle_ignore_cells` for many images at once: `shown` (n,k,2) cells per image and the
    images' relevance masks (n,H,W) -> (n,k) bool, True where it marks "ignore"."""
    relevance = np.asarray(relevance, dtype=bool)
    marks = np.zeros(np.shape(shown)[:2], dtype=bool)
    for n, cells in enumerate(shown):
        marks[n] = [_off_evidence(relevance[n], r, c, cell, max_overlap) for r, c in cells]
    return marks


def _imperfection(kind: str) -> int:
    if kind not in IMPERFECTIONS:
        raise ValueError(f"unknown imperfection {kind!r}; choose one of {IMPERFECTIONS}")
    return IMPERFECTIONS.index(kind)


def imperfect_marks(marks: np.ndarray, kind: str, rate: float, seed: int) -> np.ndarray:
    """The annotator's marks (n,k) spoilt on purpose, as a careless person might.

    `wrong`: each shown cell it kept as evidence is marked "ignore" with probability `rate`.
    `incomplete`: each cell it marked "ignore" (the decoy's among them) is left unmarked with
    probability `rate`. One uniform draw per shown cell, from (seed, kind): a higher rate
    spoils a superset of the answers a lower one spoils.
    """
    draw = np.random.default_rng([seed, _imperfection(kind)]).random(np.shape(marks))
    hit = draw < rate
    return marks | hit if kind == "wrong" else marks & ~hit


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


def imperfect_verdict(accept: bool, kind: str, rate: float, rng: np.random.Generator) -> bool:
    """The reviewer erring in its annotator's direction at `rate`: a `wrong` one accepts a mask
    on the evidence, an `incomplete` one rejects a good mask. It draws only for a verdict it
    could spoil: the benchmarks' seeds give the verdicts they always gave."""
    _imperfection(kind)
    if kind == "wrong" and not accept:
        return bool(rng.random() < rate)
    if kind == "incomplete" and accept:
        return bool(rng.random() >= rate)
    return bool(accept)


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


# --- the annotator of a round -----------------------------------------------------------------


@dataclass(frozen=True)
class Oracle:
    """The simulated annotator and reviewer of a round, as Label Studio meets it: what it
    knows (`relevance`, by image id), the overlap rule it answers by, whom a cluster answer
    applies to (`scope`: all | review) and its time model (`seconds`; None: every answer takes
    0 s). A task is its data with `task_id` and the `cells` shown (None: no prediction)."""

    relevance: Mapping[str, np.ndarray]
    max_overlap: float
    scope: str = "all"
    seconds: Mapping[str, float] | None = None

    def annotate(self, task: dict) -> Answer | None:
        """Its answer to an image or cluster task: "ignore" on the shown cells off the
        evidence; None for a task that shows no cells or whose image it does not know."""
        if task["cells"] is None:
            return None
        if task["image_id"] not in self.relevance:
            log.warning(
                "oracle: no relevance mask for image %s (task %s)",
                task["image_id"],
                task["task_id"],
            )
            return None
        kind = "cluster" if "members" in task else "image"
        result = oracle_annotation(
            task["cells"],
            task["cell"],
            task["height"],
            task["width"],
            self.relevance[task["image_id"]],
            self.max_overlap,
            scope=self.scope if kind == "cluster" else None,
        )
        return result, self._lead(kind, relabelled_regions(result))

    def review(self, task: dict) -> Answer | None:
        """Its click on a review task: accept the carried mask when it lies off the member's
        evidence; None for a member it does not know."""
        if task["image_id"] not in self.relevance:
            return None
        mask = decode_mask(task["mask"], task["height"], task["width"])
        accept = oracle_accepts(mask, self.relevance[task["image_id"]], self.max_overlap)
        return review_result(accept), self._lead("review")

    def _lead(self, kind: str, relabelled: int = 0) -> float:
        return oracle_seconds(self.seconds, kind, relabelled) if self.seconds else 0.0
