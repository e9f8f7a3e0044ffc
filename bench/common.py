"""What the benchmarks share: the pipeline's settings, decoy-digits tensors, a baseline, the
simulated annotator's answers to a round of queries and the pipeline's retraining with feedback
(`retrain`). The protocol that judges them is bench/protocol.py; bench/render.py writes results.

The annotator is the pipeline's own (xbl/labelstudio/oracle.py): the model's saliency map is
cut into grid cells, the top cells are shown, and `oracle_marks` marks "ignore" on the shown
cells that lie (almost) off the digit. The true decoy mask is never handed to the learner. An
imperfect annotator is the same answers perturbed on purpose (`imperfect_marks`): evidence
cells marked "ignore" (wrong) or ignore marks left out (incomplete).

The seed varies the data as well as the initial weights: `decoy_splits(seed=...)` draws the
split, the decoys' corners and the test and audit decoys from it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from xbl.config import FeedbackConfig, TrainConfig, as_params, build_config, load_config
from xbl.data.digits import decoy_digits
from xbl.data.images import to_tensor
from xbl.data.prepared import PreparedData
from xbl.explain.cells import cells_to_mask, top_cells
from xbl.explain.pool import pool_saliency as _pool_saliency
from xbl.explain.saliency import saliency_map
from xbl.feedback.methods import METHODS
from xbl.feedback.schedule import Feedback, method_lambda
from xbl.labelstudio.oracle import imperfect_marks, oracle_marks
from xbl.query.sampling import select_queries
from xbl.train.checkpoint import initial_model
from xbl.train.loop import FeedbackDiverged, TrainResult, predict_proba, training_loop
from xbl.train.retrain import retraining

# The pipeline's own settings (params.yaml), so the benchmark measures what a round runs:
# the feedback retrains from a fresh initialisation (`init: scratch`) with the term on from the
# first step, with each method's λ given directly (see params.yaml and xbl/feedback/methods.py).
CONFIG = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
BASELINE = {k: getattr(CONFIG.train, k) for k in ("lr", "epochs", "batch_size", "patience")}
QUERY = {k: getattr(CONFIG.query, k) for k in ("saliency", "blur_sigma", "grid_cell", "top_cells")}
ORACLE_OVERLAP = CONFIG.labelstudio.oracle_overlap
METHOD_LAMBDA = {m: method_lambda(CONFIG.feedback, m) for m in METHODS}
FEEDBACK = {**as_params(CONFIG.feedback), "lambda": METHOD_LAMBDA[CONFIG.feedback.method]}


def train_config(settings: dict) -> TrainConfig:
    """The pipeline's train section with the benchmark's overrides."""
    return replace(CONFIG.train, **settings)


def feedback_config(settings: dict, method: str) -> FeedbackConfig:
    """The feedback section for `method`, with the benchmark's settings; `lambda` is a number
    (that method's λ), as the benchmark's tables give it."""
    values = {k: v for k, v in settings.items() if k not in ("lambda", "method", "seed")}
    return build_config(
        {"feedback": {**values, "method": method, "lambda": {method: settings["lambda"]}}}
    ).feedback


@dataclass
class Splits:
    """One prepared decoy-digits dataset and its splits as float tensors."""

    data: PreparedData
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    audit_x: torch.Tensor  # the val digits with their decoys re-drawn at random: every
    audit_y: torch.Tensor  # choice is made on these; the test split is looked at once
    model: str = "small_cnn"  # the architecture every model on these splits is built as

    @property
    def pool(self) -> np.ndarray:
        """Dataset indices of the training images, the pool queries are drawn from."""
        return self.data.indices("train")


def decoy_randomized(data: PreparedData, split: str, seed: int = 0) -> np.ndarray:
    """The split's images with each decoy patch re-stamped as a random class (as in test)."""
    idx = data.indices(split)
    images = data.images[idx].copy()
    codes = np.random.default_rng(seed).integers(0, len(data.classes), len(idx))
    for image, patch, code in zip(images, data.confounder[idx], codes):
        image[:, patch] = 255 - 25 * int(code)
    return images


def splits_of(data: PreparedData, model: str = "small_cnn") -> Splits:
    """The dataset's train, val, test and audit splits as tensors (it must have an audit split)."""
    parts = []
    for split in ("train", "val", "test", "audit"):
        idx = data.indices(split)
        parts += [to_tensor(data.images[idx]), torch.from_numpy(data.labels[idx])]
    return Splits(data, *parts, model=model)


def decoy_splits(decoys: bool = True, seed: int = 0) -> Splits:
    """Decoy-digits drawn with `seed` (split, decoy corners, test and audit decoys); the audit
    split is the dataset's own (`decoy_digits` adds it)."""
    return splits_of(decoy_digits(seed=seed, decoys=decoys))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_proba(model, x).argmax(1) == y.numpy()).mean())


