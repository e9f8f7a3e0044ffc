"""Explanation-feedback terms: values, empty masks, and that each one reaches the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import nn

from tests.unit.toy_models import CornerNet
from xbl.explain.metrics import activation_recall
from xbl.explain.saliency import gradcam, upsample_map
from xbl.feedback.losses import (
    counterexamples,
    exbl_triplet,
    explanation,
    hint_penalty,
    input_gradient_map,
    input_gradients,
    rrr_g_penalty,
    rrr_penalty,
    select_exemplars,
)
from xbl.feedback.methods import EXBL, METHODS, AnnotatedImages
from xbl.train.models import SmallCNN

GRADIENT_METHODS = ("rrr", "rrr_output", "rrr_g", "hint", "exbl")


def feedback_term(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    W: torch.Tensor | None = None,
    M: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_expl of the registered method `method` on the annotated images (a mask left out is empty)."""
    empty = torch.zeros(len(x), *x.shape[-2:])
    images = AnnotatedImages(x, y, empty if W is None else W, empty if M is None else M)
    return METHODS[method]().loss(model, images)


class LinearNet(nn.Module):
    def __init__(self, shape=(2, 3, 3), n_classes: int = 4):
        super().__init__()
        self.fc = nn.Linear(int(np.prod(shape)), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels, a feedback mask W (top-left 8x8 decoy region) and M = its complement."""
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 7])
    W = torch.zeros(4, 28, 28)
    W[:, :8, :8] = 1.0
    return x, y, W, 1.0 - W


# --- input gradients and RRR ---------------------------------------------------------------


def test_input_gradients_of_a_linear_model_by_hand():
    torch.manual_seed(0)
    net, x = LinearNet(), torch.rand(5, 2, 3, 3)
    w = net.fc.weight.detach().reshape(4, 2, 3, 3)  # (K,C,H,W)
    p = F.softmax(net(x), dim=1).detach()
    # d/dx sum_k log p_k = sum_k w_k - K * sum_j p_j w_j
    logp_by_hand = w.sum(0) - 4 * torch.einsum("nj,jchw->nchw", p, w)
    assert torch.allclose(input_gradients(net, x, "logp"), logp_by_hand, atol=1e-5)
    output_by_hand = w.sum(0).expand(5, 2, 3, 3)
    assert torch.allclose(input_gradients(net, x, "output"), output_by_hand, atol=1e-6)


def test_input_gradients_leave_the_callers_tensor_alone(model, batch):
    x = batch[0]
    before = x.clone()
    input_gradients(model, x)
    assert not x.requires_grad and x.grad is None and torch.equal(x, before)


def test_rrr_penalty_of_a_linear_model_by_hand():
    torch.manual_seed(0)
    net, x = LinearNet(), torch.rand(5, 2, 3, 3)
    W = (torch.rand(5, 3, 3) > 0.5).float()
    w = net.fc.weight.detach().reshape(4, 2, 3, 3)
    p = F.softmax(net(x), dim=1).detach()
    grads = w.sum(0) - 4 * torch.einsum("nj,jchw->nchw", p, w)  # (N,C,H,W)
    by_hand = (W.unsqueeze(1) * grads**2).sum()  # each channel squared, then summed
    assert rrr_penalty(net, x, W).item() == pytest.approx(by_hand.item(), rel=1e-5)


class ColourDifference(nn.Module):
    """Reads only R − G, and only inside the top-left 4x4 corner: the colour cue of an RGB
    shortcut whose brightness carries no label."""

    def forward(self, x):
        cue = (x[:, 0, :4, :4] - x[:, 1, :4, :4]).flatten(1).sum(1)
        return torch.stack([cue, torch.zeros_like(cue)], dim=1)


def test_a_colour_difference_on_the_mask_pays_the_penalty():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    W = torch.zeros(3, 8, 8)
    W[:, :4, :4] = 1.0
    grads = input_gradients(ColourDifference(), x, "output")
    summed_first = (W * grads.sum(dim=1) ** 2).sum()  # the old penalty: channels cancel
    assert summed_first.item() == pytest.approx(0.0, abs=1e-10)
    assert rrr_penalty(ColourDifference(), x, W, "output").item() > 1.0
    assert input_gradient_map(ColourDifference(), x, "output")[:, :4, :4].min() > 0


def test_without_create_graph_rrr_gives_the_weights_no_gradient(model, batch):
    x, y, W, _ = batch
    detached = (W.unsqueeze(1) * input_gradients(model, x, create_graph=False) ** 2).sum()
    assert detached.item() > 0 and not detached.requires_grad

    # the paper's later code: CE + penalty, where the penalty is a constant -> CE's gradient only
    def conv_grad(extra):
        model.zero_grad()
        (F.cross_entropy(model(x), y) + extra).backward()
        return model.last_conv.weight.grad.clone()

    assert torch.equal(conv_grad(detached), conv_grad(0.0))
    assert not torch.equal(conv_grad(rrr_penalty(model, x, W)), conv_grad(0.0))


# --- every gradient-based term ---------------------------------------------------------------


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_term_is_positive_on_a_masked_batch(model, batch, method):
    x, y, W, M = batch
    term = feedback_term(method, model, x, y, W=W, M=M)
    assert term.dim() == 0 and term.item() > 0 and term.requires_grad


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_one_step_on_the_term_alone_moves_the_conv_weights(model, batch, method):
    x, y, W, M = batch
    before = [model.features[0].weight.detach().clone(), model.last_conv.weight.detach().clone()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    feedback_term(method, model, x, y, W=W, M=M).backward()
    optimizer.step()
    after = [model.features[0].weight, model.last_conv.weight]
    assert not any(torch.equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("method", ["rrr", "rrr_output", "rrr_g"])
def test_rrr_terms_are_exactly_zero_for_an_empty_mask(model, batch, method):
    x, y, _, _ = batch
    assert feedback_term(method, model, x, y, W=torch.zeros(4, 28, 28)).item() == 0.0


@pytest.mark.parametrize("method", ["hint", "exbl"])
def test_relevance_terms_are_zero_for_empty_masks(model, batch, method):
    x, y, _, _ = batch
    assert feedback_term(method, model, x, y, M=torch.zeros(4, 28, 28)).item() == 0.0


@pytest.mark.parametrize("method", list(METHODS))
def test_an_empty_batch_gives_zero(model, method):
    empty = torch.zeros(0, 1, 28, 28)
    masks = torch.zeros(0, 28, 28)
    term = feedback_term(method, model, empty, torch.zeros(0, dtype=torch.long), W=masks, M=masks)
    assert term.shape == () and term.item() == 0.0


def test_counterexamples_term_is_zero(model, batch):
    x, y, W, M = batch
    assert feedback_term("counterexamples", model, x, y, W=W, M=M).item() == 0.0


def test_every_method_is_registered_under_its_name_with_its_default_lambda():
    """The λ each method's audit recovery was best at (bench/results/efficacy.md, section 1)."""
    assert {name: (cls.name, cls.default_lambda) for name, cls in METHODS.items()} == {
        "rrr": ("rrr", 0.1),
        "rrr_output": ("rrr_output", 100.0),
        "rrr_g": ("rrr_g", 0.01),
        "hint": ("hint", 1.0),
        "exbl": ("exbl", 1.0),
        "counterexamples": ("counterexamples", 0.0),
    }


def test_annotated_images_always_carry_both_masks(batch):
    x, y, W, M = batch
    with pytest.raises(TypeError):
        AnnotatedImages(x, y, W)  # a term never runs without the mask it needs


def test_an_unknown_method_is_refused_naming_the_choices():
    from xbl.config import ConfigError, build_config

    with pytest.raises(ConfigError) as err:
        build_config({"feedback": {"method": "gradient_shrinkage"}})
    assert "gradient_shrinkage" in str(err.value)
    assert all(name in str(err.value) for name in METHODS)


# --- GradCAM-based terms ----------------------------------------------------------------------


def test_gradcam_at_the_layer_resolution_matches_captum(model, batch):
    x, y, _, _ = batch
    ours = gradcam(model, x, y, upsample=False)
    theirs = LayerGradCam(model, model.last_conv).attribute(x, target=y, relu_attributions=True)[
        :, 0
    ]
    theirs = theirs / theirs.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    assert ours.shape == (4, 14, 14)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours.min() >= 0 and ours.max() <= 1 + 1e-6


def test_gradcam_defaults_to_the_predicted_class(model, batch):
    x = batch[0]
    predicted = model(x).argmax(1)
    for upsample in (False, True):
        assert torch.allclose(
            gradcam(model, x, upsample=upsample), gradcam(model, x, predicted, upsample=upsample)
        )
    other = (predicted + 1) % 10
    assert not torch.allclose(gradcam(model, x), gradcam(model, x, other))


def test_upsampled_gradcam_is_the_layer_map_upsampled_then_max_scaled(model, batch):
    x, y, _, _ = batch
    small = gradcam(model, x, y, upsample=False)
    big = upsample_map(small, x.shape[-2:])  # the old loss-side map: max-scaled, then upsampled
    peaks = big.flatten(1).amax(1)
    expected = big / peaks.clamp_min(1e-12).view(-1, 1, 1)
    cam = gradcam(model, x, y)
    assert cam.shape == (4, 28, 28)
    assert torch.allclose(cam, expected, atol=1e-6)
    nonzero = peaks > 0
    assert nonzero.any() and torch.allclose(
        cam.flatten(1).amax(1)[nonzero], torch.ones(int(nonzero.sum()))
    )
    assert (
        peaks[nonzero] < 1 - 1e-3
    ).any()  # bilinear interpolation lowers a peak: the orders differ


def test_gradcam_keeps_its_graph_only_when_asked(model, batch):
    x, y, _, _ = batch
    kept = gradcam(model, x, y, create_graph=True)
    assert kept.requires_grad
    assert not gradcam(model, x, y).requires_grad
    assert torch.allclose(kept.detach(), gradcam(model, x, y), atol=1e-6)


def test_rrr_g_forbids_a_map_cell_touched_by_any_masked_pixel(model, batch):
    x = batch[0]
    one_pixel_per_cell = torch.zeros(4, 28, 28)
    one_pixel_per_cell[:, ::2, ::2] = 1.0  # every 2x2 block of the 14x14 map has one marked pixel
    full = rrr_g_penalty(model, x, torch.ones(4, 28, 28))
    assert rrr_g_penalty(model, x, one_pixel_per_cell).item() == pytest.approx(
        full.item(), rel=1e-6
    )


def test_hint_is_zero_when_the_mask_is_the_map_itself(model, batch):
    x, y, _, _ = batch
    M = gradcam(model, x, y)  # the map HINT compares: upsampled to the image, then max-scaled
    assert hint_penalty(model, x, y, M).item() < 1e-10
    assert hint_penalty(model, x, y, 1.0 - M).item() > 0.01


def test_hint_ignores_images_without_a_relevance_mask(model, batch):
    x, y, _, M = batch
    M = M.clone()
    M[1] = 0.0
    keep = [0, 2, 3]
    only_annotated = hint_penalty(model, x[keep], y[keep], M[keep])
    assert hint_penalty(model, x, y, M).item() == pytest.approx(only_annotated.item())


def test_explanation_is_the_image_weighted_by_gradcam(model, batch):
    x, y, _, _ = batch
    x = x.clone()
    x[:, :, 10:12] = 0.0
    e = explanation(model, x, y)
    assert e.shape == x.shape
    assert (e >= 0).all() and (e <= x + 1e-6).all()
    assert (e[:, :, 10:12] == 0).all() and e.abs().sum() > 0


# --- eXBL ---------------------------------------------------------------------------------------


def _region(rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(28, 28)
    m[rows, cols] = 1.0
    return m


def test_exemplars_are_the_max_and_min_activation_recall():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    M = torch.stack(
        [
            torch.zeros(28, 28),  # no evidence marked: must not be chosen
            torch.ones(28, 28),  # low AR: the map covers a small part
            _region(slice(0, 4), slice(0, 4)),  # the corner the model looks at: high AR
            _region(slice(20, 28), slice(20, 28)),  # nowhere near the corner: AR 0
        ]
    )
    net = CornerNet()
    assert select_exemplars(net, x, y, M) == (2, 3)
    assert select_exemplars(net, x[:3], y[:3], M[:3]) == (2, 1)
    cam = LayerGradCam(net, net.last_conv).attribute(x, target=y, relu_attributions=True)
    cam = F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    ar = activation_recall(cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None], M)
    assert (np.nanargmax(ar), np.nanargmin(ar)) == (2, 3)  # Captum's GradCAM, independently


def test_exemplars_need_some_relevance_mask(model, batch):
    x, y, _, _ = batch
    with pytest.raises(ValueError):
        select_exemplars(model, x, y, torch.zeros(4, 28, 28))


def test_exbl_triplet_by_hand(model, batch):
    x, y, _, _ = batch
    e = explanation(model, x[:1], y[:1], create_graph=False).detach()
    d = float(np.sqrt(e.numel()))  # ||c * ones|| over the image
    # e_good = e + 0.1, e_bad = e + 0.3: max(0.1 d - 0.3 d + margin, 0)
    assert exbl_triplet(model, x[:1], y[:1], e + 0.1, e + 0.3, margin=10.0).item() == pytest.approx(
        max(0.1 * d - 0.3 * d + 10.0, 0.0), rel=1e-4
    )
    assert exbl_triplet(model, x[:1], y[:1], e, e + 1.0, margin=1.0).item() == 0.0
    assert exbl_triplet(model, x, y, e, e, margin=0.7).item() == pytest.approx(0.7)


def test_exbl_uses_given_exemplars_without_masks(model, batch):
    x, y, _, _ = batch
    e = explanation(model, x[:1], y[:1], create_graph=False).detach()
    empty = torch.zeros(4, 28, 28)
    term = EXBL(margin=0.5, exemplars=(e, e)).loss(model, AnnotatedImages(x, y, empty, empty))
    assert term.item() == pytest.approx(0.5)


# --- counterexamples -----------------------------------------------------------------------------


def test_counterexamples_keep_labels_and_change_only_masked_pixels():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([4, 5, 6])
    W = torch.zeros(3, 8, 8, dtype=torch.bool)
    W[0, :2, :2] = True
    W[2, 5:, 3:7] = True  # image 1 has no mask: no copies
    x_new, y_new = counterexamples(x, y, W, copies=2, generator=torch.Generator().manual_seed(1))
    assert x_new.shape == (4, 3, 8, 8) and y_new.tolist() == [4, 4, 6, 6]
    source = x[[0, 0, 2, 2]]
    inside = W[[0, 0, 2, 2]].unsqueeze(1).expand_as(source)
    assert torch.equal(x_new[~inside], source[~inside])
    assert (x_new[inside] != source[inside]).all()
    assert (x_new >= 0).all() and (x_new <= 1).all()
    assert not torch.equal(x_new[0], x_new[1])  # copies draw fresh noise


def test_counterexamples_are_reproducible_with_a_seeded_generator():
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([1, 2])
    W = torch.ones(2, 8, 8)
    a = counterexamples(x, y, W, 3, torch.Generator().manual_seed(5))[0]
    b = counterexamples(x, y, W, 3, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_rrr_output_is_blind_to_last_layer_centring_and_rrr_is_not():
    """docs/methods.md, "Known limitations of the losses": making each column of the last
    weight matrix mean-free shifts every logit of an input equally. The softmax, and so `rrr`'s
    term, do not change; `rrr_output`'s term on Σ_k z_k drops to zero for every input, whatever
    the model looks at."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.rand(8, 1, 28, 28)
    W = torch.ones(8, 28, 28)
    probs = torch.softmax(model(x), dim=1).detach()
    output_term, logp_term = rrr_penalty(model, x, W, "output"), rrr_penalty(model, x, W, "logp")
    with torch.no_grad():
        last = model.head[-1]
        last.weight -= last.weight.mean(dim=0, keepdim=True)
    assert torch.allclose(torch.softmax(model(x), dim=1), probs, atol=1e-6)
    assert output_term > 0 and rrr_penalty(model, x, W, "output") < 1e-9 * output_term
    assert float(rrr_penalty(model, x, W, "logp")) == pytest.approx(float(logp_term), rel=1e-3)
