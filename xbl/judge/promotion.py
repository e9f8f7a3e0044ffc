"""Which model becomes the champion (docs/methods.md, "Promotion")."""

from __future__ import annotations

from xbl.config import PromotionConfig
from xbl.judge.evaluate import explanation_score


def promotion_decision(champion: dict, candidate: dict, rule: PromotionConfig) -> tuple[bool, str]:
    """(promote?, why) for the candidate's metrics against the current champion's.

    With an audit split (shortcut-free held-out images) the candidate must beat the champion's
    audit accuracy by more than `min_audit_gain`. Without one, explanations come first: the
    explanation score must improve and validation accuracy drop at most `max_val_acc_drop`
    (the confounded validation split rewards the shortcut, so it can only be a guard)."""
    if "audit_accuracy" in candidate and "audit_accuracy" in champion:
        return _by_audit(champion["audit_accuracy"], candidate["audit_accuracy"], rule)
    return _explanation_first(champion, candidate, rule)


def _by_audit(before: float, after: float, rule: PromotionConfig) -> tuple[bool, str]:
    gain = after - before
    verdict = f"audit accuracy {after:.3f} against the champion's {before:.3f} ({gain:+.3f})"
    if gain > rule.min_audit_gain:
        return True, verdict
    return False, f"{verdict}: not above the required gain {rule.min_audit_gain}"


def _explanation_first(champion: dict, candidate: dict, rule: PromotionConfig) -> tuple[bool, str]:
    before, basis = explanation_score(champion)
    after, _ = explanation_score(candidate)
    if before is None or after is None:
        return False, "no audit split and no masks to score explanations by: champion kept"
    if after <= before:
        return (
            False,
            f"explanation score {after:.3f} not above the champion's {before:.3f} ({basis})",
        )
    drop = champion["val_accuracy"] - candidate["val_accuracy"]
    if drop > rule.max_val_acc_drop:
        return False, f"val accuracy dropped {drop:.3f} (> {rule.max_val_acc_drop})"
    return (
        True,
        f"explanation score {before:.3f} → {after:.3f} ({basis}), val accuracy drop {drop:.3f}",
    )
