"""Where and how a model runs: the device, the seeds, mixed precision."""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn


def resolve_device(setting: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, so the same settings run on a laptop and a GPU worker."""
    if setting in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {setting!r} but CUDA is not available here")
    return device


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(device: torch.device, enabled: bool):
    """CE-forward autocast: float16 on CUDA, bfloat16 elsewhere; a no-op when disabled."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)
