"""Label Studio steps: push a round, let the simulated annotator answer, wait, collect masks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from services import labelstudio as ls
from services.faults import crash_point
from tasks import SERVICE_RETRIES
from xbl.config import WaitConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.cost import COST_FILE, round_cost, task_cost, write_cost
from xbl.feedback.masks import write_feedback
from xbl.labelstudio.agreement import (
    Answer,
    RoundAnswers,
    read_round,
    round_agreement,
    write_agreement,
)
from xbl.labelstudio.oracle import Oracle, relevance_lookup
from xbl.labelstudio.results import annotation_target, relabelled_regions
from xbl.paths import FEEDBACK_MANIFEST, feedback_dir, round_name


class RoundIncomplete(RuntimeError):
    """Too few annotations by the deadline; everything annotated so far stays in Label Studio."""


def load_queries(queries_json: str) -> list[dict]:
    return json.loads(Path(queries_json).read_text())


@task(**SERVICE_RETRIES)
def push_queries(queries_json: str, title: str, model_version: str) -> dict:
    """Create (or find) the experiment's project, with the interface the round's tasks need,
    and push them, idempotently; returns the project's id and link with the counts."""
    client = ls.connect()
    queries = load_queries(queries_json)
    cluster = any("members" in q for q in queries)  # cluster tasks need the cluster interface
    project_id = ls.ensure_project(client, title, model_version, cluster=cluster)
    counts = ls.push_round(client, project_id, queries, model_version)
    url = ls.project_link(client, project_id)
    get_run_logger().info(
        "round pushed to %s: %d new task(s), %d already there",
        url,
        counts["created"],
        counts["skipped"],
    )
    return {"project_id": project_id, "url": url, **counts}


@task(**SERVICE_RETRIES)
def oracle_answers(
    project_id: int,
    round_number: int,
    dataset: str,
    queries_json: str,
    max_overlap: float,
    scope: str = "all",
    seconds: dict[str, float] | None = None,
) -> int:
    """The simulated annotator, through the API: 'ignore' on shown cells off the evidence; on
    a cluster task, that answer applies to `scope` of the members; lead time by `seconds`."""
    queried = [q["image_id"] for q in load_queries(queries_json)]
    relevance = relevance_lookup(PreparedData.load(Path(dataset)), queried)
    oracle = Oracle(relevance, max_overlap, scope, seconds)
    return ls.answer_open_tasks(ls.connect(), project_id, round_number, oracle.annotate)


@task(**SERVICE_RETRIES)
def round_progress(project_id: int, round_number: int) -> tuple[int, int]:
    """(annotated, total) tasks of the round, as Label Studio has them now."""
    return ls.round_progress(ls.connect(), project_id, round_number)


@task
def wait_for_annotations(
    project_id: int, round_number: int, cfg: WaitConfig, what: str = "annotations"
) -> int:
    """Poll until the round's target is annotated (its answers, or its `reviews` in the review
    project); on timeout go on with at least `min_annotated`, else stop with nothing lost.
    Returns how many are annotated."""
    logger = get_run_logger()
    total = ls.round_progress(ls.connect(), project_id, round_number)[1]
    target = annotation_target(total, cfg.target_fraction)
    artifact = create_progress_artifact(
        0.0,
        key=f"{round_name(round_number)}-{what}",
        description=f"round {round_number}: {what} done",
    )

    def report(annotated: int, seen_total: int) -> None:
        logger.info(
            "round %d: %d/%d annotated (target %d)", round_number, annotated, seen_total, target
        )
        update_progress_artifact(artifact, 100.0 * annotated / max(seen_total, 1))

    annotated, _ = ls.wait_for_round(
        ls.connect, project_id, round_number, target, cfg.timeout_s, cfg.poll_s, on_progress=report
    )
    if annotated >= target:
        return annotated
    if annotated >= cfg.min_annotated:
        logger.warning(
            "round %d: timed out with %d/%d annotated; going on with those",
            round_number,
            annotated,
            target,
        )
        return annotated
    raise RoundIncomplete(
        f"round {round_number}: only {annotated} of {total} tasks annotated after "
        f"{cfg.timeout_s:g}s (need at least {cfg.min_annotated}). Nothing is lost: the "
        "annotations stay in Label Studio; run the flow again to collect them."
    )


@task(**SERVICE_RETRIES)
def collect_feedback_masks(
    project_id: int, round_number: int, queries_json: str, out_dir: str
) -> str:
    """Annotations → ignore masks W and keep masks (the evidence annotators affirmed) at image
    resolution, saved with a manifest; bad regions are reported (naming the task) and skipped,
    an annotation none of whose regions can be read is reported and left out. Several
    annotators on a task: their answers combine by `xbl.labelstudio.agreement.combine`, and
    their agreement goes to agreement.json beside the manifest."""
    queries = {q["image_id"]: q for q in load_queries(queries_json)}
    tasks = ls.collect_answers(ls.connect(), project_id, round_number)
    read = read_round(tasks)
    _log_reading(round_number, read)
    out = Path(out_dir)
    _swap_in(out, lambda new: _write_round(new, queries, tasks, read))
    return str(out / FEEDBACK_MANIFEST)


