"""Does feedback remove the shortcut? A protocol that chooses on validation and tests once.

Per seed (the seed draws the split, the decoys' corners, the test and audit decoys and the
initial weights): a vanilla model on decoy data (the pipeline's baseline, early-stopped on the
confounded val split), a model trained without decoys, and feedback retrainings on training
images chosen from the baseline's predictions, answered by the simulated annotator
(`oracle_ignore_cells` on the top saliency cells the baseline shows; HINT and eXBL learn from
the shown cells it did not mark).

Every choice is made on the audit split, the val digits with their decoys re-drawn at random:
audit recovery = (audit acc − vanilla) / (clean − vanilla), per seed, mean over seeds. In order:

1. each method's λ (its default × LAMBDA_FACTORS; retrained from scratch),
2. its start (`feedback.init`: scratch, or warm: fine-tune the baseline) at that λ,
3. the default method: the best at its chosen λ and start.

All at the study setting: 25 entropy-chosen images, the perfect annotator, 4-px cells. With the
choices fixed, audit recovery is measured for the interaction-efficiency grid (every method,
entropy and random, 10–100 images), a 7-px grid that does not line up with the 4×4 decoy,
and annotators who answer wrongly or incompletely (the best ROBUST_TOP methods). The test
split is then evaluated once, for each method's chosen configuration at the study setting.

    python -m bench.efficacy            # the full protocol: 183 retrainings, 38 min on 2
                                        # shared cores (~11 s each, 1 torch thread)
    python -m bench.efficacy --quick    # 1 seed, 2 methods, a few settings: a smoke run

Every retraining is logged to the MLflow experiment `xbl-bench-efficacy` (a parent run per
invocation), in the project's store unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import protocol, render
from bench.common import (
    BASELINE,
    FEEDBACK,
    METHOD_LAMBDA,
    ORACLE_OVERLAP,
    QUERY,
    Clicks,
    accuracy,
    annotations,
    choose_queries,
    decoy_splits,
    decoy_visibility,
    imperfect,
    listed,
    oracle_clicks,
    pool_saliency,
)
from xbl.feedback.methods import METHODS
from xbl.labelstudio.oracle import IMPERFECTIONS

EXPERIMENT = "xbl-bench-efficacy"
PROJECT = Path(__file__).resolve().parent.parent
BUDGETS = (10, 25, 50, 100)
STRATEGIES = ("entropy", "random")
LAMBDA_FACTORS = (0.1, 1.0, 10.0)
GRIDS = (4, 7)  # 4 px: the 4×4 decoy is exactly one cell; 7 px: it sits inside a larger cell
RATES = (0.1, 0.3, 0.5)
EFFICIENCY_TOP = 3  # methods in the interaction-efficiency grid: the best by audit recovery
ROBUST_TOP = 2  # methods with imperfect annotators: the best by audit recovery
QUICK = {
    "seeds": (0,),
    "methods": ("rrr", "hint"),
    "budgets": (10, 25),
    "lambda_factors": (1.0,),
    "rates": (0.3,),
    "efficiency_top": 1,
    "robust_top": 1,
}
# The typology paper's interaction efficiency (Friedrich et al., [T] in docs/methods.md): RRR
# on Decoy-MNIST with feedback on n of the 60,000 training images, chosen at random, each with
# the exact decoy mask (a perfect annotator), λ scaled by 60,000 / n / 256 (their script
# interaction_efficiency.py: n = 25 … 10,000, 50 epochs, 5 seeds). /work/shared/METHODS.md and
# docs/methods.md give one point of that curve: n = 25 → 98.9 % (vanilla 78.9, clean 98.8).
TYPOLOGY = {
    "source": "Friedrich et al., typology paper [T]: RRR, Decoy-MNIST, random images, exact "
    "decoy masks",
    "pool": 60000,
    "vanilla": 0.789,
    "clean": 0.988,
    "points": {25: 0.989},
}


@dataclass(frozen=True)
class Setting:
    """One retraining's settings; the defaults are the study setting."""

    method: str
    lam: float
    init: str = "scratch"
    strategy: str = "entropy"
    budget: int = 25
    grid: int = 4
    annotator: str = "perfect"  # perfect | wrong | incomplete
    rate: float = 0.0

    @property
    def at_study(self) -> bool:
        """Is this the study setting, where choices are made (any method, λ and start)?"""
        return (self.strategy, self.budget, self.grid, self.annotator) == (
            "entropy",
            25,
            4,
            "perfect",
        )

    @property
    def name(self) -> str:
        noise = "" if self.annotator == "perfect" else f" {self.annotator} {self.rate:.0%}"
        return (
            f"{self.method} λ={self.lam:g} {self.init} {self.strategy} {self.budget} "
            f"grid {self.grid}{noise}"
        )


