"""Query step: pick the training images the model is least sure of and draw its explanations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from prefect import task

from tasks.training import load_model
from xbl.data import PreparedData
from xbl.saliency import image_png, overlay_png, saliency_map, top_cells
from xbl.sampling import predictive_entropy, select_queries
from xbl.train import predict_proba, to_tensor


def query_records(data: PreparedData, idx: np.ndarray, probs: np.ndarray, attr: torch.Tensor,
                  cells: torch.Tensor, settings: dict, round_number: int, out: Path) -> list[dict]:
    """Render each query's image and overlay PNG and describe it for Label Studio."""
    records = []
    _, _, h, w = data.images.shape
    for j, i in enumerate(idx):
        image_id = str(data.ids[i])
        image = data.images[i]
        shown = [tuple(map(int, rc)) for rc in cells[j].tolist()]
        records.append({
            "image_id": image_id, "index": int(i), "round": round_number,
            "image_path": str(image_png(image, out / f"{image_id}.png")),
            "overlay_path": str(overlay_png(image, attr[j].cpu().numpy(), shown,
                                            settings["grid_cell"], out / f"{image_id}_overlay.png")),
            "true_label": str(data.classes[data.labels[i]]),
            "predicted_label": str(data.classes[probs[j].argmax()]),
            "entropy": float(predictive_entropy(probs[j:j + 1])[0]),
            "cells": [list(rc) for rc in shown], "cell": int(settings["grid_cell"]),
            "height": int(h), "width": int(w),
        })
    return records


@task
def select_round_queries(checkpoint: str, dataset: str, settings: dict, round_number: int,
                         already_annotated: list[str], out_dir: str) -> str:
    """The round's queries (training images, most informative first) with their saliency PNGs;
    returns the path of queries.json."""
    data = PreparedData.load(Path(dataset))
    model = load_model(checkpoint)
    pool = data.indices("train")
    probs = predict_proba(model, to_tensor(data.images[pool]))
    exclude = np.isin(data.ids[pool], list(already_annotated))
    chosen = select_queries(probs, data.labels[pool], int(settings["k"]),
                            settings.get("strategy", "entropy"), exclude=exclude,
                            seed=int(settings.get("seed", 0)) + round_number)
    idx = pool[chosen]
    attr = saliency_map(model, to_tensor(data.images[idx]), settings.get("saliency", "deeplift"),
                        float(settings.get("blur_sigma", 3.0)))
    cells = top_cells(attr, int(settings["grid_cell"]), int(settings["top_cells"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = query_records(data, idx, probs[chosen], attr, cells, settings, round_number, out)
    path = out / "queries.json"
    path.write_text(json.dumps(records, indent=1))
    return str(path)