def _log_reading(round_number: int, read: RoundAnswers) -> None:
    logger = get_run_logger()
    for problem in read.problems:
        logger.warning("annotation problem: %s", problem)
    shared = round_agreement(read.agreement)
    if shared["tasks_with_several_annotators"]:
        logger.info(
            "round %d: %d task(s) answered by several annotators; mean IoU of their ignore "
            "masks %.2f; %d disagree on whether anything is to be ignored (the union trains)",
            round_number,
            shared["tasks_with_several_annotators"],
            shared["mean_ignore_iou"],
            shared["disagree_on_nothing"],
        )


def _write_round(
    out: Path, queries: dict, tasks: list[dict], read: RoundAnswers, carried: dict | None = None
) -> None:
    """A round's feedback folder from its answers read back (and, in a cluster round, the
    carried masks `carried` holds as they were stored: {image_id: (row, W)})."""
    carried = carried or {}
    answered = {k: a for k, a in read.items() if k in queries}
    masks = {k: a.ignore for k, a in answered.items()} | {k: m for k, (_, m) in carried.items()}
    write_feedback(
        out,
        {**queries, **{k: row for k, (row, _) in carried.items()}},
        masks,
        {k: a.rating for k, a in answered.items()},
        read.problems,
        {k: a.keep for k, a in answered.items()},
        {k: a.seconds for k, a in answered.items()}
        | {k: float(row["annotator_seconds"] or 0) for k, (row, _) in carried.items()},
        {k: row["source"] for k, (row, _) in carried.items()},
        {k: float(row["confidence"]) for k, (row, _) in carried.items() if row["confidence"]},
    )
    crash_point("masks-partial")  # fault drill: masks written, the folder not complete
    write_cost(out, _answer_costs(tasks, queries, read))
    write_agreement(out, read)


def _answer_costs(tasks: list[dict], queries: dict, read: RoundAnswers) -> list[dict]:
    """Every annotator's answer cost time, an unreadable one too (its regions uncounted)."""
    unreadable = {u["annotation_id"] for u in read.unreadable}
    return [
        task_cost(
            "image",
            t["image_id"],
            a["lead_time"],
            0 if a["annotation_id"] in unreadable else relabelled_regions(a["result"]),
        )
        for t in tasks
        if t["image_id"] in queries
        for a in t["answers"]
    ]


def _swap_in(out: Path, fill) -> None:
    """Write a round's feedback folder whole beside it, then put it in place: a crash leaves
    the old folder or the new one, never a mix of both (and no mask of a deleted answer)."""
    new, old = out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")
    if old.is_dir() and not out.exists():  # an earlier run died between the two renames
        old.rename(out)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    fill(new)
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


CHANGES = ("edited", "deleted", "late", "unreadable")
COUNTED = (*CHANGES, "no_task")  # the summary's counts


@task(**SERVICE_RETRIES)
def recollect_finished_rounds(
    project: str, project_id: int | None, rounds: list[int], dataset: str
) -> dict:
    """Before a round retrains on every round's masks: read the finished `rounds`' answers from
    Label Studio again and make their stored masks follow them. An answer edited since
    replaces its mask, a deleted one removes it, a late one (given after its round went on
    without it) is added, an unreadable one is left out; each is warned about with its task.
    Label Studio unreachable: the stored masks stay as they are and the round goes on.
    Returns the counts of each change, and per round the tasks ({task_id, image_id})."""
    logger = get_run_logger()
    try:
        current = _current_answers(project_id, rounds)
    except ls.LabelStudioUnavailable as err:
        logger.warning(
            "%s: the finished rounds' answers were not read again; "
            "their stored masks are used as they are",
            err,
        )
        return {"reachable": False, "reason": str(err), "rounds": {}, **dict.fromkeys(COUNTED, 0)}
    ids = {str(image_id): i for i, image_id in enumerate(PreparedData.load(Path(dataset)).ids)}
    summary = {k: _recollect_round(Path(project), k, t, ids) for k, t in current.items()}
    totals = {kind: sum(len(s[kind]) for s in summary.values()) for kind in COUNTED}
    logger.info("finished rounds read again from Label Studio: %s", totals)
    if totals["no_task"]:
        logger.warning(
            "%d stored mask(s) have no task in Label Studio any more (project wiped or "
            "replaced?): they are kept as they were",
            totals["no_task"],
        )
    return {"reachable": True, "rounds": summary, **totals}


def _current_answers(project_id: int | None, rounds: list[int]) -> dict[int, list[dict]]:
    """Every finished round's answers, all read before anything is written."""
    if project_id is None or not rounds:
        return {}
    client = ls.connect()
    return {k: ls.collect_answers(client, project_id, k) for k in sorted(rounds)}