@dataclass
class SeedContext:
    """One seed's data, reference models and the annotator's answers, shared by every run."""

    seed: int
    ref: protocol.Reference  # the splits, the same without decoys, the vanilla and clean models
    reference: dict
    clicks: dict[int, Clicks]  # per grid cell size: the answers on the whole pool
    queries: dict[tuple[str, int], np.ndarray]  # (strategy, budget) -> sorted dataset indices
    rows: dict[Setting, dict] = field(default_factory=dict)
    models: dict[Setting, torch.nn.Module] = field(default_factory=dict)


class Tracker:
    """The benchmark's MLflow runs: one parent per invocation, one child per trained model.

    A tracking failure after the start is reported once and ends the logging, not the run:
    the results files are the record, MLflow a convenience."""

    def __init__(self, project: Path, name: str, params: dict):
        from services import tracking

        self.tracking = tracking
        self.client = tracking.client_for(project)
        self.exp_id = tracking.experiment_id(self.client, project, EXPERIMENT)
        self.parent = tracking.start_run(self.client, self.exp_id, name)
        self.broken = False
        tracking.log_params(self.client, self.parent, params)

    def _safely(self, what: str, fn, *args) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - logging must not end a long benchmark
            self.broken = True
            print(f"MLflow logging stopped ({what}): {exc!r}", flush=True)

    def child(self, name: str, params: dict, metrics: dict) -> None:
        def log() -> None:
            run = self.tracking.start_run(self.client, self.exp_id, name, self.parent)
            self.tracking.log_params(self.client, run, params)
            self.tracking.log_metrics(self.client, run, metrics)
            self.client.set_terminated(run)

        self._safely(name, log)

    def close(self, metrics: dict, files: list[Path], status: str = "FINISHED") -> None:
        def log() -> None:
            self.tracking.log_metrics(self.client, self.parent, metrics)
            for path in files:
                if path.is_file():
                    self.tracking.log_file(self.client, self.parent, path)
            self.client.set_terminated(self.parent, status=status)

        self._safely("close", log)


# ---------------------------------------------------------------- running
def prepare_seed(seed: int, budgets, strategies, baseline: dict, log, tracker) -> SeedContext:
    """Data, vanilla and clean models, and the oracle's answers on the whole pool per grid."""
    ref = protocol.references(decoy_splits(True, seed), decoy_splits(False, seed), seed, baseline)
    splits, base = ref.splits, ref.vanilla
    reference = {
        "vanilla": {
            "audit_accuracy": ref.vanilla_audit,
            "val_accuracy": accuracy(base, splits.val_x, splits.val_y),
            "best_epoch": ref.vanilla_result.best_epoch,
        },
        "clean": {"audit_accuracy": ref.clean_audit},
    }
    log(
        f"seed {seed}: audit accuracy vanilla {reference['vanilla']['audit_accuracy']:.3f}, "
        f"without decoys {reference['clean']['audit_accuracy']:.3f}"
    )
    if tracker:
        for kind in ("vanilla", "clean"):
            tracker.child(f"{kind} seed {seed}", {"seed": seed, "kind": kind}, reference[kind])
    pool = splits.pool
    attr = pool_saliency(base, splits.data, pool)
    clicks = {
        g: oracle_clicks(attr, splits.data, pool, {"grid_cell": g}, ORACLE_OVERLAP) for g in GRIDS
    }
    queries = {
        (s, b): np.sort(choose_queries(base, splits, b, s, seed))
        for s in strategies
        for b in budgets
    }
    return SeedContext(seed, ref, reference, clicks, queries)


