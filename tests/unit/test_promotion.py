"""The promotion rule: the candidate must beat the current champion on evidence free of the
shortcut, by a paired test (docs/methods.md, "Promotion")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from xbl.config import PromotionConfig
from xbl.feedback.counterfactual import counterfactual_images, fill_from_surround, to_cells
from xbl.judge.evidence import COUNTERFACTUAL, Evidence, explanation_on
from xbl.judge.paired import compare_paired, mcnemar_p, paired_bootstrap_ci
from xbl.judge.promotion import NO_EVIDENCE, level_for, promotion_decision

RULE = PromotionConfig()


def outcomes(both: int, gained: int, lost: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Champion and candidate correctness on the same images."""
    champion = [1] * both + [0] * gained + [1] * lost + [0] * neither
    candidate = [1] * both + [1] * gained + [0] * lost + [0] * neither
    return np.array(champion, bool), np.array(candidate, bool)


def test_mcnemar_is_the_exact_one_sided_binomial_test_on_the_discordant_images():
    for gained, lost in ((9, 1), (5, 5), (0, 3), (30, 12)):
        expected = binomtest(gained, gained + lost, 0.5, alternative="greater").pvalue
        assert mcnemar_p(gained, lost) == pytest.approx(expected)
    assert mcnemar_p(0, 0) == 1.0


def test_the_paired_comparison_counts_only_disagreements():
    champion, candidate = outcomes(both=300, gained=12, lost=2, neither=46)
    c = compare_paired(champion, candidate)
    assert (c.images, c.gained, c.lost) == (360, 12, 2)
    assert c.difference == pytest.approx(10 / 360)
    assert c.ci_low < c.difference < c.ci_high
    assert c.p_value == pytest.approx(mcnemar_p(12, 2))
    with pytest.raises(ValueError, match="same images"):
        compare_paired(champion, candidate[:-1])


def test_the_bootstrap_interval_keeps_an_image_s_two_answers_together():
    same = np.ones(200, bool)
    assert paired_bootstrap_ci(same, same) == (0.0, 0.0)  # always agree: no spread at all
    low, high = paired_bootstrap_ci(*outcomes(100, 30, 10, 60))
    assert 0 < low < 0.1 < high < 0.2


def test_a_candidate_better_by_the_test_is_promoted_whatever_val_says():
    champion, candidate = outcomes(both=250, gained=40, lost=5, neither=65)
    decision = promotion_decision(
        compare_paired(champion, candidate),
        "audit, 360 of 360 images",
        {"val_accuracy": 0.98},
        {"val_accuracy": 0.93},  # val drops 0.05: the confounded split rewarded the shortcut
        RULE,
    )
    assert decision.promoted and decision.reason.startswith("audit, 360 of 360 images: 0.806")
    assert "McNemar p = " in decision.reason and "95 % CI" in decision.reason
    record = decision.record()
    assert record["p_value"] < 1e-6 and record["evidence"] == "audit, 360 of 360 images"


def test_a_small_gain_that_chance_explains_is_not_promoted():
    """The old rule promoted any audit gain above 0: 3 images of 360 won it."""
    champion, candidate = outcomes(both=300, gained=5, lost=2, neither=53)
    decision = promotion_decision(compare_paired(champion, candidate), "audit", {}, {}, RULE)
    assert not decision.promoted and "not better at level 0.03 (comparison 1" in decision.reason
    worse = promotion_decision(compare_paired(candidate, champion), "audit", {}, {}, RULE)
    assert not worse.promoted


def test_the_level_budget_holds_over_any_number_of_comparisons_on_the_same_images():
    levels = [level_for(0.05, k) for k in range(1, 100_001)]
    assert sum(levels) < 0.05 and sum(levels) > 0.0499
    assert all(a > b for a, b in zip(levels, levels[1:]))
    with pytest.raises(ValueError):
        level_for(0.05, 0)


def test_the_same_gain_that_wins_a_first_comparison_loses_a_later_one():
    champion, candidate = outcomes(both=300, gained=14, lost=3, neither=43)  # p ≈ 0.006
    comparison = compare_paired(champion, candidate)
    first = promotion_decision(comparison, "audit", {}, {}, RULE)
    third = promotion_decision(comparison, "audit", {}, {}, RULE, earlier=2)
    assert first.promoted and "comparison 1 on these images" in first.reason
    assert not third.promoted and "comparison 3 on these images" in third.reason
    assert third.record()["level"] == pytest.approx(level_for(0.05, 3))
    assert third.record()["comparison_number"] == 3


def test_ten_rounds_of_candidates_no_better_rarely_move_the_champion():
    """Chance alone (each discordant image a coin toss) over 10 rounds on the same images: the
    champion moves in at most about `level` of such histories, where a fixed level per round
    moves it in about 10 times as many."""
    rng = np.random.default_rng(7)
    histories, moved, moved_fixed = 4000, 0, 0
    for _ in range(histories):
        discordant = rng.integers(10, 60, size=10)
        gained = rng.binomial(discordant, 0.5)
        p = [mcnemar_p(int(g), int(n - g)) for g, n in zip(gained, discordant)]
        moved += any(p[k] < level_for(0.05, k + 1) for k in range(10))
        moved_fixed += any(pk < 0.05 for pk in p)
    assert moved / histories <= 0.05
    assert moved_fixed / histories > 3 * moved / histories


