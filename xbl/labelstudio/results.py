"""What comes back from Label Studio: annotations and review verdicts read into feedback masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from xbl.errors import AnnotationError
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


def _regions(result) -> list[dict]:
    """The regions of a result that are objects; anything else in it is read by
    `annotation_to_mask`, which reports it."""
    return [r for r in result if isinstance(r, dict)] if isinstance(result, list) else []


def _value(region: dict) -> dict:
    value = region.get("value")
    return value if isinstance(value, dict) else {}


def _chosen(region: dict) -> str | None:
    choices = _value(region).get("choices")
    return str(choices[0]) if isinstance(choices, list) and choices else None


def _choice(result: list[dict], name: str) -> str | None:
    for region in _regions(result):
        if region.get("type") == "choices" and region.get("from_name") == name:
            return _chosen(region)
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
        IGNORE_LABEL in _labels(region)
        for region in _regions(result)
        if region.get("type") in DRAWN
    )


DRAWN = ("rectanglelabels", "brushlabels")  # the region types that mark pixels


def _labels(region: dict) -> list:
    labels = _value(region).get(region.get("type"))
    return labels if isinstance(labels, list) else []


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
        if not isinstance(data, list | tuple | np.ndarray):
            raise ValueError(f"RLE must be a list of bytes, not {type(data).__name__}")
        values = np.asarray(data, dtype=np.int64)
        if values.ndim != 1 or ((values < 0) | (values > 255)).any():
            raise ValueError("RLE must be a flat list of bytes (0-255)")
        self.bits = np.unpackbits(values.astype(np.uint8))
        self.pos = 0

    def left(self) -> int:
        return self.bits.size - self.pos

    def read(self, n: int) -> int:
        if self.pos + n > self.bits.size:
            raise ValueError("RLE stream ends early")
        value = 0
        for bit in self.bits[self.pos : self.pos + n]:
            value = (value << 1) | int(bit)
        self.pos += n
        return value


def decode_rle(rle: Sequence[int], size: int | None = None) -> np.ndarray:
    """Label Studio brush RLE -> the flat array it encodes (RGBA bytes, row-major).

    Header: 32-bit value count, 5-bit word size - 1, four 4-bit run-length field sizes - 1.
    Then chunks: 1 flag bit (1 = repeat one value, 0 = literal values), a 2-bit index into the
    field sizes, the run length - 1 in that many bits, then one word (repeat) or `run` words.

    The declared count is checked before the output is allocated: against `size` when given,
    and always against the most values the stream's remaining bits could encode, so a short
    RLE declaring billions of values allocates nothing. That is why this is not the SDK's
    `label_studio_sdk.converter.brush.decode_rle`, which allocates the declared count (up to
    4 GiB) first; a test decodes the SDK's own encoder's output here.
    """
    bits = _BitReader(rle)
    count = bits.read(32)
    word_size = bits.read(5) + 1
    run_sizes = [bits.read(4) + 1 for _ in range(4)]
    if size is not None and count != size:
        raise ValueError(f"RLE declares {count} values, expected {size}")
    # the densest chunk: a repeat of the longest run, 1 + 2 + run-size + word bits
    most = max((1 << s) / (3 + s + word_size) for s in run_sizes) * bits.left()
    if count > most:
        raise ValueError(f"RLE declares {count} values, more than its {len(rle)} bytes can hold")
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


# Label Studio paints on the image it shows: the model input, upscaled whole to about 560 px a
# side (xbl.explain.render.display_scale). A canvas far larger, or of another shape, is not one
# the loop served, and is refused before its RLE is decoded.
MAX_CANVAS_SIDE = 4096


def _check_canvas(oh: int, ow: int, height: int, width: int) -> None:
    too_large = max(oh, ow) > max(MAX_CANVAS_SIDE, height, width)
    # an upscaling keeps the aspect ratio, to within a pixel of rounding on each side
    reshaped = abs(oh * width - ow * height) > max(height, width)
    if min(oh, ow) < 1 or too_large or reshaped:
        raise ValueError(
            f"painted on a {ow}x{oh} canvas, which is not the {width}x{height} image "
            f"or an upscaling of it (at most {MAX_CANVAS_SIDE} px a side)"
        )


def _brush_mask(region: dict, height: int, width: int) -> np.ndarray:
    oh, ow = int(region["original_height"]), int(region["original_width"])
    _check_canvas(oh, ow, height, width)
    rgba = decode_rle(region["value"]["rle"], size=oh * ow * 4)
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
    keeping a pixel the annotator struck would train the model towards it. An empty result (or
    one with only a rating or a note) means nothing to ignore and nothing kept. A region that
    cannot be read (not an object, unknown label or type, outside the image, bad RLE) is
    skipped and described in `problems`; the other regions still count. When the annotator
    drew regions and none can be read, the annotation says nothing we can use: AnnotationError,
    never "nothing to ignore".
    """
    if result is not None and not isinstance(result, list):
        raise AnnotationError(f"its result is {_kind_of(result)}, not a list of regions")
    mask = np.zeros((height, width), dtype=bool)
    kept = np.zeros((height, width), dtype=bool)
    rating: str | None = None
    problems: list[str] = []
    drawn = 0
    for number, region in enumerate(result or []):
        if isinstance(region, dict) and region.get("type") in ("choices", "textarea"):
            if region.get("type") == "choices" and region.get("from_name") == RATING_NAME:
                rating = _chosen(region) or rating
            continue
        drawn += 1
        try:
            region_mask, ignored = _drawn_mask(region, height, width, labels)
        except ValueError as err:
            problems.append(f"{_region_name(region, number)}: {err}")
            continue
        if ignored:
            mask |= region_mask
        else:
            kept |= region_mask
    if drawn and len(problems) == drawn:
        raise AnnotationError(f"none of its {drawn} region(s) can be read: " + "; ".join(problems))
    return AnnotationMasks(mask, kept & ~mask, rating, problems)


