"""The training loop that `fit` (fit.py) runs, in one process or in each of N: plain
cross-entropy, or CE + λ·explanation feedback on annotated images (docs/methods.md, "Feedback
losses"); and the predictions and losses it validates with.

Device: everything follows the model (`model.to(device)` before the loop); tensors are
moved batch by batch, so the dataset may stay on the CPU. Mixed precision (`amp`) wraps only
the cross-entropy forward in autocast; the feedback term, whose input gradients are
differentiated a second time, always runs in float32, where those small second-order terms do
not underflow. The CPU in float32 is the tested default.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from xbl.config import TrainConfig
from xbl.data.images import Images, ShuffledBatches, as_images, batches, in_order
from xbl.feedback.methods import AnnotatedImages
from xbl.feedback.schedule import Feedback
from xbl.progress import progress
from xbl.train.runtime import autocast, model_device, seed_everything

EXPLOSION = 1e12  # a finite loss above this is treated as diverged, like NaN


class FeedbackDiverged(RuntimeError):
    """The loss went NaN or exploded; the model holds the last good weights (those of
    `best_epoch`, 0 = the weights it started with), so a caller can still save them."""

    def __init__(
        self,
        message: str,
        method: str | None = None,
        lam: float | None = None,
        epoch: int | None = None,
        best_epoch: int | None = None,
    ):
        super().__init__(message)
        self.method, self.lam, self.epoch, self.best_epoch = method, lam, epoch, best_epoch

    def kept_at(self, path: Path) -> FeedbackDiverged:
        """The same error, naming where the last good weights were saved."""
        return FeedbackDiverged(
            f"{self} Last good weights: {path}", self.method, self.lam, self.epoch, self.best_epoch
        )


@dataclass
class TrainResult:
    """What a training run gives back, from one process or N (the workers send it as JSON)."""

    checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    min_val_loss: float = math.inf
    effective_lambda: float | None = None
    initial_ce: float | None = None  # CE and feedback term of the first batch (with
    initial_feedback: float | None = None  # normalisation: of the batch λ was scaled on)
    device: str | None = None  # where it trained
    world_size: int = 1


@torch.no_grad()
def predict_proba(
    model: nn.Module, images, batch_size: int = 128, workers: int = 0, what: str | None = None
) -> np.ndarray:
    """Softmax probabilities of `images` (Images, an (x, y) pair or an image tensor), streamed
    in batches (on a CPU 64-128 images per batch run ~2x faster than 512: the activations stay
    in cache). `what`: a progress bar's label, for a pool that takes minutes."""
    images = as_images(images)
    was_training = model.training
    model.eval()
    device = model_device(model)
    loader = batches(images, in_order(len(images), batch_size), workers, device)
    if what:
        loader = progress(loader, what, -(-len(images) // batch_size))
    out = [
        F.softmax(model(x.to(device, non_blocking=True)).float(), dim=1).cpu() for x, _ in loader
    ]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def nll(probs: np.ndarray, y: torch.Tensor) -> float:
    return float(F.nll_loss(torch.from_numpy(probs).clamp_min(1e-12).log(), y, reduction="mean"))


@torch.no_grad()
def mean_loss(model: nn.Module, images, batch_size: int = 128) -> float:
    images = as_images(images)
    return nll(predict_proba(model, images, batch_size), images.labels)


# A step's losses: (ce, expl) to backpropagate, and their values over the whole global batch.
StepLosses = Callable[..., tuple[torch.Tensor, torch.Tensor, float, float]]


def _step_losses(
    model: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    fb: Feedback | None,
    fbatch: AnnotatedImages | None,
    device: torch.device,
    use_amp: bool,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One process: the CE over the batch plus the annotated images, and the feedback term.

    xb, yb are the batch as stored (it may stay on the CPU); `fbatch` the annotated images
    drawn for this step, already on the device, or None without feedback. Where the term's own
    forward pass gave the annotated images' logits (the RRR terms), their CE comes from those:
    one forward pass per annotated image, not two.
    """
    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    expl, fb_logits = torch.zeros((), device=device), None
    if fbatch is not None:
        # float32 on purpose: a second derivative through fp16 underflows
        expl, fb_logits = fb.method.loss_and_logits(model, fbatch)
        expl = expl.float()
        if fb_logits is None:
            xb = torch.cat([xb, fbatch.x])
        yb = torch.cat([yb, fbatch.y])
    with autocast(device, use_amp):
        logits = model(xb)
    if fb_logits is not None:
        logits = torch.cat([logits.float(), fb_logits.float()])
    ce = F.cross_entropy(logits.float(), yb)
    # one device sync per step for the guard, the normalisation and the history
    ce_value, expl_value = torch.stack([ce.detach(), expl.detach()]).tolist()
    return ce, expl, ce_value, expl_value


class _Diverged(Exception):
    """Internal: carries what the message needs until the best weights are back in place."""

    def __init__(self, value: float, epoch: int, where: str):
        self.value, self.epoch, self.where = value, epoch, where


def _check_finite(value: float, epoch: int, where: str) -> None:
    if not (math.isfinite(value) and value < EXPLOSION):
        raise _Diverged(value, epoch, where)


def training_loop(
    model: nn.Module,
    train,
    val,
    cfg: TrainConfig,
    feedback: Feedback | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    step: StepLosses | None = None,
) -> TrainResult:
    """Adam with early stopping on the (confounded) validation loss; restores the best weights.

    With `cfg.patience` 0 every epoch counts as the best, so the last epoch's weights are kept.
    On divergence (NaN or a loss above 1e12, in training or on validation) the best weights so
    far are restored before FeedbackDiverged is raised, naming the method, λ and epoch.
    `step` computes each step's losses; None is one process, xbl.train.distributed passes its
    data-parallel share.
    """
    seed_everything(cfg.seed)
    train, val = as_images(train), as_images(val)
    loop = _EpochRunner.start(model, train, cfg, feedback, step or _step_losses)
    result = loop.result
    best_state, stale = copy.deepcopy(model.state_dict()), 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            trained = loop.run(epoch)
            row = {
                "epoch": epoch,
                **trained,
                # what the epoch's training steps cost (validation apart): a round's reviewer
                # sees the feedback term's price beside plain training in MLflow
                "train_seconds": time.perf_counter() - started,
                **_validate(model, val, cfg.loader_workers, epoch),
            }
            result.history.append(row)
            if on_epoch:
                on_epoch(row)
            if row["val_loss"] < result.min_val_loss - 1e-6 or cfg.patience <= 0:
                result.min_val_loss = min(result.min_val_loss, row["val_loss"])
                result.best_epoch, stale = epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    except _Diverged as bad:
        raise _diverged(bad, feedback, loop.lam, result.best_epoch) from None
    finally:
        model.load_state_dict(best_state)  # also on divergence: the last good weights
    result.effective_lambda = loop.lam if feedback is not None else None
    return result


def _validate(model: nn.Module, val: Images, workers: int, epoch: int) -> dict:
    probs = predict_proba(model, val, workers=workers)
    val_loss = nll(probs, val.labels)
    _check_finite(val_loss, epoch, "validation loss")
    accuracy = float((probs.argmax(1) == val.labels.numpy()).mean())
    return {"val_loss": val_loss, "val_accuracy": accuracy}


@dataclass
class _EpochRunner:
    """The optimiser state and λ across epochs; `run` trains one epoch."""

    model: nn.Module
    train: DataLoader  # the epoch's batches, reshuffled by `gen` each time it is iterated
    cfg: TrainConfig
    fb: Feedback | None  # on the model's device; None without (or with empty) feedback
    step: StepLosses
    device: torch.device
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    gen: torch.Generator
    lam: float
    pending: bool  # λ still to be normalised
    result: TrainResult = field(default_factory=TrainResult)
    steps: int = 0  # optimiser steps so far, across epochs

    @classmethod
    def start(
        cls,
        model: nn.Module,
        train: Images,
        cfg: TrainConfig,
        feedback: Feedback | None,
        step: StepLosses,
    ) -> _EpochRunner:
        device = model_device(model)
        fb = feedback.to(device) if feedback is not None and len(feedback.images) else None
        scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
        gen = torch.Generator().manual_seed(cfg.seed)
        order = ShuffledBatches(len(train), cfg.batch_size, gen)
        return cls(
            model,
            batches(train, order, cfg.loader_workers, device),
            cfg,
            fb,
            step,
            device,
            torch.optim.Adam(model.parameters(), lr=cfg.lr),
            scaler,
            gen,
            feedback.lam if feedback is not None else 0.0,
            fb is not None and fb.normalize_lambda,
            TrainResult(device=str(device)),
        )

    def run(self, epoch: int) -> dict:
        self.model.train()
        ce_sum = fb_sum = 0.0
        fb_steps = 0
        for xb, yb in self.train:
            fbatch = self._feedback_batch()
            ce, expl, ce_value, expl_value = self.step(
                self.model,
                xb,
                yb,
                self.fb,
                fbatch,
                self.device,
                bool(self.cfg.amp),
            )
            self._observe(ce_value, expl_value)
            weight = self.fb.step_weight(self.lam) if fbatch is not None else 0.0
            _check_finite(ce_value + weight * expl_value, epoch, "training loss")
            self._update(ce + weight * expl)
            ce_sum, fb_sum, fb_steps = (
                ce_sum + ce_value,
                fb_sum + expl_value,
                fb_steps + (fbatch is not None),
            )
        n_batches = len(self.train)
        return {"train_ce": ce_sum / n_batches, "train_feedback": fb_sum / max(fb_steps, 1)}

    def _feedback_batch(self) -> AnnotatedImages | None:
        """The annotated images of this step: a draw on every `every`-th step, else None."""
        self.steps += 1
        if self.fb is None or (self.steps - 1) % self.fb.every:
            return None
        return self.fb.draw(self.gen)

    def _observe(self, ce_value: float, expl_value: float) -> None:
        """Record the first batch's losses; with normalisation, take the rescaled λ at the first
        batch whose term is nonzero (before it, λ acts on 0)."""
        result = self.result
        if result.initial_ce is None or (self.pending and expl_value > 0):
            result.initial_ce, result.initial_feedback = ce_value, expl_value
            if self.pending and expl_value > 0:
                self.lam, self.pending = self.fb.normalised_lambda(ce_value, expl_value), False

    def _update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()


def _diverged(
    bad: _Diverged, feedback: Feedback | None, lam: float, best_epoch: int
) -> FeedbackDiverged:
    method = feedback.method.name if feedback is not None else None
    where = f"method {method!r}, lambda {lam:g}" if feedback is not None else "plain cross-entropy"
    kept = f"those of epoch {best_epoch}" if best_epoch else "the initial ones"
    return FeedbackDiverged(
        f"{bad.where} is {bad.value:g} at epoch {bad.epoch} ({where}); the model keeps the "
        f"last good weights ({kept}) — lower the lambda or the learning rate",
        method=method,
        lam=lam,
        epoch=bad.epoch,
        best_epoch=best_epoch,
    )
