"""Settings from params.yaml, and the device the model trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml; a missing file is an error that names the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file not found: {path}")
    with path.open() as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def resolve_device(setting: str | None = "auto") -> torch.device:
    """'auto' takes CUDA when present, so the same settings run on a laptop and a GPU worker."""
    if setting in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {setting!r} but CUDA is not available here")
    return device
