"""What annotators said, as training uses it: the feedback manifests written each round, and
the `Feedback` a retraining draws its annotated images from (docs/methods.md, "Feedback losses").
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from torch import nn

from xbl.config import FeedbackConfig, TrainConfig
from xbl.data import PreparedData, to_tensor
from xbl.methods import METHODS, AnnotatedImages, FeedbackMethod, method_for

FEEDBACK_ROOT = "data/feedback"  # every round's masks, one DVC-tracked folder
LAMBDA_PER_BATCH = 16  # the summed terms' λ is set as for this many annotated images a step


@dataclass
class Feedback:
    """The annotated images and the method that learns from them.

    Every `every`-th step gets `per_batch` of these mixed in, so a handful of annotations act
    throughout training, with the term weighted so that its expected gradient depends on
    neither setting while its cost does (`step_weight`; docs/methods.md, "Feedback cost").
    `normalize_lambda` rescales λ at the first batch with a nonzero term, so that the term
    starts at λ times the cross-entropy; it is meant for fine-tuning a trained model (from a
    fresh start the term is near zero at first and the rescaled λ would be huge).
    """

    method: FeedbackMethod
    images: AnnotatedImages
    lam: float
    normalize_lambda: bool = False
    per_batch: int = 16  # these defaults are the term on every step; the pipeline's own
    every: int = 1  # schedule comes from params.yaml (build_feedback)

    def step_weight(self, lam: float) -> float:
        """The term's weight on a step that carries it: λ·every; and for a term that sums over
        the drawn images (the RRR terms), also · min(16, n) / min(per_batch, n) for n annotated
        images, so λ means what it means at 16 images a step whatever `per_batch` is (with
        fewer than 16 annotated, 16 a step meant all of them). A normalised λ was measured on
        the drawn images themselves and needs no such factor."""
        images = 1.0
        if self.method.sums_over_images and not self.normalize_lambda:
            n = len(self.images)
            images = min(LAMBDA_PER_BATCH, n) / max(min(self.per_batch, n), 1)
        return lam * self.every * images

    def to(self, device: torch.device) -> Feedback:
        """A copy with the images on `device` (annotations are few: they move once)."""
        method = copy.copy(self.method)
        if getattr(method, "exemplars", None) is not None:
            method.exemplars = tuple(e.to(device) for e in method.exemplars)
        return replace(self, method=method, images=self.images.to(device))

    def draw(self, gen: torch.Generator) -> AnnotatedImages:
        """The annotated images of one step: `per_batch` of them, at random."""
        idx = torch.randperm(len(self.images), generator=gen)[: self.per_batch]
        return self.images.take(idx.to(self.images.y.device))

    def job(self) -> dict:
        """Plain values and tensors that rebuild this feedback in a data-parallel worker."""
        images = self.images
        return {
            "method": self.method.name,
            "state": self.method.state(),
            "images": {"x": images.x, "y": images.y, "W": images.W, "M": images.M},
            "lam": self.lam,
            "normalize_lambda": self.normalize_lambda,
            "per_batch": self.per_batch,
            "every": self.every,
        }

    @classmethod
    def from_job(cls, job: dict) -> Feedback:
        method = METHODS[job["method"]].from_state(job["state"])
        return cls(
            method,
            AnnotatedImages(**job["images"]),
            job["lam"],
            job["normalize_lambda"],
            job["per_batch"],
            job["every"],
        )


def build_feedback(
    cfg: FeedbackConfig,
    data: PreparedData,
    indices: np.ndarray,
    W: np.ndarray,
    seed: int,
    model: nn.Module | None = None,
    ratings: dict[int, str] | None = None,
    keep: np.ndarray | None = None,
) -> Feedback:
    """Feedback on the annotated training images `indices` with their ignore masks W (n,H,W)
    and keep masks (n,H,W: what annotators affirmed as evidence; None = nothing kept).

    The evidence mask M is what annotators kept minus what they said to ignore. It never comes
    from `data.relevance`: real users have no relevance masks, and a perfect mask for every
    queried image would credit HINT and eXBL with evidence nobody gave (the metrics still use
    it). `model` is the one annotators judged; only methods with `needs_model` use it.
    """
    indices, W = np.asarray(indices), np.asarray(W, dtype=bool)
    keep = np.zeros_like(W) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != W.shape:
        raise ValueError(f"keep masks {keep.shape} do not match the ignore masks W {W.shape}")
    images = AnnotatedImages(
        to_tensor(data.images[indices]),
        torch.from_numpy(data.labels[indices]),
        torch.from_numpy(W).float(),
        torch.from_numpy(keep & ~W).float(),
    )
    method = method_for(cfg)
    images = method.prepare(images, model, ratings or {}, seed)
    return Feedback(
        method, images, cfg.lam(cfg.method), cfg.normalize_lambda, cfg.per_batch, cfg.every
    )


def retraining_schedule(train: TrainConfig, feedback: FeedbackConfig) -> TrainConfig:
    """Train settings for a feedback retraining: the feedback's epochs and learning rate on a
    fixed schedule (early stopping on the confounded val split would pick the shortcut back)."""
    return replace(train, epochs=feedback.epochs, lr=feedback.lr, patience=0)


# ---------------------------------------------------------------- manifests, one per round
MANIFEST_FIELDS = [
    "image_id",
    "index",
    "round",
    "mask",
    "ignored_pixels",
    "keep",
    "kept_pixels",
    "rating",
    "annotator_seconds",
    "source",  # answer (the annotator's own) | propagated (a confident carried mask) | reviewed
    "confidence",  # a carried mask's confidence (empty for answers)
]
SOURCES = ("answer", "propagated", "reviewed")


def mask_file_name(image_id: str) -> str:
    """A flat, unique file name for an image's mask: the ID percent-encoded (a user's IDs are
    paths such as `cat/001.png`; decoy-digits' `digit-0001` stays as it is), then `.png`."""
    return f"{quote(image_id, safe='')}.png"


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def _load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image) > 0


