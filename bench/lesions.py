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
import time
from pathlib import Path

import numpy as np
import torch

from bench import protocol, render
from bench.common import (
    BASELINE,
    FEEDBACK,
    accuracy,
    annotations,
    choose_queries,
    listed,
    oracle_clicks,
    pool_saliency,
    splits_of,
)
from xbl.data.lesions import decoy_lesions

STUDY = ("entropy", 25)
EFFICIENCY = (("random", 25), ("entropy", 100), ("random", 100))


def seed_context(seed: int, cfg: dict, log) -> dict:
    """Data, the vanilla and clean models, and the oracle's answers on the whole pool."""
    size, n, model = cfg["image_size"], cfg["n_per_class"], cfg["model"]
    ref = protocol.references(
        splits_of(decoy_lesions(size, n, seed=seed), model),
        splits_of(decoy_lesions(size, n, seed=seed, correlated=False), model),
        seed,
        cfg["baseline"],
    )
    splits = ref.splits
    reference = {
        "vanilla": ref.vanilla_audit,
        "vanilla_val": accuracy(ref.vanilla, splits.val_x, splits.val_y),
        "vanilla_best_epoch": ref.vanilla_result.best_epoch,
        "clean": ref.clean_audit,
    }
    log(f"seed {seed}: audit vanilla {reference['vanilla']:.3f} clean {reference['clean']:.3f}")
    pool = splits.pool
    cell = size // cfg["grid"]
    clicks = oracle_clicks(
        pool_saliency(ref.vanilla, splits.data, pool), splits.data, pool, {"grid_cell": cell}
    )
    return {
        "seed": seed,
        "ref": ref,
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
    ref, seed = ctx["ref"], ctx["seed"]
    splits = ref.splits
    chosen = np.sort(choose_queries(ref.vanilla, splits, budget, strategy, seed))
    ann = annotations(ctx["clicks"].subset(chosen), splits.data)
    settings = {**cfg["feedback"], "lambda": lam, "init": init}
    start = time.perf_counter()
    model, _, judged = protocol.audited_retraining(ref, method, ann, seed, settings)
    row = {
        "seed": seed,
        "method": method,
        "lam": lam,
        "init": init,
        "strategy": strategy,
        "budget": budget,
        **judged,
        "seconds": time.perf_counter() - start,
    }
    ctx["rows"][key] = row
    ctx["models"][key] = model
    log(
        f"seed {seed} {method} λ={lam:g} {init} {strategy} {budget}: "
        f"audit {row['audit_accuracy']:.3f} "
        f"recovery {row['audit_recovery']:+.2f} (mark marked on {ann.decoy_marked:.0%}, "
        f"{row['seconds'] / 60:.1f} min)"
    )
    return row


def choose(contexts, m: str, cfg: dict, log) -> dict:
    """λ (from scratch), then the start at that λ, by mean audit recovery at the study setting;
    every seed runs a candidate before the mean decides."""

    def score(lam: float, init: str) -> tuple[float, float]:
        rows = [retrained(ctx, m, lam, init, *STUDY, cfg, log) for ctx in contexts]
        return protocol.seed_mean(rows)

    c = protocol.choose_lambda_and_start(score, protocol.lambda_grid(m, cfg["lambda_factors"]))
    log(f"{m}: chose λ {c['lambda']:g}, {c['init']}")
    return c | {"by_lambda": {f"{x:g}": v for x, v in c["by_lambda"].items()}}


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
        "test": test_split(contexts, choices),
    }


def test_split(contexts, choices: dict) -> dict:
    """Test accuracy of the vanilla, clean and chosen models (`test_once`), per seed."""
    out = []
    for ctx in contexts:
        models = {m: ctx["models"][(m, c["lambda"], c["init"], *STUDY)] for m, c in choices.items()}
        test = protocol.test_once(ctx["ref"], models)
        out.append(
            {
                "seed": ctx["seed"],
                "vanilla": test["vanilla"],
                "clean": test["clean"],
                "methods": test["models"],
            }
        )
    return {"per_seed": out}


