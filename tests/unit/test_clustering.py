"""Explanation clustering, propagation by localisation, and the cluster query strategy
(xbl/query/clustering.py, xbl/query/sampling.py, xbl/query/round.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

from xbl.config import QueryConfig
from xbl.data.digits import decoy_digits
from xbl.query.clustering import (
    cluster_explanations,
    cluster_queries,
    cluster_suspicion,
    fit_concept,
    localise,
    mask_agreement,
    propagate,
)
from xbl.query.round import cluster_round
from xbl.query.sampling import select_queries
from xbl.train.checkpoint import initial_model


def planted_maps(n_per: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Saliency maps with one blob each, at one of three places: three planted clusters."""
    rng = np.random.default_rng(seed)
    centres = [(5, 5), (5, 22), (20, 14)]
    yy, xx = np.mgrid[0:28, 0:28]
    maps, truth = [], []
    for c, (cy, cx) in enumerate(centres):
        for _ in range(n_per):
            jy, jx = rng.normal(0, 1.0, 2)
            blob = np.exp(-((yy - cy - jy) ** 2 + (xx - cx - jx) ** 2) / 8.0)
            maps.append(blob * rng.choice([-1, 1]) + rng.normal(0, 0.05, (28, 28)))
            truth.append(c)
    return np.stack(maps), np.array(truth)


@pytest.mark.parametrize("selection", ["eigengap", "silhouette"])
def test_k_selection_finds_the_planted_clusters(selection):
    maps, truth = planted_maps()
    clusters = cluster_explanations(maps, seed=0, k_range=(2, 8), selection=selection)
    assert clusters.k == 3
    assert adjusted_rand_score(truth, clusters.labels) == pytest.approx(1.0)
    # each representative is a member of its own cluster
    assert all(clusters.labels[r] == c for c, r in enumerate(clusters.representatives))


def test_clustering_is_deterministic_per_seed():
    maps, _ = planted_maps(seed=1)
    maps = maps + np.random.default_rng(2).normal(0, 0.3, maps.shape)  # blur the boundaries
    first = cluster_explanations(maps, seed=3)
    again = cluster_explanations(maps.copy(), seed=3)
    assert np.array_equal(first.labels, again.labels)
    assert first.summary() == again.summary()


class PatchNet(nn.Module):
    """A fixed random convolution at full resolution (the explained layer) and a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.last_conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2)
        )

    def forward(self, x):
        return self.head(self.last_conv(x))


def scene(rng, patch_at: tuple[int, int] | None) -> tuple[torch.Tensor, np.ndarray]:
    """A dim checkered object in the middle and, optionally, a flat bright 4x4 patch."""
    image = rng.normal(0.05, 0.02, (28, 28))
    yy, xx = np.mgrid[0:28, 0:28]
    disc = (yy - 14) ** 2 + (xx - 14) ** 2 < 36
    image[disc] = np.where((yy + xx)[disc] % 2 == 0, 0.45, 0.15)
    mask = np.zeros((28, 28), dtype=bool)
    if patch_at is not None:
        r, c = patch_at
        image[r : r + 4, c : c + 4] = 1.0
        mask[r : r + 4, c : c + 4] = True
    return torch.tensor(image, dtype=torch.float32)[None], mask


def test_propagation_finds_a_planted_patch_wherever_it_is_and_doubts_where_it_is_absent():
    rng = np.random.default_rng(0)
    rep, rep_mask = scene(rng, (1, 1))
    places = [(1, 23), (23, 2), (22, 22), (2, 12), (12, 1)]
    with_patch = [scene(rng, p) for p in places]
    without = [scene(rng, None) for _ in range(5)]
    members = torch.stack([x for x, _ in with_patch + without])
    out = propagate(PatchNet(), rep, rep_mask, members, threshold=0.8)
    truth = np.stack([m for _, m in with_patch])
    agreement = mask_agreement(out.masks[:5], truth)
    assert agreement["iou"] > 0.6, agreement
    assert out.confidence[:5].min() > 0.8
    assert out.confidence[5:].max() < 0.5
    assert out.confident(0.8).tolist() == [True] * 5 + [False] * 5


def test_a_concept_needs_marked_and_unmarked_pixels():
    acts = np.random.default_rng(0).normal(size=(4, 7, 7))
    with pytest.raises(ValueError):
        fit_concept(acts, np.zeros((28, 28), dtype=bool))
    with pytest.raises(ValueError):
        fit_concept(acts, np.ones((28, 28), dtype=bool))
    concept = fit_concept(acts, np.pad(np.ones((8, 8), dtype=bool), ((0, 20), (0, 20))))
    # the representative's own marked and unmarked means score 1 and 0 by construction
    scores = localise(concept, acts[None], (28, 28)).scores[0]
    assert scores[:2, :2].mean() == pytest.approx(1.0)


def test_the_cluster_strategy_asks_once_per_chosen_cluster():
    reps = np.array([10, 20, 30, 40])
    assert cluster_queries(reps, np.array([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [20, 40, 30]
    assert cluster_queries(reps, np.zeros(4), 10).tolist() == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="cluster_queries"):
        select_queries(np.full((4, 2), 0.5), None, 2, "cluster")


def test_a_cluster_round_queries_one_representative_per_cluster(tmp_path):
    data = decoy_digits(seed=0)
    model = initial_model("small_cnn", data, seed=0)
    pool = data.indices("train")
    probs = np.random.default_rng(0).dirichlet(np.ones(10), len(pool))
    exclude = np.zeros(len(pool), dtype=bool)
    exclude[:5] = True
    cfg = QueryConfig(strategy="cluster", k=3, cluster_pool=120, clusters_max=6)
    clustered = cluster_round(model, data, probs, exclude, cfg)
    chosen, record = clustered.chosen, clustered.record(data.ids)
    assert len(chosen) == min(3, record["k"]) and len(set(chosen)) == len(chosen)
    assert not exclude[chosen].any()
    members = [set(m) for m in record["members"]]
    clusters_asked = [
        next(c for c, m in enumerate(members) if data.ids[pool[i]] in m) for i in chosen
    ]
    assert len(set(clusters_asked)) == len(chosen)  # one query per cluster
    ranked = np.argsort(-np.array(record["suspicion"]), kind="stable")[: len(chosen)]
    assert clusters_asked == ranked.tolist()  # the most suspicious clusters, in order
    assert sum(record["sizes"]) == 120


def test_suspicion_is_saliency_off_the_shared_object():
    images = np.zeros((4, 1, 8, 8))
    images[:, :, 2:6, 2:6] = 1.0  # every member's object in the middle
    on_object = np.zeros((4, 8, 8))
    on_object[:, 3, 3] = 1.0
    off_object = np.zeros((4, 8, 8))
    off_object[:, 0, 7] = 1.0
    maps = np.concatenate([on_object, off_object])
    clusters = cluster_explanations(maps, k_range=(2, 2), neighbours=3)
    suspicion = cluster_suspicion(maps, np.concatenate([images, images]), clusters)
    off = clusters.labels[4]
    assert suspicion[off] == pytest.approx(1.0) and suspicion[1 - off] == pytest.approx(0.0)
