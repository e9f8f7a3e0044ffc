"""Explanation-feedback penalties: L = CE + λ·L_expl on annotated images (docs/methods.md,
"Feedback losses"). The methods that combine them live in xbl/feedback/methods.py.

Masks are (N,H,W): W = 1 where the model must NOT look, M = 1 where the evidence is. Every term
keeps the autograd graph (create_graph=True where a gradient sits inside the loss), otherwise
the penalty would be a constant and never reach the weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xbl.explain.metrics import activation_recall
from xbl.explain.saliency import gradcam


def _mask_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (N,H,W) float mask on x's device; accepts bool/numpy and a singleton channel axis."""
    mask = torch.as_tensor(mask, device=x.device).to(x.dtype)
    return mask.reshape(x.shape[0], *x.shape[-2:])


def input_gradients(
    model: nn.Module, x: torch.Tensor, variant: str = "logp", create_graph: bool = True
) -> torch.Tensor:
    """d/dx of sum_k log p_k ("logp", Ross et al.) or of sum_k z_k ("output", Serrano), one
    value per channel: (N,C,H,W). x is cloned, so the caller's tensor never gets requires_grad.
    """
    return _input_gradients_and_logits(model, x, variant, create_graph)[0]


def input_gradient_map(
    model: nn.Module, x: torch.Tensor, variant: str = "logp", create_graph: bool = True
) -> torch.Tensor:
    """Per pixel, the root of the channels' squared input gradients: (N,H,W). This is the
    quantity the RRR penalty squares, so a model that reads a colour difference (R − G, whose
    channel gradients cancel in a sum) shows up in it."""
    grads = input_gradients(model, x, variant, create_graph)
    return grads.pow(2).sum(dim=1).sqrt()


def _input_gradients_and_logits(
    model: nn.Module, x: torch.Tensor, variant: str, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if variant == "logp":
            score = F.log_softmax(logits, dim=1).sum()
        elif variant == "output":
            score = logits.sum()
        else:
            raise ValueError(
                f"unknown input-gradient variant {variant!r}; choose 'logp' or 'output'"
            )
        (grads,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return grads, logits


def rrr_penalty(
    model: nn.Module, x: torch.Tensor, W: torch.Tensor, variant: str = "logp"
) -> torch.Tensor:
    """Right for the right reasons: sum_n sum_c sum_ij W * (input gradient)^2, by double
    backpropagation. Each channel's gradient is squared before the channels are summed: summed
    first, the gradients of a model that reads R − G cancel and the penalty misses it."""
    return rrr_penalty_and_logits(model, x, W, variant)[0]


def rrr_penalty_and_logits(
    model: nn.Module, x: torch.Tensor, W: torch.Tensor, variant: str = "logp"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RRR penalty and the logits of the forward pass it differentiated: a training step
    takes these images' cross-entropy from them instead of running the images through the
    model a second time (docs/methods.md, "Feedback cost")."""
    grads, logits = _input_gradients_and_logits(model, x, variant, create_graph=True)
    return (_mask_like(W, x).unsqueeze(1) * grads**2).sum(), logits


def rrr_g_penalty(model: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """RRR-G: sum (W_down * GradCAM of the predicted class)^2.

    W is max-pooled to the map's resolution: a map cell that covers any forbidden pixel is
    forbidden, so a 4x4 decoy that straddles map cells cannot hide in partly-covered ones
    (average pooling would only down-weight them).
    """
    cam = gradcam(model, x, target=None, upsample=False, create_graph=True)
    W_down = F.adaptive_max_pool2d(_mask_like(W, x).unsqueeze(1), cam.shape[-2:])[:, 0]
    return ((W_down * cam) ** 2).sum()


def hint_penalty(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor
) -> torch.Tensor:
    """HINT-style: MSE between the upsampled true-class GradCAM and the relevance mask.

    Images with an empty M carry no relevance annotation and are left out; none left gives 0.
    """
    M = _mask_like(M, x)
    annotated = M.flatten(1).any(dim=1)
    if not annotated.any():
        return x.new_zeros(())
    cam = gradcam(model, x[annotated], y[annotated], create_graph=True)
    return F.mse_loss(cam, M[annotated])


def explanation(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | int, create_graph: bool = True
) -> torch.Tensor:
    """eXBL explanation e(x) = x * G(x), G the GradCAM upsampled to the image: (N,C,H,W)."""
    return x * gradcam(model, x, target, create_graph=create_graph).unsqueeze(1)


def select_exemplars(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, M: torch.Tensor
) -> tuple[int, int]:
    """(good, bad) = argmax / argmin Activation Recall of the true-class GradCAM; empty masks skipped."""
    G = gradcam(model, x, y)
    ar = activation_recall(G, _mask_like(M, x))  # NaN where M is empty
    if np.isnan(ar).all():
        raise ValueError("no image has a nonempty relevance mask to choose exemplars from")
    return int(np.nanargmax(ar)), int(np.nanargmin(ar))


def exbl_triplet(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    e_good: torch.Tensor,
    e_bad: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """mean_n max(||e(x_n) - e_good|| - ||e(x_n) - e_bad|| + margin, 0)."""
    e = explanation(model, x, y, create_graph=True).flatten(1)
    d_pos = torch.linalg.vector_norm(e - e_good.reshape(1, -1), dim=1)
    d_neg = torch.linalg.vector_norm(e - e_bad.reshape(1, -1), dim=1)
    return F.relu(d_pos - d_neg + margin).mean()


def counterexamples(
    x: torch.Tensor,
    y: torch.Tensor,
    W: torch.Tensor,
    copies: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`copies` copies of each image with a nonempty W, its W region replaced by U[0,1] noise.

    Returns only the new images and their (unchanged) labels; the caller appends them.
    """
    W = _mask_like(W, x).bool()
    keep = W.flatten(1).any(dim=1)
    x_rep = x[keep].repeat_interleave(copies, dim=0)
    W_rep = W[keep].repeat_interleave(copies, dim=0).unsqueeze(1).expand_as(x_rep)
    noise_device = generator.device if generator is not None else x.device
    noise = torch.rand(x_rep.shape, generator=generator, device=noise_device, dtype=x.dtype).to(
        x.device
    )
    return torch.where(W_rep, noise, x_rep), y[keep].repeat_interleave(copies, dim=0)
