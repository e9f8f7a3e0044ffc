"""build_feedback: what each method gets from the annotated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbl.data import decoy_digits
from xbl.feedback import build_feedback, relevance_for
from xbl.losses import FEEDBACK_METHODS, explanation, gradcam_map, _upsample
from xbl.metrics import activation_recall
from xbl.models import SmallCNN
from xbl.train import to_tensor


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


SETTINGS = {"lambda": 3.0, "normalize_lambda": False, "per_batch": 5, "exbl_margin": 0.5,
            "counterexample_copies": 2, "seed": 1}


@pytest.mark.parametrize("method", FEEDBACK_METHODS)
def test_every_method_carries_the_images_labels_masks_and_settings(data, annotated, model, method):
    idx, W = annotated
    fb = build_feedback(method, data, idx, W, SETTINGS, model=model)
    assert fb.method == method
    assert (fb.lam, fb.normalize_lambda, fb.per_batch, fb.margin) == (3.0, False, 5, 0.5)
    assert torch.equal(fb.x[:6], to_tensor(data.images[idx]))
    assert torch.equal(fb.y[:6], torch.from_numpy(data.labels[idx]))
    assert torch.equal(fb.W[:6].bool(), torch.from_numpy(W))
    assert torch.equal(fb.M[:6].bool(), torch.from_numpy(data.relevance[idx] & ~W))
    assert (fb.exemplars is not None) == (method == "exbl")


def test_relevance_is_the_evidence_minus_what_to_ignore(data, annotated):
    idx, W = annotated
    W = W.copy()
    W[0, 10:14, 10:14] = True  # an annotator may also strike part of the digit
    M = relevance_for(data, idx, W)
    assert not (M & W).any()
    assert (M | W | ~data.relevance[idx]).all()


def test_counterexamples_keep_labels_and_change_only_the_masked_pixels(data, annotated, model):
    idx, W = annotated
    fb = build_feedback("counterexamples", data, idx, W, SETTINGS, model=model)
    copies, marked = SETTINGS["counterexample_copies"], 4  # images with an empty W get none
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
    a = build_feedback("counterexamples", data, idx, W, SETTINGS, model=model)
    b = build_feedback("counterexamples", data, idx, W, SETTINGS, model=model)
    c = build_feedback("counterexamples", data, idx, W, {**SETTINGS, "seed": 2}, model=model)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def _activation_recall(model, x, y, M) -> np.ndarray:
    G = _upsample(gradcam_map(model, x, y, create_graph=False), x.shape[-2:]).detach()
    return activation_recall(G, M)


def test_exbl_exemplars_are_the_max_and_min_activation_recall_images(data, annotated, model):
    idx, W = annotated
    fb = build_feedback("exbl", data, idx, W, SETTINGS, model=model)
    ar = _activation_recall(model, fb.x, fb.y, fb.M)
    good, bad = int(np.nanargmax(ar)), int(np.nanargmin(ar))
    assert good != bad
    for exemplar, i in zip(fb.exemplars, (good, bad)):
        expected = explanation(model, fb.x[[i]], fb.y[[i]], create_graph=False)
        assert torch.allclose(exemplar, expected)
        assert not exemplar.requires_grad


def test_exbl_exemplars_come_from_the_ratings_when_both_kinds_are_given(data, annotated, model):
    idx, W = annotated
    fb = build_feedback("exbl", data, idx, W, SETTINGS, model=model, ratings={3: "good", 1: "bad"})
    for exemplar, i in zip(fb.exemplars, (3, 1)):
        expected = explanation(model, fb.x[[i]], fb.y[[i]], create_graph=False)
        assert torch.allclose(exemplar, expected)
    # only one kind rated: fall back to activation recall
    by_ar = build_feedback("exbl", data, idx, W, SETTINGS, model=model)
    only_good = build_feedback("exbl", data, idx, W, SETTINGS, model=model, ratings={3: "good"})
    assert all(torch.equal(a, b) for a, b in zip(only_good.exemplars, by_ar.exemplars))


def test_exbl_needs_the_model_and_unknown_methods_are_refused(data, annotated):
    idx, W = annotated
    with pytest.raises(ValueError, match="baseline model"):
        build_feedback("exbl", data, idx, W, SETTINGS)
    with pytest.raises(ValueError, match="unknown feedback method"):
        build_feedback("gradient_magic", data, idx, W, SETTINGS)


def test_each_method_takes_its_own_lambda_from_params(data, annotated, model):
    idx, W = annotated
    per_method = {**SETTINGS, "lambda": {"rrr": 1.0, "rrr_output": 100.0, "hint": 10.0}}
    lams = {m: build_feedback(m, data, idx, W, per_method, model=model).lam
            for m in ("rrr", "rrr_output", "hint")}
    assert lams == {"rrr": 1.0, "rrr_output": 100.0, "hint": 10.0}
    with pytest.raises(ValueError, match="no value for method 'rrr_g'"):
        build_feedback("rrr_g", data, idx, W, per_method, model=model)


def test_params_yaml_gives_every_method_a_lambda():
    from pathlib import Path

    from xbl.config import load_params
    from xbl.feedback import method_lambda

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert params["feedback"]["method"] in FEEDBACK_METHODS
    assert all(method_lambda(params["feedback"], m) >= 0 for m in FEEDBACK_METHODS)


def test_retraining_runs_a_fixed_schedule_from_the_chosen_start():
    from xbl.feedback import from_scratch, retraining_schedule

    schedule = retraining_schedule({"lr": 0.01, "epochs": 50, "patience": 5, "batch_size": 32},
                                   {"lr": 0.001, "epochs": 20})
    assert schedule == {"lr": 0.001, "epochs": 20, "patience": 0, "batch_size": 32}
    assert from_scratch({}) and from_scratch({"init": "scratch"})
    assert not from_scratch({"init": "baseline"})
    with pytest.raises(ValueError, match="feedback.init is 'warm'"):
        from_scratch({"init": "warm"})
