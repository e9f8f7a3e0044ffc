"""build_feedback: what each method gets from the annotated images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from xbl.config import ConfigError, FeedbackConfig, build_config
from xbl.data import decoy_digits, to_tensor
from xbl.feedback import build_feedback
from xbl.losses import explanation
from xbl.methods import METHODS
from xbl.metrics import activation_recall
from xbl.models import SmallCNN
from xbl.saliency import gradcam


@pytest.fixture(scope="module")
def data():
    return decoy_digits(seed=0)


@pytest.fixture
def annotated(data):
    """Six training images; the first four marked on their decoy, the last two left empty."""
    idx = data.indices("train")[:6]
    W = data.confounder[idx].copy()
    W[4:] = False
    return idx, W


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SmallCNN()


SEED = 1


def settings(method: str, **changes) -> FeedbackConfig:
    """λ 3 for `method` (not its default), and every other setting off its default too."""
    cfg = FeedbackConfig(
        method=method,
        lambda_={method: 3.0},
        normalize_lambda=False,
        per_batch=5,
        exbl_margin=0.5,
        counterexample_copies=2,
    )
    return replace(cfg, **changes)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_carries_the_images_labels_masks_and_settings(data, annotated, model, method):
    idx, W = annotated
    fb = build_feedback(settings(method), data, idx, W, SEED, model=model)
    assert type(fb.method) is METHODS[method] and fb.method.name == method
    assert (fb.lam, fb.normalize_lambda, fb.per_batch) == (3.0, False, 5)
    images = fb.images
    assert torch.equal(images.x[:6], to_tensor(data.images[idx]))
    assert torch.equal(images.y[:6], torch.from_numpy(data.labels[idx]))
    assert torch.equal(images.W[:6].bool(), torch.from_numpy(W))
    assert torch.equal(images.M[:6].bool(), torch.from_numpy(data.relevance[idx] & ~W))
    assert (getattr(fb.method, "exemplars", None) is not None) == (method == "exbl")
    if method == "exbl":
        assert fb.method.margin == 0.5
    if method == "counterexamples":
        assert fb.method.copies == 2


def test_relevance_is_the_evidence_minus_what_to_ignore(data, annotated):
    idx, W = annotated
    W = W.copy()
    W[0, 10:14, 10:14] = True  # an annotator may also strike part of the digit
    assert data.relevance[idx[0], 10:14, 10:14].any()  # ... where the evidence was
    M = build_feedback(settings("hint"), data, idx, W, SEED).images.M.bool().numpy()
    assert not (M & W).any()
    assert (M | W | ~data.relevance[idx]).all()
    assert np.array_equal(M, data.relevance[idx] & ~W)


def test_counterexamples_keep_labels_and_change_only_the_masked_pixels(data, annotated, model):
    idx, W = annotated
    fb = build_feedback(settings("counterexamples"), data, idx, W, SEED, model=model).images
    copies, marked = 2, 4  # images with an empty W get none
    assert len(fb.y) == 6 + copies * marked
    originals = to_tensor(data.images[idx])
    for k in range(copies * marked):
        source = k // copies
        new, orig = fb.x[6 + k], originals[source]
        mask = torch.from_numpy(W[source]).expand_as(new)
        assert fb.y[6 + k] == fb.y[source]
        assert torch.equal(new[~mask], orig[~mask])
        assert not torch.equal(new[mask], orig[mask])
        assert new.min() >= 0 and new.max() <= 1
    assert not fb.W[6:].any() and not fb.M[6:].any()  # the copies carry no further masks
    assert not torch.equal(fb.x[6], fb.x[7])  # each copy draws its own noise


def test_counterexamples_follow_the_seed(data, annotated, model):
    idx, W = annotated
    cfg = settings("counterexamples")
    a = build_feedback(cfg, data, idx, W, SEED, model=model).images
    b = build_feedback(cfg, data, idx, W, SEED, model=model).images
    c = build_feedback(cfg, data, idx, W, SEED + 1, model=model).images
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def test_exbl_exemplars_are_the_max_and_min_activation_recall_images(data, annotated, model):
    idx, W = annotated
    fb = build_feedback(settings("exbl"), data, idx, W, SEED, model=model)
    x, y = fb.images.x, fb.images.y
    ar = activation_recall(gradcam(model, x, y), fb.images.M)
    good, bad = int(np.nanargmax(ar)), int(np.nanargmin(ar))
    assert good != bad
    for exemplar, i in zip(fb.method.exemplars, (good, bad)):
        expected = explanation(model, x[[i]], y[[i]], create_graph=False)
        assert torch.allclose(exemplar, expected)
        assert not exemplar.requires_grad


def test_exbl_exemplars_come_from_the_ratings_when_both_kinds_are_given(data, annotated, model):
    idx, W = annotated
    cfg = settings("exbl")
    fb = build_feedback(cfg, data, idx, W, SEED, model=model, ratings={3: "good", 1: "bad"})
    x, y = fb.images.x, fb.images.y
    for exemplar, i in zip(fb.method.exemplars, (3, 1)):
        expected = explanation(model, x[[i]], y[[i]], create_graph=False)
        assert torch.allclose(exemplar, expected)
    # only one kind rated: fall back to activation recall
    by_ar = build_feedback(cfg, data, idx, W, SEED, model=model).method
    only_good = build_feedback(cfg, data, idx, W, SEED, model=model, ratings={3: "good"}).method
    assert all(torch.equal(a, b) for a, b in zip(only_good.exemplars, by_ar.exemplars))
    assert not all(torch.equal(a, b) for a, b in zip(fb.method.exemplars, by_ar.exemplars))


def test_exbl_needs_the_model_and_unknown_methods_are_refused(data, annotated):
    idx, W = annotated
    with pytest.raises(ValueError, match="eXBL needs the model the annotators judged"):
        build_feedback(settings("exbl"), data, idx, W, SEED)
    with pytest.raises(ConfigError, match="feedback.method is 'gradient_magic'") as err:
        build_config({"feedback": {"method": "gradient_magic"}})
    assert all(name in str(err.value) for name in METHODS)


def test_each_method_takes_its_own_lambda_from_params(data, annotated, model):
    """feedback.lambda overrides a method's λ; a method it leaves out keeps its own default."""
    idx, W = annotated
    per_method = FeedbackConfig(lambda_={"rrr": 2.0, "rrr_output": 50.0, "hint": 5.0})
    lams = {
        m: build_feedback(replace(per_method, method=m), data, idx, W, SEED, model=model).lam
        for m in ("rrr", "rrr_output", "hint", "rrr_g")
    }
    assert lams == {
        "rrr": 2.0,
        "rrr_output": 50.0,
        "hint": 5.0,
        "rrr_g": METHODS["rrr_g"].default_lambda,
    }
    assert METHODS["rrr_g"].default_lambda == 0.1
    with pytest.raises(ConfigError, match="feedback.lambda is 'gradient_magic'"):
        build_config({"feedback": {"lambda": {"gradient_magic": 1.0}}})


def test_params_yaml_gives_every_method_a_lambda():
    from pathlib import Path

    from xbl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml").feedback
    assert cfg.method in METHODS
    assert all(cfg.lam(m) >= 0 for m in METHODS)


def test_retraining_runs_a_fixed_schedule_from_the_chosen_start():
    from xbl.config import TrainConfig
    from xbl.feedback import retraining_schedule

    train = TrainConfig(lr=0.01, epochs=50, patience=5, batch_size=32)
    schedule = retraining_schedule(train, FeedbackConfig(lr=0.001, epochs=20))
    assert schedule == replace(train, lr=0.001, epochs=20, patience=0)
    assert schedule.batch_size == 32
    assert FeedbackConfig().init == "scratch"
    assert build_config({"feedback": {"init": "scratch"}}).feedback.init == "scratch"
    assert build_config({"feedback": {"init": "baseline"}}).feedback.init == "baseline"
    with pytest.raises(ConfigError, match="feedback.init is 'warm'"):
        build_config({"feedback": {"init": "warm"}})
