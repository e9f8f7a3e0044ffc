"""Label Studio steps: push a round, let the simulated annotator answer, wait, collect masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks import labelstudio as ls
from xbl.data import PreparedData
from xbl.labelstudio import masks_from_annotations


class RoundIncomplete(RuntimeError):
    """Too few annotations by the deadline; everything annotated so far stays in Label Studio."""


def load_queries(queries_json: str) -> list[dict]:
    return json.loads(Path(queries_json).read_text())


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def push_queries(queries_json: str, title: str, model_version: str) -> dict:
    """Create (or find) the experiment's project and push the round's tasks, idempotently."""
    client = ls.connect()
    project_id = ls.ensure_project(client, title, model_version)
    counts = ls.push_round(client, project_id, load_queries(queries_json), model_version)
    get_run_logger().info("round pushed to %s: %d new task(s), %d already there",
                          ls.project_link(client, project_id), counts["created"], counts["skipped"])
    return {"project_id": project_id, "url": ls.project_link(client, project_id), **counts}


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def oracle_answers(title: str, round_number: int, dataset: str, queries_json: str,
                   max_overlap: float) -> int:
    """The simulated annotator, through the API: 'ignore' on shown cells off the evidence."""
    data = PreparedData.load(Path(dataset))
    relevance = {q["image_id"]: data.relevance[q["index"]] for q in load_queries(queries_json)}
    client = ls.connect()
    return ls.oracle_annotate(client, ls.find_project(client, title), round_number, relevance,
                              max_overlap)


def annotation_target(total: int, settings: dict) -> int:
    return max(1, int(np.ceil(float(settings.get("target_fraction", 1.0)) * total)))


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def round_progress(title: str, round_number: int) -> tuple[int, int]:
    """(annotated, total) tasks of the round, as Label Studio has them now."""
    client = ls.connect()
    return ls.round_progress(client, ls.find_project(client, title), round_number)


@task
def wait_for_annotations(title: str, round_number: int, settings: dict) -> int:
    """Poll until the round's target is annotated; on timeout go on with at least
    `min_annotated`, else stop with nothing lost. Returns how many are annotated."""
    logger = get_run_logger()
    client = ls.connect()
    project_id = ls.find_project(client, title)
    total = ls.round_progress(client, project_id, round_number)[1]
    target = annotation_target(total, settings)
    artifact = create_progress_artifact(0.0, key=f"round-{round_number}-annotations",
                                        description=f"round {round_number}: annotated tasks")

    def report(annotated: int, seen_total: int) -> None:
        logger.info("round %d: %d/%d annotated (target %d)", round_number, annotated, seen_total,
                    target)
        update_progress_artifact(artifact, 100.0 * annotated / max(seen_total, 1))

    annotated, _ = ls.wait_for_round(ls.connect, project_id, round_number, target,
                                     float(settings["timeout_s"]), float(settings["poll_s"]),
                                     on_progress=report)
    if annotated >= target:
        return annotated
    if annotated >= int(settings.get("min_annotated", 1)):
        logger.warning("round %d: timed out with %d/%d annotated; going on with those",
                       round_number, annotated, target)
        return annotated
    raise RoundIncomplete(
        f"round {round_number}: only {annotated} of {total} tasks annotated after "
        f"{settings['timeout_s']}s (need at least {settings.get('min_annotated', 1)}). Nothing is "
        "lost: the annotations stay in Label Studio; run the flow again to collect them.")


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def collect_feedback_masks(title: str, round_number: int, queries_json: str,
                           out_dir: str) -> str:
    """Annotations → ignore masks W at image resolution, saved with a manifest; bad regions
    are reported (naming the task) and skipped, the rest of the annotation kept."""
    logger = get_run_logger()
    queries = {q["image_id"]: q for q in load_queries(queries_json)}
    h, w = next(iter(queries.values()))["height"], next(iter(queries.values()))["width"]
    client = ls.connect()
    annotations = ls.collect_annotations(client, ls.find_project(client, title), round_number)
    masks, ratings, problems = masks_from_annotations(annotations, h, w)
    for problem in problems:
        logger.warning("annotation problem: %s", problem)
    return str(write_feedback(Path(out_dir), queries, masks, ratings, problems))


def write_feedback(out: Path, queries: dict, masks: dict, ratings: dict, problems: list) -> Path:
    """masks/<image_id>.png (255 = ignore) and manifest.csv; images not in the round are skipped."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["image_id", "index", "round", "mask", "ignored_pixels",
                                     "rating"])
        writer.writeheader()
        for image_id, mask in sorted(masks.items()):
            if image_id not in queries:
                continue
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / f"{image_id}.png")
            writer.writerow({"image_id": image_id, "index": queries[image_id]["index"],
                             "round": queries[image_id]["round"], "mask": f"masks/{image_id}.png",
                             "ignored_pixels": int(mask.sum()), "rating": ratings.get(image_id) or ""})
    (out / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    return manifest


def read_feedback(manifests: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """All rounds' feedback: dataset indices, ignore masks W, and ratings by position."""
    indices, masks, ratings = [], [], {}
    for manifest in manifests:
        root = Path(manifest).parent
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                if row["rating"]:
                    ratings[len(indices)] = row["rating"]
                indices.append(int(row["index"]))
                masks.append(np.asarray(Image.open(root / row["mask"])) > 0)
    if not indices:
        return np.zeros(0, dtype=int), np.zeros((0, 0, 0), dtype=bool), {}
    return np.array(indices), np.stack(masks), ratings
