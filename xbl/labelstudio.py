"""Label Studio's side of the feedback loop, as pure data: the labeling interface, task payloads,
the pre-drawn grid cells, and annotations back to feedback masks: W (1 = the model must not use
this pixel) and the keep mask (1 = the annotator affirmed this pixel as evidence). No network
here; services/labelstudio.py talks to the server.

A round waits for `annotation_target` of its tasks (`wait.target_fraction`).

Coordinates: Label Studio stores rectangles in percent of the image, so the shown image may be
an upscaled copy of the model's input; `height`, `width` and `cell` are in model-input pixels.
"""

from __future__ import annotations

import base64
import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

IGNORE_LABEL = "ignore"
ATTENTION_LABEL = "model attention"
RATING_NAME = "explanation_rating"
RATINGS = ("good", "bad")
RECTANGLES_NAME = "cells"
BRUSH_NAME = "brush"
IMAGE_NAME = "image"
# a cluster task: does the answer on the representative hold for the cluster's members?
APPLIES_NAME = "applies_to"
APPLIES = {"all members": "all", "none": "none", "members after review": "review"}
# a review task: one click on a mask carried to a member
REVIEW_NAME = "review"
REVIEW_CHOICES = ("accept", "reject")

Cell = tuple[int, int]


def annotation_target(total: int, target_fraction: float) -> int:
    """How many of a round's `total` tasks must be annotated before it retrains (at least 1)."""
    return max(1, int(np.ceil(target_fraction * total)))


def labeling_config(
    labels: Sequence[str] = (IGNORE_LABEL, ATTENTION_LABEL), cluster: bool = False
) -> str:
    """The annotator's interface: image and explanation side by side, the model's top cells
    pre-drawn as `labels[1]` rectangles on the image; relabel (or paint) what to ignore as
    `labels[0]`; cells left as `labels[1]`, and regions drawn or painted as `labels[1]`, are
    the evidence the model should look at. `cluster`: the image is a cluster's representative;
    a montage of members follows, and the answer says whom it applies to (Label Studio wants
    every key of the config in every task, so cluster rounds use this variant)."""
    ignore, attention = labels
    return f"""<View>
  <Header value="Which outlined cells should the model ignore?"/>
  <Text name="summary" value="$summary"/>
  <View style="display: flex; gap: 1em; align-items: flex-start;">
    <View style="flex: 1;">
      <Header value="Image: relabel the cells the model must ignore; leave (or paint) '{attention}' on the evidence" size="6"/>
      <Image name="{IMAGE_NAME}" value="$image" zoom="true" zoomControl="true"/>
    </View>
    <View style="flex: 1;">
      <Header value="Model explanation (saliency, top cells outlined)" size="6"/>
      <Image name="overlay" value="$overlay"/>
    </View>
  </View>
  <RectangleLabels name="{RECTANGLES_NAME}" toName="{IMAGE_NAME}">
    <Label value="{ignore}" background="#d62728"/>
    <Label value="{attention}" background="#ffbf00"/>
  </RectangleLabels>
  <BrushLabels name="{BRUSH_NAME}" toName="{IMAGE_NAME}">
    <Label value="{ignore}" background="#d62728"/>
    <Label value="{attention}" background="#ffbf00"/>
  </BrushLabels>
  <Header value="Is the model right for the right reasons?" size="6"/>
  <Choices name="{RATING_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="true">
    <Choice value="{RATINGS[0]}"/>
    <Choice value="{RATINGS[1]}"/>
  </Choices>{_cluster_part() if cluster else ""}
  <TextArea name="comment" toName="{IMAGE_NAME}" placeholder="Comment (optional)" rows="2"
            maxSubmissions="1"/>
</View>"""


def _cluster_part() -> str:
    """The members' montage beside the question whom the answer applies to, so both stay in
    view under the representative."""
    choices = "".join(f'\n        <Choice value="{value}"/>' for value in APPLIES)
    return f"""
  <View style="display: flex; gap: 1em; align-items: flex-start;">
    <View style="flex: 1;">
      <Header value="Members of this cluster (a sample), with the model's explanation" size="6"/>
      <Image name="montage" value="$montage"/>
    </View>
    <View style="flex: 1;">
      <Header value="What you marked to ignore applies to:" size="6"/>
      <Choices name="{APPLIES_NAME}" toName="{IMAGE_NAME}" choice="single">{choices}
      </Choices>
    </View>
  </View>"""


