"""Query selection: which pool images the annotator sees next."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from xbl.query.sampling import STRATEGIES, predictive_entropy, select_queries


@pytest.fixture
def probs() -> np.ndarray:
    logits = np.random.default_rng(0).normal(scale=3.0, size=(50, 10))
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def _entropy_by_hand(row) -> float:
    return -sum(p * math.log(p) for p in row if p > 0)


def test_entropy_of_uniform_and_one_hot():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 * log 0 must not warn or give NaN
        h = predictive_entropy(np.array([[0.25] * 4, [0, 1, 0, 0], [0.5, 0.5, 0, 0]]))
    assert h == pytest.approx([math.log(4), 0.0, math.log(2)])


def test_entropy_sampling_orders_by_entropy(probs):
    picked = select_queries(probs, None, 10, "entropy")
    by_hand = sorted(range(len(probs)), key=lambda i: _entropy_by_hand(probs[i]), reverse=True)[:10]
    assert picked.tolist() == by_hand


@pytest.mark.parametrize("as_mask", [True, False])
def test_entropy_sampling_skips_excluded_images(probs, as_mask):
    top = select_queries(probs, None, 5, "entropy")
    excluded = top[[0, 2]]
    exclude = np.isin(np.arange(len(probs)), excluded) if as_mask else excluded.tolist()
    picked = select_queries(probs, None, 5, "entropy", exclude=exclude)
    assert not set(picked) & set(excluded)
    # what remains keeps its entropy order: the old 2nd, 4th, 5th, then the 6th and 7th
    assert picked.tolist()[:3] == top[[1, 3, 4]].tolist()
    assert picked.tolist() == select_queries(probs, None, 7, "entropy")[[1, 3, 4, 5, 6]].tolist()


def test_least_confidence_and_margin_on_hand_made_probabilities():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # confident
            [0.40, 0.35, 0.25],  # least confident, small margin 0.05
            [0.50, 0.49, 0.01],  # smallest margin 0.01, max 0.5
            [0.60, 0.20, 0.20],  # margin 0.40
        ]
    )
    assert select_queries(probs, None, 4, "least_confidence").tolist() == [1, 2, 3, 0]
    assert select_queries(probs, None, 4, "margin").tolist() == [2, 1, 3, 0]


def test_random_is_seeded_and_respects_exclusions(probs):
    a = select_queries(probs, None, 10, "random", exclude=[0, 1, 2], seed=3)
    assert (
        a.tolist() == select_queries(probs, None, 10, "random", exclude=[0, 1, 2], seed=3).tolist()
    )
    assert (
        a.tolist() != select_queries(probs, None, 10, "random", exclude=[0, 1, 2], seed=4).tolist()
    )
    assert len(set(a)) == 10 and not set(a) & {0, 1, 2}


def test_confident_mistakes_are_misclassified_lowest_entropy_first():
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # wrong (label 1), very confident
            [0.10, 0.80, 0.10],  # right
            [0.40, 0.30, 0.30],  # wrong (label 2), unsure
            [0.10, 0.10, 0.80],  # wrong (label 0), confident
        ]
    )
    labels = np.array([1, 1, 2, 0])
    assert select_queries(probs, labels, 10, "confident_mistakes").tolist() == [0, 3, 2]
    assert select_queries(probs, labels, 10, "confident_mistakes", exclude=[0]).tolist() == [3, 2]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_k_beyond_the_pool_returns_everything_available(probs, strategy):
    labels = np.zeros(len(probs), dtype=int)
    picked = select_queries(probs, labels, 1000, strategy, exclude=range(10))
    expected = set(range(10, 50))
    if strategy == "confident_mistakes":
        expected = {i for i in expected if probs[i].argmax() != 0}
    assert sorted(picked.tolist()) == sorted(expected)


def test_unknown_strategy_names_the_choices(probs):
    with pytest.raises(ValueError) as err:
        select_queries(probs, None, 3, "bald")
    assert all(name in str(err.value) for name in STRATEGIES)
