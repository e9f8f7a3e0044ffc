"""One answer, many images: cluster the model's explanations, and carry one annotator's "ignore"
mask from a cluster's representative to its members by finding the same concept in each.

Two steps (docs/methods.md, "Explanation clustering" and "Propagation by localisation"):

1. SpRAy (Lapuschkin et al. 2019): the saliency maps the annotators see are downsized, made
   non-negative and normalised to unit mass, compared on a k-nearest-neighbour graph, and cut by
   spectral clustering; k is chosen by the eigengap of the graph's normalised Laplacian (or by
   silhouette) and reported. A shortcut the model uses in many images shows up as its own cluster.
2. Reveal2Revise-style localisation (Anders et al. 2022; Pahde et al. 2023): the representative's
   marked pixels and its unmarked pixels give two sets of activation vectors in the explained
   layer (`model.last_conv`); a regularised discriminant direction between them is the
   concept (a CAV). In each member the projection on it, scaled so that the representative's
   marked and unmarked means sit at 1 and 0, is upsampled and thresholded into a mask. The
   concept's peak strength is the member's confidence: low means the concept was not found and
   the member goes to review instead of training. `localise_cells` does the same on the
   annotation grid: the member's cells most like the mark, as many as the annotator marked.

Plain numpy, torch and scikit-learn: no Prefect, MLflow or Label Studio here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csgraph
from sklearn.cluster import spectral_clustering
from sklearn.metrics import silhouette_score
from sklearn.neighbors import kneighbors_graph
from torch import nn

from xbl.config import K_SELECTION, QueryConfig
from xbl.explain.saliency import eval_mode, upsample_map
from xbl.progress import batch_starts

_EPS = 1e-12


# ---------------------------------------------------------------- 1. explanation clustering
def explanation_features(attr: torch.Tensor | np.ndarray, side: int = 8) -> np.ndarray:
    """SpRAy's input: |saliency| average-pooled to side×side, each map scaled to unit mass, then
    square-rooted, so Euclidean distance is the Hellinger distance between where two maps look
    (a sign flip of DeepLIFT on a label-coded shortcut keeps the same location)."""
    maps = torch.as_tensor(np.asarray(attr), dtype=torch.float32).abs().unsqueeze(1)
    small = F.adaptive_avg_pool2d(maps, side).flatten(1)
    small = small / small.sum(dim=1, keepdim=True).clamp_min(_EPS)
    return small.sqrt().numpy().astype(np.float64)


def affinity_graph(features: np.ndarray, neighbours: int = 10) -> np.ndarray:
    """Symmetric k-nearest-neighbour connectivity (SpRAy's affinity), dense (n, n)."""
    n = len(features)
    knn = kneighbors_graph(features, min(neighbours, n - 1), include_self=False).toarray()
    return np.maximum(knn, knn.T)


def laplacian_spectrum(affinity: np.ndarray, count: int) -> np.ndarray:
    """The `count` smallest eigenvalues of the symmetric normalised Laplacian, ascending."""
    lap = csgraph.laplacian(affinity, normed=True)
    values = np.linalg.eigvalsh(lap)
    return np.clip(values[:count], 0.0, None)


def eigengap_k(eigenvalues: np.ndarray, k_min: int, k_max: int) -> int:
    """The k in [k_min, k_max] after which the spectrum jumps most: λ_{k+1} − λ_k largest."""
    gaps = np.diff(eigenvalues)  # gaps[k-1] = λ_{k+1} − λ_k (1-based λ)
    ks = np.arange(k_min, min(k_max, len(gaps)) + 1)
    return int(ks[np.argmax(gaps[ks - 1])])


@dataclass
class Clusters:
    """A clustering of explanations: members' cluster labels, its k and how k was chosen."""

    labels: np.ndarray  # (n,) cluster of each map, 0..k-1
    k: int
    selection: str  # eigengap | silhouette
    eigenvalues: np.ndarray  # the Laplacian's smallest eigenvalues (reported)
    scores: dict[int, float]  # per k tried: eigengap after it, or silhouette
    representatives: np.ndarray  # (k,) position of each cluster's most central member

    def members(self, cluster: int) -> np.ndarray:
        return np.flatnonzero(self.labels == cluster)

    def summary(self) -> dict:
        return {
            "k": self.k,
            "selection": self.selection,
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "scores": {str(k): float(v) for k, v in self.scores.items()},
            "sizes": [int((self.labels == c).sum()) for c in range(self.k)],
            "representatives": [int(r) for r in self.representatives],
        }


def central_members(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per cluster, the member nearest the cluster's mean explanation: what it typically shows."""
    reps = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        centre = features[members].mean(axis=0)
        reps.append(members[np.argmin(((features[members] - centre) ** 2).sum(axis=1))])
    return np.array(reps, dtype=np.int64)


def cluster_explanations(
    attr: torch.Tensor | np.ndarray,
    seed: int = QueryConfig.seed,
    k_range: tuple[int, int] = (2, QueryConfig.clusters_max),
    selection: str = QueryConfig.cluster_selection,
    side: int = 8,
    neighbours: int = 10,
) -> Clusters:
    """Spectral clustering of saliency maps (n,H,W); the same maps and seed give the same
    clusters (`cluster_qr` labelling has no random restarts)."""
    if selection not in K_SELECTION:
        raise ValueError(f"unknown k selection {selection!r}; choose one of {list(K_SELECTION)}")
    features = explanation_features(attr, side)
    n = len(features)
    k_min, k_max = max(1, k_range[0]), min(k_range[1], n - 1)
    if n < 3 or k_max < k_min:
        labels = np.zeros(n, dtype=np.int64)
        return Clusters(labels, 1, selection, np.zeros(0), {}, central_members(features, labels, 1))
    affinity = affinity_graph(features, neighbours)
    eigenvalues = laplacian_spectrum(affinity, k_max + 1)

    def cut(k: int) -> np.ndarray:
        with warnings.catch_warnings():  # well-separated clusters leave the graph disconnected
            warnings.filterwarnings("ignore", message="Graph is not fully connected")
            return spectral_clustering(
                affinity, n_clusters=k, assign_labels="cluster_qr", random_state=seed
            )

    if selection == "eigengap":
        k = eigengap_k(eigenvalues, k_min, k_max)
        scores = {j: float(eigenvalues[j] - eigenvalues[j - 1]) for j in range(k_min, k_max + 1)}
        labels = cut(k)
    else:
        cuts = {j: cut(j) for j in range(max(2, k_min), k_max + 1)}
        scores = {
            j: float(silhouette_score(features, lab)) if len(set(lab)) > 1 else -1.0
            for j, lab in cuts.items()
        }
        k = max(scores, key=scores.get)
        labels = cuts[k]
    labels = _dense_labels(labels)
    k = int(labels.max()) + 1
    return Clusters(labels, k, selection, eigenvalues, scores, central_members(features, labels, k))


def _dense_labels(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0..k-1 in order of first appearance (an empty cluster leaves no hole)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse].astype(np.int64)


# ---------------------------------------------------------------- which clusters to ask about
def off_object_share(attr: np.ndarray, images: np.ndarray, contrast: float = 0.5) -> float:
    """How much of a cluster's saliency falls off the members' shared object area.

    A pixel is object in one image where it stands out from the image's median (background)
    by more than `contrast` of the image's largest deviation; the shared object area is where
    at least half the members have object. A mark that only some members carry, at varying
    places (a corner patch, a ruler), is not shared, so saliency on it counts as off-object."""
    attr = np.abs(np.asarray(attr, dtype=np.float64))
    gray = np.asarray(images, dtype=np.float64)
    gray = gray.mean(axis=1) if gray.ndim == 4 else gray
    deviation = np.abs(gray - np.median(gray, axis=(1, 2), keepdims=True))
    peak = np.maximum(deviation.max(axis=(1, 2), keepdims=True), _EPS)
    shared_object = (deviation > contrast * peak).mean(axis=0) >= 0.5
    mass = np.maximum(attr.sum(axis=(1, 2)), _EPS)
    return float(np.mean((attr * ~shared_object).sum(axis=(1, 2)) / mass))


def cluster_suspicion(attr: np.ndarray, images: np.ndarray, clusters: Clusters) -> np.ndarray:
    """Per cluster, its members' mean saliency share off their shared object (`off_object_share`):
    how `query.strategy: cluster` ranks clusters, most suspicious first."""
    attr = np.asarray(attr)
    return np.array(
        [off_object_share(attr[m], images[m]) for m in map(clusters.members, range(clusters.k))]
    )


def cluster_queries(representatives: np.ndarray, suspicion: np.ndarray, k: int) -> np.ndarray:
    """`query.strategy: cluster`: one query per cluster, the representatives of the k most
    suspicious clusters, most suspicious first (ties keep cluster order). One answer on a
    representative is carried to its cluster's members (`propagate`)."""
    order = np.argsort(-np.asarray(suspicion, dtype=np.float64), kind="stable")
    return np.asarray(representatives)[order][: max(int(k), 0)]


@dataclass
class ClusterRound:
    """What a cluster round chose: the candidates (pool rows, in pool order), their maps,
    clusters and suspicion; the representatives asked (positions in the pool, most suspicious
    first), the cluster of each, and the sample of its members that its montage shows."""

    rows: np.ndarray
    attr: torch.Tensor
    clusters: Clusters
    suspicion: np.ndarray
    chosen: np.ndarray
    asked: list[int]
    shown: list[np.ndarray]

    def members(self, cluster: int, ids: np.ndarray) -> list[str]:
        return [str(ids[self.rows[m]]) for m in self.clusters.members(cluster)]

    def record(self, ids: np.ndarray) -> dict:
        """The round's artifact (clusters.json): the clusters, their members and who was asked."""
        representatives = self.rows[self.clusters.representatives]
        return {
            **self.clusters.summary(),
            "suspicion": [float(v) for v in self.suspicion],
            "members": [self.members(c, ids) for c in range(self.clusters.k)],
            "queried": [str(ids[representatives[c]]) for c in self.asked],
        }


def label_purity(labels: np.ndarray) -> float:
    """Share of the members carrying the cluster's most common label."""
    labels = np.asarray(labels)
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


# ---------------------------------------------------------------- 2. propagation by localisation
def layer_activations(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Outputs (N,C,h,w) of the explained layer (`model.last_conv` by default), in eval mode."""
    layer = layer if layer is not None else model.last_conv
    out = []
    hook = layer.register_forward_hook(lambda _m, _i, acts: out.append(acts.detach()))
    try:
        with eval_mode(model), torch.no_grad():
            for s in batch_starts(len(x), batch_size, f"activations of {len(x)} images"):
                model(x[s : s + batch_size])
    finally:
        hook.remove()
    return torch.cat(out)


def _to_layer(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Share of each layer position's footprint that the pixel mask covers, (h, w)."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(m, size)[0, 0].numpy()


@dataclass
class Concept:
    """A concept direction in the explained layer (a CAV), scaled so that the representative's
    marked mean projects to 1 and its unmarked mean to 0."""

    direction: np.ndarray  # (C,)
    origin: np.ndarray  # (C,) the unmarked mean
    positives: int  # layer positions the fit used on each side
    negatives: int

    def scores(self, acts: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N,C,h,w) activations -> (N,h,w) concept strength (≈1 like the marked region)."""
        a = np.asarray(acts, dtype=np.float64)
        return np.einsum("nchw,c->nhw", a - self.origin[None, :, None, None], self.direction)


def fit_concept(
    acts: torch.Tensor | np.ndarray, mask: np.ndarray, shrinkage: float = 1e-3, cover: float = 0.5
) -> Concept:
    """The concept the annotator marked on one image, as a linear direction in the explained
    layer: regularised discriminant analysis of the positions covered at least `cover` by the
    "ignore" mask against those it does not touch (partly covered ones mix both: left out).

    d = (Σ + s·tr(Σ)/C·I)⁻¹ (μ₊ − μ₋), Σ the pooled within-side covariance. The plain mean
    difference (a pattern CAV) also points at what marked and unmarked share with bright digit
    strokes; whitening by Σ keeps what only the mark has (on decoy-digits pixel precision of
    the propagated masks rose from 0.04 to 0.8 at equal recall, docs/methods.md)."""
    a = np.asarray(acts, dtype=np.float64)  # (C,h,w)
    share = _to_layer(mask, a.shape[1:])
    pos, neg = share >= cover, share == 0
    if not pos.any():  # a mark smaller than a layer position: its most covered positions
        pos = (share > 0) & (share >= share.max())
    if not pos.any() or not neg.any():
        raise ValueError("the mask must mark some of the image and leave some of it unmarked")
    inside, outside = a[:, pos], a[:, neg]
    mu_pos, mu_neg = inside.mean(axis=1), outside.mean(axis=1)
    centred = np.concatenate([inside - mu_pos[:, None], outside - mu_neg[:, None]], axis=1)
    cov = centred @ centred.T / max(centred.shape[1] - 2, 1)
    cov += shrinkage * max(np.trace(cov) / len(cov), _EPS) * np.eye(len(cov))
    direction = np.linalg.solve(cov, mu_pos - mu_neg)
    scale = float(direction @ (mu_pos - mu_neg))
    if scale <= _EPS:
        raise ValueError("marked and unmarked activations do not differ: no concept to find")
    return Concept(direction / scale, mu_neg, int(pos.sum()), int(neg.sum()))


@dataclass
class Propagated:
    """Masks carried to members, each with its confidence."""

    masks: np.ndarray  # (n,H,W) bool
    confidence: np.ndarray  # (n,) in [0, 1]
    scores: np.ndarray  # (n,h,w) concept strength at the layer's resolution

    def confident(self, threshold: float) -> np.ndarray:
        """Members whose mask may train without review; the others go to review."""
        return (self.confidence >= threshold) & self.masks.any(axis=(1, 2))


def localise(
    concept: Concept,
    acts: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> Propagated:
    """The concept in each member: its strength, upsampled to the image, cut at `threshold`
    (0 = like the unmarked part of the representative, 1 = like its mark) is the mask. The
    confidence is the peak strength, clipped to [0, 1]: 1 when the member shows the concept
    somewhere as strongly as the representative's mark did, near 0 when nothing resembles it."""
    scores = concept.scores(acts)
    up = upsample_map(torch.from_numpy(scores).float(), tuple(image_size)).numpy()
    peak = up.reshape(len(up), -1).max(axis=1) if len(up) else np.zeros(0)
    return Propagated(up >= threshold, np.clip(peak, 0.0, 1.0), scores)


def cell_strength(
    concept: Concept, acts: torch.Tensor | np.ndarray, image_size: tuple[int, int], cell: int
) -> np.ndarray:
    """(N, ⌈H/cell⌉, ⌈W/cell⌉) the concept's mean strength in each cell of the annotation grid
    (the layer's strength upsampled to the image, then averaged per cell)."""
    scores = torch.from_numpy(concept.scores(acts)).float()
    up = upsample_map(scores, tuple(image_size))
    return F.avg_pool2d(up[:, None], cell, ceil_mode=True)[:, 0].double().numpy()


def marked_cells(mask: np.ndarray, cell: int) -> int:
    """How many cells of the annotation grid the (H,W) mask touches."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    return int((F.max_pool2d(m, cell, ceil_mode=True) > 0).sum())


def localise_cells(
    concept: Concept,
    acts: torch.Tensor | np.ndarray,
    image_size: tuple[int, int],
    cell: int,
    cells: int = 1,
    threshold: float = 0.5,
) -> Propagated:
    """The concept in each member, in the unit the annotator marks in: the `cells` grid cells
    most like the representative's mark (give the number it marked), each kept only if its
    mean strength reaches `threshold`. Fixing the extent to the answer's stops a concept that
    also fires weakly along strokes or edges from spreading the mask over them (on decoy-digits
    pixel-thresholded masks reached IoU 0.3–0.5 with the true decoys; cells of the answer's
    extent, 0.9–1.0; bench/propagation.py). The confidence is the strongest cell's mean
    strength clipped to [0, 1]: 1 when a cell is as strong as the mark itself was."""
    strength = cell_strength(concept, acts, image_size, cell)
    n, gh, gw = strength.shape
    flat = strength.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")[:, : max(1, cells)]
    chosen = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(chosen, order, np.take_along_axis(flat, order, axis=1) >= threshold, 1)
    grid = chosen.reshape(n, gh, gw).repeat(cell, axis=1).repeat(cell, axis=2)
    masks = grid[:, : image_size[0], : image_size[1]]
    peak = flat.max(axis=1) if n else np.zeros(0)
    return Propagated(masks, np.clip(peak, 0.0, 1.0), concept.scores(acts))


def propagate(
    model: nn.Module,
    representative: torch.Tensor,
    ignore_mask: np.ndarray,
    members: torch.Tensor,
    threshold: float,
    layer: nn.Module | None = None,
) -> Propagated:
    """One annotated representative's "ignore" mask (H,W) carried to `members` (N,C,H,W) by
    localising its concept in the explained layer, cut at `threshold`
    (query.propagation_threshold)."""
    rep_acts = layer_activations(model, representative[None], layer)[0]
    concept = fit_concept(rep_acts, ignore_mask)
    return localise(
        concept, layer_activations(model, members, layer), members.shape[-2:], threshold
    )


def mask_agreement(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel precision, recall and IoU of propagated masks against true ones, pooled over
    images (an image without either counts nothing)."""
    p, t = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    hit, marked, true = (p & t).sum(), p.sum(), t.sum()
    union = (p | t).sum()
    return {
        "precision": float(hit / marked) if marked else float("nan"),
        "recall": float(hit / true) if true else float("nan"),
        "iou": float(hit / union) if union else float("nan"),
    }


# ---------------------------------------------------------------- which carried masks train
SCOPES = ("all", "none", "review")  # a cluster answer applies to all members, none, or after review
CONFIDENT, REVIEW, DROPPED = "confident", "review", "dropped"


def triage(carried: Propagated, scope: str, confidence: float) -> np.ndarray:
    """Per member, what happens to its carried mask: `confident` trains directly, `review` goes
    to a one-click review, `dropped` is not used. "all": confident masks train and the doubtful
    ones are reviewed; "review": every mask is reviewed; "none": nothing is carried. An empty
    mask (the concept was not found) is never shown: there is nothing to judge."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    found = carried.masks.any(axis=(1, 2))
    status = np.full(len(found), DROPPED, dtype=object)
    if scope == "none":
        return status
    status[found] = REVIEW
    if scope == "all":
        status[carried.confident(confidence)] = CONFIDENT
    return status
