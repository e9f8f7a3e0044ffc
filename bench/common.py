"""What the benchmarks share: decoy-digits tensors, a baseline, the simulated annotator's
answers to a round of queries, retraining with feedback, and where and how results are written.

The annotator is simulated exactly as in the pipeline: the model's saliency map is cut into
grid cells, the top cells are shown, and `oracle_ignore_cells` marks "ignore" on the shown cells
that lie (almost) off the digit. The true decoy mask is never handed to the learner.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from xbl.checkpoint import initial_model
from xbl.config import FeedbackConfig, TrainConfig, as_params, build_config, load_config
from xbl.data import PreparedData, decoy_digits, to_tensor
from xbl.feedback import Feedback, build_feedback, retraining_schedule
from xbl.labelstudio import oracle_ignore_cells
from xbl.methods import METHODS
from xbl.saliency import cells_to_mask, saliency_map, top_cells
from xbl.sampling import select_queries
from xbl.training_loop import TrainResult, predict_proba, training_loop

RESULTS = Path(__file__).resolve().parent / "results"

# The pipeline's own settings (params.yaml), so the benchmark measures what a round runs:
# the feedback retrains from a fresh initialisation (`init: scratch`) with the term on from the
# first step, with each method's λ given directly (see params.yaml and xbl/methods.py).
CONFIG = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
BASELINE = {k: getattr(CONFIG.train, k) for k in ("lr", "epochs", "batch_size", "patience")}
QUERY = {k: getattr(CONFIG.query, k) for k in ("saliency", "blur_sigma", "grid_cell", "top_cells")}
ORACLE_OVERLAP = CONFIG.labelstudio.oracle_overlap
METHOD_LAMBDA = {m: CONFIG.feedback.lam(m) for m in METHODS}
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
    val_rand_x: torch.Tensor  # the val images with the decoy's value re-drawn at random:
    # the selection signal for settings (the test split stays unseen)

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


def decoy_splits(decoys: bool = True, seed: int = 0) -> Splits:
    data = decoy_digits(seed=seed, decoys=decoys)
    parts = []
    for split in ("train", "val", "test"):
        idx = data.indices(split)
        parts += [to_tensor(data.images[idx]), torch.from_numpy(data.labels[idx])]
    return Splits(data, *parts, to_tensor(decoy_randomized(data, "val", seed)))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_proba(model, x).argmax(1) == y.numpy()).mean())


def new_model(splits: Splits, seed: int) -> torch.nn.Module:
    """The pipeline's model, its initial weights fixed by the seed."""
    return initial_model("small_cnn", splits.data, seed)


def train_plain(
    splits: Splits, seed: int, settings: dict | None = None
) -> tuple[torch.nn.Module, TrainResult]:
    """Cross-entropy only, early-stopped on the (confounded) validation loss, like the baseline."""
    model = new_model(splits, seed)
    cfg = train_config({**BASELINE, **(settings or {}), "seed": seed})
    return model, training_loop(
        model, splits.train_x, splits.train_y, splits.val_x, splits.val_y, cfg
    )


def query_round(
    model: torch.nn.Module, splits: Splits, budget: int | None, strategy: str, seed: int
) -> np.ndarray:
    """Dataset indices of the `budget` training images chosen by `strategy` (None: all)."""
    pool = splits.pool
    if budget is None or budget >= len(pool):
        return pool
    probs = predict_proba(model, splits.train_x)
    return pool[select_queries(probs, splits.train_y.numpy(), budget, strategy, seed=seed)]


@dataclass
class Annotations:
    indices: np.ndarray  # dataset indices of the annotated images
    W: np.ndarray  # (n,H,W) bool: the cells the simulated annotator marked "ignore"
    decoy_shown: float  # share of images whose decoy cell was among the shown cells
    decoy_marked: float  # share of images whose W covers (part of) the decoy
    shown: np.ndarray | None = None  # per image: was the decoy among the shown cells
    marked: np.ndarray | None = None  # per image: does W cover the decoy


def simulated_annotations(
    model: torch.nn.Module,
    data: PreparedData,
    indices: np.ndarray,
    query: dict | None = None,
    overlap: float = ORACLE_OVERLAP,
    batch_size: int = 256,
) -> Annotations:
    """Show the top saliency cells of each queried image; the oracle marks the off-digit ones."""
    q = {**QUERY, **(query or {})}
    cell = int(q["grid_cell"])
    _, _, h, w = data.images.shape
    masks, shown_hit = [], []
    for start in range(0, len(indices), batch_size):
        part = indices[start : start + batch_size]
        attr = saliency_map(
            model, to_tensor(data.images[part]), q["saliency"], float(q["blur_sigma"])
        )
        cells = top_cells(attr, cell, int(q["top_cells"]), signed=bool(q.get("signed", False)))
        for i, shown in zip(part, cells.tolist()):
            ignored = oracle_ignore_cells(shown, cell, data.relevance[i], overlap)
            masks.append(cells_to_mask(ignored, cell, h, w))
            shown_hit.append(bool((cells_to_mask(shown, cell, h, w) & data.confounder[i]).any()))
    W = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    marked = (W & data.confounder[indices]).any(axis=(1, 2))
    shown = np.array(shown_hit, dtype=bool)
    return Annotations(
        np.asarray(indices),
        W,
        float(shown.mean()) if len(shown) else 0.0,
        float(marked.mean()) if len(marked) else 0.0,
        shown,
        marked,
    )


def retrain(
    base: torch.nn.Module,
    splits: Splits,
    method: str,
    ann: Annotations,
    seed: int,
    settings: dict | None = None,
) -> tuple[torch.nn.Module, TrainResult, Feedback]:
    """Train with feedback on the annotated images as the pipeline does (`retraining_schedule`,
    `feedback.init`). eXBL's exemplars are the baseline's explanations either way: those are
    what annotators judged."""
    fb_cfg = feedback_config({**FEEDBACK, **(settings or {})}, method)
    feedback = build_feedback(fb_cfg, splits.data, ann.indices, ann.W, seed, model=base)
    model = new_model(splits, seed) if fb_cfg.init == "scratch" else copy.deepcopy(base)
    cfg = retraining_schedule(train_config({**BASELINE, "seed": seed}), fb_cfg)
    result = training_loop(
        model, splits.train_x, splits.train_y, splits.val_x, splits.val_y, cfg, feedback=feedback
    )
    return model, result, feedback


def recovery(acc: float, vanilla: float, clean: float) -> float:
    """(acc - vanilla) / (clean - vanilla): the share of the shortcut's accuracy gap closed."""
    gap = clean - vanilla
    return float((acc - vanilla) / gap) if gap > 0 else float("nan")


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(list(values), dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def machine() -> dict:
    """Where the numbers come from: they only compare within one machine and one run."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def machine_line(info: dict) -> str:
    return (
        f"{info['date']} · {info['platform']} · {info['cpu_count']} CPU(s), "
        f"{info['torch_threads']} torch thread(s) · torch {info['torch']}"
    )


def _strict(value):
    """NaN and infinities become null: the file stays valid JSON for any reader."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")
    return path


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call, wall-clock."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


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
