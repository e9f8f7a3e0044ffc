"""Several annotators on one task: how far they agree, and the one answer that trains.

The conflict rule (`combine`): the ignore mask W that trains is the **union** of the
annotators' ignore masks. An annotator marks what the model must not use: a shortcut one person
saw and another missed is still a shortcut, and leaving it in W costs the model one cue among
the evidence, while leaving it out lets the model keep the shortcut the loop exists to remove.
(Majority per pixel would, with two annotators, keep only what both marked and drop every
disagreement.) So "nothing to ignore" holds only when every annotator said so. The keep mask is
the union of what they affirmed, minus W ("ignore" wins, as within one annotation); the rating
is "bad" when anyone rated the explanation bad, for the same reason; the seconds are the sum of
everyone's time, since all of it was spent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from xbl.errors import AnnotationError
from xbl.labelstudio.interface import RATINGS
from xbl.labelstudio.results import annotation_to_mask


@dataclass(frozen=True)
class Answer:
    """One annotator's answer to one task, read into masks."""

    annotator: str
    ignore: np.ndarray  # W, bool HxW
    keep: np.ndarray  # bool HxW
    rating: str | None
    seconds: float


@dataclass(frozen=True)
class TaskAgreement:
    """How the annotators of one task agree: the mean IoU of their ignore masks over every
    pair, and whether they agree on "nothing to ignore" (all marked nothing, or all marked
    something)."""

    image_id: str
    task_id: int | None
    annotators: int
    ignore_iou: float
    agree_on_nothing: bool


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree fully (1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def task_agreement(image_id: str, task_id: int | None, answers: Sequence[Answer]) -> TaskAgreement:
    """The agreement of one task's answers (at least two)."""
    pairs = list(combinations(answers, 2))
    iou = float(np.mean([mask_iou(a.ignore, b.ignore) for a, b in pairs]))
    marked = {bool(a.ignore.any()) for a in answers}
    return TaskAgreement(image_id, task_id, len(answers), iou, len(marked) == 1)


def combine(answers: Sequence[Answer]) -> Answer:
    """The one answer that trains from one task's answers (the module's conflict rule)."""
    ignore = np.logical_or.reduce([a.ignore for a in answers])
    keep = np.logical_or.reduce([a.keep for a in answers]) & ~ignore
    ratings = [a.rating for a in answers if a.rating]
    rating = RATINGS[1] if RATINGS[1] in ratings else (ratings[0] if ratings else None)
    who = "+".join(a.annotator for a in answers)
    return Answer(who, ignore, keep, rating, float(sum(a.seconds for a in answers)))


def round_agreement(tasks: Sequence[TaskAgreement]) -> dict:
    """A round's agreement for its report: over the tasks answered by several annotators, the
    mean IoU of their ignore masks and how many agree, or not, on "nothing to ignore"."""
    return {
        "tasks_with_several_annotators": len(tasks),
        "mean_ignore_iou": float(np.mean([t.ignore_iou for t in tasks])) if tasks else None,
        "agree_on_nothing": sum(t.agree_on_nothing for t in tasks),
        "disagree_on_nothing": sum(not t.agree_on_nothing for t in tasks),
        "per_task": [vars(t) for t in tasks],
    }


class RoundAnswers(dict):
    """A round's answers read back: the combined Answer per image id (a dict), and beside it
    the problems (naming task and image), the annotations that could not be read (left out,
    never taken as "nothing to ignore"), and the agreement of tasks with several annotators."""

    def __init__(self):
        super().__init__()
        self.problems: list[str] = []
        self.unreadable: list[dict] = []  # {task_id, image_id, annotation_id, reason}
        self.agreement: list[TaskAgreement] = []


def read_answer(annotation: dict, height: int, width: int) -> tuple[Answer, list[str]]:
    """One annotation ({annotator, result, lead_time}) read into masks, with the problems of
    the regions skipped; AnnotationError (from `annotation_to_mask`) when none can be read."""
    read = annotation_to_mask(annotation["result"], height, width)
    seconds = float(annotation.get("lead_time") or 0.0)
    who = str(annotation.get("annotator") or "")
    return Answer(who, read.ignore, read.keep, read.rating, seconds), read.problems


def _where(task: dict, annotation: dict) -> str:
    return (
        f"task {task['task_id']} (image {task['image_id']}, "
        f"annotation {annotation.get('annotation_id')})"
    )


def read_round(tasks: Sequence[dict]) -> RoundAnswers:
    """Each task ({image_id, task_id, height, width, answers: [annotation, ...]}) read into
    one combined answer (`combine`) over its readable annotations; a task none of whose
    annotations can be read has no answer, so its earlier mask is not kept either."""
    out = RoundAnswers()
    for task in tasks:
        answers = []
        for annotation in task["answers"]:
            try:
                answer, problems = read_answer(annotation, task["height"], task["width"])
            except AnnotationError as err:
                out.unreadable.append(
                    {
                        "task_id": task["task_id"],
                        "image_id": task["image_id"],
                        "annotation_id": annotation.get("annotation_id"),
                        "reason": str(err),
                    }
                )
                out.problems.append(f"{_where(task, annotation)}: cannot be read, left out ({err})")
                continue
            answers.append(answer)
            out.problems.extend(f"{_where(task, annotation)}: {p}" for p in problems)
        if len(answers) > 1:
            out.agreement.append(task_agreement(task["image_id"], task["task_id"], answers))
        if answers:
            out[task["image_id"]] = combine(answers)
    return out


AGREEMENT_FILE = "agreement.json"  # beside a round's manifest


def write_agreement(out: Path, read: RoundAnswers) -> Path:
    """agreement.json in the round's feedback folder: `round_agreement` and the annotations
    left out because they could not be read."""
    path = out / AGREEMENT_FILE
    record = {**round_agreement(read.agreement), "unreadable": read.unreadable}
    path.write_text(json.dumps(record, indent=1))
    return path


def read_agreement(manifest: str | Path) -> dict:
    """The agreement record beside a round's manifest (one with no shared task when none)."""
    path = Path(manifest).parent / AGREEMENT_FILE
    return (
        json.loads(path.read_text())
        if path.is_file()
        else {**round_agreement([]), "unreadable": []}
    )
