"""What the annotator sees: saliency maps, their grid cells, and the PNGs shown in Label Studio.

docs/methods.md, "Saliency": DeepLIFT (Rescale, Captum's) for the predicted class against a
blurred baseline, or GradCAM on `model.last_conv`; the map is cut into a grid and the top cells
by mean attribution are outlined.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import nn

_EPS = 1e-12
OUTLINE_RGB = (255, 0, 255)  # magenta: absent from both 'jet' and 'bwr', so outlines stay visible


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N,C,H,W) images, per channel, with reflect padding."""
    if sigma <= 0:
        return x.clone()
    n, c, h, w = x.shape
    # reflect padding needs pad < side; a kernel wider than the image adds nothing anyway
    radius = min(max(1, round(3 * sigma)), h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Explain the deployed model (no dropout, frozen batch-norm), then hand it back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predicted_class(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def _scale_per_image(attr: torch.Tensor) -> torch.Tensor:
    """Divide each map by its max |.|; an all-zero map stays zero instead of becoming NaN."""
    peak = attr.abs().flatten(1).amax(dim=1).clamp_min(_EPS)
    return attr / peak.view(-1, *([1] * (attr.dim() - 1)))


def deeplift_blurred(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | int | None = None, sigma: float = 3.0
) -> torch.Tensor:
    """DeepLIFT (Rescale) against a blurred copy of x, summed over channels, scaled by max |.|."""
    # blur before requires_grad: a baseline inside the graph would leak gradient into DeepLIFT
    baseline = gaussian_blur(x.detach(), sigma)
    x = x.detach().clone().requires_grad_(True)
    with eval_mode(model):
        if target is None:
            target = predicted_class(model, x)
        with warnings.catch_warnings():  # Captum's notice that it hooks the ReLUs, on every call
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            # max-unpooling (Captum's rule for max-pool) has no deterministic CPU kernel: the
            # attribution is still exact, only summation order may vary
            warnings.filterwarnings("ignore", message="max_unpooling2d_forward_out")
            attr = DeepLift(model).attribute(x, baselines=baseline, target=target)
    return _scale_per_image(attr.detach().sum(dim=1))


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | int | None = None,
    upsample: bool = True,
    create_graph: bool = False,
) -> torch.Tensor:
    """GradCAM of `model.last_conv`: ReLU(Σ_c mean_ij(∂z_t/∂A_c) · A_c), scaled per image to
    [0, 1]; bilinearly upsampled to the image first when `upsample` (N,H,W), else at the
    layer's own resolution (N,h,w). docs/methods.md, "Saliency".

    The one GradCAM of the project: the losses keep its graph (`create_graph=True`) and train
    through it, the metrics and the annotator's overlays read it, so all three see the same
    map. `target` None is the predicted class, from the same forward pass. The model's mode is
    the caller's: wrap a call in `eval_mode` to explain the deployed model.
    """
    captured = {}
    hook = model.last_conv.register_forward_hook(lambda _m, _i, out: captured.update(acts=out))
    try:
        with torch.enable_grad():
            if not create_graph:  # the map only; a frozen model still gets its layer's gradient
                x = x.detach().requires_grad_(True)
            logits = model(x)
    finally:
        hook.remove()
    acts = captured["acts"]
    if target is None:
        target = logits.argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device).long().expand(len(x))
    with torch.enable_grad():
        score = logits.gather(1, target.unsqueeze(1)).sum()
        (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))
    if not create_graph:
        cam = cam.detach()
    if upsample:
        cam = upsample_map(cam, x.shape[-2:])
    return cam / cam.flatten(1).amax(dim=1).clamp_min(_EPS).view(-1, 1, 1)


def upsample_map(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(N,h,w) maps to (N,*size), bilinearly (the corners of the image are pixel edges)."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


SALIENCY_METHODS = ("deeplift", "gradcam")


def saliency_map(
    model: nn.Module, x: torch.Tensor, method: str = "deeplift", sigma: float = 3.0
) -> torch.Tensor:
    """The map the annotator sees (query.saliency): DeepLIFT vs a blurred baseline, or GradCAM."""
    if method == "deeplift":
        return deeplift_blurred(model, x, sigma=sigma)
    if method == "gradcam":
        with eval_mode(model):
            return gradcam(model, x)
    raise ValueError(f"unknown saliency {method!r}; choose one of {list(SALIENCY_METHODS)}")


def cell_scores(attr: torch.Tensor, cell: int) -> torch.Tensor:
    """Mean attribution per cell x cell block: (N,H,W) -> (N, H//cell, W//cell)."""
    attr = torch.as_tensor(attr).float()
    return F.avg_pool2d(attr.unsqueeze(1), kernel_size=cell)[:, 0]


def top_cells(attr: torch.Tensor, cell: int, k: int, signed: bool = False) -> torch.Tensor:
    """(row, col) of the k cells with the largest |mean attribution|, best first: (N, k, 2).

    Ranked by magnitude: a cell the model weighs *against* its predicted class is still a
    cell it looks at. A label-coded shortcut such as the decoy patch often gets a negative
    DeepLIFT score for the predicted logit (its value rules the other classes out), and a
    signed ranking hides it in about half of the images. `signed=True` ranks by the signed
    mean (the paper's choice); for non-negative maps (GradCAM) both agree.
    k is capped at the number of cells. topk returns cell indices directly; the paper's code
    ranked with argsort(argsort(.)), which yields ranks, not the cells.
    """
    scores = cell_scores(attr, cell)
    if not signed:
        scores = scores.abs()
    n_cols = scores.shape[-1]
    k = min(k, scores[0].numel())
    best = scores.flatten(1).topk(k, dim=1).indices
    return torch.stack([best // n_cols, best % n_cols], dim=-1)


def cells_to_mask(
    cells: torch.Tensor | np.ndarray | Iterable[tuple[int, int]], cell: int, height: int, width: int
) -> np.ndarray:
    """Boolean (H, W) mask that is True inside every given (row, col) cell."""
    mask = np.zeros((height, width), dtype=bool)
    for row, col in np.asarray(cells, dtype=np.int64).reshape(-1, 2):
        if not (0 <= row * cell < height and 0 <= col * cell < width):
            raise ValueError(f"cell ({row}, {col}) lies outside a {height}x{width} image")
        mask[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = True
    return mask


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
