"""Which model becomes the champion (docs/methods.md, "Promotion")."""

from __future__ import annotations

from xbl.config import PromotionConfig


def promotion_decision(baseline: dict, candidate: dict, rule: PromotionConfig) -> tuple[bool, str]:
    """(promote?, why) for the candidate's metrics against the baseline's: champion if
    validation accuracy drops at most `max_val_acc_drop` and (when required) the explanation
    score on validation images with masks improves."""
    drop = baseline["val_accuracy"] - candidate["val_accuracy"]
    if drop > rule.max_val_acc_drop:
        return False, f"val accuracy dropped {drop:.3f} (> {rule.max_val_acc_drop})"
    if rule.require_better_explanation:
        before = baseline.get("val_explanation_score")
        after = candidate.get("val_explanation_score")
        if before is None or after is None or after <= before:
            return False, f"explanation score did not improve ({before} → {after})"
        return True, f"explanation score {before:.3f} → {after:.3f}, val accuracy drop {drop:.3f}"
    return True, f"val accuracy drop {drop:.3f}"
