"""Activation Recall and wrong-reason share on maps small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbl.explain.metrics import activation_recall, wrong_reason_share

# 2x2 images; M marks the left column
M = np.array([[[1, 0], [1, 0]]] * 4, dtype=float)


def test_activation_recall_by_hand():
    G = np.array(
        [
            [[1.0, 0.0], [1.0, 0.0]],  # exactly the evidence -> 1
            [[0.0, 1.0], [0.0, 1.0]],  # only outside the evidence -> 0
            [[0.5, 1.0], [0.0, 1.0]],  # (0.5 + 0) / 2 -> 0.25
            [[1.0, 1.0], [1.0, 1.0]],  # everywhere -> 1 (AR is recall, not precision)
        ]
    )
    assert activation_recall(G, M) == pytest.approx([1.0, 0.0, 0.25, 1.0])


def test_activation_recall_is_nan_for_an_empty_mask_and_accepts_torch():
    G = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]] * 2)
    masks = torch.tensor([[[0, 0], [0, 0]], [[0, 1], [0, 1]]], dtype=torch.bool)
    ar = activation_recall(G, masks)
    assert isinstance(ar, np.ndarray) and ar.shape == (2,)
    assert np.isnan(ar[0]) and ar[1] == pytest.approx((0.4 + 0.8) / 2)


def test_wrong_reason_share_by_hand():
    W_true = np.array([[[1, 0], [0, 0]]] * 3, dtype=float)  # the confounder is the top-left pixel
    A = np.array(
        [
            [[3.0, 0.0], [0.0, 0.0]],  # all attribution on the confounder -> 1
            [[0.0, 2.0], [1.0, 0.0]],  # none on it -> 0
            [[-1.0, 1.0], [-1.0, 1.0]],  # |A| counts: 1 of 4 -> 0.25
        ]
    )
    assert wrong_reason_share(A, W_true) == pytest.approx([1.0, 0.0, 0.25])


def test_a_dead_map_is_flagged_never_scored_as_a_right_reason():
    from xbl.explain.metrics import dead_maps, outside_share

    W_true = np.array([[[1, 0], [0, 0]]] * 3, dtype=float)
    A = np.array([[[0.0, 0.0], [0.0, 0.0]], [[np.nan, 1.0], [0.0, 0.0]], [[0.0, 1.0], [0, 0]]])
    assert dead_maps(A).tolist() == [True, True, False]
    share = wrong_reason_share(A, W_true)
    assert np.isnan(share[:2]).all() and share[2] == 0.0
    assert np.isnan(outside_share(A, W_true > 0)[:2]).all()


def test_wrong_reason_share_single_map_and_torch():
    A = torch.tensor([[2.0, -2.0], [0.0, 0.0]])
    assert wrong_reason_share(A, torch.tensor([[0, 1], [0, 0]])) == pytest.approx([0.5])


def test_evaluation_of_data_without_confounder_masks_scores_attribution_off_the_evidence():
    """A user's manifest has relevance masks but no confounder masks: the evaluation used to
    crash on the empty selection; it reports activation recall, the share of attribution off
    the relevance masks, and no wrong-reason share; the score rests on DeepLIFT."""
    from xbl.data.digits import decoy_digits
    from xbl.judge.evaluate import evaluate
    from xbl.train.models import SmallCNN

    data = decoy_digits(seed=0)
    keep = np.concatenate([data.indices(split)[:40] for split in ("train", "val", "test")])
    for name in ("images", "labels", "split", "relevance", "confounder", "ids"):
        setattr(data, name, getattr(data, name)[keep])
    data.confounder[:] = False
    torch.manual_seed(0)
    metrics, cm = evaluate(SmallCNN(), data)
    assert not [k for k in metrics if "wrong_reason_share" in k]
    assert metrics["val_explanation_score"] == 1 - metrics["val_outside_share_deeplift"]
    assert 0 < metrics["val_explanation_score"] < 1
    for explainer in ("deeplift", "gradcam", "inputgrad"):
        assert 0 <= metrics[f"val_activation_recall_{explainer}"] <= 1
    assert "audit_accuracy" not in metrics  # no audit rows: none reported
    assert cm.sum() == len(data.indices("test"))


def test_outside_share_counts_attribution_off_the_evidence_and_skips_uninformative_masks():
    from xbl.explain.metrics import outside_share

    M = np.array([[[1, 0], [0, 0]]] * 4, dtype=bool)
    M[2] = True  # a mask over the whole image says nothing: NaN
    M[3] = False  # no mask at all: NaN
    A = np.array(
        [[[3.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1, 1], [1, 1]], [[1, 0], [0, 0]]]
    )
    share = outside_share(A, M)
    assert share[0] == pytest.approx(0.25)
    assert np.isnan(share[1:]).all()  # [1]: a dead map
