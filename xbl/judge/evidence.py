"""The images a candidate is judged on, free of the shortcut (docs/methods.md, "Promotion").

The true audit split when the dataset has one (decoy-digits, decoy-lesions, a manifest with
audit rows). Otherwise a counterfactual audit built from what annotators marked: each marked
"ignore" region (answered or carried) is a concept in the localising model's explained layer,
found on the validation images the way a cluster round carries an answer to its members
(`fit_concept` + `localise_cells`), and replaced by a fill from the image's own surround
(xbl/feedback/counterfactual.py). A model that still reads the shortcut loses it there; a model
that reads the evidence does not care. Validation images where no marked concept is found are
left out, and the coverage says how many were used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from xbl.data.images import to_tensor
from xbl.data.prepared import AUDIT, PreparedData
from xbl.explain.metrics import dead_maps, wrong_reason_share
from xbl.explain.saliency import deeplift_blurred
from xbl.feedback.counterfactual import counterfactual_images, to_cells
from xbl.query.clustering import fit_concept, layer_activations, localise_cells, marked_cells
from xbl.train.loop import predict_proba

TRUE_AUDIT, COUNTERFACTUAL = "audit", "counterfactual audit"
MAX_CONCEPTS = 32  # marks a counterfactual audit fits concepts from (spread over the rounds)
# a cell is located when its mean concept strength reaches this (localise_cells' own threshold:
# 1 is as strong as the mark itself, 0 like the unmarked rest)
CELL_STRENGTH = 0.5


@dataclass
class Evidence:
    kind: str  # TRUE_AUDIT or COUNTERFACTUAL
    images: np.ndarray  # (n,C,H,W) uint8
    labels: np.ndarray  # (n,)
    covered: int  # validation (or audit) images used
    of: int  # validation (or audit) images there were
    how: str  # how the shortcut-free images were obtained
    regions: np.ndarray | None = None  # (n,H,W) the located confounder (counterfactual only)
    # (n,H,W) where each image's shortcut is, carrying no label: the true audit's confounder
    # masks, or the donor's cells pasted into a counterfactual image; None when unknown
    shortcut: np.ndarray | None = None

    def describe(self) -> str:
        return f"{self.kind}, {self.covered} of {self.of} images ({self.how})"


def true_audit(data: PreparedData) -> Evidence | None:
    idx = data.indices(AUDIT)
    if len(idx) == 0:
        return None
    how = "held-out images whose shortcut does not follow the label"
    masks = data.confounder[idx]
    shortcut = masks if masks.any() else None
    return Evidence(
        TRUE_AUDIT, data.images[idx], data.labels[idx], len(idx), len(idx), how, None, shortcut
    )


def _spread(count: int, most: int) -> np.ndarray:
    return np.unique(np.linspace(0, count - 1, min(count, most)).round().astype(int))


def locate_marks(
    localiser: nn.Module,
    data: PreparedData,
    marked_rows: np.ndarray,
    ignore_masks: np.ndarray,
    rows: np.ndarray,
    cell: int,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """For each of `rows`: the located region (H,W) of the marked concept it shows most
    strongly, and that concept's confidence in [0, 1] (0 when no mark could be fitted).
    The region is as many grid cells as the annotator marked (`localise_cells`): a region
    cut from the upsampled concept map spreads over the evidence beside the mark, and
    filling it would take evidence away from a model that reads it. (The union of every
    confident concept's region instead took evidence away too: on the user-manifest test a
    fixed model lost 0.125 on it.)"""
    h, w = data.images.shape[-2:]
    best_mask = np.zeros((len(rows), h, w), dtype=bool)
    best_conf = np.zeros(len(rows))
    usable = [i for i in range(len(marked_rows)) if 0 < ignore_masks[i].mean() < 1]
    if not usable or len(rows) == 0:
        return best_mask, best_conf
    picked = [usable[j] for j in _spread(len(usable), MAX_CONCEPTS)]
    marked_acts = layer_activations(localiser, to_tensor(data.images[marked_rows[picked]]))
    acts = layer_activations(localiser, to_tensor(data.images[rows]))
    for a, i in zip(marked_acts, picked):
        try:
            concept = fit_concept(a.numpy(), ignore_masks[i])
        except ValueError:  # the mark and the rest look alike in this layer: nothing to carry
            continue
        cells = marked_cells(ignore_masks[i], cell)
        found = localise_cells(concept, acts, (h, w), cell, cells, threshold)
        better = found.confidence > best_conf
        best_conf[better] = found.confidence[better]
        best_mask[better] = found.masks[better]
    return best_mask, best_conf


def counterfactual_audit(
    localiser: nn.Module,
    data: PreparedData,
    marked_rows: np.ndarray,
    ignore_masks: np.ndarray,
    cell: int,
    confidence: float,
    split: str = "val",
    seed: int = 0,
    threshold: float = CELL_STRENGTH,
    source: str = "marked regions",
) -> Evidence | None:
    """The `split` images that show a marked concept with at least `confidence`: that region
    filled from the surround, then the located region of a random one of them (`seed`) pasted
    in, so the shortcut is present but carries no label; None when no mark is usable or no
    image shows one."""
    rows = data.indices(split)
    regions, conf = locate_marks(localiser, data, marked_rows, ignore_masks, rows, cell, threshold)
    found = (conf >= confidence) & regions.any(axis=(1, 2))
    if not found.any():
        return None
    how = (
        f"{len(marked_rows)} {source} localised in the {split} images (as many cells as "
        f"marked, strength ≥ {threshold}, confidence ≥ {confidence}), each filled from its image's surround and "
        "given the region of a randomly drawn image"
    )
    donors = np.random.default_rng(seed).integers(0, int(found.sum()), int(found.sum()))
    images = counterfactual_images(data.images[rows[found]], regions[found], cell, donors)
    return Evidence(
        COUNTERFACTUAL,
        images,
        data.labels[rows[found]],
        int(found.sum()),
        len(rows),
        how,
        regions[found],
        to_cells(regions[found], cell)[donors],
    )


def gather_evidence(
    data: PreparedData,
    localiser: nn.Module,
    marked_rows: np.ndarray,
    ignore_masks: np.ndarray,
    cell: int,
    confidence: float,
) -> Evidence | None:
    """The true audit when there is one, else the counterfactual audit built from the marked
    regions, or from the manifest's confounder masks of training images while nothing is
    marked yet, else None."""
    audit = true_audit(data)
    if audit is not None:
        return audit
    source = "marked regions"
    if len(marked_rows) == 0:
        marked_rows, ignore_masks = given_confounders(data)
        source = "confounder masks from the manifest"
    if len(marked_rows) == 0:
        return None
    return counterfactual_audit(
        localiser, data, marked_rows, ignore_masks, cell, confidence, source=source
    )


def given_confounders(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """Training rows that come with a confounder mask, and those masks."""
    rows = data.indices("train")
    masks = np.asarray(data.confounder[rows], dtype=bool)
    given = masks.any(axis=(1, 2))
    return rows[given], masks[given]


def correct_on(model: nn.Module, evidence: Evidence) -> np.ndarray:
    """Per evidence image: does the model predict its label?"""
    probs = predict_proba(model, to_tensor(evidence.images))
    return probs.argmax(1) == np.asarray(evidence.labels)


def explanation_on(model: nn.Module, evidence: Evidence, batch_size: int = 128) -> dict | None:
    """How little the model's DeepLIFT attribution rests on the shortcut in the evidence images
    (1 − wrong-reason share: higher = righter reasons), and the share of dead maps (all zero or
    non-finite), which are left out rather than scored as perfect. None when the evidence does
    not say where the shortcut is."""
    if evidence.shortcut is None:
        return None
    shares, dead = [], []
    for start in range(0, len(evidence.images), batch_size):
        maps = deeplift_blurred(model, to_tensor(evidence.images[start : start + batch_size]))
        maps = maps.abs().cpu().numpy()
        shares.append(wrong_reason_share(maps, evidence.shortcut[start : start + batch_size]))
        dead.append(dead_maps(maps))
    share, dead_share = np.concatenate(shares), float(np.concatenate(dead).mean())
    score = float(1 - np.nanmean(share)) if np.isfinite(share).any() else None
    return {"score": score, "dead_map_share": dead_share}
