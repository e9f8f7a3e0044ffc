"""Feedback methods as objects in one registry, and the one GradCAM the losses and metrics share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam

from xbl.config import FEEDBACK_METHODS, build_config
from xbl.data.digits import decoy_digits
from xbl.explain.saliency import eval_mode, gradcam, upsample_map
from xbl.feedback.methods import METHODS, AnnotatedImages, FeedbackMethod, register
from xbl.feedback.schedule import build_feedback, method_lambda
from xbl.train.fit import fit
from xbl.train.models import SmallCNN


class ResponseToForbidden(FeedbackMethod):
    """A toy method: the logits of the forbidden pixels alone should be zero."""

    name, default_lambda = "toy_forbidden_response", 0.5
    calls = 0

    def term(self, model, batch):
        ResponseToForbidden.calls += 1
        return (model(batch.x * batch.W.unsqueeze(1)) ** 2).mean()


@pytest.fixture
def toy_method():
    register(ResponseToForbidden)
    ResponseToForbidden.calls = 0
    yield ResponseToForbidden
    del METHODS[ResponseToForbidden.name]
    FEEDBACK_METHODS.remove(ResponseToForbidden.name)


def _small_digits():
    data = decoy_digits(seed=0)
    keep = np.concatenate(
        [
            np.flatnonzero(data.split == s)[:n]
            for s, n in (("train", 192), ("val", 64), ("test", 64))
        ]
    )
    for name in ("images", "labels", "split", "relevance", "confounder", "ids"):
        setattr(data, name, getattr(data, name)[keep])
    return data


def test_a_method_registered_in_one_class_is_selected_by_config_and_trains(toy_method, tmp_path):
    cfg = build_config(
        {
            "train": {"epochs": 2, "patience": 0, "batch_size": 64},
            "feedback": {"method": toy_method.name, "every": 1},
        }
    )
    assert method_lambda(cfg.feedback) == 0.5  # its own default λ
    data = _small_digits()
    annotated = data.indices("train")[:10]
    fb = build_feedback(cfg.feedback, data, annotated, data.confounder[annotated], seed=0)
    assert isinstance(fb.method, ResponseToForbidden) and fb.lam == 0.5

    with_term = fit(data, cfg.train, tmp_path / "toy.pt", feedback=fb)
    plain = fit(data, cfg.train, tmp_path / "plain.pt")

    assert ResponseToForbidden.calls == 2 * 3  # every step of both epochs (3 batches each)
    assert all(row["train_feedback"] > 0 for row in with_term.history)
    assert plain.history[-1]["train_feedback"] == 0
    assert with_term.history[-1]["train_ce"] != pytest.approx(plain.history[-1]["train_ce"])
    assert (tmp_path / "toy.pt").is_file()


def test_an_unregistered_method_is_refused_by_name():
    with pytest.raises(ValueError, match="feedback.method is 'toy_forbidden_response'"):
        build_config({"feedback": {"method": "toy_forbidden_response"}})


def test_two_methods_cannot_share_a_name(toy_method):
    class Impostor(FeedbackMethod):
        name, default_lambda = toy_method.name, 1.0

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)


def test_every_method_declares_its_default_lambda_and_a_term():
    model = SmallCNN()
    x = torch.rand(4, 1, 28, 28)
    W = torch.zeros(4, 28, 28)
    W[:, :4, :4] = 1
    batch = AnnotatedImages(x, torch.tensor([0, 1, 2, 3]), W, torch.ones(4, 28, 28) - W)
    for name, cls in METHODS.items():
        assert isinstance(cls.default_lambda, float), name
        value = cls().loss(model, batch)
        assert value.ndim == 0 and torch.isfinite(value), name


def _captum_gradcam(model, x, target, upsample):
    cam = (
        LayerGradCam(model, model.last_conv)
        .attribute(x, target=target, relu_attributions=True)
        .detach()[:, 0]
    )
    if upsample:
        cam = upsample_map(cam, x.shape[-2:])
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


@pytest.mark.parametrize("upsample", [False, True])
def test_our_differentiable_gradcam_is_captums(upsample):
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.rand(8, 1, 28, 28)
    target = torch.arange(8) % 10
    with eval_mode(model):
        ours = gradcam(model, x, target, upsample=upsample)
        theirs = _captum_gradcam(model, x, target, upsample)
    assert ours.shape == theirs.shape == ((8, 28, 28) if upsample else (8, 14, 14))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours.amax(dim=(1, 2)).min() > 0.99  # each map scaled to a peak of 1


def test_gradcam_keeps_its_graph_for_the_losses():
    torch.manual_seed(0)
    model = SmallCNN()
    cam = gradcam(model, torch.rand(2, 1, 28, 28), upsample=False, create_graph=True)
    (grad,) = torch.autograd.grad(cam.sum(), model.features[0].weight)
    assert grad.abs().sum() > 0  # the first layer's weights shape the map


def test_the_term_every_nth_step_runs_that_often_weighted_lambda_times_n(toy_method, tmp_path):
    """feedback.every = N: the term on steps 1, N+1, ... only, weighted λ·N, so that one step
    with (λ, N) moves the weights as one step with (λ·N, 1) does."""
    data = _small_digits()
    annotated = data.indices("train")[:10]

    def train(lam: float, every: int, epochs: int, batch: int) -> tuple[dict, list[dict]]:
        cfg = build_config(
            {
                "train": {"epochs": epochs, "patience": 0, "batch_size": batch},
                "feedback": {
                    "method": toy_method.name,
                    "every": every,
                    "lambda": {toy_method.name: lam},
                },
            }
        )
        fb = build_feedback(cfg.feedback, data, annotated, data.confounder[annotated], seed=0)
        result = fit(data, cfg.train, tmp_path / "toy.pt", feedback=fb)
        return torch.load(tmp_path / "toy.pt", weights_only=False)["state_dict"], result.history

    ResponseToForbidden.calls = 0
    train(0.5, every=2, epochs=3, batch=64)  # 3 steps per epoch: 9 steps, the term on 5
    assert ResponseToForbidden.calls == 5
    one_sparse, _ = train(0.5, every=3, epochs=1, batch=192)  # a single step
    one_dense, _ = train(1.5, every=1, epochs=1, batch=192)
    for name, weight in one_dense.items():
        assert torch.allclose(one_sparse[name], weight, atol=1e-6), name
    plain, _ = train(0.5, every=1, epochs=1, batch=192)
    assert not torch.allclose(plain["head.3.weight"], one_dense["head.3.weight"])