def run(ctx: SeedContext, setting: Setting, feedback: dict, log, tracker) -> dict:
    """One retraining, judged on the audit split (cached: a setting runs once per seed)."""
    if setting in ctx.rows:
        return ctx.rows[setting]
    splits, base = ctx.ref.splits, ctx.ref.vanilla
    key = (setting.strategy, setting.budget)
    chosen = (
        ctx.queries[key]
        if key in ctx.queries
        else np.sort(choose_queries(base, splits, setting.budget, setting.strategy, ctx.seed))
    )
    answers = ctx.clicks[setting.grid].subset(chosen)
    if setting.annotator != "perfect":
        answers = imperfect(answers, setting.annotator, setting.rate, ctx.seed)
    ann = annotations(answers, splits.data)
    settings = {**feedback, "lambda": setting.lam, "init": setting.init}
    start = time.perf_counter()
    model, result, judged = protocol.audited_retraining(
        ctx.ref, setting.method, ann, ctx.seed, settings
    )
    row = {
        "seed": ctx.seed,
        **asdict(setting),
        "annotated": int(len(ann.indices)),
        **judged,
        "effective_lambda": result.effective_lambda if result else None,
        "seconds": time.perf_counter() - start,
    }
    ctx.rows[setting] = row
    if setting.at_study:  # a candidate for the test split, looked at once at the end
        ctx.models[setting] = model
    log(
        f"seed {ctx.seed} {setting.name}: audit acc {row['audit_accuracy']:.3f} recovery "
        f"{row['audit_recovery']:+.2f}{' DIVERGED' if result is None else ''} "
        f"(decoy marked on {ann.decoy_marked:.0%}, "
        f"{row['seconds']:.1f} s)"
    )
    if tracker:
        tracker.child(
            f"{setting.name} seed {ctx.seed}",
            {
                "seed": ctx.seed,
                "kind": "feedback",
                **asdict(setting),
                **{f"feedback.{k}": v for k, v in settings.items()},
            },
            {k: v for k, v in row.items() if isinstance(v, float) and k not in asdict(setting)},
        )
    return row


def run_all(contexts, settings, feedback, log, tracker) -> list[dict]:
    return [run(ctx, s, feedback, log, tracker) for s in settings for ctx in contexts]


# ---------------------------------------------------------------- choosing on the audit split
def mean_recovery(rows: list[dict], **fields) -> float:
    """Mean audit recovery over seeds of the matching runs (`seed_mean`)."""
    return protocol.seed_mean(protocol.matching(rows, **fields))[0]


def choose(rows: list[dict], methods, factors) -> dict:
    """Per method the λ, then the start, with the best mean audit recovery at the study
    setting; and the default method. Ties keep the earlier candidate (the default λ and
    `scratch` come first)."""
    study = {"strategy": "entropy", "budget": 25, "grid": 4, "annotator": "perfect"}
    out = {"methods": {}}
    for m in methods:
        lams = sorted(protocol.lambda_grid(m, factors), key=lambda x: x != METHOD_LAMBDA[m])
        c = protocol.choose_lambda_and_start(
            lambda lam, init, m=m: mean_recovery(rows, method=m, lam=lam, init=init, **study),
            lams,
        )
        out["methods"][m] = {
            "lambda": c["lambda"],
            "init": c["init"],
            "audit_recovery": c["by_init"][c["init"]],
            "by_lambda": {f"{x:g}": v for x, v in c["by_lambda"].items()},
            "by_init": c["by_init"],
        }
    out["default"] = protocol.best({m: c["audit_recovery"] for m, c in out["methods"].items()})
    return out


# ---------------------------------------------------------------- the test split, once
def test_split(contexts, choices: dict, tracker) -> dict:
    """Test accuracy and recovery of each method's chosen configuration, and of the reference
    models (`test_once`), and the clean model on clean test images."""
    per_seed = []
    for ctx in contexts:
        chosen = {m: Setting(m, c["lambda"], c["init"]) for m, c in choices["methods"].items()}
        test = protocol.test_once(ctx.ref, {m: ctx.models[s] for m, s in chosen.items()})
        clean_test = (ctx.ref.clean_splits.test_x, ctx.ref.clean_splits.test_y)
        vanilla, clean = test["vanilla"], test["clean"]
        entry = {
            "seed": ctx.seed,
            "vanilla": vanilla,
            "clean": clean,
            "clean_on_clean_images": accuracy(ctx.ref.clean, *clean_test),
            "methods": test["models"],
        }
        per_seed.append(entry)
        if tracker:
            tracker.child(
                f"test once seed {ctx.seed}",
                {"seed": ctx.seed, "kind": "test-once", "default": choices["default"]},
                {
                    "vanilla_test_accuracy": vanilla,
                    "clean_test_accuracy": clean,
                    **{
                        f"{m}_test_accuracy": v["test_accuracy"]
                        for m, v in entry["methods"].items()
                    },
                },
            )
    return {"per_seed": per_seed}


