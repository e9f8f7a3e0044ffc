"""Does feedback remove the shortcut? Decoy-randomized test accuracy per method and budget.

Per seed: a vanilla model on decoy data (the pipeline's baseline, early-stopped on the
confounded val split), a model trained without decoys, and, for each feedback method, a
retraining with `budget` training images chosen by entropy or at random from the baseline's
predictions, answered by the simulated annotator's cell clicks (`oracle_ignore_cells` on the
top saliency cells the baseline shows). One baseline, one set of saliency maps and one set of
clicks per seed are shared by every method and budget. Recovery = (acc − vanilla) /
(clean − vanilla), per seed, then mean ± std over seeds.

    python -m bench.efficacy            # the full grid, ~15 min on 2 idle cores
    python -m bench.efficacy --quick    # 1 seed, 2 methods, 2 budgets: a smoke run

Every run is logged to the MLflow experiment `xbl-bench-efficacy` (a parent run per
invocation), in the project's store unless MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    BASELINE,
    FEEDBACK,
    METHOD_LAMBDA,
    ORACLE_OVERLAP,
    QUERY,
    RESULTS,
    Annotations,
    accuracy,
    decoy_splits,
    decoy_visibility,
    machine,
    machine_line,
    mean_std,
    query_round,
    recovery,
    retrain,
    simulated_annotations,
    train_plain,
    write_json,
)
from xbl.methods import METHODS

EXPERIMENT = "xbl-bench-efficacy"
BUDGETS = (10, 25, 50, 100, None)  # None: every training image
STRATEGIES = ("entropy", "random")
QUICK = {"seeds": (0,), "methods": ("rrr", "counterexamples"), "budgets": (25, None)}
PROJECT = Path(__file__).resolve().parent.parent
AIM = {"budget": 25, "strategy": "entropy", "recovery": 0.95}


def budget_name(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


class Tracker:
    """The benchmark's MLflow runs: one parent per invocation, one child per trained model."""

    def __init__(self, project: Path, name: str, params: dict):
        from services import tracking

        self.tracking = tracking
        self.client = tracking.client_for(project)
        self.exp_id = tracking.experiment_id(self.client, project, EXPERIMENT)
        self.parent = tracking.start_run(self.client, self.exp_id, name)
        tracking.log_params(self.client, self.parent, params)

    def child(self, name: str, params: dict, metrics: dict) -> None:
        run = self.tracking.start_run(self.client, self.exp_id, name, self.parent)
        self.tracking.log_params(self.client, run, params)
        self.tracking.log_metrics(self.client, run, metrics)
        self.client.set_terminated(run)

    def close(self, metrics: dict, files: list[Path], status: str = "FINISHED") -> None:
        self.tracking.log_metrics(self.client, self.parent, metrics)
        for path in files:
            if path.is_file():
                self.tracking.log_file(self.client, self.parent, path)
        self.client.set_terminated(self.parent, status=status)


def subset(all_ann: Annotations, pool: np.ndarray, indices: np.ndarray) -> Annotations:
    """The clicks on `indices`, taken from the clicks on the whole pool (same baseline)."""
    pos = np.searchsorted(pool, indices)
    W = all_ann.W[pos]
    return Annotations(
        indices,
        W,
        float(np.mean(all_ann.shown[pos])),
        float(np.mean(all_ann.marked[pos])),
        all_ann.shown[pos],
        all_ann.marked[pos],
    )


