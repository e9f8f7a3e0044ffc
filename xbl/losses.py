"""Explanation-feedback terms: L = CE + lambda * L_expl on annotated images (METHODS.md, 'Feedback losses').

Masks are (N,H,W): W = 1 where the model must NOT look, M = 1 where the evidence is. Every term
keeps the autograd graph (create_graph=True where a gradient sits inside the loss), otherwise
the penalty would be a constant and never reach the weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xbl.metrics import activation_recall

FEEDBACK_METHODS = ("rrr", "rrr_output", "rrr_g", "hint", "exbl", "counterexamples")
_EPS = 1e-8


def _mask_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (N,H,W) float mask on x's device; accepts bool/numpy and a singleton channel axis."""
    mask = torch.as_tensor(mask, device=x.device).to(x.dtype)
    return mask.reshape(x.shape[0], *x.shape[-2:])


def _targets(target: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(target, device=device).long().expand(n)


def _upsample(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def input_gradients(model: nn.Module, x: torch.Tensor, variant: str = "logp",
                    create_graph: bool = True) -> torch.Tensor:
    """d/dx of sum_k log p_k ("logp", Ross et al.) or of sum_k z_k ("output", Serrano).

    Summed over channels: (N,H,W). x is cloned, so the caller's tensor never gets requires_grad.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if variant == "logp":
            score = F.log_softmax(logits, dim=1).sum()
        elif variant == "output":
            score = logits.sum()
        else:
            raise ValueError(f"unknown input-gradient variant {variant!r}; choose 'logp' or 'output'")
        (grads,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return grads.sum(dim=1)


def rrr_penalty(model: nn.Module, x: torch.Tensor, W: torch.Tensor, variant: str = "logp") -> torch.Tensor:
    """Right for the right reasons: sum_n sum_ij W * (input gradient)^2, by double backpropagation."""
    grads = input_gradients(model, x, variant=variant, create_graph=True)
    return (_mask_like(W, x) * grads**2).sum()


def gradcam_map(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int | None = None,
                create_graph: bool = True) -> torch.Tensor:
    """Differentiable GradCAM of `model.last_conv` at its own resolution (N,h,w), max-scaled to [0,1].

    target None means the predicted class, taken from the same forward pass.
    """
    captured = {}
    hook = model.last_conv.register_forward_hook(lambda _m, _i, out: captured.update(acts=out))
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        hook.remove()
    acts = captured["acts"]
    if target is None:
        target = logits.argmax(dim=1)
    with torch.enable_grad():
        score = logits.gather(1, _targets(target, len(x), logits.device).unsqueeze(1)).sum()
        (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph)
    channel_weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((channel_weights * acts).sum(dim=1))
    return cam / cam.flatten(1).amax(dim=1).clamp_min(_EPS).view(-1, 1, 1)


def rrr_g_penalty(model: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """RRR-G: sum (W_down * GradCAM of the predicted class)^2.

    W is max-pooled to the map's resolution: a map cell that covers any forbidden pixel is
    forbidden, so a 4x4 decoy that straddles map cells cannot hide in partly-covered ones
    (average pooling would only down-weight them).
    """
    cam = gradcam_map(model, x, target=None, create_graph=True)
    W_down = F.adaptive_max_pool2d(_mask_like(W, x).unsqueeze(1), cam.shape[-2:])[:, 0]
    return ((W_down * cam) ** 2).sum()


def hint_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """HINT-style: MSE between the upsampled true-class GradCAM and the relevance mask.

    Images with an empty M carry no relevance annotation and are left out; none left gives 0.
    """
    M = _mask_like(M, x)
    annotated = M.flatten(1).any(dim=1)
    if not annotated.any():
        return x.new_zeros(())
    cam = gradcam_map(model, x[annotated], y[annotated], create_graph=True)
    return F.mse_loss(_upsample(cam, x.shape[-2:]), M[annotated])


def explanation(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int,
                create_graph: bool = True) -> torch.Tensor:
    """eXBL explanation e(x) = x * G(x), G the GradCAM upsampled to the image: (N,C,H,W)."""
    G = _upsample(gradcam_map(model, x, target, create_graph=create_graph), x.shape[-2:])
    return x * G.unsqueeze(1)


def select_exemplars(model: nn.Module, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor) -> tuple[int, int]:
    """(good, bad) = argmax / argmin Activation Recall of the true-class GradCAM; empty masks skipped."""
    G = _upsample(gradcam_map(model, x, y, create_graph=False), x.shape[-2:]).detach()
    ar = activation_recall(G, _mask_like(M, x))  # NaN where M is empty
    if np.isnan(ar).all():
        raise ValueError("no image has a nonempty relevance mask to choose exemplars from")
    return int(np.nanargmax(ar)), int(np.nanargmin(ar))


def exbl_triplet(model: nn.Module, x: torch.Tensor, y: torch.Tensor, e_good: torch.Tensor,
                 e_bad: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """mean_n max(||e(x_n) - e_good|| - ||e(x_n) - e_bad|| + margin, 0)."""
    e = explanation(model, x, y, create_graph=True).flatten(1)
    d_pos = torch.linalg.vector_norm(e - e_good.reshape(1, -1), dim=1)
    d_neg = torch.linalg.vector_norm(e - e_bad.reshape(1, -1), dim=1)
    return F.relu(d_pos - d_neg + margin).mean()


def counterexamples(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, copies: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` copies of each image with a nonempty W, its W region replaced by U[0,1] noise.

    Returns only the new images and their (unchanged) labels; the caller appends them.
    """
    W = _mask_like(W, x).bool()
    keep = W.flatten(1).any(dim=1)
    x_rep = x[keep].repeat_interleave(copies, dim=0)
    W_rep = W[keep].repeat_interleave(copies, dim=0).unsqueeze(1).expand_as(x_rep)
    noise_device = generator.device if generator is not None else x.device
    noise = torch.rand(x_rep.shape, generator=generator, device=noise_device, dtype=x.dtype).to(x.device)
    return torch.where(W_rep, noise, x_rep), y[keep].repeat_interleave(copies, dim=0)


def feedback_term(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  W: torch.Tensor | None = None, M: torch.Tensor | None = None,
                  exemplars: tuple[torch.Tensor, torch.Tensor] | None = None,
                  margin: float = 1.0) -> torch.Tensor:
    """L_expl of `method` on the annotated images x (a scalar; zero for an empty batch)."""
    if method not in FEEDBACK_METHODS:
        raise ValueError(f"unknown feedback method {method!r}; choose one of {list(FEEDBACK_METHODS)}")
    if len(x) == 0 or method == "counterexamples":  # counterexamples act on the data, not the loss
        return x.new_zeros(())
    if method in ("rrr", "rrr_output", "rrr_g"):
        if W is None:
            raise ValueError(f"feedback method {method!r} needs the feedback mask W")
        if method == "rrr_g":
            return rrr_g_penalty(model, x, W)
        return rrr_penalty(model, x, W, variant="logp" if method == "rrr" else "output")
    if M is None and not (method == "exbl" and exemplars is not None):
        raise ValueError(f"feedback method {method!r} needs the relevance mask M")
    if method == "hint":
        return hint_penalty(model, x, y, M)
    return _exbl_term(model, x, y, M, exemplars, margin)


def _exbl_term(model: nn.Module, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor | None,
               exemplars: tuple[torch.Tensor, torch.Tensor] | None, margin: float) -> torch.Tensor:
    """Triplet loss against given exemplars, or against the batch's own max/min-AR images."""
    if exemplars is None:
        if not _mask_like(M, x).flatten(1).any():
            return x.new_zeros(())  # no relevance marked anywhere: no exemplar to learn from
        good, bad = select_exemplars(model, x, y, M)
        # exemplars are fixed anchors for this step, like labels: no gradient through them
        exemplars = tuple(explanation(model, x[[i]], y[[i]], create_graph=False).detach()
                          for i in (good, bad))
    return exbl_triplet(model, x, y, exemplars[0], exemplars[1], margin=margin)