def markdown(result: dict) -> str:
    cfg, seeds = result["settings"], result["per_seed"]
    spread = len(seeds) > 1  # one seed: the mean alone, its std of 0 would read as measured

    def over_seeds(values, sign: bool = False) -> str:
        return render.fmt(protocol.mean_std(values), sign=sign, spread=spread)

    def pair(ms, sign: bool = True) -> str:
        return render.fmt(tuple(ms), sign=sign, spread=spread)

    rows = [r for s in seeds for r in s["runs"]]
    ref = lambda k: over_seeds([s["reference"][k] for s in seeds])  # noqa: E731
    lines = [
        "# Shortcut removal on decoy-lesions with a ResNet-18: chosen on validation, tested once",
        "",
        render.machine_line(result["machine"]),
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
        *render.table(
            ["method", *(f"λ × {f:g}" for f in cfg["lambda_factors"]), "chosen λ", *protocol.INITS]
            + ["chosen start"],
            [
                [m, *(pair(v) for v in c["by_lambda"].values()), f"{c['lambda']:g}"]
                + [pair(c["by_init"][i]) for i in protocol.INITS]
                + [c["init"]]
                for m, c in result["choices"].items()
            ],
        ),
        "",
        "## 2. Interaction efficiency (audit recovery at the chosen setting)",
        "",
        "In brackets: the share of the answered images whose mark the annotator marked (it can "
        "mark only what the shown top cells cover).",
        "",
        *render.table(
            ["method", "strategy", "25", "100"],
            [
                [
                    m,
                    strategy,
                    *(efficiency_cell(rows, m, c, strategy, b, over_seeds) for b in (25, 100)),
                ]
                for m, c in result["choices"].items()
                for strategy in ("entropy", "random")
            ],
        ),
    ]
    test = result["test"]["per_seed"]
    lines += [
        "",
        "## 3. The test split, once",
        "",
        f"vanilla test accuracy {over_seeds([t['vanilla'] for t in test])}, clean "
        f"{over_seeds([t['clean'] for t in test])}.",
        "",
        *render.table(
            ["method", "λ", "start", "test accuracy", "test recovery"],
            [
                [m, f"{c['lambda']:g}", c["init"]]
                + [over_seeds([t["methods"][m]["test_accuracy"] for t in test])]
                + [over_seeds([t["methods"][m]["test_recovery"] for t in test], True)]
                for m, c in result["choices"].items()
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def efficiency_cell(rows: list[dict], m: str, c: dict, strategy: str, budget: int, over_seeds):
    """Audit recovery at the chosen setting, and the share of answers that marked the mark."""
    found = protocol.matching(
        rows, method=m, lam=c["lambda"], init=c["init"], strategy=strategy, budget=budget
    )
    if not found:
        return "not run"
    marked = np.mean([r["decoy_marked"] for r in found])
    return f"{over_seeds([r['audit_recovery'] for r in found], True)} ({marked:.0%})"


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
    parser.add_argument("--out", default=str(render.RESULTS / "lesions.json"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the .md from --out")
    args = parser.parse_args(argv)
    if args.report_only:
        return render.rewrite_page(Path(args.out), markdown)
    torch.set_num_threads(args.threads)
    cfg = {
        "seeds": listed(args.seeds, int),
        "methods": listed(args.methods),
        "lambda_factors": listed(args.lambda_factors, float),
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
    start, log = time.perf_counter(), render.progress_log()
    result = {"machine": render.machine(), "settings": cfg, **benchmark(cfg, log)}
    result["seconds"] = time.perf_counter() - start
    out, page = render.write_report(Path(args.out), result, markdown)
    log(f"wrote {out} and {page}")
    return result


if __name__ == "__main__":
    main()
