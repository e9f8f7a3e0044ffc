"""build_feedback: what each method gets from the annotated images; feedback manifests."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from xbl.config import ConfigError, FeedbackConfig, build_config
from xbl.data.digits import decoy_digits
from xbl.data.images import to_tensor
from xbl.explain.metrics import activation_recall
from xbl.explain.saliency import gradcam
from xbl.feedback.losses import explanation
from xbl.feedback.masks import read_feedback, read_mask_records, write_feedback
from xbl.feedback.methods import METHODS
from xbl.feedback.schedule import build_feedback, method_lambda
from xbl.train.models import SmallCNN


@pytest.fixture(scope="module")
def data():
    return decoy_digits(seed=0)


@pytest.fixture
def annotated(data):
    """Six training images; the first four marked on their decoy, the last two left empty; on
    the first five the annotator kept two centre cells (a different pair on each), on the last
    nothing."""
    idx = data.indices("train")[:6]
    W = data.confounder[idx].copy()
    W[4:] = False
    keep = np.zeros_like(W)
    for n in range(5):
        keep[n, 8:12, 4 * n + 4 : 4 * n + 12] = True
    return idx, W, keep


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
    idx, W, keep = annotated
    fb = build_feedback(settings(method), data, idx, W, SEED, model=model, keep=keep)
    assert type(fb.method) is METHODS[method] and fb.method.name == method
    assert (fb.lam, fb.normalize_lambda, fb.per_batch) == (3.0, False, 5)
    images = fb.images
    assert torch.equal(images.x[:6], to_tensor(data.images[idx]))
    assert torch.equal(images.y[:6], torch.from_numpy(data.labels[idx]))
    assert torch.equal(images.W[:6].bool(), torch.from_numpy(W))
    assert torch.equal(images.M[:6].bool(), torch.from_numpy(keep & ~W))
    assert (getattr(fb.method, "exemplars", None) is not None) == (method == "exbl")
    if method == "exbl":
        assert fb.method.margin == 0.5
    if method == "counterexamples":
        assert fb.method.copies == 2


def test_evidence_is_what_annotators_kept_minus_what_to_ignore(data, annotated):
    idx, W, keep = annotated
    W = W.copy()
    W[0, 8:12, 4:8] = True  # the annotator also struck one of the cells they kept
    M = build_feedback(settings("hint"), data, idx, W, SEED, keep=keep).images.M.bool().numpy()
    assert np.array_equal(M, keep & ~W)
    assert not M[0, 8:12, 4:8].any() and M[0, 8:12, 8:12].all()  # "ignore" wins
    assert not M[5].any()  # kept nothing: no evidence, however much digit the image has
    assert (M & ~data.relevance[idx]).any()  # whole kept cells, background included


def test_evidence_never_comes_from_the_datasets_relevance_masks(data, annotated):
    idx, W, keep = annotated
    blind = replace(data, relevance=np.zeros_like(data.relevance))
    full = replace(data, relevance=np.ones_like(data.relevance))
    masks = [
        build_feedback(settings("hint"), d, idx, W, SEED, keep=keep).images.M
        for d in (data, blind, full)
    ]
    assert masks[0].any() and all(torch.equal(masks[0], m) for m in masks[1:])
    nothing_kept = build_feedback(settings("hint"), full, idx, W, SEED).images.M
    assert not nothing_kept.any()  # keep=None: no annotator affirmed anything


def test_keep_masks_must_match_the_ignore_masks(data, annotated):
    idx, W, keep = annotated
    with pytest.raises(ValueError, match="keep masks"):
        build_feedback(settings("hint"), data, idx, W, SEED, keep=keep[:5])


def test_hint_has_no_term_without_kept_evidence(data, annotated, model):
    """HINT's term is exactly zero on images where nothing was kept, nonzero otherwise, and on a
    mixed batch it is the term of the images with evidence alone."""
    idx, W, keep = annotated
    hint = settings("hint")
    none_kept = build_feedback(hint, data, idx, W, SEED).images
    assert none_kept.M.sum() == 0
    assert build_feedback(hint, data, idx, W, SEED).method.loss(model, none_kept).item() == 0.0
    fb = build_feedback(hint, data, idx, W, SEED, keep=keep)
    whole = fb.method.loss(model, fb.images)
    assert whole.item() > 0 and whole.requires_grad
    assert fb.method.loss(model, fb.images.take(torch.tensor([5]))).item() == 0.0
    kept_only = fb.method.loss(model, fb.images.take(torch.arange(5)))
    assert whole.item() == pytest.approx(kept_only.item())


def test_counterexamples_keep_labels_and_change_only_the_masked_pixels(data, annotated, model):
    idx, W, keep = annotated
    fb = build_feedback(
        settings("counterexamples"), data, idx, W, SEED, model=model, keep=keep
    ).images
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
    idx, W, keep = annotated
    cfg = settings("counterexamples")
    a = build_feedback(cfg, data, idx, W, SEED, model=model, keep=keep).images
    b = build_feedback(cfg, data, idx, W, SEED, model=model, keep=keep).images
    c = build_feedback(cfg, data, idx, W, SEED + 1, model=model, keep=keep).images
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def test_exbl_exemplars_are_the_max_and_min_activation_recall_images(data, annotated, model):
    idx, W, keep = annotated
    fb = build_feedback(settings("exbl"), data, idx, W, SEED, model=model, keep=keep)
    x, y = fb.images.x, fb.images.y
    ar = activation_recall(gradcam(model, x, y), fb.images.M)
    good, bad = int(np.nanargmax(ar)), int(np.nanargmin(ar))
    assert good != bad
    for exemplar, i in zip(fb.method.exemplars, (good, bad)):
        expected = explanation(model, x[[i]], y[[i]], create_graph=False)
        assert torch.allclose(exemplar, expected)
        assert not exemplar.requires_grad


def test_exbl_exemplars_come_from_the_ratings_when_both_kinds_are_given(data, annotated, model):
    idx, W, keep = annotated
    cfg = settings("exbl")
    fb = build_feedback(
        cfg, data, idx, W, SEED, model=model, ratings={3: "good", 1: "bad"}, keep=keep
    )
    x, y = fb.images.x, fb.images.y
    for exemplar, i in zip(fb.method.exemplars, (3, 1)):
        expected = explanation(model, x[[i]], y[[i]], create_graph=False)
        assert torch.allclose(exemplar, expected)
    # only one kind rated: fall back to activation recall
    by_ar = build_feedback(cfg, data, idx, W, SEED, model=model, keep=keep).method
    only_good = build_feedback(
        cfg, data, idx, W, SEED, model=model, ratings={3: "good"}, keep=keep
    ).method
    assert all(torch.equal(a, b) for a, b in zip(only_good.exemplars, by_ar.exemplars))
    assert not all(torch.equal(a, b) for a, b in zip(fb.method.exemplars, by_ar.exemplars))


def test_exbl_needs_the_model_and_unknown_methods_are_refused(data, annotated):
    idx, W, keep = annotated
    with pytest.raises(ValueError, match="eXBL needs the model the annotators judged"):
        build_feedback(settings("exbl"), data, idx, W, SEED, keep=keep)
    with pytest.raises(ConfigError, match="feedback.method is 'gradient_magic'") as err:
        build_config({"feedback": {"method": "gradient_magic"}})
    assert all(name in str(err.value) for name in METHODS)


def test_exbl_needs_both_ratings_or_kept_evidence(data, annotated, model):
    idx, W, _ = annotated
    with pytest.raises(ValueError, match="no annotator kept any evidence"):
        build_feedback(settings("exbl"), data, idx, W, SEED, model=model, ratings={0: "good"})
    rated = build_feedback(
        settings("exbl"), data, idx, W, SEED, model=model, ratings={0: "good", 2: "bad"}
    )
    assert rated.method.exemplars is not None and not rated.images.M.any()


def test_each_method_takes_its_own_lambda_from_params(data, annotated, model):
    """feedback.lambda overrides a method's λ; a method it leaves out keeps its own default."""
    idx, W, keep = annotated
    per_method = FeedbackConfig(lambda_={"rrr": 2.0, "rrr_output": 50.0, "hint": 5.0})
    lams = {
        m: build_feedback(
            replace(per_method, method=m), data, idx, W, SEED, model=model, keep=keep
        ).lam
        for m in ("rrr", "rrr_output", "hint", "rrr_g")
    }
    assert lams == {
        "rrr": 2.0,
        "rrr_output": 50.0,
        "hint": 5.0,
        "rrr_g": METHODS["rrr_g"].default_lambda,
    }
    assert METHODS["rrr_g"].default_lambda == 0.01
    with pytest.raises(ConfigError, match="feedback.lambda is 'gradient_magic'"):
        build_config({"feedback": {"lambda": {"gradient_magic": 1.0}}})


