"""The promotion rule: the candidate must beat the current champion on evidence free of the
shortcut (docs/methods.md, "Promotion")."""

from __future__ import annotations

import pytest

from xbl.config import PromotionConfig
from xbl.judge.promotion import promotion_decision

RULE = PromotionConfig()


def model(audit=None, val=0.95, wrs=None, outside=None) -> dict:
    metrics = {"val_accuracy": val}
    if audit is not None:
        metrics["audit_accuracy"] = audit
    if wrs is not None:
        metrics["val_wrong_reason_share_deeplift"] = wrs
    if outside is not None:
        metrics["val_outside_share_deeplift"] = outside
    return metrics


def test_with_an_audit_split_the_higher_audit_accuracy_wins_whatever_val_says():
    shortcut = model(audit=0.74, val=0.98, wrs=0.4)
    fixed = model(audit=0.93, val=0.95, wrs=0.05)  # val drops 0.03: the shortcut is gone
    promoted, why = promotion_decision(shortcut, fixed, RULE)
    assert promoted and why.startswith("audit accuracy 0.930 against the champion's 0.740")
    assert not promotion_decision(fixed, shortcut, RULE)[0]


def test_a_candidate_that_only_ties_the_champion_or_misses_the_gain_is_rejected():
    champion = model(audit=0.90)
    assert not promotion_decision(champion, model(audit=0.90), RULE)[0]
    rule = PromotionConfig(min_audit_gain=0.02)
    promoted, why = promotion_decision(champion, model(audit=0.91), rule)
    assert not promoted and "required gain 0.02" in why
    assert promotion_decision(champion, model(audit=0.93), rule)[0]


def test_without_an_audit_split_explanations_come_first():
    champion = model(val=0.95, wrs=0.30)
    assert promotion_decision(champion, model(val=0.94, wrs=0.10), RULE)[0]
    promoted, why = promotion_decision(champion, model(val=0.96, wrs=0.35), RULE)
    assert not promoted and "explanation score 0.650 not above the champion's 0.700" in why
    promoted, why = promotion_decision(champion, model(val=0.90, wrs=0.10), RULE)
    assert not promoted and "val accuracy dropped 0.050" in why


def test_user_data_scores_attribution_off_the_relevance_masks():
    champion, candidate = model(outside=0.6), model(outside=0.3)
    promoted, why = promotion_decision(champion, candidate, RULE)
    assert promoted and "outside the relevance masks" in why


def test_with_nothing_shortcut_free_to_judge_by_the_champion_stays():
    promoted, why = promotion_decision(model(val=0.90), model(val=0.99), RULE)
    assert not promoted and "champion kept" in why


@pytest.mark.parametrize("values", [{"max_val_acc_drop": -0.1}, {"min_audit_gain": 1.5}])
def test_nonsense_rules_are_refused_at_load(values):
    from xbl.errors import ConfigError

    with pytest.raises(ConfigError, match="promotion"):
        PromotionConfig(**values)