def review_labeling_config() -> str:
    """A review task: one member with the mask carried to it drawn in red; one click."""
    choices = "".join(f'<Choice value="{value}"/>' for value in REVIEW_CHOICES)
    return f"""<View>
  <Header value="Should the model ignore the red region here, as in the cluster's answer?"/>
  <Text name="summary" value="$summary"/>
  <Image name="{IMAGE_NAME}" value="$image"/>
  <Choices name="{REVIEW_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="true"
           required="true">{choices}</Choices>
</View>"""


def upload_stem(image_id: str) -> str:
    """A file stem safe to upload and serve: a user's image IDs are paths (`cat/001.png`), and
    a `/` or `%` in an uploaded name breaks the URL Label Studio serves it under. IDs that are
    already safe (decoy-digits') stay as they are; others get a hash, so stems stay unique."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", image_id):
        return image_id
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("_")[:60]
    return f"{slug}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def task_payload(query: dict) -> dict:
    """One Label Studio task (its `data`) for one queried image."""
    entropy = float(query["entropy"])
    data = {
        "image_id": str(query["image_id"]),
        "round": int(query["round"]),
        "image": query["image_url"],
        "overlay": query["overlay_url"],
        "true_label": str(query["true_label"]),
        "predicted_label": str(query["predicted_label"]),
        "entropy": entropy,
        "cell": int(query["cell"]),
        "height": int(query["height"]),
        "width": int(query["width"]),
        "summary": (
            f"image {query['image_id']} · round {int(query['round'])} · "
            f"true label {query['true_label']} · predicted {query['predicted_label']} · "
            f"entropy {entropy:.3f}"
        ),
    }
    if "members" in query:  # a cluster's representative: its members and their montage
        data.update(
            montage=query["montage_url"],
            cluster=int(query["cluster"]),
            members=[str(m) for m in query["members"]],
        )
        data["summary"] += (
            f" · represents cluster {query['cluster']} ({len(query['members'])} images)"
        )
    return {"data": data}


def encode_mask(mask: np.ndarray) -> str:
    """A boolean mask as compact text (base64 of its packed bits) to travel in task data."""
    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool).ravel())).decode()


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return bits[: height * width].reshape(height, width).astype(bool)


def review_payload(member: dict) -> dict:
    """One review task (its `data`): a member, the mask carried to it, where it came from."""
    data = {
        key: member[key]
        for key in ("image_id", "round", "representative", "cluster", "height", "width", "mask")
    }
    data.update(
        image=member["image_url"],
        confidence=float(member["confidence"]),
        summary=(
            f"image {member['image_id']} · round {int(member['round'])} · carried from "
            f"{member['representative']} (cluster {member['cluster']}) · confidence "
            f"{float(member['confidence']):.2f}"
        ),
    )
    return {"data": data}


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


def cell_region_id(row: int, col: int) -> str:
    return f"cell-{row}-{col}"


def _cell_rectangle(row: int, col: int, cell: int, height: int, width: int, label: str) -> dict:
    """A grid cell as a Label Studio rectangle in percent coordinates (edge cells clipped)."""
    top, left = row * cell, col * cell
    return {
        "id": cell_region_id(row, col),
        "from_name": RECTANGLES_NAME,
        "to_name": IMAGE_NAME,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * left / width,
            "y": 100.0 * top / height,
            "width": 100.0 * (min(left + cell, width) - left) / width,
            "height": 100.0 * (min(top + cell, height) - top) / height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def cell_predictions(
    cells: Iterable[Cell],
    cell: int,
    height: int,
    width: int,
    model_version: str,
    score: float = 0.0,
) -> dict:
    """The model's top cells as one prediction, pre-drawn as "model attention" rectangles."""
    return {
        "model_version": model_version,
        "score": float(score),
        "result": [
            _cell_rectangle(int(r), int(c), cell, height, width, ATTENTION_LABEL) for r, c in cells
        ],
    }


def cells_from_prediction(result: list[dict], cell: int, height: int, width: int) -> list[Cell]:
    """Back from the pre-drawn rectangles to grid (row, col), in the prediction's order."""
    cells = []
    for region in result:
        if region.get("type") != "rectanglelabels":
            continue
        value = region["value"]
        top, left = value["y"] * height / 100.0, value["x"] * width / 100.0
        cells.append((int(round(top / cell)), int(round(left / cell))))
    return cells


