"""What the loop sends to Label Studio: task payloads, the heat-map and cell predictions, masks as text."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

import numpy as np

from xbl.labelstudio.interface import ATTENTION_LABEL, IMAGE_NAME, RECTANGLES_NAME
from xbl.labelstudio.results import Cell


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


def cell_region_id(row: int, col: int) -> str:
    return f"cell-{row}-{col}"


def cell_rectangle(row: int, col: int, cell: int, height: int, width: int, label: str) -> dict:
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
            cell_rectangle(int(r), int(c), cell, height, width, ATTENTION_LABEL) for r, c in cells
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
