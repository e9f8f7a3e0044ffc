"""What comes back from Label Studio: annotations and review verdicts read into feedback masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from xbl.labelstudio.interface import (
    APPLIES,
    APPLIES_NAME,
    ATTENTION_LABEL,
    IGNORE_LABEL,
    RATING_NAME,
    REVIEW_CHOICES,
    REVIEW_NAME,
)

Cell = tuple[int, int]


def annotation_target(total: int, target_fraction: float) -> int:
    """How many of a round's `total` tasks must be annotated before it retrains (at least 1)."""
    return max(1, int(np.ceil(target_fraction * total)))


def _choice(result: list[dict], name: str) -> str | None:
    for region in result or []:
        if region.get("type") == "choices" and region.get("from_name") == name:
            choices = (region.get("value") or {}).get("choices") or []
            return str(choices[0]) if choices else None
    return None


def applies_to(result: list[dict]) -> str | None:
    """A cluster answer's scope: all, none or review; None when the annotator chose nothing."""
    return APPLIES.get(_choice(result, APPLIES_NAME))


def review_verdict(result: list[dict]) -> bool | None:
    """True for accept, False for reject, None when the review says neither."""
    choice = _choice(result, REVIEW_NAME)
    return None if choice is None else choice == REVIEW_CHOICES[0]


def relabelled_regions(result: list[dict]) -> int:
    """Regions the annotator labelled "ignore": the actions a cost model counts."""
    return sum(
        IGNORE_LABEL in ((region.get("value") or {}).get(region.get("type")) or [])
        for region in result or []
        if region.get("type") in ("rectanglelabels", "brushlabels")
    )