def test_the_lambda_a_run_logs_is_the_one_its_training_starts_from(data, annotated, model):
    """flows/loop.py logs `method_lambda` as feedback.lambda; the Feedback carries the same."""
    idx, W, keep = annotated
    for method in ("rrr", "hint"):
        cfg = FeedbackConfig(method=method, lambda_={"rrr": 2.0})
        fb = build_feedback(cfg, data, idx, W, SEED, model=model, keep=keep)
        assert fb.lam == method_lambda(cfg) == method_lambda(cfg, method)


def test_params_yaml_gives_every_method_a_lambda():
    from pathlib import Path

    from xbl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml").feedback
    assert cfg.method in METHODS
    assert all(method_lambda(cfg, m) >= 0 for m in METHODS)


def test_retraining_runs_a_fixed_schedule_from_the_chosen_start():
    from xbl.config import TrainConfig
    from xbl.feedback.schedule import retraining_schedule

    train = TrainConfig(lr=0.01, epochs=50, patience=5, batch_size=32)
    schedule = retraining_schedule(train, FeedbackConfig(lr=0.001, epochs=20))
    assert schedule == replace(train, lr=0.001, epochs=20, patience=0)
    assert schedule.batch_size == 32
    assert FeedbackConfig().init == "scratch"
    assert build_config({"feedback": {"init": "scratch"}}).feedback.init == "scratch"
    assert build_config({"feedback": {"init": "warm"}}).feedback.init == "warm"
    with pytest.raises(ConfigError, match="feedback.init is 'baseline'"):
        build_config(
            {"feedback": {"init": "baseline"}}
        )  # renamed: warm starts from the query model