def new_model(splits: Splits, seed: int) -> torch.nn.Module:
    """The splits' model, its initial weights fixed by the seed."""
    return initial_model(splits.model, splits.data, seed)


def train_plain(
    splits: Splits, seed: int, settings: dict | None = None
) -> tuple[torch.nn.Module, TrainResult]:
    """Cross-entropy only, early-stopped on the (confounded) validation loss, like the baseline."""
    model = new_model(splits, seed)
    cfg = train_config({**BASELINE, **(settings or {}), "seed": seed})
    return model, train_on(splits, model, cfg)


def train_on(
    splits: Splits, model: torch.nn.Module, cfg: TrainConfig, feedback: Feedback | None = None
) -> TrainResult:
    """The pipeline's training loop on the splits' train images, validated on val."""
    return training_loop(
        model,
        (splits.train_x, splits.train_y),
        (splits.val_x, splits.val_y),
        cfg,
        feedback=feedback,
    )


def choose_queries(
    model: torch.nn.Module, splits: Splits, budget: int | None, strategy: str, seed: int
) -> np.ndarray:
    """Dataset indices of the `budget` training images chosen by `strategy` (None: all)."""
    pool = splits.pool
    if budget is None or budget >= len(pool):
        return pool
    probs = predict_proba(model, splits.train_x)
    return pool[select_queries(probs, splits.train_y.numpy(), budget, strategy, seed=seed)]


@dataclass
class Clicks:
    """The simulated annotator's answers: per queried image, the cells shown (best first) and
    which of them it marked "ignore"."""

    indices: np.ndarray  # (n,) dataset indices
    cells: np.ndarray  # (n,k,2) (row, col) of the shown cells
    ignored: np.ndarray  # (n,k) bool
    cell: int  # grid cell size in pixels

    def subset(self, indices: np.ndarray) -> Clicks:
        """The answers on `indices` (a subset of these images)."""
        pos = np.searchsorted(self.indices, indices)
        if not np.array_equal(self.indices[pos], indices):
            raise ValueError("indices are not all among the answered images")
        return Clicks(self.indices[pos], self.cells[pos], self.ignored[pos], self.cell)


def pool_saliency(
    model: torch.nn.Module, data: PreparedData, indices: np.ndarray, query: dict | None = None
) -> torch.Tensor:
    """The saliency maps (n,H,W) the annotator is shown for the images `indices`: the
    pipeline's `pool_saliency` with its query settings and the benchmark's overrides."""
    q = {**QUERY, **(query or {})}
    return _pool_saliency(model, data.images, indices, q["saliency"], float(q["blur_sigma"]))


def oracle_clicks(
    attr: torch.Tensor,
    data: PreparedData,
    indices: np.ndarray,
    query: dict | None = None,
    overlap: float = ORACLE_OVERLAP,
) -> Clicks:
    """Show the top cells of each map; the oracle marks "ignore" on the off-digit ones."""
    q = {**QUERY, **(query or {})}
    cell = int(q["grid_cell"])
    cells = top_cells(attr, cell, int(q["top_cells"]), signed=bool(q.get("signed", False)))
    cells = cells.numpy()
    ignored = oracle_marks(cells, cell, data.relevance[np.asarray(indices)], overlap)
    return Clicks(np.asarray(indices), cells, ignored, cell)


def imperfect(clicks: Clicks, kind: str, rate: float, seed: int) -> Clicks:
    """The oracle's answers with a share `rate` of them spoilt (`imperfect_marks`: `kind` is
    one of IMPERFECTIONS)."""
    return replace(clicks, ignored=imperfect_marks(clicks.ignored, kind, rate, seed))


@dataclass
class Annotations:
    indices: np.ndarray  # dataset indices of the annotated images
    W: np.ndarray  # (n,H,W) bool: the cells the simulated annotator marked "ignore"
    keep: np.ndarray  # (n,H,W) bool: the shown cells it did not mark: affirmed evidence
    decoy_shown: float  # share of images whose decoy cell was among the shown cells
    decoy_marked: float  # share of images whose W covers (part of) the decoy
    evidence_marked: float  # share of the marked pixels that lie on the digit


