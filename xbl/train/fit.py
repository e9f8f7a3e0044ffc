"""Training: `fit`, the one entry point, for one process or N."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xbl.config import TrainConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.schedule import Feedback
from xbl.train.checkpoint import checkpoint_meta, initial_model, save_checkpoint, save_last_good
from xbl.train.distributed import launch
from xbl.train.loop import FeedbackDiverged, TrainResult, training_loop
from xbl.train.runtime import resolve_device


def fit(
    data: PreparedData,
    cfg: TrainConfig,
    out: Path,
    init: str | Path | dict | None = None,
    feedback: Feedback | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """The one way to train: `cfg.model` on the train split, validated on val, from the seed's
    weights or `init`, with or without feedback; the checkpoint at `out` holds the kept weights.

    With `cfg.devices` > 1 the same training runs data-parallel in that many processes. On
    divergence the last good weights are saved beside `out` and FeedbackDiverged names them.
    `on_epoch` gets each epoch's row of the history as that epoch ends (in this process, also
    under N), so a caller can log live curves before training returns.
    """
    if cfg.devices > 1:  # one process per device under torchrun (gloo on CPU, nccl on GPUs)
        return launch(cfg.devices, data, cfg, Path(out), init, feedback, on_epoch)
    device = resolve_device(cfg.device)
    model = initial_model(cfg.model, data, cfg.seed, init, cfg.pretrained, cfg.freeze).to(device)
    meta = checkpoint_meta(cfg.model, data)
    try:
        result = training_loop(
            model,
            data.split_images("train"),
            data.split_images("val"),
            cfg,
            feedback,
            on_epoch=on_epoch,
        )
    except FeedbackDiverged as diverged:
        raise diverged.kept_at(save_last_good(model, Path(out), meta)) from None
    result.checkpoint = str(save_checkpoint(model, Path(out), meta))
    return result
