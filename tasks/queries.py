"""Query step: pick the training images the model is least sure of and draw its explanations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from prefect import task

from xbl.config import QueryConfig
from xbl.data.images import to_tensor
from xbl.data.prepared import PreparedData
from xbl.explain.cells import top_cells
from xbl.explain.pool import pool_saliency
from xbl.explain.render import display_scale, image_png, montage_png, overlay_png
from xbl.explain.saliency import saliency_map
from xbl.labelstudio.payloads import upload_stem
from xbl.query.clustering import cluster_explanations, cluster_suspicion
from xbl.query.sampling import cluster_queries, predictive_entropy, select_queries
from xbl.train.checkpoint import load_model
from xbl.train.loop import predict_proba


def query_records(
    data: PreparedData,
    idx: np.ndarray,
    probs: np.ndarray,
    attr: torch.Tensor,
    cells: torch.Tensor,
    cell: int,
    round_number: int,
    out: Path,
) -> list[dict]:
    """Render each query's image and overlay PNG and describe it for Label Studio."""
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
                "index": int(i),
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
            }
        )
    return records


def cluster_round(
    model, data: PreparedData, probs: np.ndarray, exclude: np.ndarray, cfg: QueryConfig, out: Path
) -> tuple[np.ndarray, list[dict]]:
    """`query.strategy: cluster`: cluster the candidates' explanations (the top
    `query.cluster_pool` by entropy, or all), and ask about the representatives of the most
    suspicious clusters; the clusters and their members go to clusters.json, the round's
    artifact. Returns the chosen positions in the pool and, per chosen representative, its
    cluster, members and a montage PNG of a sample of them with their heat-maps."""
    pool = data.indices("train")
    size = cfg.cluster_pool or len(pool)
    candidates = select_queries(probs, None, size, "entropy", exclude=exclude)
    candidates = np.sort(candidates)  # cluster in pool order: the same pool, the same clusters
    attr = pool_saliency(model, data.images, pool[candidates], cfg.saliency, cfg.blur_sigma)
    clusters = cluster_explanations(
        attr, seed=cfg.seed, k_range=(2, cfg.clusters_max), selection=cfg.cluster_selection
    )
    suspicion = cluster_suspicion(attr.numpy(), data.images[pool[candidates]], clusters)
    chosen = cluster_queries(candidates[clusters.representatives], suspicion, cfg.k)
    asked = [int(np.flatnonzero(candidates[clusters.representatives] == i)[0]) for i in chosen]
    extras = [
        _cluster_extras(data, pool[candidates], attr, clusters.members(c), c, cfg, out)
        for c in asked
    ]
    record = {
        **clusters.summary(),
        "suspicion": [float(v) for v in suspicion],
        "members": [
            [str(data.ids[pool[candidates[m]]]) for m in clusters.members(c)]
            for c in range(clusters.k)
        ],
        "queried": [str(data.ids[pool[i]]) for i in chosen],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "clusters.json").write_text(json.dumps(record, indent=1))
    return chosen, extras


def _cluster_extras(
    data: PreparedData,
    rows: np.ndarray,
    attr: torch.Tensor,
    members: np.ndarray,
    cluster: int,
    cfg: QueryConfig,
    out: Path,
) -> dict:
    """A chosen cluster's members (ids, in pool order) and the montage of a fixed sample of
    them (the same seed, the same sample) that its task shows."""
    rng = np.random.default_rng(cfg.seed + cluster)
    shown = np.sort(rng.permutation(members)[: cfg.montage_members])
    montage = montage_png(
        data.images[rows[shown]], attr[shown], out / f"cluster-{cluster}_montage.png"
    )
    return {
        "cluster": int(cluster),
        "members": [str(data.ids[rows[m]]) for m in members],
        "montage_path": str(montage),
    }


@task
def select_round_queries(
    checkpoint: str,
    dataset: str,
    cfg: QueryConfig,
    round_number: int,
    already_annotated: list[str],
    out_dir: str,
) -> str:
    """The round's queries (training images, most informative first) with their saliency PNGs;
    returns the path of queries.json."""
    data = PreparedData.load(Path(dataset))
    model, _ = load_model(checkpoint)
    pool = data.indices("train")
    probs = predict_proba(model, data.split_images("train"))
    exclude = np.isin(data.ids[pool], list(already_annotated))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extras: list[dict] = []
    if cfg.strategy == "cluster":
        chosen, extras = cluster_round(model, data, probs, exclude, cfg, out)
    else:
        chosen = select_queries(
            probs,
            data.labels[pool],
            cfg.k,
            cfg.strategy,
            exclude=exclude,
            seed=cfg.seed + round_number,
        )
    idx = pool[chosen]
    attr = saliency_map(model, to_tensor(data.images[idx]), cfg.saliency, cfg.blur_sigma)
    cells = top_cells(attr, cfg.grid_cell, cfg.top_cells)
    records = query_records(data, idx, probs[chosen], attr, cells, cfg.grid_cell, round_number, out)
    for record, extra in zip(records, extras):  # a cluster round: each query is a cluster's
        record.update(extra)
    path = out / "queries.json"
    path.write_text(json.dumps(records, indent=1))
    return str(path)
