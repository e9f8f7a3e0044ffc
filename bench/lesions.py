"""Shortcut removal on decoy-lesions with a ResNet-18: the efficacy protocol of
bench/efficacy.py, cut to what 2 CPU cores can run in about an hour.

Per seed (it draws the lesions, the split, every sticker and ruler, and the initial weights):
a vanilla ResNet-18 trained on the confounded images and a clean one trained where the marks
carry no label (`correlated=False`), both early-stopped on their validation loss. The simulated
annotator answers on the vanilla model's DeepLIFT maps cut into `--grid` cells per side (8 px
cells at 64 px, which no mark lines up with), marking "ignore" on the shown cells off the lesion.

1. λ of each method (its default × `--lambda-factors`), retrained from scratch, 25 entropy
   answers; 2. the start (scratch or warm) at that λ; 3. entropy against random at 25 and 100
   answers with the chosen setting; 4. the test split, read once, for each method's choice.
Every choice is made on the audit split (the validation lesions with their marks re-drawn at
random); audit recovery = (audit acc − vanilla) / (clean − vanilla).

    python -m bench.lesions [--seeds 0,1] [--methods rrr_output] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    BASELINE,
    FEEDBACK,
    METHOD_LAMBDA,
    RESULTS,
    accuracy,
    annotations,
    machine,
    machine_line,
    mean_std,
    oracle_clicks,
    pool_saliency,
    query_round,
    recovery,
    retrain,
    splits_of,
    train_plain,
    write_json,
)
from xbl.data.lesions import decoy_lesions

STUDY = ("entropy", 25)
EFFICIENCY = (("random", 25), ("entropy", 100), ("random", 100))
INITS = ("scratch", "warm")


def seed_context(seed: int, cfg: dict, log) -> dict:
    """Data, the vanilla and clean models, and the oracle's answers on the whole pool."""
    size, n, model = cfg["image_size"], cfg["n_per_class"], cfg["model"]
    splits = splits_of(decoy_lesions(size, n, seed=seed), model)
    clean_splits = splits_of(decoy_lesions(size, n, seed=seed, correlated=False), model)
    base, base_result = train_plain(splits, seed, cfg["baseline"])
    clean, _ = train_plain(clean_splits, seed, cfg["baseline"])
    reference = {
        "vanilla": accuracy(base, splits.audit_x, splits.audit_y),
        "vanilla_val": accuracy(base, splits.val_x, splits.val_y),
        "vanilla_best_epoch": base_result.best_epoch,
        "clean": accuracy(clean, splits.audit_x, splits.audit_y),
    }
    log(f"seed {seed}: audit vanilla {reference['vanilla']:.3f} clean {reference['clean']:.3f}")
    pool = splits.pool
    cell = size // cfg["grid"]
    clicks = oracle_clicks(
        pool_saliency(base, splits.data, pool), splits.data, pool, {"grid_cell": cell}
    )
    return {
        "seed": seed,
        "splits": splits,
        "base": base,
        "clean": clean,
        "reference": reference,
        "clicks": clicks,
        "cell": cell,
        "rows": {},
        "models": {},
    }


def retrained(
    ctx: dict, method: str, lam: float, init: str, strategy: str, budget: int, cfg: dict, log
) -> dict:
    """One retraining on the simulated answers, judged on the audit split (once per setting)."""
    key = (method, lam, init, strategy, budget)
    if key in ctx["rows"]:
        return ctx["rows"][key]
    splits, seed = ctx["splits"], ctx["seed"]
    chosen = np.sort(query_round(ctx["base"], splits, budget, strategy, seed))
    ann = annotations(ctx["clicks"].subset(chosen), splits.data)
    settings = {**cfg["feedback"], "lambda": lam, "init": init}
    start = time.perf_counter()
    model, result, _ = retrain(ctx["base"], splits, method, ann, seed, settings)
    audit = accuracy(model, splits.audit_x, splits.audit_y)
    ref = ctx["reference"]
    row = {
        "seed": seed,
        "method": method,
        "lam": lam,
        "init": init,
        "strategy": strategy,
        "budget": budget,
        "audit_accuracy": audit,
        "audit_recovery": recovery(audit, ref["vanilla"], ref["clean"]),
        "val_accuracy": accuracy(model, splits.val_x, splits.val_y),
        "decoy_shown": ann.decoy_shown,
        "decoy_marked": ann.decoy_marked,
        "evidence_marked": ann.evidence_marked,
        "diverged": result is None,
        "seconds": time.perf_counter() - start,
    }
    ctx["rows"][key] = row
    ctx["models"][key] = model
    log(
        f"seed {seed} {method} λ={lam:g} {init} {strategy} {budget}: audit {audit:.3f} "
        f"recovery {row['audit_recovery']:+.2f} (mark marked on {ann.decoy_marked:.0%}, "
        f"{row['seconds'] / 60:.1f} min)"
    )
    return row