def write_feedback(
    out: Path,
    queries: dict,
    masks: dict,
    ratings: dict,
    problems: list[str],
    keep: dict,
    seconds: dict | None = None,
    sources: dict | None = None,
    confidence: dict | None = None,
) -> Path:
    """masks/<name> (W, 255 = ignore) and keep/<name> (255 = kept as evidence), named by
    `mask_file_name`, manifest.csv and problems.txt in `out`; images that are not among the
    round's `queries` are skipped. An image missing from `keep` kept nothing; `seconds` is the
    annotator's time per image, kept so a round's cost travels with its masks; `sources` says
    where a mask came from (default: the annotator's answer), `confidence` a carried mask's."""
    seconds, sources, confidence = seconds or {}, sources or {}, confidence or {}
    for folder in ("masks", "keep"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, MANIFEST_FIELDS)
        writer.writeheader()
        for image_id, mask in sorted(masks.items()):
            if image_id not in queries:
                continue
            kept = keep[image_id] if image_id in keep else np.zeros_like(mask, dtype=bool)
            name = mask_file_name(image_id)
            _save_mask(mask, out / "masks" / name)
            _save_mask(kept, out / "keep" / name)
            writer.writerow(
                {
                    "image_id": image_id,
                    "index": queries[image_id]["index"],
                    "round": queries[image_id]["round"],
                    "mask": f"masks/{name}",
                    "ignored_pixels": int(mask.sum()),
                    "keep": f"keep/{name}",
                    "kept_pixels": int(kept.sum()),
                    "rating": ratings.get(image_id) or "",
                    "annotator_seconds": round(float(seconds.get(image_id, 0.0)), 3),
                    "source": sources.get(image_id, SOURCES[0]),
                    "confidence": (
                        round(float(confidence[image_id]), 4) if image_id in confidence else ""
                    ),
                }
            )
    (out / "problems.txt").write_text("".join(f"{p}\n" for p in problems))
    return manifest


def read_feedback(
    manifests: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """All rounds' feedback: dataset indices, ignore masks W, keep masks, and ratings by
    position. A manifest written before keep masks were collected (no `keep` column) reads
    with empty keep masks: those images affirmed no evidence, so HINT gets no term from them."""
    indices, masks, kept, ratings = [], [], [], {}
    for manifest in manifests:
        root = Path(manifest).parent
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                if row["rating"]:
                    ratings[len(indices)] = row["rating"]
                indices.append(int(row["index"]))
                masks.append(_load_mask(root / row["mask"]))
                keep_png = row.get("keep")
                kept.append(_load_mask(root / keep_png) if keep_png else np.zeros_like(masks[-1]))
    if not indices:
        empty = np.zeros((0, 0, 0), dtype=bool)
        return np.zeros(0, dtype=int), empty, empty.copy(), {}
    return np.array(indices), np.stack(masks), np.stack(kept), ratings


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


def finished_rounds(project: Path) -> list[Path]:
    """Feedback manifests of the rounds already collected, oldest first."""
    manifests = (project / FEEDBACK_ROOT).glob("round-*/manifest.csv")
    return sorted(manifests, key=lambda p: int(p.parent.name.split("-")[1]))