# ---------------------------------------------------------------- summaries
def summarise(result: dict) -> dict:
    """Mean ± std over seeds of every setting, the paired entropy − random tests and the test
    table, all from the per-seed rows in the result."""
    rows = [r for s in result["per_seed"] for r in s["runs"]]
    keys = [f.name for f in Setting.__dataclass_fields__.values()]
    settings = []
    for key, group in protocol.by_setting(rows, lambda r: tuple(r[k] for k in keys)).items():
        rec, rec_sd = protocol.mean_std(r["audit_recovery"] for r in group)
        acc, acc_sd = protocol.mean_std(r["audit_accuracy"] for r in group)
        settings.append(
            {
                **dict(zip(keys, key)),
                "n": len(group),
                "diverged": sum(bool(r["diverged"]) for r in group),
                "audit_recovery": rec,
                "audit_recovery_std": rec_sd,
                "audit_accuracy": acc,
                "audit_accuracy_std": acc_sd,
                **{
                    k: float(np.mean([r[k] for r in group]))
                    for k in ("val_accuracy", "decoy_shown", "decoy_marked", "evidence_marked")
                },
            }
        )
    ref = {
        f"{kind}_audit_accuracy": protocol.mean_std(
            s["reference"][kind]["audit_accuracy"] for s in result["per_seed"]
        )
        for kind in ("vanilla", "clean")
    }
    return {
        "reference": ref,
        "settings": settings,
        "entropy_vs_random": paired_tests(rows, result["choices"]),
        "test": test_summary(result["test"], result["choices"]),
    }


def paired_tests(rows: list[dict], choices: dict) -> list[dict]:
    """Entropy − random audit recovery, paired by seed, per method and budget, and pooled over
    budgets per method (`paired_differences`)."""
    out = []
    for m, c in choices["methods"].items():
        base = {
            "method": m,
            "lam": c["lambda"],
            "init": c["init"],
            "grid": 4,
            "annotator": "perfect",
        }
        pairs = {}
        for r in protocol.matching(rows, strategy="entropy", **base):
            twin = protocol.matching(
                rows, strategy="random", seed=r["seed"], budget=r["budget"], **base
            )
            if twin:
                pairs.setdefault(r["budget"], []).append(
                    r["audit_recovery"] - twin[0]["audit_recovery"]
                )
        for budget, diffs in [
            *sorted(pairs.items()),
            ("all", [d for v in pairs.values() for d in v]),
        ]:
            if diffs:
                test = protocol.paired_differences(diffs).items()
                named = {("entropy_better" if k == "better" else k): v for k, v in test}
                out.append({"method": m, "budget": budget, **named})
    return out


def test_summary(test: dict, choices: dict) -> dict:
    seeds = test["per_seed"]
    out = {
        k: protocol.mean_std(s[k] for s in seeds)
        for k in ("vanilla", "clean", "clean_on_clean_images")
    }
    out["methods"] = {
        m: {
            "lambda": c["lambda"],
            "init": c["init"],
            "test_accuracy": protocol.mean_std(s["methods"][m]["test_accuracy"] for s in seeds),
            "test_recovery": protocol.mean_std(s["methods"][m]["test_recovery"] for s in seeds),
        }
        for m, c in choices["methods"].items()
    }
    return out


# ---------------------------------------------------------------- the report
def _lam(lam: float, method: str) -> str:
    return "–" if METHOD_LAMBDA[method] == 0 else f"{lam:g}"


