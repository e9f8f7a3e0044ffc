"""Which model becomes the champion (docs/methods.md, "Promotion").

The candidate must be right more often than the champion on shortcut-free images (the true
audit split, else the counterfactual audit built from the annotations: xbl/judge/evidence.py),
by a paired test at `promotion.level`. The confounded validation split rewards the shortcut, so
its accuracy is reported and is a veto only when `promotion.val_veto` asks for it."""

from __future__ import annotations

from dataclasses import dataclass

from xbl.config import PromotionConfig
from xbl.judge.evaluate import explanation_score
from xbl.judge.paired import PairedComparison

NO_EVIDENCE = (
    "no shortcut-free evidence: the dataset has no audit split and no annotator has marked a "
    "region to build a counterfactual audit from, so the champion stays. To get some: add rows "
    "with split=audit to the manifest (images whose shortcut does not follow the label), give "
    "confounder masks, or answer one round in Label Studio"
)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    evidence: str  # which audit, its coverage and how it was built; "none"
    comparison: PairedComparison | None = None

    def record(self) -> dict:
        """What the candidate's run carries (and a retry reads back)."""
        out = {"promoted": self.promoted, "reason": self.reason, "evidence": self.evidence}
        if self.comparison is not None:
            c = self.comparison
            out.update(
                p_value=c.p_value,
                champion_accuracy=c.champion_accuracy,
                candidate_accuracy=c.candidate_accuracy,
                difference=c.difference,
                ci_low=c.ci_low,
                ci_high=c.ci_high,
                images=c.images,
            )
        return out


def promotion_decision(
    comparison: PairedComparison | None,
    evidence: str,
    champion: dict,
    candidate: dict,
    rule: PromotionConfig,
) -> Decision:
    """Promote when the paired test on the evidence says the candidate is better at `rule.level`
    (and, with `rule.val_veto`, val accuracy dropped at most `rule.max_val_acc_drop`).
    `champion` and `candidate` are their metrics, for the val figures the reason reports."""
    if comparison is None or comparison.images == 0:
        return Decision(False, NO_EVIDENCE, "none")
    verdict = f"{evidence}: {comparison.summary()}"
    drop = champion.get("val_accuracy", 0.0) - candidate.get("val_accuracy", 0.0)
    context = f"; val accuracy {-drop:+.3f}{_explanations(champion, candidate)}"
    if comparison.difference <= 0 or comparison.p_value >= rule.level:
        return Decision(
            False, f"{verdict}: not better at level {rule.level}{context}", evidence, comparison
        )
    if rule.val_veto and drop > rule.max_val_acc_drop:
        why = (
            f"{verdict}, but val accuracy dropped {drop:.3f} (> {rule.max_val_acc_drop}, val_veto)"
        )
        return Decision(False, why, evidence, comparison)
    return Decision(True, f"{verdict}{context}", evidence, comparison)


def _explanations(champion: dict, candidate: dict) -> str:
    before, basis = explanation_score(champion)
    after, _ = explanation_score(candidate)
    if before is None or after is None:
        return ""
    return f"; explanation score {before:.3f} → {after:.3f} ({basis})"
