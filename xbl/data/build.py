"""Build the dataset that params' `data` section names: a built-in one, a manifest or a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xbl.config import DataConfig
from xbl.data.digits import decoy_digits
from xbl.data.lesions import decoy_lesions
from xbl.data.manifest import check_out_folder, folder_manifest, read_manifest
from xbl.data.prepared import PreparedData


def build_dataset(cfg: DataConfig, root: Path = Path("."), out: Path | None = None) -> PreparedData:
    """The dataset named in params' `data` section; with `out`, written there as the prepared
    folder and read back from it (a user's images one at a time, never all in memory)."""
    if cfg.dataset not in ("decoy-digits", "decoy-lesions"):
        source = root / cfg.dataset
        manifest = folder_manifest(source, cfg.split, cfg.seed) if source.is_dir() else source
        return read_manifest(manifest, cfg.image_size, _channels(cfg), out, project=root)
    data = _built_in(cfg)
    if out is None:
        return data
    check_out_folder(out, root)  # data.out names a folder of its own, never data/raw
    data.save(out)
    return PreparedData.load(out)


def _built_in(cfg: DataConfig) -> PreparedData:
    """The generated datasets: a few thousand small images, made in memory."""
    if cfg.dataset == "decoy-digits":
        data = decoy_digits(cfg.image_size, cfg.digit_size, cfg.decoy_size, cfg.split, cfg.seed)
        if cfg.channels == 3:  # greyscale digits on R, G and B, e.g. for RGB-pretrained weights
            data.images = np.repeat(data.images, 3, axis=1)
        return data
    data = decoy_lesions(cfg.image_size, split=cfg.split, seed=cfg.seed)
    if cfg.channels == 1:  # PIL's luma, as for a user's colour images
        luma = np.tensordot([0.299, 0.587, 0.114], data.images.astype(float), axes=(0, 1))
        data.images = luma.round().astype(np.uint8)[:, None]
    return data


def _channels(cfg: DataConfig) -> int | None:
    return None if cfg.channels == "auto" else int(cfg.channels)