# ---------------------------------------------------------------- manifests


def _round(height: int = 6, width: int = 5) -> tuple[dict, dict, dict, dict]:
    """A round's queries and answers: image "b" kept nothing (it is missing from keep), and "x"
    was answered but never queried in this round."""
    rng = np.random.default_rng(0)
    queries = {"a": {"index": 7, "round": 2}, "b": {"index": 3, "round": 2}}
    masks = {name: rng.random((height, width)) < 0.3 for name in ("a", "b", "x")}
    keep = {name: ~masks[name] & (rng.random((height, width)) < 0.5) for name in ("a", "x")}
    return queries, masks, keep, {"a": "bad", "b": None, "x": "good"}


def test_manifest_round_trip_carries_ignore_and_keep_masks_and_ratings(tmp_path):
    queries, masks, keep, ratings = _round()
    manifest = write_feedback(tmp_path / "round-2", queries, masks, ratings, ["a problem"], keep)
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["image_id"], r["keep"]) for r in rows] == [("a", "keep/a.png"), ("b", "keep/b.png")]
    assert rows[0]["kept_pixels"] == str(int(keep["a"].sum())) and rows[1]["kept_pixels"] == "0"
    assert (tmp_path / "round-2" / "problems.txt").read_text() == "a problem\n"

    records = read_mask_records([str(manifest)])
    assert [(r.image_id, r.index, r.rating) for r in records] == [("a", 7, "bad"), ("b", 3, "")]
    assert np.array_equal(np.stack([r.ignore for r in records]), np.stack([masks["a"], masks["b"]]))
    assert np.array_equal(records[0].keep, keep["a"]) and records[0].keep.any()
    assert records[1].keep.shape == masks["b"].shape and not records[1].keep.any()


def _old_manifest(folder, image_id: str, index: int, mask: np.ndarray, rating: str) -> str:
    """A round's manifest as written before keep masks were stored: no keep column."""
    (folder / "masks").mkdir(parents=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / "old.png")
    fields = ["image_id", "index", "round", "mask", "ignored_pixels", "rating"]
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerow(
            {
                "image_id": image_id,
                "index": index,
                "round": 1,
                "mask": "masks/old.png",
                "ignored_pixels": int(mask.sum()),
                "rating": rating,
            }
        )
    return str(folder / "manifest.csv")


def test_a_manifest_without_keep_masks_reads_with_empty_ones(tmp_path, data, model):
    """Old rounds still train: their images keep no evidence, so HINT gets no term from them."""
    idx = data.indices("train")[:2]
    old_W = data.confounder[idx[0]]
    old = _old_manifest(tmp_path / "round-1", str(data.ids[idx[0]]), int(idx[0]), old_W, "good")
    kept_cells = {"new": np.zeros((28, 28), bool)}
    kept_cells["new"][8:16, 8:16] = True
    new = write_feedback(
        tmp_path / "round-2",
        {str(data.ids[idx[1]]): {"index": int(idx[1]), "round": 2}},
        {str(data.ids[idx[1]]): np.zeros((28, 28), bool)},
        {str(data.ids[idx[1]]): "bad"},
        [],
        {str(data.ids[idx[1]]): kept_cells["new"]},
    )
    joined = read_feedback([old, str(new)], data)
    indices, W, keep, ratings = joined.rows, joined.ignore, joined.keep, joined.ratings
    assert indices.tolist() == idx.tolist() and ratings == {0: "good", 1: "bad"}
    assert np.array_equal(W[0], old_W) and not keep[0].any()
    assert np.array_equal(keep[1], kept_cells["new"])

    hint = settings("hint")
    fb = build_feedback(hint, data, indices, W, SEED, keep=keep)
    assert fb.method.loss(model, fb.images.take(torch.tensor([0]))).item() == 0.0
    assert fb.method.loss(model, fb.images.take(torch.tensor([1]))).item() > 0


def test_the_annotation_budget_counts_answers_and_annotator_seconds(tmp_path):
    from xbl.feedback.cost import annotation_budget
    from xbl.feedback.masks import write_feedback

    queries = {f"img-{i}": {"index": i, "round": 1} for i in range(3)}
    masks = {k: np.zeros((4, 4), bool) for k in queries}
    first = write_feedback(
        tmp_path / "round-1", queries, masks, {}, [], {}, {"img-0": 12.5, "img-1": 3.0}
    )
    second = write_feedback(tmp_path / "round-2", {"img-0": queries["img-0"]}, masks, {}, [], {})
    budget = annotation_budget([str(first), str(second)])
    assert budget == {"answers": 4, "reviews": 0, "annotator_seconds": 15.5}