def _recollect_round(project: Path, k: int, tasks: list[dict], ids: dict[str, int]) -> dict:
    """Round `k`'s stored masks made to follow its current answers; returns what changed."""
    out = feedback_dir(project, k)
    stored, carried = _stored_masks(out)
    read = read_round(tasks)
    changes = answer_changes(stored, read, tasks)
    for item in changes["no_task"]:  # a wiped or replaced project deletes no answer of ours
        row, ignore, keep = stored[item["image_id"]]
        seconds = float(row["annotator_seconds"] or 0)
        read[item["image_id"]] = Answer("stored", ignore, keep, row["rating"] or None, seconds)
    if changes["edited"] or changes["deleted"] or changes["late"] or _dropped(stored, read):
        _log_changes(k, changes)
        queries = {}
        for image_id in read:
            # a stored row keeps its row in the data the round ran on; a late one gets today's
            index = stored[image_id][0]["index"] if image_id in stored else ids.get(image_id)
            if index is None:
                read.problems.append(f"image {image_id}: not in the prepared data; left out")
                continue
            queries[image_id] = {"index": index, "round": k}

        def fill(new: Path) -> None:
            _write_round(new, queries, tasks, read, carried)
            _keep_cluster_cost(out, new)

        _swap_in(out, fill)
    return changes


def _dropped(stored: dict, read: RoundAnswers) -> bool:
    """A stored mask whose answer can no longer be read: it goes, as a deleted one does."""
    return any(u["image_id"] in stored and u["image_id"] not in read for u in read.unreadable)


def _log_changes(k: int, changes: dict) -> None:
    said = "; ".join(
        f"{len(changes[kind])} {kind} (task {', '.join(str(c['task_id']) for c in changes[kind])})"
        for kind in CHANGES
        if changes[kind]
    )
    get_run_logger().warning(
        "round %d: answers changed in Label Studio since the round finished: %s; its masks now "
        "follow the current answers",
        k,
        said,
    )


def answer_changes(stored: dict, read: RoundAnswers, tasks: list[dict]) -> dict[str, list[dict]]:
    """What differs between a round's stored masks ({image_id: (row, W, keep)}) and its answers
    read now: edited (another W, keep mask or rating), deleted (its task has no answer any
    more), late (an answer with no stored mask), unreadable (left out), each as {task_id,
    image_id}; and no_task: stored masks whose task Label Studio no longer has at all (a wiped
    or replaced project), which are kept."""
    task_of = {t["image_id"]: t["task_id"] for t in tasks}
    gone = {u["image_id"] for u in read.unreadable} | (set(stored) - set(task_of))

    def listed(images) -> list[dict]:
        return [{"task_id": task_of.get(i), "image_id": i} for i in sorted(images)]

    return {
        "edited": listed(i for i in stored if i in read and not _same(stored[i], read[i])),
        "deleted": listed(i for i in stored if i not in read and i not in gone),
        "late": listed(i for i in read if i not in stored),
        "no_task": listed(set(stored) - set(task_of)),
        "unreadable": [
            {"task_id": u["task_id"], "image_id": u["image_id"], "reason": u["reason"]}
            for u in read.unreadable
        ],
    }


def _same(stored: tuple, answer) -> bool:
    row, ignore, keep = stored
    return (
        np.array_equal(ignore, answer.ignore)
        and np.array_equal(keep, answer.keep)
        and (row["rating"] or None) == answer.rating
    )


def _stored_masks(out: Path) -> tuple[dict, dict]:
    """A round's stored answers {image_id: (row, W, keep)} and carried masks {image_id: (row,
    W)} (a cluster round's, kept as they are: carrying needs the round's query model)."""
    manifest = out / FEEDBACK_MANIFEST
    if not manifest.is_file():
        return {}, {}
    answers, carried = {}, {}
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            ignore = _png_mask(out / row["mask"])
            if (row.get("source") or "answer") == "answer":
                keep = _png_mask(out / row["keep"]) if row.get("keep") else np.zeros_like(ignore)
                answers[row["image_id"]] = (row, ignore, keep)
            else:
                carried[row["image_id"]] = (row, ignore)
    return answers, carried


def _png_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image) > 0


def _keep_cluster_cost(old: Path, new: Path) -> None:
    """A cluster round's cost keeps its review tasks and propagation summary, and its answers
    stay cluster tasks."""
    before_path = old / COST_FILE
    if not before_path.is_file():
        return
    before = json.loads(before_path.read_text())
    if not any(t["task"] == "cluster" for t in before["per_task"]):
        return
    answers = json.loads((new / COST_FILE).read_text())["per_task"]
    reviews = [t for t in before["per_task"] if t["task"] == "review"]
    extra = {k: v for k, v in before.items() if k not in round_cost([]) and k != "per_task"}
    write_cost(new, [{**t, "task": "cluster"} for t in answers] + reviews, extra)