def _reads_only(where: np.ndarray) -> nn.Module:
    """A linear model whose class-1 logit sums the pixels in `where` (H,W), and nothing else."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(where.size, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].weight[1] = torch.as_tensor(where.ravel(), dtype=torch.float32)
    return model


def test_the_explanation_score_on_the_audit_images_tells_shortcut_from_evidence():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(12, 1, 16, 16), dtype=np.uint8)
    shortcut = np.zeros((12, 16, 16), bool)
    shortcut[:, :4, :4] = True  # the pasted shortcut's cells
    evidence = Evidence(COUNTERFACTUAL, images, np.zeros(12, int), 12, 12, "", None, shortcut)
    corner, centre = shortcut[0].astype(float), np.zeros((16, 16))
    centre[6:10, 6:10] = 1
    assert explanation_on(_reads_only(corner), evidence)["score"] < 0.05
    assert explanation_on(_reads_only(centre), evidence)["score"] > 0.95
    dead = explanation_on(_reads_only(np.zeros((16, 16))), evidence)  # attributes nothing
    assert dead == {"score": None, "dead_map_share": 1.0}  # flagged, never a perfect score
    no_place = Evidence(COUNTERFACTUAL, images, np.zeros(12, int), 12, 12, "")
    assert explanation_on(_reads_only(corner), no_place) is None


def test_the_decision_reports_the_explanation_score_on_the_audit_images():
    champion, candidate = outcomes(both=250, gained=40, lost=5, neither=65)
    metrics = (
        {"evidence_explanation_score": 0.21, "evidence_dead_map_share": 0.0},
        {"evidence_explanation_score": 0.87, "evidence_dead_map_share": 0.05},
    )
    decision = promotion_decision(compare_paired(champion, candidate), "audit", *metrics, RULE)
    assert "on the audit images 0.210 → 0.870" in decision.reason
    assert "up to 5% of the maps dead, left out" in decision.reason


def test_val_vetoes_only_when_the_setting_asks():
    champion, candidate = outcomes(both=250, gained=40, lost=5, neither=65)
    comparison = compare_paired(champion, candidate)
    vals = ({"val_accuracy": 0.98}, {"val_accuracy": 0.90})
    assert promotion_decision(comparison, "audit", *vals, RULE).promoted
    veto = promotion_decision(comparison, "audit", *vals, PromotionConfig(val_veto=True))
    assert not veto.promoted and "val_veto" in veto.reason


def test_without_evidence_it_says_how_to_get_some():
    decision = promotion_decision(None, "none", {"val_accuracy": 0.9}, {"val_accuracy": 1}, RULE)
    assert not decision.promoted and decision.reason == NO_EVIDENCE
    for way in ("split=audit", "confounder masks", "answer one round"):
        assert way in NO_EVIDENCE


def test_level_is_checked():
    from xbl.errors import ConfigError

    with pytest.raises(ConfigError, match="level"):
        PromotionConfig(level=0).check()


# ---------------------------------------------------------------- the counterfactual replacement
def test_the_fill_grows_the_mark_to_whole_cells_and_takes_the_surround():
    image = np.full((3, 12, 12), 40, np.uint8)
    image[0, 1:3, 1:3] = 250  # a red mark, not aligned with the 4-px grid's cell edges
    mask = np.zeros((1, 12, 12), bool)
    mask[0, 1:3, 1:3] = True
    cells = to_cells(mask, 4)
    assert cells[0, :4, :4].all() and cells.sum() == 16
    out = counterfactual_images(image[None], mask, 4)[0]
    assert (out == 40).all()  # mark gone, and no outline of it left
    assert (out[:, 4:, 4:] == image[:, 4:, 4:]).all()  # the rest untouched


def test_the_fill_reaches_a_large_region_and_an_image_marked_everywhere_keeps_its_mean():
    image = np.zeros((1, 32, 32), np.uint8)
    image[0, :, 16:] = 200
    region = np.zeros((32, 32), bool)
    region[4:28, 4:28] = True
    out = fill_from_surround(image, region)
    assert out[0, 16, 5] < 100 < out[0, 16, 26]  # each side takes its own surround
    everywhere = fill_from_surround(image, np.ones((32, 32), bool))
    assert (everywhere == 100).all()


def test_a_donor_gives_each_image_a_shortcut_that_carries_no_label():
    """The audit's images keep a shortcut, drawn from another image: the model that reads it
    is misled as on a true audit split, whose decoys are re-drawn at random."""
    images = np.zeros((2, 1, 8, 8), np.uint8)
    images[0, 0, :2, :2] = 200  # image 0's mark, top left
    images[1, 0, 6:, 6:] = 90  # image 1's mark, bottom right
    masks = np.zeros((2, 8, 8), bool)
    masks[0, :2, :2] = masks[1, 6:, 6:] = True
    out = counterfactual_images(images, masks, 2, donors=np.array([1, 0]))
    assert (out[0, 0, 6:, 6:] == 90).all() and (out[0, 0, :2, :2] == 0).all()
    assert (out[1, 0, :2, :2] == 200).all() and (out[1, 0, 6:, 6:] == 0).all()
