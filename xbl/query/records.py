"""A round's queries as the annotator gets them (queries.json): each image and its overlay
drawn, and what its task says; in a cluster round, the clusters (clusters.json) and a montage
of each asked cluster's members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from xbl.data.prepared import PreparedData
from xbl.explain.render import display_scale, image_png, montage_png, overlay_png
from xbl.labelstudio.payloads import upload_stem
from xbl.query.clustering import ClusterRound
from xbl.query.sampling import predictive_entropy


def query_records(
    data: PreparedData,
    idx: np.ndarray,
    probs: np.ndarray,
    attr: torch.Tensor,
    cells: torch.Tensor,
    cell: int,
    round_number: int,
    out: Path,
    clustered: ClusterRound | None = None,
) -> list[dict]:
    """Render each query's image and overlay PNG and describe it for Label Studio; in a cluster
    round each query is a cluster's representative, and its record names the cluster."""
    extras = cluster_extras(data, clustered, out) if clustered else [{}] * len(idx)
    records = []
    _, _, h, w = data.images.shape
    scale = display_scale(h, w)
    for j, i in enumerate(idx):
        image_id = str(data.ids[i])
        image, stem = data.images[i], upload_stem(image_id)
        shown = [tuple(map(int, rc)) for rc in cells[j].tolist()]
        records.append(
            {
                "image_id": image_id,
                "index": int(i),  # its row in this data version only: later rounds join by ID
                "round": round_number,
                "image_path": str(image_png(image, out / f"{stem}.png", scale)),
                "overlay_path": str(
                    overlay_png(
                        image,
                        attr[j].cpu().numpy(),
                        shown,
                        cell,
                        out / f"{stem}_overlay.png",
                        scale,
                    )
                ),
                "true_label": str(data.classes[data.labels[i]]),
                "predicted_label": str(data.classes[probs[j].argmax()]),
                "entropy": float(predictive_entropy(probs[j : j + 1])[0]),
                "cells": [list(rc) for rc in shown],
                "cell": cell,
                "height": int(h),
                "width": int(w),
                **extras[j],
            }
        )
    return records


def cluster_extras(data: PreparedData, clustered: ClusterRound, out: Path) -> list[dict]:
    """Writes clusters.json; per query, its cluster, the members (ids, in pool order) and the
    montage of the sample of them its task shows."""
    (out / "clusters.json").write_text(json.dumps(clustered.record(data.ids), indent=1))
    rows, attr = clustered.rows, clustered.attr
    return [
        {
            "cluster": int(c),
            "members": clustered.members(c, data.ids),
            "montage_path": str(
                montage_png(data.images[rows[shown]], attr[shown], out / f"cluster-{c}_montage.png")
            ),
        }
        for c, shown in zip(clustered.asked, clustered.shown)
    ]