def run_seed(
    seed: int,
    methods,
    budgets,
    strategies,
    feedback: dict,
    query: dict,
    overlap: float,
    log,
    tracker: Tracker | None,
    baseline: dict | None = None,
) -> dict:
    """Vanilla, clean and every feedback retraining for one seed."""
    splits, clean_splits = decoy_splits(decoys=True), decoy_splits(decoys=False)
    base, base_result = train_plain(splits, seed, baseline)
    clean, _ = train_plain(clean_splits, seed, baseline)
    out = {
        "seed": seed,
        "vanilla": {
            "test_accuracy": accuracy(base, splits.test_x, splits.test_y),
            "val_randomized_accuracy": accuracy(base, splits.val_rand_x, splits.val_y),
            "val_accuracy": accuracy(base, splits.val_x, splits.val_y),
            "best_epoch": base_result.best_epoch,
        },
        "clean": {
            "test_accuracy": accuracy(clean, splits.test_x, splits.test_y),
            "clean_test_accuracy": accuracy(clean, clean_splits.test_x, clean_splits.test_y),
        },
        "runs": [],
    }
    vanilla, clean_acc = out["vanilla"]["test_accuracy"], out["clean"]["test_accuracy"]
    log(f"seed {seed}: vanilla {vanilla:.3f}, without decoys {clean_acc:.3f}")
    if tracker:
        tracker.child(f"vanilla seed {seed}", {"seed": seed, "kind": "vanilla"}, out["vanilla"])
        tracker.child(f"clean seed {seed}", {"seed": seed, "kind": "clean"}, out["clean"])
    pool = splits.pool
    all_clicks = simulated_annotations(base, splits.data, pool, query, overlap)
    chosen_sets = {
        f"{s} {budget_name(b)}": query_round(base, splits, b, s, seed)
        for s in strategies
        for b in budgets
        if b is not None
    }
    out["decoy_visibility"] = decoy_visibility(
        base, splits, {**chosen_sets, "all": pool}, query, seed
    )
    done = set()
    for strategy in strategies:
        for budget in budgets:
            chosen = pool if budget is None else chosen_sets[f"{strategy} {budget_name(budget)}"]
            kind = "all" if budget is None else strategy  # every image: no choice to make
            if (kind, budget) in done:
                continue
            done.add((kind, budget))
            ann = subset(all_clicks, pool, np.sort(chosen))
            for method in methods:
                settings = {**feedback, "lambda": METHOD_LAMBDA[method]}
                start = time.perf_counter()
                model, result, _ = retrain(base, splits, method, ann, seed, settings)
                row = {
                    "seed": seed,
                    "method": method,
                    "strategy": kind,
                    "budget": budget_name(budget),
                    "annotated": int(len(ann.indices)),
                    "test_accuracy": accuracy(model, splits.test_x, splits.test_y),
                    "val_randomized_accuracy": accuracy(model, splits.val_rand_x, splits.val_y),
                    "val_accuracy": accuracy(model, splits.val_x, splits.val_y),
                    "decoy_shown": ann.decoy_shown,
                    "decoy_marked": ann.decoy_marked,
                    "effective_lambda": result.effective_lambda,
                    "seconds": time.perf_counter() - start,
                }
                row["recovery"] = recovery(row["test_accuracy"], vanilla, clean_acc)
                out["runs"].append(row)
                log(
                    f"seed {seed} {method:15s} {kind:7s} {budget_name(budget):>4s}: "
                    f"acc {row['test_accuracy']:.3f} recovery {row['recovery']:+.2f} "
                    f"(decoy marked on {row['decoy_marked']:.0%}, {row['seconds']:.1f} s)"
                )
                if tracker:
                    tracker.child(
                        f"{method} {kind} {budget_name(budget)} seed {seed}",
                        {
                            "seed": seed,
                            "kind": "feedback",
                            "method": method,
                            "strategy": kind,
                            "budget": budget_name(budget),
                            **{f"feedback.{k}": v for k, v in settings.items()},
                        },
                        {k: v for k, v in row.items() if isinstance(v, float)},
                    )
    return out


