"""Cluster rounds: carry each cluster answer to the cluster's members, put the doubtful masks to
a one-click review in Label Studio, and collect what trains (docs/methods.md, "Explanation
clustering and propagation")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from services import labelstudio as ls
from tasks import SERVICE_RETRIES
from tasks.annotation import load_queries
from xbl.config import QueryConfig
from xbl.data.images import to_tensor
from xbl.data.prepared import PreparedData
from xbl.explain.render import display_scale, mask_png
from xbl.feedback.cost import task_cost, write_cost
from xbl.feedback.masks import write_feedback
from xbl.labelstudio.oracle import Oracle, relevance_lookup
from xbl.labelstudio.payloads import decode_mask, encode_mask, upload_stem
from xbl.labelstudio.results import (
    annotation_to_mask,
    applies_to,
    masks_from_annotations,
    relabelled_regions,
)
from xbl.query.clustering import CONFIDENT, REVIEW, propagate, triage
from xbl.train.checkpoint import load_model


def is_cluster_round(queries_json: str) -> bool:
    """A round whose queries are clusters' representatives (their tasks carry the members)."""
    return any("members" in q for q in load_queries(queries_json))


def _carry(model, data: PreparedData, index: dict, query: dict, ignore: np.ndarray, cfg):
    """The representative's "ignore" mask localised in its members; None when there is no
    concept to carry (nothing marked, or everything)."""
    members = [m for m in query["members"] if m != query["image_id"] and m in index]
    if not members or not ignore.any() or ignore.all():
        return members, None
    rows = np.array([index[m] for m in members])
    # by ID, like every mask: the representative's recorded index is its row in the data
    # version the round was drawn on
    representative = index[query["image_id"]]
    carried = propagate(
        model,
        to_tensor(data.images[representative : representative + 1])[0],
        ignore,
        to_tensor(data.images[rows]),
        threshold=cfg.propagation_threshold,
    )
    return members, carried


def _member_records(data, index, query, members, carried, status, out: Path) -> list[dict]:
    """The carried masks that train or go to review, each with what a review task shows."""
    h, w = data.images.shape[-2:]
    records = []
    for j, image_id in enumerate(members):
        if status[j] not in (CONFIDENT, REVIEW):
            continue
        record = {
            "image_id": image_id,
            "index": int(index[image_id]),
            "round": int(query["round"]),
            "cluster": int(query["cluster"]),
            "representative": query["image_id"],
            "confidence": float(carried.confidence[j]),
            "status": str(status[j]),
            "mask": encode_mask(carried.masks[j]),
            "height": int(h),
            "width": int(w),
        }
        if status[j] == REVIEW:
            png = out / "review" / f"{upload_stem(image_id)}_review.png"
            mask_png(data.images[index[image_id]], carried.masks[j], png, display_scale(h, w))
            record["image_path"] = str(png)
        records.append(record)
    return records


def _cluster_answer(model, data, index, query, result, cfg, out: Path) -> tuple[dict, list[dict]]:
    """One cluster answer carried and triaged: the cluster's counts and its members' records."""
    scope = applies_to(result) or "review"  # no choice made: nothing trains unseen
    h, w = data.images.shape[-2:]
    members, carried = _carry(
        model, data, index, query, annotation_to_mask(result, h, w).ignore, cfg
    )
    if carried is None:  # nothing marked on the representative: its answer trains alone
        status, records = np.array([], dtype=object), []
    else:
        status = triage(carried, scope, cfg.review_confidence)
        records = _member_records(data, index, query, members, carried, status, out)
    cluster = {
        "representative": query["image_id"],
        "cluster": int(query["cluster"]),
        "applies_to": scope,
        "members": len(members),
        "carried": 0 if carried is None else int(carried.masks.any(axis=(1, 2)).sum()),
        "confident": int((status == CONFIDENT).sum()),
        "review": int((status == REVIEW).sum()),
    }
    return cluster, records


@task(**SERVICE_RETRIES)
def propagate_answers(
    project_id: int,
    round_number: int,
    dataset: str,
    queries_json: str,
    checkpoint: str,
    cfg: QueryConfig,
    out_dir: str,
) -> str:
    """Each cluster answer carried to its members by localising the marked concept in the query
    model's explained layer (`propagate`), triaged by the answer's scope and each mask's
    confidence; writes propagation.json. The same weights give the same masks, so a resumed
    round computes them again rather than keeping them anywhere."""
    data = PreparedData.load(Path(dataset))
    model, _ = load_model(checkpoint)
    index = {str(image_id): i for i, image_id in enumerate(data.ids)}
    answers = {
        a["image_id"]: a for a in ls.collect_annotations(ls.connect(), project_id, round_number)
    }
    out, clusters, members_out = Path(out_dir), [], []
    for query in (q for q in load_queries(queries_json) if "members" in q):
        answer = answers.get(query["image_id"])
        if answer is not None:  # an unanswered cluster (a timed-out round): nothing to carry
            cluster, records = _cluster_answer(
                model, data, index, query, answer["result"], cfg, out
            )
            clusters.append(cluster)
            members_out += records
    path = out / "propagation.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"round": round_number, "clusters": clusters, "members": members_out}, indent=1)
    )
    get_run_logger().info(
        "round %d: %d carried mask(s) confident, %d to review",
        round_number,
        sum(c["confident"] for c in clusters),
        sum(c["review"] for c in clusters),
    )
    return str(path)


