"""What a round cost the annotators: each task's modelled or measured seconds, kept beside its manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COST_FILE = "cost.json"  # beside a round's manifest: every task the round cost, answered or not


def task_cost(kind: str, image_id: str, seconds: float, regions: int = 0) -> dict:
    """One annotator task as the cost record keeps it: kind is image, cluster or review."""
    return {"task": kind, "image_id": image_id, "seconds": float(seconds), "regions": int(regions)}


def round_cost(tasks: list[dict]) -> dict:
    """A round's annotator actions and seconds (Label Studio's lead time) from its tasks."""
    reviews = sum(t["task"] == "review" for t in tasks)
    seconds = float(sum(t["seconds"] for t in tasks))
    return {
        "tasks_opened": len(tasks),
        "answers": len(tasks) - reviews,
        "members_reviewed": reviews,
        "regions_relabelled": int(sum(t["regions"] for t in tasks)),
        "annotator_seconds": seconds,
        "seconds_per_task": seconds / len(tasks) if tasks else 0.0,
    }


def write_cost(out: Path, tasks: list[dict], extra: dict | None = None) -> Path:
    """cost.json in the round's feedback folder: the summary, `extra` facts, and each task."""
    path = out / COST_FILE
    path.write_text(json.dumps({**round_cost(tasks), **(extra or {}), "per_task": tasks}, indent=1))
    return path


def read_cost(manifest: str | Path) -> dict:
    """The cost record beside a round's manifest (an empty round's when there is none)."""
    path = Path(manifest).parent / COST_FILE
    return json.loads(path.read_text()) if path.is_file() else round_cost([])


def annotation_budget(manifests: list[str]) -> dict[str, float]:
    """What the annotations so far cost: answers, reviews, and the annotators' seconds as Label
    Studio timed them (the simulated annotator's modelled time). A round with a cost record
    counts every task it cost, a rejected review too; an older round counts its manifest's
    answers (0 seconds where the time was not kept yet)."""
    answers, reviews, seconds = 0, 0, 0.0
    for manifest in manifests:
        cost = Path(manifest).parent / COST_FILE
        if cost.is_file():
            record = json.loads(cost.read_text())
            answers += record["answers"]
            reviews += record["members_reviewed"]
            seconds += record["annotator_seconds"]
            continue
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                answers += 1
                seconds += float(row.get("annotator_seconds") or 0.0)
    return {"answers": answers, "reviews": reviews, "annotator_seconds": seconds}
