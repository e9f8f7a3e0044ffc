"""A query round, in the order its data flows: choose the training images to ask about (a
strategy, or the cluster round), explain them (saliency, top cells), and draw them for the
annotator (xbl/query/records.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from xbl.config import QueryConfig
from xbl.data.images import to_tensor
from xbl.data.prepared import PreparedData
from xbl.explain.cells import top_cells
from xbl.explain.pool import pool_saliency
from xbl.explain.saliency import saliency_map
from xbl.query.clustering import (
    ClusterRound,
    cluster_explanations,
    cluster_queries,
    cluster_suspicion,
)
from xbl.query.records import query_records
from xbl.query.sampling import select_queries


def query_round(
    model: nn.Module,
    data: PreparedData,
    probs: np.ndarray,
    exclude: np.ndarray,
    cfg: QueryConfig,
    round_number: int,
    out: Path,
) -> list[dict]:
    """The round's queries, most informative first, with their PNGs drawn into `out`. `probs`
    are the model's predictions on the training pool; `exclude` marks its images already
    annotated."""
    pool = data.indices("train")
    clustered = None
    if cfg.strategy == "cluster":
        clustered = cluster_round(model, data, probs, exclude, cfg)
        chosen = clustered.chosen
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
    return query_records(
        data, idx, probs[chosen], attr, cells, cfg.grid_cell, round_number, out, clustered
    )


def cluster_round(
    model: nn.Module,
    data: PreparedData,
    probs: np.ndarray,
    exclude: np.ndarray,
    cfg: QueryConfig,
) -> ClusterRound:
    """`query.strategy: cluster`: cluster the candidates' explanations (the top
    `query.cluster_pool` by entropy, or all), and ask about the representatives of the most
    suspicious clusters."""
    pool = data.indices("train")
    size = cfg.cluster_pool or len(pool)
    candidates = select_queries(probs, None, size, "entropy", exclude=exclude)
    candidates = np.sort(candidates)  # cluster in pool order: the same pool, the same clusters
    rows = pool[candidates]
    attr = pool_saliency(model, data.images, rows, cfg.saliency, cfg.blur_sigma)
    clusters = cluster_explanations(
        attr, seed=cfg.seed, k_range=(2, cfg.clusters_max), selection=cfg.cluster_selection
    )
    suspicion = cluster_suspicion(attr.numpy(), data.images[rows], clusters)
    representatives = candidates[clusters.representatives]
    chosen = cluster_queries(representatives, suspicion, cfg.k)
    asked = [int(np.flatnonzero(representatives == i)[0]) for i in chosen]
    shown = []
    for c in asked:  # a cluster's own seed: the same round shows the same members in its montage
        rng = np.random.default_rng(cfg.seed + c)
        shown.append(np.sort(rng.permutation(clusters.members(c))[: cfg.montage_members]))
    return ClusterRound(rows, attr, clusters, suspicion, chosen, asked, shown)