def _region_name(region, number: int) -> str:
    """Its Label Studio id, else its place in the result."""
    return f"region {region.get('id', f'#{number}') if isinstance(region, dict) else f'#{number}'}"


def _kind_of(thing) -> str:
    return "null" if thing is None else f"a {type(thing).__name__} ({str(thing)[:40]!r})"


def _drawn_mask(region, height: int, width: int, labels: Sequence[str]) -> tuple[np.ndarray, bool]:
    """A drawn region's pixels and whether it says "ignore"; ValueError saying why it cannot
    be read."""
    if not isinstance(region, dict):
        raise ValueError(f"is {_kind_of(region)}, not an object")
    kind = region.get("type")
    if kind not in DRAWN:
        raise ValueError(f"unsupported region type {kind!r}")
    if not isinstance(region.get("value"), dict):
        raise ValueError(f"its value is {_kind_of(region.get('value'))}, not an object")
    ignore, attention = labels
    region_labels = _labels(region)
    unknown = [label for label in region_labels if label not in (ignore, attention)]
    if unknown or not region_labels:
        raise ValueError(
            f"unknown label {unknown[0] if unknown else None!r} "
            f"(expected {ignore!r} or {attention!r})"
        )
    try:
        region_mask = _region_mask(region, height, width)
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"unreadable {kind} region ({type(err).__name__}: {err})") from None
    if not region_mask.any():
        raise ValueError(
            f"{kind} region lies outside the {height}x{width} image or covers no pixel"
        )
    return region_mask, ignore in region_labels


class RoundMasks(NamedTuple):
    """A round's annotations read back, by image id."""

    ignore: dict[str, np.ndarray]
    keep: dict[str, np.ndarray]
    ratings: dict[str, str | None]
    problems: list[str]  # each naming its task and image
    seconds: dict[str, float]  # the annotator's time on each task (Label Studio's lead time)


class UnreadableAnnotations(AnnotationError):
    """Annotations of a round that could not be read, each named by its task; `read` holds the
    round's other annotations, read, for a caller that reports these and goes on without
    them."""

    def __init__(self, unreadable: list[str], read: RoundMasks):
        super().__init__(
            f"{len(unreadable)} annotation(s) cannot be read:\n  " + "\n  ".join(unreadable)
        )
        self.unreadable, self.read = unreadable, read


def masks_from_annotations(annotations: list[dict], height: int, width: int) -> RoundMasks:
    """Collected annotations ({image_id, task_id, annotation_id, result[, lead_time]}) -> W,
    keep mask, rating and annotator seconds per image id, and the problems. Every annotation
    is read; those that cannot be are named together in one UnreadableAnnotations."""
    out, unreadable = RoundMasks({}, {}, {}, [], {}), []
    for ann in annotations:
        image_id = ann["image_id"]
        where = (
            f"task {ann.get('task_id')} (image {image_id}, annotation {ann.get('annotation_id')})"
        )
        try:
            read = annotation_to_mask(ann.get("result"), height, width)
        except AnnotationError as err:
            unreadable.append(f"{where}: {err}")
            continue
        out.ignore[image_id], out.keep[image_id] = read.ignore, read.keep
        out.ratings[image_id] = read.rating
        out.seconds[image_id] = float(ann.get("lead_time") or 0.0)
        out.problems.extend(f"{where}: {problem}" for problem in read.problems)
    if unreadable:
        raise UnreadableAnnotations(unreadable, out)
    return out