def _reviews(propagation_json: str) -> list[dict]:
    members = json.loads(Path(propagation_json).read_text())["members"]
    return [m for m in members if m["status"] == REVIEW]


@task(**SERVICE_RETRIES)
def push_review_tasks(propagation_json: str, title: str) -> dict:
    """The review project, with one task per carried mask that needs review (idempotent)."""
    client = ls.connect()
    project_id = ls.ensure_review_project(client, title)
    counts = ls.push_reviews(client, project_id, _reviews(propagation_json))
    get_run_logger().info(
        "review tasks at %s: %d new, %d already there",
        ls.project_link(client, project_id),
        counts["created"],
        counts["skipped"],
    )
    return {"project_id": project_id, **counts}


@task(**SERVICE_RETRIES)
def oracle_reviews(
    review_project_id: int,
    round_number: int,
    dataset: str,
    propagation_json: str,
    max_overlap: float,
    seconds: dict[str, float],
) -> int:
    """The simulated reviewer, through the API: accept a mask that lies off the evidence."""
    in_review = [m["image_id"] for m in _reviews(propagation_json)]
    relevance = relevance_lookup(PreparedData.load(Path(dataset)), in_review)
    oracle = Oracle(relevance, max_overlap, seconds=seconds)
    return ls.answer_open_tasks(ls.connect(), review_project_id, round_number, oracle.review)


@task(**SERVICE_RETRIES)
def collect_cluster_feedback(
    project_id: int,
    review_project_id: int | None,
    round_number: int,
    queries_json: str,
    propagation_json: str,
    out_dir: str,
) -> str:
    """What trains from a cluster round: each representative's own answer, the confident
    carried masks, and the reviewed masks the reviewer accepted (a rejected one trains
    nothing); written like any round's masks, with each row's source and confidence, and the
    round's cost (every task, rejected reviews too) in cost.json."""
    client = ls.connect()
    queries = {q["image_id"]: q for q in load_queries(queries_json)}
    first = next(iter(queries.values()))
    h, w = first["height"], first["width"]
    annotations = ls.collect_annotations(client, project_id, round_number)
    read = masks_from_annotations(annotations, h, w)
    for problem in read.problems:
        get_run_logger().warning("annotation problem: %s", problem)
    masks, seconds = dict(read.ignore), dict(read.seconds)
    sources, confidence, rows = {}, {}, dict(queries)
    for m in json.loads(Path(propagation_json).read_text())["members"]:
        if m["status"] == CONFIDENT:
            masks[m["image_id"]] = decode_mask(m["mask"], h, w)
            sources[m["image_id"]], confidence[m["image_id"]] = "propagated", m["confidence"]
            rows[m["image_id"]] = m
    reviews = (
        ls.collect_reviews(client, review_project_id, round_number) if review_project_id else []
    )
    by_id = {m["image_id"]: m for m in _reviews(propagation_json)}
    for r in reviews:
        if r["accepted"] and r["image_id"] in by_id:
            masks[r["image_id"]], seconds[r["image_id"]] = r["mask"], r["lead_time"]
            sources[r["image_id"]], confidence[r["image_id"]] = "reviewed", r["confidence"]
            rows[r["image_id"]] = by_id[r["image_id"]]
    out = Path(out_dir)
    manifest = write_feedback(
        out, rows, masks, read.ratings, read.problems, read.keep, seconds, sources, confidence
    )
    tasks = [
        task_cost("cluster", a["image_id"], a["lead_time"], relabelled_regions(a["result"]))
        for a in annotations
    ] + [task_cost("review", r["image_id"], r["lead_time"]) for r in reviews]
    write_cost(out, tasks, propagation_summary(propagation_json, reviews))
    return str(manifest)


def propagation_summary(propagation_json: str, reviews: list[dict]) -> dict:
    """How one round's answers spread: carried masks, confident, reviewed, accepted, rejected."""
    record = json.loads(Path(propagation_json).read_text())
    clusters = record["clusters"]
    return {
        "propagated_masks": sum(c["carried"] for c in clusters),
        "confident": sum(c["confident"] for c in clusters),
        "review_tasks": sum(c["review"] for c in clusters),
        "reviewed": len(reviews),
        "accepted": sum(r["accepted"] is True for r in reviews),
        "rejected": sum(r["accepted"] is False for r in reviews),
    }
