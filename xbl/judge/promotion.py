"""Which model becomes the champion (docs/methods.md, "Promotion").

The candidate must be right more often than the champion on shortcut-free images (the true
audit split, else the counterfactual audit built from the annotations: xbl/judge/evidence.py),
by a paired test. The confounded validation split rewards the shortcut, so its accuracy is
reported and is a veto only when `promotion.val_veto` asks for it.

The same audit images judge every round's candidate. Testing each at `promotion.level` would let
chance promote about once in 1/level rounds (the champion's figure drifts upward: winner's
curse). So `promotion.level` is the budget for all comparisons on the same images, spent as
level·6/(π²k²) on the k-th: the sum over every k is the level itself."""

from __future__ import annotations

import math
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


def level_for(budget: float, comparison: int) -> float:
    """The level of the `comparison`-th paired test (1, 2, ...) on the same images, out of a
    false-promotion budget that holds over any number of them."""
    if comparison < 1:
        raise ValueError(f"comparisons count from 1, not {comparison}")
    return budget * 6 / (math.pi**2 * comparison**2)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    evidence: str  # which audit, its coverage and how it was built; "none"
    comparison: PairedComparison | None = None
    level: float | None = None  # the level this comparison was tested at
    number: int | None = None  # which comparison on these images it was (1, 2, ...)

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
                level=self.level,
                comparison_number=self.number,
            )
        return out


def promotion_decision(
    comparison: PairedComparison | None,
    evidence: str,
    champion: dict,
    candidate: dict,
    rule: PromotionConfig,
    earlier: int = 0,
) -> Decision:
    """Promote when the paired test on the evidence says the candidate is better at its share
    of `rule.level`, this being comparison `earlier` + 1 on these images (and, with
    `rule.val_veto`, val accuracy dropped at most `rule.max_val_acc_drop`). `champion` and
    `candidate` are their metrics, for the val figures the reason reports."""
    if comparison is None or comparison.images == 0:
        return Decision(False, NO_EVIDENCE, "none")
    number = earlier + 1
    level = level_for(rule.level, number)
    judged = {"evidence": evidence, "comparison": comparison, "level": level, "number": number}
    verdict = f"{evidence}: {comparison.summary()}"
    at = f"level {level:.2g} (comparison {number} on these images, of a budget of {rule.level})"
    drop = champion.get("val_accuracy", 0.0) - candidate.get("val_accuracy", 0.0)
    context = f"; val accuracy {-drop:+.3f}{_explanations(champion, candidate)}"
    if comparison.difference <= 0 or comparison.p_value >= level:
        return Decision(False, f"{verdict}: not better at {at}{context}", **judged)
    if rule.val_veto and drop > rule.max_val_acc_drop:
        why = (
            f"{verdict}, but val accuracy dropped {drop:.3f} (> {rule.max_val_acc_drop}, val_veto)"
        )
        return Decision(False, why, **judged)
    return Decision(True, f"{verdict}: better at {at}{context}", **judged)


def _explanations(champion: dict, candidate: dict) -> str:
    """The explanation scores the reviewer sees beside the test: on val (xbl/judge/evaluate.py)
    and on the audit images, where the shortcut carries no label (`evidence_explanation_score`,
    xbl/judge/evidence.py), each with its dead maps flagged."""
    out = ""
    before, basis = explanation_score(champion)
    after, _ = explanation_score(candidate)
    if before is not None and after is not None:
        out += f"; explanation score {before:.3f} → {after:.3f} ({basis})"
    before, after = (m.get("evidence_explanation_score") for m in (champion, candidate))
    if before is not None and after is not None:
        dead = max(m.get("evidence_dead_map_share", 0.0) for m in (champion, candidate))
        flag = f"; up to {dead:.0%} of the maps dead, left out" if dead > 0 else ""
        out += (
            f"; on the audit images {before:.3f} → {after:.3f} (1 − DeepLIFT share on the "
            f"shortcut's cells{flag})"
        )
    return out