def summarise(seeds: list[dict]) -> dict:
    """Mean ± std over seeds per (method, strategy, budget), and for vanilla and clean."""
    runs = [r for s in seeds for r in s["runs"]]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["strategy"], r["budget"]), []).append(r)
    rows = []
    for (method, strategy, budget), group in groups.items():
        acc, acc_sd = mean_std(r["test_accuracy"] for r in group)
        rec, rec_sd = mean_std(r["recovery"] for r in group)
        val, val_sd = mean_std(r["val_randomized_accuracy"] for r in group)
        rows.append(
            {
                "method": method,
                "strategy": strategy,
                "budget": budget,
                "n": len(group),
                "test_accuracy": acc,
                "test_accuracy_std": acc_sd,
                "recovery": rec,
                "recovery_std": rec_sd,
                "val_randomized_accuracy": val,
                "val_randomized_accuracy_std": val_sd,
                "decoy_marked": float(np.mean([r["decoy_marked"] for r in group])),
            }
        )
    vanilla = mean_std(s["vanilla"]["test_accuracy"] for s in seeds)
    clean = mean_std(s["clean"]["test_accuracy"] for s in seeds)
    return {
        "vanilla": {"test_accuracy": vanilla[0], "test_accuracy_std": vanilla[1]},
        "clean": {
            "test_accuracy": clean[0],
            "test_accuracy_std": clean[1],
            "clean_test_accuracy": mean_std(s["clean"]["clean_test_accuracy"] for s in seeds)[0],
        },
        "rows": rows,
    }