def markdown(result: dict) -> str:
    cfg, summary, choices = result["settings"], result["summary"], result["choices"]
    summarised = {tuple(r[k] for k in Setting.__dataclass_fields__): r for r in summary["settings"]}

    def cell(setting: Setting, what: str = "recovery") -> str:
        r = summarised.get(tuple(asdict(setting).values()))
        if r is None:
            return "–"
        if what == "recovery":
            text = render.fmt((r["audit_recovery"], r["audit_recovery_std"]), 2, sign=True)
            return text + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
        return f"{r[what]:.0%}"

    def chosen(m: str, **kw) -> Setting:
        c = choices["methods"][m]
        return Setting(m, c["lambda"], c["init"], **kw)

    def by_lambda(m: str) -> list[str]:
        if METHOD_LAMBDA[m] > 0:
            return [cell(Setting(m, lam)) for lam in protocol.lambda_grid(m, cfg["lambda_factors"])]
        return [cell(Setting(m, 0.0)) if f == 1.0 else "–" for f in cfg["lambda_factors"]]

    ref = summary["reference"]
    d = choices["default"]
    dc = choices["methods"][d]
    test = summary["test"]
    spoilt = [(k, r) for k in IMPERFECTIONS for r in cfg["rates"]]
    lines = [
        "# Shortcut removal on decoy-digits: chosen on validation, tested once",
        "",
        render.machine_line(result["machine"]),
        "",
        f"Seeds {cfg['seeds']}: each seed draws the split, the decoys' corners, the test and "
        "audit decoys and the initial weights. Feedback = the simulated annotator's answers on "
        f"the top {cfg['query']['top_cells']} {cfg['query']['saliency']} cells of the baseline; "
        f"retrained for {cfg['feedback']['epochs']} fixed epochs. Took "
        f"{result['seconds'] / 60:.1f} min ({result['retrainings']} retrainings).",
        "",
        "**Audit split** = the val digits with their decoys re-drawn at random. Every choice "
        "below is made on it; audit recovery = (audit acc − vanilla) / (clean − vanilla) per "
        "seed, mean ± std over seeds. The figures of a chosen configuration are biased upwards "
        "by the choice; the test split, read once at the end, is not.",
        "",
        f"- vanilla on decoy data: audit accuracy {render.fmt(ref['vanilla_audit_accuracy'], 3)}",
        f"- trained without decoys: audit accuracy {render.fmt(ref['clean_audit_accuracy'], 3)}",
        "",
        "## 1. Validation choices (25 entropy-chosen images, perfect annotator, 4-px cells)",
        "",
        "λ is chosen from the method's default × "
        f"{{{', '.join(f'{f:g}' for f in cfg['lambda_factors'])}}} retrained from scratch, then "
        "the start (scratch: a fresh initialisation; warm: fine-tune the baseline) at that λ.",
        "",
        *render.table(
            ["method", *(f"λ × {f:g}" for f in cfg["lambda_factors"]), "chosen λ", *protocol.INITS]
            + ["chosen start", "audit recovery"],
            [
                [m, *by_lambda(m), _lam(c["lambda"], m)]
                + [cell(Setting(m, c["lambda"], i)) for i in protocol.INITS]
                + [c["init"], f"{c['audit_recovery']:+.2f}"]
                for m, c in ((m, choices["methods"][m]) for m in cfg["methods"])
            ],
        ),
        "",
        f"**Default method (best audit recovery): `{d}`, λ {_lam(dc['lambda'], d)}, init "
        f"`{dc['init']}`, {cfg['feedback']['epochs']} epochs.**",
        "",
        "## 2. Interaction efficiency (audit recovery; perfect annotator, 4-px cells)",
        "",
        f"The {len(result['efficiency_methods'])} method(s) with the best audit recovery in "
        "section 1, each at its chosen λ and start. Entropy: the images the baseline is least "
        "sure of; random: a seeded permutation of the pool.",
        "",
        *render.table(
            ["method", "strategy", *(str(b) for b in cfg["budgets"])],
            [
                [m, s, *(cell(chosen(m, strategy=s, budget=b)) for b in cfg["budgets"])]
                for m in result["efficiency_methods"]
                for s in cfg["strategies"]
            ],
        ),
    ]
    typ = TYPOLOGY
    points = ", ".join(
        f"n = {n}: {acc:.1%} test accuracy, recovery "
        f"{(acc - typ['vanilla']) / (typ['clean'] - typ['vanilla']):+.2f}"
        for n, acc in typ["points"].items()
    )
    lines += [
        "",
        f"**Beside the typology paper.** {typ['source']}, feedback on n of "
        f"{typ['pool']:,} training images; λ scaled by 60,000 / n / 256; test accuracy. Our "
        f"references give one point of that curve: {points} (vanilla {typ['vanilla']:.1%}, "
        f"clean {typ['clean']:.1%}). The closest row here is `rrr` with random images, but "
        f"our pool is {result['pool_size']} images (25 is 2.3 % of it, against 0.04 % there), "
        "our annotator sees only the top cells of the baseline's map (theirs is handed the "
        "exact mask), and our λ is not scaled with n. Compare the shape, not the numbers.",
        "",
        "## 3. Entropy vs random (paired by seed)",
        "",
        "Entropy − random audit recovery per seed, at each method's chosen configuration; "
        "`all` pools the budgets (pairs from one seed are not independent). With "
        f"{len(cfg['seeds'])} seed(s) these tests have little power: a Wilcoxon test on 3 pairs "
        "cannot go below p = 0.25, and only a large, consistent difference would show.",
        "",
        *render.table(
            ["method", "budget", "pairs", "entropy − random", "entropy better", "t-test p"]
            + ["Wilcoxon p"],
            [
                [t["method"], str(t["budget"]), str(t["pairs"])]
                + [render.fmt((t["mean_difference"], t["std"]), 2, sign=True)]
                + [f"{t['entropy_better']}/{t['pairs']}", _p(t["t_p"]), _p(t["wilcoxon_p"])]
                for t in summary["entropy_vs_random"]
            ],
        ),
        "",
        "## 4. A grid that does not line up with the decoy",
        "",
        "25 entropy-chosen images, perfect annotator, chosen λ and start. With 4-px cells the "
        "decoy is exactly one cell; with 7-px cells (a 4×4 grid) it lies inside a corner cell "
        'that also covers part of the digit\'s frame, so an "ignore" covers 49 px for a 16-px '
        "decoy, and a corner cell overlapping the digit by ≥ 10 % is kept. The 7-px corner "
        "cell still holds the whole decoy; a grid offset so that it cuts the decoy into "
        "several cells would be harsher (not run). `evidence marked`: share of the ignored "
        "pixels that lie on the digit.",
        "",
        *render.table(
            ["method", "grid", "audit recovery", "decoy shown", "decoy marked"]
            + ["evidence marked"],
            [
                [m, f"{g} px", cell(s)]
                + [cell(s, k) for k in ("decoy_shown", "decoy_marked", "evidence_marked")]
                for m in cfg["methods"]
                for g, s in ((g, chosen(m, grid=g)) for g in GRIDS)
            ],
        ),
        "",
        "## 5. Imperfect annotators",
        "",
        "After the typology paper's robustness task: the oracle's answers spoilt on purpose, "
        "seeded (`bench.common.imperfect`). *Wrong*: each shown cell it kept as evidence is "
        'marked "ignore" with probability p. *Incomplete*: each cell it marked "ignore" '
        "(the decoy's among them) is left unmarked with probability p. 25 entropy-chosen "
        f"images, 4-px cells; the {cfg['robust_top']} method(s) with the best audit recovery. "
        "The typology paper's RRR with wrong masks stayed near vanilla (Decoy-MNIST 77.0 % "
        "against 78.9 %). Our references do not say how those masks were drawn, but a figure "
        "at vanilla means the decoy went unmarked there; here a wrong answer is added to the "
        "right ones and the decoy stays marked as often as with the perfect annotator, a "
        "milder corruption.",
        "",
        *render.table(
            ["method", "perfect", *(f"{k} {r:.0%}" for k, r in spoilt)],
            [
                [name, cell(chosen(m), what)]
                + [cell(chosen(m, annotator=k, rate=r), what) for k, r in spoilt]
                for m in result["robust_methods"]
                for name, what in ((m, "recovery"), ("(decoy marked)", "decoy_marked"))
            ],
        ),
        "",
        "## 6. Test, reported once",
        "",
        "Decoy-randomized test accuracy of each method's validation-chosen configuration "
        "(25 entropy-chosen images, perfect annotator, 4-px cells), mean ± std over seeds; "
        "recovery = (acc − vanilla) / (clean − vanilla) per seed. Nothing was chosen on these "
        "figures.",
        "",
        f"- vanilla on decoy data: {render.fmt(test['vanilla'], 3)}",
        f"- trained without decoys: {render.fmt(test['clean'], 3)} (on clean test images: "
        f"{render.fmt(test['clean_on_clean_images'], 3)})",
        "",
        *render.table(
            ["method", "λ", "start", "test accuracy", "test recovery"],
            [
                [f"**{m}** (default)" if m == d else m, _lam(t["lambda"], m), t["init"]]
                + [render.fmt(t["test_accuracy"], 3), render.fmt(t["test_recovery"], 2, sign=True)]
                for m, t in ((m, test["methods"][m]) for m in cfg["methods"])
            ],
        ),
    ]
    if result.get("decoy_visibility"):
        lines += [
            "",
            "## Can the annotator see the decoy?",
            "",
            "Share of the queried images (mean over seeds) whose prediction changes when the "
            "decoy is re-drawn as a random class (`reliance`), and whose decoy cell is among "
            f"the top {cfg['query']['top_cells']} 4-px cells: DeepLIFT ranked by |mean "
            "attribution| (the default), by signed mean, and GradCAM.",
            "",
            *render.table(
                ["queries", "images", "reliance", "DeepLIFT magnitude", "DeepLIFT signed"]
                + ["GradCAM"],
                [
                    [name, f"{v['images']:.0f}", f"{v['reliance']:.0%}"]
                    + [f"{v[f'shown_{k}']:.0%}" for k in SHOWN]
                    for name, v in result["decoy_visibility"].items()
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


SHOWN = ("deeplift_magnitude", "deeplift_signed", "gradcam")  # decoy_visibility's rankings


def _p(p: float) -> str:
    return "–" if not np.isfinite(p) else f"{p:.2f}"


def plot(result: dict, path: Path) -> Path:
    plt = render.pyplot()
    cfg, summary, choices = result["settings"], result["summary"], result["choices"]
    rows = summary["settings"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base = {"grid": 4, "annotator": "perfect"}
    for m in result["efficiency_methods"]:
        i, c = cfg["methods"].index(m), choices["methods"][m]
        for s, style in (("entropy", "-"), ("random", "--")):
            pts = sorted(
                protocol.matching(
                    rows, method=m, lam=c["lambda"], init=c["init"], strategy=s, **base
                ),
                key=lambda r: r["budget"],
            )
            if pts:
                ax.errorbar(
                    [r["budget"] for r in pts],
                    [r["audit_recovery"] for r in pts],
                    yerr=[r["audit_recovery_std"] for r in pts],
                    fmt=style + "o",
                    color=colours[i % len(colours)],
                    ms=4,
                    capsize=2,
                    label=f"{m} ({s})",
                )
    typ = TYPOLOGY
    for n, acc in typ["points"].items():
        rec = (acc - typ["vanilla"]) / (typ["clean"] - typ["vanilla"])
        ax.plot([n], [rec], "k*", ms=11, label=f"typology RRR, {n} of 60,000 (random, exact masks)")
    for y, style in ((0.0, ":"), (1.0, "-.")):
        ax.axhline(y, color="grey", ls=style, lw=1)
    ax.set_xscale("log")
    ax.set_xticks(list(cfg["budgets"]), [str(b) for b in cfg["budgets"]])
    ax.set(
        xlabel="annotated images",
        ylabel="audit recovery (0 = vanilla, 1 = trained without decoys)",
        title="Interaction efficiency: entropy (solid) vs random (dashed)",
    )
    ax.legend(fontsize=7, loc="center right")
    for m in result["robust_methods"]:
        c = choices["methods"][m]
        perfect = protocol.matching(
            rows, method=m, lam=c["lambda"], init=c["init"], budget=25, strategy="entropy", **base
        )
        for k, style in zip(IMPERFECTIONS, ("-", "--")):
            pts = perfect + sorted(
                protocol.matching(
                    rows, method=m, lam=c["lambda"], init=c["init"], grid=4, annotator=k
                ),
                key=lambda r: r["rate"],
            )
            ax2.plot(
                [r["rate"] for r in pts],
                [r["audit_recovery"] for r in pts],
                style + "o",
                color=colours[cfg["methods"].index(m) % len(colours)],
                ms=4,
                label=f"{m} ({k})",
            )
    ax2.axhline(0.0, color="grey", ls=":", lw=1)
    ax2.set(
        xlabel="share of answers spoilt",
        ylabel="audit recovery",
        title="Imperfect annotators (25 entropy images)",
    )
    ax2.legend(fontsize=7)
    return render.save_figure(fig, path)


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    result["summary"] = summarise(result)
    return render.write_report(out_dir / "efficacy.json", result, markdown, plot)


# ---------------------------------------------------------------- the protocol
def benchmark(cfg: dict, log, tracker) -> dict:
    """Run the protocol of the module docstring; returns the result without its summary."""
    feedback = cfg["feedback"]
    contexts = [
        prepare_seed(s, cfg["budgets"], cfg["strategies"], cfg["baseline"], log, tracker)
        for s in cfg["seeds"]
    ]
    methods = cfg["methods"]
    rows = lambda: [r for ctx in contexts for r in ctx.rows.values()]  # noqa: E731

    log("1. λ per method, on the audit split")
    run_all(
        contexts,
        [
            Setting(m, lam)
            for m in methods
            for lam in protocol.lambda_grid(m, cfg["lambda_factors"])
        ],
        feedback,
        log,
        tracker,
    )
    lams = choose(rows(), methods, cfg["lambda_factors"])["methods"]
    log("2. start per method (scratch or warm), at its λ")
    run_all(
        contexts,
        [Setting(m, lams[m]["lambda"], i) for m in methods for i in protocol.INITS],
        feedback,
        log,
        tracker,
    )
    choices = choose(rows(), methods, cfg["lambda_factors"])
    for m, c in choices["methods"].items():
        log(f"   {m}: λ {c['lambda']:g}, {c['init']}: audit recovery {c['audit_recovery']:+.2f}")
    log(f"   default method: {choices['default']}")

    def chosen(m: str, **kw) -> Setting:
        c = choices["methods"][m]
        return Setting(m, c["lambda"], c["init"], **kw)

    ranked = sorted(methods, key=lambda m: -protocol.rank(choices["methods"][m]["audit_recovery"]))
    efficient = ranked[: cfg["efficiency_top"]]
    log(f"3. interaction efficiency: {', '.join(efficient)}")
    run_all(
        contexts,
        [
            chosen(m, strategy=s, budget=b)
            for b in cfg["budgets"]
            for s in cfg["strategies"]
            for m in efficient
        ],
        feedback,
        log,
        tracker,
    )
    log("4. the misaligned grid")
    run_all(contexts, [chosen(m, grid=g) for m in methods for g in GRIDS], feedback, log, tracker)
    robust = ranked[: cfg["robust_top"]]
    log(f"5. imperfect annotators: {', '.join(robust)}")
    run_all(
        contexts,
        [
            chosen(m, annotator=k, rate=r)
            for m in robust
            for k in IMPERFECTIONS
            for r in cfg["rates"]
        ],
        feedback,
        log,
        tracker,
    )
    log("6. the test split, once")
    test = test_split(contexts, choices, tracker)
    visibility = {}
    for ctx in contexts:
        subsets = {f"{s} {b}": ctx.queries[(s, b)] for s, b in ctx.queries}
        splits = ctx.ref.splits
        vis = decoy_visibility(
            ctx.ref.vanilla, splits, {**subsets, "all": splits.pool}, seed=ctx.seed
        )
        for name, v in vis.items():
            visibility.setdefault(name, []).append(v)
    return {
        "per_seed": [
            {"seed": ctx.seed, "reference": ctx.reference, "runs": list(ctx.rows.values())}
            for ctx in contexts
        ],
        "choices": choices,
        "efficiency_methods": efficient,
        "robust_methods": robust,
        "test": test,
        "decoy_visibility": {
            name: {k: float(np.mean([v[k] for v in vs])) for k in vs[0]}
            for name, vs in visibility.items()
        },
        "retrainings": sum(len(ctx.rows) for ctx in contexts),
        "pool_size": int(len(contexts[0].ref.splits.pool)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 methods, few settings")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--efficiency-top", type=int, default=EFFICIENCY_TOP)
    parser.add_argument("--robust-top", type=int, default=ROBUST_TOP)
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"feedback epochs (default: {FEEDBACK['epochs']})"
    )
    parser.add_argument(
        "--baseline-epochs",
        type=int,
        default=None,
        help=f"epochs of the vanilla and clean models (default {BASELINE['epochs']})",
    )
    # one thread: on 2 cores shared with other work, 2 threads ran a retraining ~10x slower
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(render.RESULTS))
    parser.add_argument("--project", default=str(PROJECT), help="where the MLflow store is")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild efficacy.md/.png from efficacy.json"
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.report_only:
        result = json.loads((out_dir / "efficacy.json").read_text())
        write_outputs(result, out_dir)
        return result
    torch.set_num_threads(args.threads)
    cfg = {
        "seeds": listed(args.seeds, int),
        "methods": listed(args.methods),
        "budgets": listed(args.budgets, int),
        "strategies": listed(args.strategies),
        "lambda_factors": list(LAMBDA_FACTORS),
        "rates": list(RATES),
        "efficiency_top": args.efficiency_top,
        "robust_top": args.robust_top,
    }
    if args.quick:
        cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in QUICK.items()})
    if 25 not in cfg["budgets"]:
        parser.error("--budgets must include 25, the budget every choice is made at")
    cfg.update(
        {
            "baseline": {
                **BASELINE,
                **({"epochs": args.baseline_epochs} if args.baseline_epochs else {}),
            },
            "feedback": {**FEEDBACK, **({"epochs": args.epochs} if args.epochs else {})},
            "query": QUERY,
            "oracle_overlap": ORACLE_OVERLAP,
            "grids": list(GRIDS),
            "default_lambda": {m: METHOD_LAMBDA[m] for m in cfg["methods"]},
            "quick": args.quick,
        }
    )
    tracker = (
        None
        if args.no_mlflow
        else Tracker(
            Path(args.project),
            f"efficacy{' quick' if args.quick else ''} {time.strftime('%Y-%m-%d %H:%M')}",
            {k: v for k, v in cfg.items() if k != "default_lambda"},
        )
    )
    start, log = time.perf_counter(), render.progress_log()
    try:
        result = {"machine": render.machine(), "settings": cfg, **benchmark(cfg, log, tracker)}
        result["seconds"] = time.perf_counter() - start
        files = write_outputs(result, out_dir)
    except BaseException:
        if tracker:
            tracker.close({}, [], status="FAILED")
        raise
    if tracker:
        tracker.close({"seconds": result["seconds"]}, files)
    log(f"wrote {', '.join(str(f) for f in files)}")
    return result


if __name__ == "__main__":
    main()
