"""The PNGs annotators and reviewers see: images, heat-map overlays with outlined cells, montages and masks."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

_EPS = 1e-12
OUTLINE_RGB = (255, 0, 255)  # magenta: absent from both 'jet' and 'bwr', so outlines stay visible


def _gray(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C,H,W) or (H,W), float in [0,1] or uint8 -> float (H,W) in [0,1]; colour is averaged."""
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    return np.clip(arr, 0.0, 1.0)


# What an annotator's screen holds: image and overlay side by side in a 1600×1000 window.
DISPLAY_SIDE = 560  # small images are upscaled (nearest) to about this long side


MAX_SIDE = 700  # larger ones are shrunk to this, so they show whole without scrolling


def display_scale(height: int, width: int) -> int:
    """The whole-number upscaling that brings a small image near DISPLAY_SIDE (1 for large)."""
    return max(1, DISPLAY_SIDE // max(height, width))


def _upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def _heatmap(attr: np.ndarray) -> np.ndarray:
    """RGB in [0,1]: 'jet' for non-negative maps, 'bwr' centred on zero for signed ones."""
    peak = max(float(np.abs(attr).max()), _EPS)
    if attr.min() < 0:
        return colormaps["bwr"](0.5 + attr / (2 * peak))[..., :3]
    return colormaps["jet"](attr / peak)[..., :3]


def image_png(image: torch.Tensor | np.ndarray, path: str | Path, scale: int = 10) -> Path:
    """Write the image alone, upscaled by `scale` (nearest) so a 28 px digit is visible."""
    return _save_rgb(_upscale(_rgb(image), scale), path)


def _rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C,H,W) -> float (H,W,3) in [0,1]; greyscale is repeated on the three channels."""
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3:
        rgb = np.moveaxis(arr, 0, -1)
        return rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else np.clip(rgb, 0.0, 1.0)
    return np.repeat(_gray(arr)[..., None], 3, axis=-1)


def overlay_png(
    image: torch.Tensor | np.ndarray,
    attr: torch.Tensor | np.ndarray,
    cells: torch.Tensor | np.ndarray | Iterable[tuple[int, int]],
    cell: int,
    path: str | Path,
    scale: int = 10,
    alpha: float = 0.5,
) -> Path:
    """Write the grayscale image blended with the attribution heat map, given cells outlined."""
    gray = _gray(image)
    attr = (
        attr.detach().cpu().numpy() if torch.is_tensor(attr) else np.asarray(attr, dtype=np.float64)
    )
    rgb = (1 - alpha) * gray[..., None] + alpha * _heatmap(attr)
    canvas = Image.fromarray(_to_uint8(_upscale(rgb, scale)))
    draw = ImageDraw.Draw(canvas)
    side = cell * scale
    for row, col in np.asarray(cells, dtype=np.int64).reshape(-1, 2):
        box = (col * side, row * side, (col + 1) * side - 1, (row + 1) * side - 1)
        draw.rectangle(box, outline=OUTLINE_RGB, width=max(1, scale // 4))
    return _save(canvas, path)


def montage_png(
    images: np.ndarray,
    attr: torch.Tensor | np.ndarray,
    path: str | Path,
    cols: int = 4,
    tile: int = 140,
    alpha: float = 0.5,
) -> Path:
    """Members of a cluster at a glance: each image blended with its heat map, in a grid of
    `cols` tiles of about `tile` px, so one look shows whether they share what the model uses."""
    attr = attr.detach().cpu().numpy() if torch.is_tensor(attr) else np.asarray(attr)
    height, width = np.asarray(images).shape[-2:]
    scale = max(1, tile // max(height, width))
    rows = -(-len(attr) // cols)
    gap = 4
    side_h, side_w = height * scale + gap, width * scale + gap
    canvas = Image.new("RGB", (cols * side_w - gap, max(rows, 1) * side_h - gap), "white")
    for j, (image, a) in enumerate(zip(images, attr, strict=True)):
        rgb = (1 - alpha) * _gray(image)[..., None] + alpha * _heatmap(a)
        tile_img = Image.fromarray(_to_uint8(_upscale(rgb, scale)))
        canvas.paste(tile_img, ((j % cols) * side_w, (j // cols) * side_h))
    return _save(canvas, path)


def mask_png(
    image: torch.Tensor | np.ndarray,
    mask: np.ndarray,
    path: str | Path,
    scale: int = 10,
    alpha: float = 0.45,
) -> Path:
    """The image with a proposed "ignore" mask tinted red and outlined: what a reviewer judges."""
    mask = np.asarray(mask, dtype=bool)
    rgb = _rgb(image).copy()
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.array([1.0, 0.0, 0.0])
    big = _upscale(rgb, scale)
    edge = _upscale(mask.astype(np.uint8), scale).astype(bool)
    inner = edge.copy()
    inner[1:-1, 1:-1] = (
        edge[1:-1, 1:-1] & edge[:-2, 1:-1] & edge[2:, 1:-1] & edge[1:-1, :-2] & edge[1:-1, 2:]
    )
    big[edge & ~inner] = (1.0, 0.0, 0.0)
    return _save_rgb(big, path)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _save_rgb(rgb: np.ndarray, path: str | Path) -> Path:
    return _save(Image.fromarray(_to_uint8(rgb)), path)


def _save(canvas: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if max(canvas.size) > MAX_SIDE:  # answers come back in percent: shrinking costs nothing
        ratio = MAX_SIDE / max(canvas.size)
        canvas = canvas.resize(
            (round(canvas.width * ratio), round(canvas.height * ratio)), Image.LANCZOS
        )
    canvas.convert("RGB").save(path, format="PNG")
    return path