def mean_recovery(contexts, key) -> tuple[float, float]:
    rows = [ctx["rows"][key] for ctx in contexts]
    if any(r["diverged"] for r in rows):
        return float("nan"), float("nan")
    return mean_std(r["audit_recovery"] for r in rows)


def _best(scores: dict) -> object:
    """The key with the highest mean score; NaN (a diverged run) never wins; ties keep the
    earlier key."""
    return max(scores, key=lambda k: scores[k][0] if np.isfinite(scores[k][0]) else -np.inf)


def choose(contexts, m: str, cfg: dict, log) -> dict:
    """λ (from scratch), then the start at that λ, by mean audit recovery at the study setting."""
    lams = [float(f"{METHOD_LAMBDA[m] * f:.6g}") for f in cfg["lambda_factors"]]
    for lam in lams:
        for ctx in contexts:
            retrained(ctx, m, lam, "scratch", *STUDY, cfg, log)
    by_lambda = {x: mean_recovery(contexts, (m, x, "scratch", *STUDY)) for x in lams}
    lam = _best(by_lambda)
    for ctx in contexts:
        retrained(ctx, m, lam, "warm", *STUDY, cfg, log)
    by_init = {i: mean_recovery(contexts, (m, lam, i, *STUDY)) for i in INITS}
    init = _best(by_init)
    log(f"{m}: chose λ {lam:g}, {init}")
    return {
        "lambda": lam,
        "init": init,
        "by_lambda": {f"{x:g}": v for x, v in by_lambda.items()},
        "by_init": by_init,
    }


def benchmark(cfg: dict, log) -> dict:
    contexts = [seed_context(s, cfg, log) for s in cfg["seeds"]]
    choices = {}
    for m in cfg["methods"]:
        choices[m] = c = choose(contexts, m, cfg, log)
        for strategy, budget in EFFICIENCY[: cfg["efficiency"]]:
            for ctx in contexts:
                retrained(ctx, m, c["lambda"], c["init"], strategy, budget, cfg, log)
    return {
        "per_seed": [
            {"seed": c["seed"], "reference": c["reference"], "runs": list(c["rows"].values())}
            for c in contexts
        ],
        "choices": choices,
        "test": test_once(contexts, choices),
    }


def test_once(contexts, choices: dict) -> dict:
    """Test accuracy of the vanilla, clean and chosen models: the only read of the test split."""
    out = []
    for ctx in contexts:
        s = ctx["splits"]
        vanilla, clean = (accuracy(ctx[k], s.test_x, s.test_y) for k in ("base", "clean"))
        entry = {"seed": ctx["seed"], "vanilla": vanilla, "clean": clean, "methods": {}}
        for m, c in choices.items():
            acc = accuracy(ctx["models"][(m, c["lambda"], c["init"], *STUDY)], s.test_x, s.test_y)
            entry["methods"][m] = {
                "test_accuracy": acc,
                "test_recovery": recovery(acc, vanilla, clean),
            }
        out.append(entry)
    return {"per_seed": out}


def _mean_std_text(values, sign: bool = False, spread: bool = True) -> str:
    """mean ± std; the mean alone for one seed, whose std of 0 would read as a measured one."""
    mean, std = values if isinstance(values, tuple) else mean_std(values)
    if not np.isfinite(mean):
        return "–"
    return f"{mean:{'+' if sign else ''}.2f}" + (f" ± {std:.2f}" if spread else "")


