"""The feedback masks each round writes: one manifest and one PNG per answered image, under data/feedback/."""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

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
