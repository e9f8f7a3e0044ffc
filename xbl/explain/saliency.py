"""Saliency maps: what the annotator is shown the model attends to.

docs/methods.md, "Saliency": DeepLIFT (Rescale, Captum's) for the predicted class against a
blurred baseline, or GradCAM on `model.last_conv` (the one differentiable GradCAM the losses and
metrics use too). The grid over a map is in cells.py, the PNGs in render.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from torch import nn

from xbl.config import SALIENCY_METHODS, QueryConfig

_EPS = 1e-12


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


def saliency_map(
    model: nn.Module, x: torch.Tensor, method: str, sigma: float = QueryConfig.blur_sigma
) -> torch.Tensor:
    """The map the annotator sees (query.saliency): DeepLIFT vs a blurred baseline, or GradCAM."""
    if method == "deeplift":
        return deeplift_blurred(model, x, sigma=sigma)
    if method == "gradcam":
        with eval_mode(model):
            return gradcam(model, x)
    raise ValueError(f"unknown saliency {method!r}; choose one of {list(SALIENCY_METHODS)}")