def markdown(result: dict) -> str:
    cfg, seeds = result["settings"], result["per_seed"]
    _ms = functools.partial(_mean_std_text, spread=len(seeds) > 1)
    rows = [r for s in seeds for r in s["runs"]]
    ref = lambda k: _ms([s["reference"][k] for s in seeds])  # noqa: E731
    lines = [
        "# Shortcut removal on decoy-lesions with a ResNet-18: chosen on validation, tested once",
        "",
        machine_line(result["machine"]),
        "",
        f"Seeds {cfg['seeds']}, {cfg['n_per_class']} images per class at {cfg['image_size']} px "
        "(train 60 %, val 20 %, test 20 %, and the audit copy of val), "
        f"{cfg['model']}; "
        f"vanilla and clean models: at most {cfg['baseline']['epochs']} epochs, early-stopped "
        f"on val loss (patience {cfg['baseline']['patience']}); feedback: "
        f"{cfg['feedback']['epochs']} epochs from the start chosen below, the term on "
        f"{cfg['feedback']['per_batch']} annotated images on every "
        f"{cfg['feedback']['every']}th batch; grid {cfg['grid']} cells per side. "
        f"Took {result['seconds'] / 60:.0f} min ({len(rows)} retrainings).",
        "",
        f"- vanilla (confounded) model: audit accuracy {ref('vanilla')} (val {ref('vanilla_val')})",
        f"- clean model (marks carry no label): audit accuracy {ref('clean')}",
        "",
        "## 1. Validation choices (25 entropy-chosen images, perfect annotator)",
        "",
        "| method | "
        + " | ".join(f"λ × {f:g}" for f in cfg["lambda_factors"])
        + " | chosen λ | scratch | warm | chosen start |",
        "|---|" + "---|" * (len(cfg["lambda_factors"]) + 4),
    ]
    for m, c in result["choices"].items():
        lam_cells = [_ms(tuple(v), True) for v in c["by_lambda"].values()]
        init_cells = [_ms(tuple(c["by_init"][i]), True) for i in INITS]
        lines.append(
            f"| {m} | "
            + " | ".join(lam_cells)
            + f" | {c['lambda']:g} | "
            + " | ".join(init_cells)
            + f" | {c['init']} |"
        )
    lines += [
        "",
        "## 2. Interaction efficiency (audit recovery at the chosen setting)",
        "",
        "In brackets: the share of the answered images whose mark the annotator marked (it can "
        "mark only what the shown top cells cover).",
        "",
        "| method | strategy | 25 | 100 |",
        "|---|---|---|---|",
    ]
    for m, c in result["choices"].items():
        for strategy in ("entropy", "random"):
            cells = []
            for budget in (25, 100):
                found = [
                    r
                    for r in rows
                    if (r["method"], r["lam"], r["init"], r["strategy"], r["budget"])
                    == (m, c["lambda"], c["init"], strategy, budget)
                ]
                marked = np.mean([r["decoy_marked"] for r in found]) if found else 0.0
                cells.append(
                    f"{_ms([r['audit_recovery'] for r in found], True)} ({marked:.0%})"
                    if found
                    else "not run"
                )
            lines.append(f"| {m} | {strategy} | " + " | ".join(cells) + " |")
    test = result["test"]["per_seed"]
    lines += [
        "",
        "## 3. The test split, once",
        "",
        f"vanilla test accuracy {_ms([t['vanilla'] for t in test])}, clean "
        f"{_ms([t['clean'] for t in test])}.",
        "",
        "| method | λ | start | test accuracy | test recovery |",
        "|---|---|---|---|---|",
    ]
    for m, c in result["choices"].items():
        acc = _ms([t["methods"][m]["test_accuracy"] for t in test])
        rec = _ms([t["methods"][m]["test_recovery"] for t in test], True)
        lines.append(f"| {m} | {c['lambda']:g} | {c['init']} | {acc} | {rec} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default="rrr_output")
    parser.add_argument("--lambda-factors", default="0.1,1,10")
    parser.add_argument("--n-per-class", type=int, default=700)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--grid", type=int, default=8, help="cells per side")
    parser.add_argument("--epochs", type=int, default=10, help="vanilla and clean models")
    # the best val-loss epoch is kept, without stopping early: a ResNet's val accuracy on
    # lesions dips for an epoch or two (0.97 -> 0.64 -> 0.97 in a 10-epoch run)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--feedback-epochs", type=int, default=10)
    parser.add_argument("--every", type=int, default=4, help="the term on every N-th batch")
    parser.add_argument(
        "--per-batch",
        type=int,
        default=FEEDBACK["per_batch"],
        help="annotated images on a batch that carries the term (params.yaml's by default)",
    )
    parser.add_argument(
        "--efficiency",
        type=int,
        default=len(EFFICIENCY),
        help="how many of the entropy/random × 25/100 runs beyond the study",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and short")
    parser.add_argument("--out", default=str(RESULTS / "lesions.json"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the .md from --out")
    args = parser.parse_args(argv)
    if args.report_only:
        result = json.loads(Path(args.out).read_text())
        Path(args.out).with_suffix(".md").write_text(markdown(result))
        return result
    torch.set_num_threads(args.threads)
    cfg = {
        "seeds": [int(s) for s in args.seeds.split(",")],
        "methods": args.methods.split(","),
        "lambda_factors": [float(f) for f in args.lambda_factors.split(",")],
        "n_per_class": args.n_per_class,
        "image_size": args.image_size,
        "model": args.model,
        "grid": args.grid,
        "efficiency": args.efficiency,
        "baseline": {**BASELINE, "epochs": args.epochs, "patience": args.patience},
        "feedback": {
            **FEEDBACK,
            "epochs": args.feedback_epochs,
            "every": args.every,
            "per_batch": args.per_batch,
        },
    }
    if args.quick:
        cfg.update(
            seeds=cfg["seeds"][:1],
            lambda_factors=[1.0],
            n_per_class=40,
            efficiency=1,
            baseline={**cfg["baseline"], "epochs": 1},
            feedback={**cfg["feedback"], "epochs": 1},
        )
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    result = {"machine": machine(), "settings": cfg, **benchmark(cfg, log)}
    result["seconds"] = time.perf_counter() - start
    out = write_json(Path(args.out), result)
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
