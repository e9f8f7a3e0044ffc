"""Checkpoints: a model's weights with what rebuilds it (its name and the data's shape).

The weights include the input normalisation (`normalize.mean`, `normalize.std`), so a reloaded
model takes [0,1] images as it was trained on them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xbl.config import TrainConfig
from xbl.data.prepared import PreparedData
from xbl.train.models import build_model, freeze_stages, load_pretrained, load_weights
from xbl.train.runtime import seed_everything


def checkpoint_meta(name: str, data: PreparedData) -> dict:
    """What rebuilds the model from a checkpoint: its name and the data's shape."""
    _, c, h, _ = data.images.shape
    return {"model": name, "in_channels": c, "n_classes": len(data.classes), "image_size": h}


def initial_model(
    name: str,
    data: PreparedData,
    seed: int,
    init: str | Path | dict | None = None,
    pretrained: str | Path | None = TrainConfig.pretrained,
    freeze: str = TrainConfig.freeze,
) -> nn.Module:
    """The model a run starts from: weights fixed by the seed, or `pretrained` (train.pretrained:
    a local state dict, adapted by `load_pretrained`), or `init` (a checkpoint's path or a state
    dict: all of a model's weights, so it overrides `pretrained`); then `freeze` (train.freeze)
    stops training its early stages."""
    seed_everything(seed)
    meta = checkpoint_meta(name, data)
    model = build_model(name, meta["in_channels"], meta["n_classes"], meta["image_size"])
    if init is not None:
        load_weights(model, init if isinstance(init, dict) else load_checkpoint(Path(init))[0])
    elif pretrained is not None:
        load_pretrained(model, pretrained)
    freeze_stages(model, freeze)
    return model


def save_checkpoint(model: nn.Module, path: Path, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


def save_last_good(model: nn.Module, out: Path, meta: dict) -> Path:
    """After a divergence the model holds the last good weights: keep them beside `out`."""
    out = Path(out)
    return save_checkpoint(model, out.with_name(out.stem + "-last-good.pt"), meta)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    return ckpt["state_dict"], ckpt["meta"]


def load_model(
    checkpoint: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """The checkpoint's model on `device`, and its meta."""
    state, meta = load_checkpoint(Path(checkpoint))
    model = build_model(meta["model"], meta["in_channels"], meta["n_classes"], meta["image_size"])
    load_weights(model, state)
    return model.to(device), meta
