"""The training loop: plain cross-entropy, or CE + λ·explanation feedback on annotated images."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TrainConfig:
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0
    patience: int = 5            # 0: no early stopping, keep the last epoch's weights

    @classmethod
    def from_params(cls, section: dict) -> "TrainConfig":
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})


@dataclass
class Feedback:
    """Annotated images and what the annotators said about them.

    W marks pixels the model must not use; M (optional) where the evidence is. Every batch
    gets `per_batch` of these mixed in, so a handful of annotations act throughout training.
    """
    method: str
    x: torch.Tensor
    y: torch.Tensor
    W: torch.Tensor
    M: torch.Tensor | None = None
    lam: float = 10.0
    normalize_lambda: bool = True
    per_batch: int = 16
    margin: float = 1.0
    exemplars: tuple[torch.Tensor, torch.Tensor] | None = None


class FeedbackDiverged(RuntimeError):
    """The loss went NaN or exploded; the last good weights were kept."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    min_val_loss: float = math.inf
    effective_lambda: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,C,H,W) to float in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = [F.softmax(model(x[i:i + batch_size].to(device)), dim=1).cpu()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    probs = torch.from_numpy(predict_proba(model, x, batch_size))
    return float(F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="mean"))


def _feedback_batch(fb: Feedback, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    idx = torch.randperm(len(fb.y), generator=gen)[:fb.per_batch]
    M = fb.M[idx] if fb.M is not None else None
    return fb.x[idx], fb.y[idx], fb.W[idx], M


def _feedback_term(fb: Feedback, model: nn.Module, x, y, W, M) -> torch.Tensor:
    from xbl.losses import feedback_term

    return feedback_term(fb.method, model, x, y, W=W, M=M, exemplars=fb.exemplars,
                         margin=fb.margin)


def _check_finite(loss: torch.Tensor, fb: Feedback | None, lam: float, epoch: int) -> None:
    if torch.isfinite(loss) and loss.item() < 1e12:
        return
    where = f"method {fb.method!r}, lambda {lam:g}" if fb else "plain cross-entropy"
    raise FeedbackDiverged(f"loss is {loss.item():g} at epoch {epoch} ({where}); "
                           "kept the last good weights — lower the lambda or the learning rate")


def train(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
          val_x: torch.Tensor, val_y: torch.Tensor, cfg: TrainConfig,
          feedback: Feedback | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Adam with early stopping on the (confounded) validation loss; restores the best weights.

    On divergence the best weights so far are restored before FeedbackDiverged is raised.
    """
    seed_everything(cfg.seed)
    device = model_device(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    result = TrainResult()
    best_state, stale = copy.deepcopy(model.state_dict()), 0
    lam = feedback.lam if feedback else 0.0
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            sums = {"ce": 0.0, "feedback": 0.0}
            order = torch.randperm(len(train_y), generator=gen)
            n_batches = 0
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                xb, yb = train_x[idx].to(device), train_y[idx].to(device)
                expl = train_x.new_zeros(()).to(device)
                if feedback is not None and len(feedback.y):
                    fx, fy, fW, fM = (t.to(device) if t is not None else None
                                      for t in _feedback_batch(feedback, gen))
                    xb, yb = torch.cat([xb, fx]), torch.cat([yb, fy])
                    expl = _feedback_term(feedback, model, fx, fy, fW, fM)
                ce = F.cross_entropy(model(xb), yb)
                if feedback is not None and feedback.normalize_lambda and result.effective_lambda is None:
                    # λ is relative: the feedback term starts at λ times the CE's order.
                    lam = feedback.lam * ce.item() / expl.item() if expl.item() > 0 else feedback.lam
                    result.effective_lambda = lam
                loss = ce + lam * expl
                _check_finite(loss, feedback, lam, epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["ce"] += ce.item()
                sums["feedback"] += expl.item()
                n_batches += 1
            val_loss = mean_loss(model, val_x, val_y)
            val_acc = float((predict_proba(model, val_x).argmax(1) == val_y.numpy()).mean())
            row = {"epoch": epoch, "train_ce": sums["ce"] / n_batches,
                   "train_feedback": sums["feedback"] / n_batches,
                   "val_loss": val_loss, "val_accuracy": val_acc}
            result.history.append(row)
            if on_epoch:
                on_epoch(row)
            if val_loss < result.min_val_loss - 1e-6 or cfg.patience <= 0:
                result.min_val_loss = min(result.min_val_loss, val_loss)
                result.best_epoch, stale = epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    finally:
        model.load_state_dict(best_state)
    if feedback is not None and result.effective_lambda is None:
        result.effective_lambda = lam
    return result


def save_checkpoint(model: nn.Module, path: Path, meta: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    return ckpt["state_dict"], ckpt["meta"]