def annotations(clicks: Clicks, data: PreparedData) -> Annotations:
    """The pixel masks of the answers: W (ignore) and keep (shown and not ignored)."""
    _, _, h, w = data.images.shape
    W = np.zeros((len(clicks.indices), h, w), dtype=bool)
    shown = np.zeros_like(W)
    for n, (cells, ignored) in enumerate(zip(clicks.cells, clicks.ignored)):
        W[n] = cells_to_mask(cells[ignored], clicks.cell, h, w)
        shown[n] = cells_to_mask(cells, clicks.cell, h, w)
    decoy = data.confounder[clicks.indices]
    on_digit = (W & data.relevance[clicks.indices]).sum()
    return Annotations(
        clicks.indices,
        W,
        shown & ~W,
        float((shown & decoy).any(axis=(1, 2)).mean()) if len(W) else 0.0,
        float((W & decoy).any(axis=(1, 2)).mean()) if len(W) else 0.0,
        float(on_digit / W.sum()) if W.any() else 0.0,
    )


def simulated_annotations(
    model: torch.nn.Module,
    data: PreparedData,
    indices: np.ndarray,
    query: dict | None = None,
    overlap: float = ORACLE_OVERLAP,
) -> Annotations:
    """The perfect oracle's answers on `indices`, from `model`'s saliency maps."""
    attr = pool_saliency(model, data, np.asarray(indices), query)
    return annotations(oracle_clicks(attr, data, np.asarray(indices), query, overlap), data)


def retrain(
    base: torch.nn.Module,
    splits: Splits,
    method: str,
    ann: Annotations,
    seed: int,
    settings: dict | None = None,
) -> tuple[torch.nn.Module, TrainResult | None, Feedback]:
    """The pipeline's retraining (`retraining`: the feedback's schedule, `feedback.init`) on
    the annotated images `ann` (its indices, W and keep), with `base` as the model annotators
    judged. HINT and eXBL learn from what the annotator affirmed (`keep`).

    A diverged training (the pipeline would stop with `FeedbackDiverged`) returns the model
    with its last good weights and no result."""
    fb_cfg = feedback_config({**FEEDBACK, **(settings or {})}, method)
    train = train_config({**BASELINE, "seed": seed})
    plan = retraining(splits.data, train, fb_cfg, ann.indices, ann.W, ann.keep, judged=base)
    # the splits' own model (`train.model` is the pipeline's), from the seed or warm
    model = initial_model(splits.model, splits.data, seed, plan.init)
    try:
        result = train_on(splits, model, plan.train, plan.feedback)
    except FeedbackDiverged:
        return model, None, plan.feedback
    return model, result, plan.feedback


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call, wall-clock."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def listed(option: str, kind: type = str) -> list:
    """A comma-separated command-line option (`--seeds 0,1,2`) as a list of `kind`."""
    return [kind(v) for v in option.split(",")]


def timing_options(parser: argparse.ArgumentParser, out: Path) -> None:
    """What a timing benchmark is asked: how often to repeat (the machine is shared, medians
    are compared), on how many torch threads, and where to write."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(out))


def decoy_visibility(
    model: torch.nn.Module,
    splits: Splits,
    subsets: dict[str, np.ndarray],
    query: dict | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Why clicks do or do not reach the decoy, per subset of the pool (dataset indices).

    `reliance`: share of images whose prediction changes when the decoy is re-drawn as a random
    class; `shown_<map>`: share whose decoy cell is among the top cells of that map.
    """
    q = {**QUERY, **(query or {})}
    data, pool = splits.data, splits.pool
    cell, k = int(q["grid_cell"]), int(q["top_cells"])
    x = splits.train_x
    redrawn = to_tensor(decoy_randomized(data, "train", seed + 1))
    changed = predict_proba(model, x).argmax(1) != predict_proba(model, redrawn).argmax(1)
    deeplift = saliency_map(model, x, "deeplift", float(q["blur_sigma"]))
    rankings = {
        "deeplift_magnitude": top_cells(deeplift, cell, k),
        "deeplift_signed": top_cells(deeplift, cell, k, signed=True),
        "gradcam": top_cells(saliency_map(model, x, "gradcam"), cell, k),
    }
    _, _, h, w = data.images.shape
    shown = {
        name: np.array(
            [
                (cells_to_mask(c, cell, h, w) & data.confounder[i]).any()
                for i, c in zip(pool, cells.tolist())
            ]
        )
        for name, cells in rankings.items()
    }
    out = {}
    for name, indices in subsets.items():
        pos = np.searchsorted(pool, np.sort(indices))
        out[name] = {
            "images": int(len(pos)),
            "reliance": float(changed[pos].mean()),
            **{f"shown_{m}": float(s[pos].mean()) for m, s in shown.items()},
        }
    return out