def _rectangle_mask(value: dict, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the (possibly rotated) rectangle; rotation is in degrees,
    clockwise about the top-left corner, as Label Studio draws it."""
    x0, y0 = value["x"] * width / 100.0, value["y"] * height / 100.0
    w, h = value["width"] * width / 100.0, value["height"] * height / 100.0
    theta = np.deg2rad(value["rotation"])
    v, u = np.mgrid[0:height, 0:width] + 0.5
    du, dv = u - x0, v - y0
    along = du * np.cos(theta) + dv * np.sin(theta)
    across = -du * np.sin(theta) + dv * np.cos(theta)
    return (along >= 0) & (along < w) & (across >= 0) & (across < h)


class _BitReader:
    """Most-significant bit first, as Label Studio's (thi.ng rle-pack) brush encoder writes."""

    def __init__(self, data: Sequence[int]):
        values = np.asarray(data, dtype=np.int64)
        if values.ndim != 1 or ((values < 0) | (values > 255)).any():
            raise ValueError("RLE must be a flat list of bytes (0-255)")
        self.bits = np.unpackbits(values.astype(np.uint8))
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > self.bits.size:
            raise ValueError("RLE stream ends early")
        value = 0
        for bit in self.bits[self.pos : self.pos + n]:
            value = (value << 1) | int(bit)
        self.pos += n
        return value


def decode_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio brush RLE -> the flat array it encodes (RGBA bytes, row-major).

    Header: 32-bit value count, 5-bit word size - 1, four 4-bit run-length field sizes - 1.
    Then chunks: 1 flag bit (1 = repeat one value, 0 = literal values), a 2-bit index into the
    field sizes, the run length - 1 in that many bits, then one word (repeat) or `run` words.
    """
    bits = _BitReader(rle)
    count = bits.read(32)
    word_size = bits.read(5) + 1
    run_sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8 if word_size <= 8 else np.uint32)
    i = 0
    while i < count:
        repeat = bits.read(1)
        end = i + 1 + bits.read(run_sizes[bits.read(2)])
        if end > count:
            raise ValueError("RLE run goes past the declared size")
        if repeat:
            out[i:end] = bits.read(word_size)
        else:
            out[i:end] = [bits.read(word_size) for _ in range(end - i)]
        i = end
    return out


def _resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) + 0.5) * mask.shape[0] / height
    cols = (np.arange(width) + 0.5) * mask.shape[1] / width
    return mask[rows.astype(int)][:, cols.astype(int)]


def _brush_mask(region: dict, height: int, width: int) -> np.ndarray:
    oh, ow = int(region["original_height"]), int(region["original_width"])
    rgba = decode_rle(region["value"]["rle"])
    if rgba.size != oh * ow * 4:
        raise ValueError(f"RLE holds {rgba.size} values, expected {oh}x{ow}x4")
    mask = rgba.reshape(oh, ow, 4)[..., 3] > 0
    return mask if (oh, ow) == (height, width) else _resize_nearest(mask, height, width)


def _region_mask(region: dict, height: int, width: int) -> np.ndarray:
    """Missing or non-numeric values raise, and the caller reports the region."""
    if region["type"] == "rectanglelabels":
        raw = region["value"]
        value = {key: float(raw[key]) for key in ("x", "y", "width", "height")}
        value["rotation"] = float(raw.get("rotation") or 0.0)
        return _rectangle_mask(value, height, width)
    return _brush_mask(region, height, width)


class AnnotationMasks(NamedTuple):
    """One annotation read back: W, the keep mask, the explanation rating, and what could not
    be read."""

    ignore: np.ndarray  # W, bool HxW: 1 = the model must not use this pixel
    keep: np.ndarray  # bool HxW: 1 = the annotator affirmed this pixel as evidence
    rating: str | None
    problems: list[str]


def annotation_to_mask(
    result: list[dict],
    height: int,
    width: int,
    labels: Sequence[str] = (IGNORE_LABEL, ATTENTION_LABEL),
) -> AnnotationMasks:
    """An annotation's result -> (W, keep, explanation rating or None, problems).

    Regions labelled `labels[0]` ("ignore") join W. Regions labelled `labels[1]` ("model
    attention"), pre-drawn cells the annotator left as they were and rectangles or brush strokes
    they added, join the keep mask, minus W: where the annotator said both, "ignore" wins, since
    keeping a pixel the annotator struck would train the model towards it. An empty result means
    nothing to ignore and nothing kept. A region that cannot be read (unknown label or type,
    outside the image, bad RLE) is skipped and described in `problems`; the other regions still
    count.
    """
    ignore, attention = labels
    mask = np.zeros((height, width), dtype=bool)
    kept = np.zeros((height, width), dtype=bool)
    rating: str | None = None
    problems: list[str] = []
    for region in result or []:
        kind = region.get("type")
        name = f"region {region.get('id', '?')}"
        value = region.get("value") or {}
        if kind == "choices":
            if region.get("from_name") == RATING_NAME and value.get("choices"):
                rating = str(value["choices"][0])
            continue
        if kind == "textarea":
            continue
        if kind not in ("rectanglelabels", "brushlabels"):
            problems.append(f"{name}: unsupported region type {kind!r}")
            continue
        region_labels = list(value.get(kind) or [])
        unknown = [label for label in region_labels if label not in (ignore, attention)]
        if unknown or not region_labels:
            problems.append(
                f"{name}: unknown label {unknown[0] if unknown else None!r} "
                f"(expected {ignore!r} or {attention!r})"
            )
            continue
        try:
            region_mask = _region_mask(region, height, width)
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{name}: unreadable {kind} region ({type(err).__name__}: {err})")
            continue
        if not region_mask.any():
            problems.append(
                f"{name}: {kind} region lies outside the {height}x{width} image or covers no pixel"
            )
            continue
        if ignore in region_labels:
            mask |= region_mask
        else:
            kept |= region_mask
    return AnnotationMasks(mask, kept & ~mask, rating, problems)


class RoundMasks(NamedTuple):
    """A round's annotations read back, by image id."""

    ignore: dict[str, np.ndarray]
    keep: dict[str, np.ndarray]
    ratings: dict[str, str | None]
    problems: list[str]  # each naming its task and image
    seconds: dict[str, float]  # the annotator's time on each task (Label Studio's lead time)


def masks_from_annotations(annotations: list[dict], height: int, width: int) -> RoundMasks:
    """Collected annotations ({image_id, task_id, annotation_id, result[, lead_time]}) -> W,
    keep mask, rating and annotator seconds per image id, and the problems."""
    out = RoundMasks({}, {}, {}, [], {})
    for ann in annotations:
        image_id = ann["image_id"]
        read = annotation_to_mask(ann["result"], height, width)
        out.ignore[image_id], out.keep[image_id] = read.ignore, read.keep
        out.ratings[image_id] = read.rating
        out.seconds[image_id] = float(ann.get("lead_time") or 0.0)
        where = (
            f"task {ann.get('task_id')} (image {image_id}, annotation {ann.get('annotation_id')})"
        )
        out.problems.extend(f"{where}: {problem}" for problem in read.problems)
    return out