# --- annotations back to masks ---------------------------------------------------------------


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


def validate_labeling_config(config: str) -> list[str]:
    """What the pipeline needs from a (possibly edited) project config; empty = fine."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError as err:
        return [f"labeling config is not valid XML: {err}"]
    problems = []
    rect = root.find(f".//RectangleLabels[@name='{RECTANGLES_NAME}']")
    if rect is None:
        problems.append(f"no RectangleLabels named {RECTANGLES_NAME!r}")
    else:
        values = {label.get("value") for label in rect.iter("Label")}
        problems += [
            f"RectangleLabels {RECTANGLES_NAME!r} lacks the label {label!r}"
            for label in (IGNORE_LABEL, ATTENTION_LABEL)
            if label not in values
        ]
    if root.find(f".//Image[@name='{IMAGE_NAME}']") is None:
        problems.append(f"no Image named {IMAGE_NAME!r}")
    return problems


# --- the simulated annotator -----------------------------------------------------------------


def oracle_ignore_cells(
    cells: Iterable[Cell], cell: int, relevance_mask: np.ndarray, max_overlap: float
) -> list[Cell]:
    """The shown cells a careful annotator marks "ignore": those whose share of pixels inside
    the relevance mask (the true evidence) is below `max_overlap`."""
    relevance = np.asarray(relevance_mask, dtype=bool)
    chosen = []
    for row, col in cells:
        patch = relevance[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
        if patch.size and patch.mean() < max_overlap:
            chosen.append((int(row), int(col)))
    return chosen


def oracle_annotation(
    cells: Iterable[Cell],
    cell: int,
    height: int,
    width: int,
    relevance_mask: np.ndarray,
    max_overlap: float,
    scope: str | None = None,
) -> list[dict]:
    """The result a person would submit: each shown cell relabelled "ignore" or kept as
    "model attention" (so the kept cells are the shown ones on the evidence, and become the
    keep mask), and the explanation rated "good" only when nothing is to be ignored. On a
    cluster task (`scope` given: all or review) the answer applies to the members in that
    scope when something was marked, to none when nothing was."""
    cells = [(int(r), int(c)) for r, c in cells]
    ignored = set(oracle_ignore_cells(cells, cell, relevance_mask, max_overlap))
    result = [
        _cell_rectangle(
            r, c, cell, height, width, IGNORE_LABEL if (r, c) in ignored else ATTENTION_LABEL
        )
        for r, c in cells
    ]
    result.append(
        {
            "id": "rating",
            "from_name": RATING_NAME,
            "to_name": IMAGE_NAME,
            "type": "choices",
            "value": {"choices": [RATINGS[1] if ignored else RATINGS[0]]},
        }
    )
    if scope is not None:
        said = {v: k for k, v in APPLIES.items()}[scope if ignored else "none"]
        result.append(_choice_region(APPLIES_NAME, said))
    return result


def _choice_region(name: str, value: str) -> dict:
    return {
        "id": name,
        "from_name": name,
        "to_name": IMAGE_NAME,
        "type": "choices",
        "value": {"choices": [value]},
    }


def oracle_accepts(mask: np.ndarray, relevance_mask: np.ndarray, max_overlap: float) -> bool:
    """The simulated reviewer's click: accept a nonempty carried mask when at most
    `max_overlap` of it lies on the evidence (the rule it applies to cells)."""
    mask = np.asarray(mask, dtype=bool)
    on_evidence = (mask & np.asarray(relevance_mask, dtype=bool)).sum()
    return bool(mask.any() and on_evidence <= max_overlap * mask.sum())


def review_result(accept: bool) -> list[dict]:
    return [_choice_region(REVIEW_NAME, REVIEW_CHOICES[0 if accept else 1])]


def oracle_seconds(seconds: dict[str, float], kind: str, relabelled: int = 0) -> float:
    """The simulated annotator's time on one task by the per-action time model (docs/methods.md,
    "Annotation cost"): `task` to open and read an image task, plus `region` per region
    relabelled, plus `montage` on a cluster task; `review` per review task."""
    if kind == "review":
        return float(seconds["review"])
    extra = seconds["montage"] if kind == "cluster" else 0.0
    return float(seconds["task"] + seconds["region"] * relabelled + extra)