def aims(summary: dict, per_seed: list[dict]) -> list[dict]:
    """Per method: is ≥95 % of the gap recovered with ≤25 entropy-chosen queries (mean over
    seeds), and entropy − random accuracy per budget, paired by seed (mean ± std)."""
    rows = {(r["method"], r["strategy"], r["budget"]): r for r in summary["rows"]}
    acc = {
        (s["seed"], r["method"], r["strategy"], r["budget"]): r["test_accuracy"]
        for s in per_seed
        for r in s["runs"]
    }
    seeds = [s["seed"] for s in per_seed]
    out = []
    for method in dict.fromkeys(r["method"] for r in summary["rows"]):
        small = [
            r
            for (m, s, b), r in rows.items()
            if m == method and s == AIM["strategy"] and b != "all" and int(b) <= AIM["budget"]
        ]
        best = max(small, key=lambda r: r["recovery"], default=None)
        difference = {}
        for m, s, b in rows:
            if m == method and s == "entropy" and (method, "random", b) in rows:
                mean, std = mean_std(
                    acc[(seed, method, "entropy", b)] - acc[(seed, method, "random", b)]
                    for seed in seeds
                )
                difference[b] = {"mean": mean, "std": std}
        out.append(
            {
                "method": method,
                "best_recovery_within_aim": best["recovery"] if best else None,
                "best_budget_within_aim": best["budget"] if best else None,
                "aim_met": bool(best and best["recovery"] >= AIM["recovery"]),
                "entropy_minus_random": difference,
            }
        )
    return out


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(result: dict) -> str:
    summary, settings = result["summary"], result["settings"]
    vanilla, clean = summary["vanilla"], summary["clean"]
    rows = {(r["method"], r["strategy"], r["budget"]): r for r in summary["rows"]}
    strategies = list(settings["strategies"])
    lines = [
        "# Shortcut removal on decoy-digits",
        "",
        machine_line(result["machine"]),
        "",
        f"Seeds {settings['seeds']}; decoy-randomized test accuracy, mean ± std over seeds; "
        "recovery = (acc − vanilla) / (clean − vanilla), per seed. Feedback = the simulated "
        f"annotator's clicks on the top {settings['query']['top_cells']} "
        f"{settings['query']['saliency']} cells ({settings['query']['grid_cell']} px) of "
        "the baseline; trained "
        + (
            "from a fresh initialisation"
            if settings["feedback"].get("init") == "scratch"
            else "from the baseline's weights"
        )
        + f" with the feedback term, {settings['feedback']['epochs']} fixed epochs. Took "
        f"{result['seconds'] / 60:.1f} min.",
        "",
        f"- vanilla on decoy data: {_fmt(vanilla['test_accuracy'], vanilla['test_accuracy_std'])}",
        f"- trained without decoys: {_fmt(clean['test_accuracy'], clean['test_accuracy_std'])} "
        f"(on clean test images: {summary['clean']['clean_test_accuracy']:.3f})",
        "",
        "| method | λ | budget | "
        + " | ".join(f"{s}: accuracy | {s}: recovery | {s}: decoy marked" for s in strategies)
        + " |",
        "|---|---|---|" + "---|---|---|" * len(strategies),
    ]
    for method in settings["methods"]:
        for budget in settings["budgets"]:
            cells = []
            for s in strategies:
                r = rows.get((method, "all" if budget == "all" else s, budget))
                cells += (
                    [
                        _fmt(r["test_accuracy"], r["test_accuracy_std"]),
                        _fmt(r["recovery"], r["recovery_std"], 2),
                        f"{r['decoy_marked']:.0%}",
                    ]
                    if r
                    else ["–", "–", "–"]
                )
            lam = "–" if method == "counterexamples" else f"{settings['lambda'][method]:g}"
            lines.append(f"| {method} | {lam} | {budget} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Budget `all`: every training image annotated, so both strategies are the "
        "same run (shown in both column groups).",
        "",
        "## Aims",
        "",
        f"≥ {AIM['recovery']:.0%} of the gap recovered with ≤ {AIM['budget']} "
        f"{AIM['strategy']}-chosen queries (best mean recovery at a budget ≤ "
        f"{AIM['budget']}), and entropy − random test accuracy paired by seed, per budget "
        "(a difference within its std is noise):",
        "",
    ]
    for a in result["aims"]:
        rec = a["best_recovery_within_aim"]
        if rec is None:
            lines.append(f"- {a['method']}: no budget ≤ {AIM['budget']} was run")
            continue
        diffs = ", ".join(
            f"{b}: {d['mean']:+.3f} ± {d['std']:.3f}" for b, d in a["entropy_minus_random"].items()
        )
        lines.append(
            f"- {a['method']}: best recovery {rec:.2f} (budget "
            f"{a['best_budget_within_aim']}) → {'met' if a['aim_met'] else 'not met'}; "
            f"entropy − random: {diffs}"
        )
    lines += [
        "",
        "## Can the annotator see the decoy?",
        "",
        "Share of the queried images (mean over seeds) whose prediction changes when the "
        "decoy is re-drawn as a random class (`reliance`), and whose decoy cell is among "
        f"the top {settings['query']['top_cells']} cells shown: DeepLIFT ranked by "
        "|mean attribution| (the default now), by signed mean (before), and GradCAM.",
        "",
        "| queries | images | reliance | DeepLIFT magnitude | DeepLIFT signed | GradCAM |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in visibility_summary(result["per_seed"]).items():
        lines.append(
            f"| {name} | {v['images']:.0f} | {v['reliance']:.0%} | "
            f"{v['shown_deeplift_magnitude']:.0%} | {v['shown_deeplift_signed']:.0%} | "
            f"{v['shown_gradcam']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def visibility_summary(per_seed: list[dict]) -> dict[str, dict[str, float]]:
    names = per_seed[0]["decoy_visibility"].keys()
    return {
        n: {
            k: float(np.mean([s["decoy_visibility"][n][k] for s in per_seed]))
            for k in per_seed[0]["decoy_visibility"][n]
        }
        for n in names
    }


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, settings = result["summary"], result["settings"]
    n_pool = result["pool_size"]
    xs = {b: (n_pool if b == "all" else int(b)) for b in settings["budgets"]}
    fig, ax = plt.subplots(figsize=(10, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(settings["methods"]):
        for strategy, style in (("entropy", "-"), ("random", "--")):
            if strategy not in settings["strategies"]:
                continue
            pts = [
                r
                for b in settings["budgets"]
                for r in summary["rows"]
                if r["method"] == method
                and r["budget"] == b
                and r["strategy"] == ("all" if b == "all" else strategy)
            ]
            if not pts:
                continue
            ax.errorbar(
                [xs[r["budget"]] for r in pts],
                [r["test_accuracy"] for r in pts],
                yerr=[r["test_accuracy_std"] for r in pts],
                fmt=style + "o",
                color=colours[i % len(colours)],
                ms=4,
                capsize=2,
                label=f"{method} ({strategy})",
            )
    for key, style, label in (
        ("vanilla", ":", "vanilla on decoy data"),
        ("clean", "-.", "trained without decoys"),
    ):
        ax.axhline(summary[key]["test_accuracy"], color="grey", ls=style, lw=1, label=label)
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()), [f"{b}" if b != "all" else f"all\n({n_pool})" for b in xs])
    ax.set(
        xlabel="annotated images (budget)",
        ylabel="decoy-randomized test accuracy",
        title="Feedback from simulated cell clicks: entropy (solid) vs random (dashed)",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path) -> dict:
    """Summary, aims, Markdown and plot again from the per-seed runs in efficacy.json."""
    result = json.loads((out_dir / "efficacy.json").read_text())
    result["summary"] = summarise(result["per_seed"])
    result["aims"] = aims(result["summary"], result["per_seed"])
    write_json(out_dir / "efficacy.json", result)
    (out_dir / "efficacy.md").write_text(markdown(result))
    plot(result, out_dir / "efficacy.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 methods, 2 budgets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="10,25,50,100,all")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"feedback epochs (default: {FEEDBACK['epochs']})"
    )
    parser.add_argument(
        "--baseline-epochs",
        type=int,
        default=None,
        help=f"epochs of the vanilla and clean models (default {BASELINE['epochs']})",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--project", default=str(PROJECT), help="where the MLflow store is")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild efficacy.md/.png (and the summary) from efficacy.json",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        return write_report(Path(args.out_dir))
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    budgets = [None if b == "all" else int(b) for b in args.budgets.split(",")]
    if args.quick:
        seeds, methods = list(QUICK["seeds"]), list(QUICK["methods"])
        budgets = list(QUICK["budgets"])
    strategies = args.strategies.split(",")
    feedback = {**FEEDBACK, **({"epochs": args.epochs} if args.epochs else {})}
    baseline = {**BASELINE, **({"epochs": args.baseline_epochs} if args.baseline_epochs else {})}
    settings = {
        "seeds": seeds,
        "methods": methods,
        "budgets": [budget_name(b) for b in budgets],
        "strategies": strategies,
        "baseline": baseline,
        "query": QUERY,
        "oracle_overlap": ORACLE_OVERLAP,
        "feedback": feedback,
        "lambda": {m: METHOD_LAMBDA[m] for m in methods},
        "quick": args.quick,
    }
    out_dir = Path(args.out_dir)
    tracker = (
        None
        if args.no_mlflow
        else Tracker(
            Path(args.project),
            f"efficacy{' quick' if args.quick else ''} {time.strftime('%Y-%m-%d %H:%M')}",
            {k: v for k, v in settings.items() if k not in ("lambda",)},
        )
    )
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    try:
        per_seed = [
            run_seed(
                seed,
                methods,
                budgets,
                strategies,
                feedback,
                QUERY,
                ORACLE_OVERLAP,
                log,
                tracker,
                baseline,
            )
            for seed in seeds
        ]
    except BaseException:
        if tracker:
            tracker.close({}, [], status="FAILED")
        raise
    summary = summarise(per_seed)
    result = {
        "machine": machine(),
        "settings": settings,
        "seconds": time.perf_counter() - start,
        "pool_size": int(len(decoy_splits().pool)),
        "summary": summary,
        "aims": aims(summary, per_seed),
        "per_seed": per_seed,
    }
    json_path = write_json(out_dir / "efficacy.json", result)
    md_path = out_dir / "efficacy.md"
    md_path.write_text(markdown(result))
    png_path = plot(result, out_dir / "efficacy.png")
    if tracker:
        tracker.close({"seconds": result["seconds"]}, [json_path, md_path, png_path])
    log(f"wrote {json_path}, {md_path}, {png_path}")
    return result


if __name__ == "__main__":
    main()
