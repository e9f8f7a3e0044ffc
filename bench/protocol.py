"""The benchmarks' protocol, written once: two reference models bound the shortcut's gap, every
choice is made on the audit split, the test split is read once at the end, and a figure is the
mean ± std of its per-seed values.

The audit split is the validation images with their confounder re-drawn at random; recovery =
(acc − vanilla) / (clean − vanilla), the share of the gap between the vanilla model (trained on
the confounded images) and the clean one (trained where the confounder carries no label) that a
retrained model closes. Choices read the audit split only, so the figures of a chosen
configuration are biased upwards; the test split, read once for each choice, is not.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import numpy as np
from torch import nn

from bench.common import METHOD_LAMBDA, Annotations, Splits, accuracy, retrain, train_plain
from xbl.train.loop import TrainResult

INITS = ("scratch", "warm")  # feedback.init: a fresh start, or fine-tuning the vanilla model


def recovery(acc: float, vanilla: float, clean: float) -> float:
    """(acc - vanilla) / (clean - vanilla): the share of the shortcut's accuracy gap closed;
    NaN where there is no gap (a tiny run can leave none)."""
    gap = clean - vanilla
    return float((acc - vanilla) / gap) if gap > 0 else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (std 0 for one seed)."""
    a = np.asarray(list(values), dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def nanmean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """mean_std over the seeds where the value is defined (not None, not NaN)."""
    a = np.array([np.nan if v is None else v for v in values], dtype=float)
    a = a[np.isfinite(a)]
    return mean_std(a) if len(a) else (float("nan"), 0.0)


@dataclass
class Reference:
    """One seed's two ends of the gap, on the same images."""

    splits: Splits  # the confounded data
    clean_splits: Splits  # the same images where the confounder carries no label
    vanilla: nn.Module
    clean: nn.Module
    vanilla_result: TrainResult
    vanilla_audit: float
    clean_audit: float

    def audit(self, model: nn.Module) -> tuple[float, float]:
        """`model`'s audit accuracy and the share of the gap it closes there."""
        acc = accuracy(model, self.splits.audit_x, self.splits.audit_y)
        return acc, recovery(acc, self.vanilla_audit, self.clean_audit)


def references(splits: Splits, clean_splits: Splits, seed: int, baseline: dict | None) -> Reference:
    """The vanilla and clean models of one seed, each trained as the pipeline's baseline
    (early-stopped on its validation loss) with the `baseline` settings."""
    vanilla, result = train_plain(splits, seed, baseline)
    clean, _ = train_plain(clean_splits, seed, baseline)
    audit = (splits.audit_x, splits.audit_y)
    return Reference(
        splits,
        clean_splits,
        vanilla,
        clean,
        result,
        accuracy(vanilla, *audit),
        accuracy(clean, *audit),
    )


def audited_retraining(
    ref: Reference, method: str, ann: Annotations, seed: int, settings: dict
) -> tuple[nn.Module, TrainResult | None, dict]:
    """The pipeline's retraining on the annotator's answers `ann` (`retrain`, from the vanilla
    model annotators judged), and what it reaches on the audit split with what the answers
    marked. A diverged one (no result) is judged on its last good weights."""
    model, result, _ = retrain(ref.vanilla, ref.splits, method, ann, seed, settings)
    audit, audit_recovery = ref.audit(model)
    return (
        model,
        result,
        {
            "audit_accuracy": audit,
            "audit_recovery": audit_recovery,
            "val_accuracy": accuracy(model, ref.splits.val_x, ref.splits.val_y),
            "decoy_shown": ann.decoy_shown,
            "decoy_marked": ann.decoy_marked,
            "evidence_marked": ann.evidence_marked,
            "diverged": result is None,
        },
    )


# ---------------------------------------------------------------- choosing on the audit split
def matching(rows: Iterable[dict], **fields) -> list[dict]:
    """The per-seed rows of one setting: those whose `fields` have these values."""
    return [r for r in rows if all(r[k] == v for k, v in fields.items())]


def seed_mean(rows: list[dict], key: str = "audit_recovery") -> tuple[float, float]:
    """Mean ± std over seeds of a setting's runs; NaN (never chosen) if none ran or any seed's
    training diverged, as the pipeline would have stopped there."""
    if not rows or any(r["diverged"] for r in rows):
        return float("nan"), float("nan")
    return mean_std(r[key] for r in rows)


def rank(score: float | tuple[float, float]) -> float:
    """A score (a mean, or mean ± std) as candidates are ranked by it: undefined (NaN) last."""
    value = score[0] if isinstance(score, tuple) else score
    return value if np.isfinite(value) else -np.inf


def best(scores: dict) -> Hashable:
    """The candidate with the highest score; an undefined one never wins; ties keep the
    earlier candidate."""
    return max(scores, key=lambda k: rank(scores[k]))


def lambda_grid(method: str, factors: Iterable[float]) -> list[float]:
    """The λ values tried for `method`: its default times each factor (one value if it has
    no term, as counterexamples)."""
    lam = METHOD_LAMBDA[method]
    return [float(f"{lam * f:.6g}") for f in factors] if lam > 0 else [lam]


def choose_lambda_and_start(score: Callable[[float, str], object], lams: list[float]) -> dict:
    """λ first, retrained from scratch, then the start (INITS) at that λ, each the best by
    `score(lam, init)`: what a study chooses per method. Ties keep the earlier λ or start."""
    by_lambda = {lam: score(lam, "scratch") for lam in lams}
    lam = best(by_lambda)
    by_init = {init: score(lam, init) for init in INITS}
    return {"lambda": lam, "init": best(by_init), "by_lambda": by_lambda, "by_init": by_init}


def paired_differences(diffs: list[float]) -> dict:
    """Differences between two settings paired by seed: how many, their mean ± std, how many
    favour the first, and the p-values of a paired t-test and a Wilcoxon signed-rank test (NaN
    where one pair, or no spread, leaves the test undefined)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    t = stats.ttest_rel(d, np.zeros_like(d)) if len(d) > 1 and d.std() > 0 else None
    w = stats.wilcoxon(d) if len(d) > 1 and np.any(d != 0) else None
    mean, std = mean_std(d)
    return {
        "pairs": len(d),
        "mean_difference": mean,
        "std": std,
        "better": int((d > 0).sum()),
        "t_p": float(t.pvalue) if t else float("nan"),
        "wilcoxon_p": float(w.pvalue) if w else float("nan"),
    }


# ---------------------------------------------------------------- the test split, once
def test_once(ref: Reference, models: dict) -> dict:
    """Test accuracy of the reference models and of each chosen model (`models`: name ->
    model) with the recovery it reaches. The studies read the test split here only."""
    x, y = ref.splits.test_x, ref.splits.test_y
    vanilla, clean = accuracy(ref.vanilla, x, y), accuracy(ref.clean, x, y)
    tested = {}
    for name, model in models.items():
        acc = accuracy(model, x, y)
        tested[name] = {"test_accuracy": acc, "test_recovery": recovery(acc, vanilla, clean)}
    return {"vanilla": vanilla, "clean": clean, "models": tested}


# ---------------------------------------------------------------- the tables
def by_setting(rows: Iterable[dict], key: Callable[[dict], Hashable]) -> dict[Hashable, list]:
    """Per-seed rows grouped by their setting, in first-seen order."""
    groups: dict[Hashable, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups
