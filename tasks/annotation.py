"""Label Studio steps: push a round, let the simulated annotator answer, wait, collect masks."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from services import labelstudio as ls
from tasks import SERVICE_RETRIES
from xbl.config import WaitConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.cost import task_cost, write_cost
from xbl.feedback.masks import write_feedback
from xbl.labelstudio.oracle import Oracle, relevance_lookup
from xbl.labelstudio.results import annotation_target, masks_from_annotations, relabelled_regions
from xbl.paths import round_name


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
    the rest of the annotation kept."""
    logger = get_run_logger()
    queries = {q["image_id"]: q for q in load_queries(queries_json)}
    first = next(iter(queries.values()))
    annotations = ls.collect_annotations(ls.connect(), project_id, round_number)
    read = masks_from_annotations(annotations, first["height"], first["width"])
    for problem in read.problems:
        logger.warning("annotation problem: %s", problem)
    manifest = write_feedback(
        Path(out_dir), queries, read.ignore, read.ratings, read.problems, read.keep, read.seconds
    )
    write_cost(
        Path(out_dir),
        [
            task_cost("image", a["image_id"], a["lead_time"], relabelled_regions(a["result"]))
            for a in annotations
            if a["image_id"] in queries
        ],
    )
    return str(manifest)
