"""Does the judge decide the same without the audit split? (issue "A judge for every dataset")

Per dataset and data seed: the vanilla model (the shortcut), the simulated annotator's answers on
25 entropy queries, and candidates retrained from them with every method at its λ and at λ/100,
plus vanilla retrained from other seeds (no fix at all). Each candidate is judged against two
champions (the vanilla model, and the default method's candidate) twice, by the pipeline's gate
(`compare_paired` + `promotion_decision`):
- on the true audit split (the reference decision);
- on the counterfactual audit the pipeline builds when the audit split is hidden: the answers'
  "ignore" regions localised in the val images by the vanilla model and filled from the surround.
Agreement is the share of identical decisions.

Then 10 rounds with no new information: the same answers retrain the default method with a new
seed each round, judged on the counterfactual audit against the current champion; the champion
changes at most once if chance cannot promote.

Usage: python -m bench.judge [--seeds 0,1] [--datasets decoy-digits,decoy-lesions]
Writes bench/results/judge.json and judge.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import (
    CONFIG,
    METHOD_LAMBDA,
    choose_queries,
    listed,
    retrain,
    simulated_annotations,
    splits_of,
    train_plain,
)
from bench.render import RESULTS, machine, machine_line, progress_log, table, write_report
from xbl.data.digits import decoy_digits
from xbl.data.lesions import decoy_lesions
from xbl.judge.evidence import correct_on, counterfactual_audit, true_audit
from xbl.judge.paired import compare_paired
from xbl.judge.promotion import level_for, promotion_decision

METHODS = ("rrr", "rrr_output", "rrr_g", "counterexamples", "hint")
LAMBDA_SCALES = (1.0, 0.01)  # the method's λ, and one too weak to fix much
NO_FIX_SEEDS = (100, 200)  # vanilla again from another initialisation
DATASETS = {
    # lesions with the small CNN at 64 px: a ResNet-18 takes minutes per model on 2 CPU cores
    "decoy-digits": (lambda seed: decoy_digits(seed=seed), 4),
    "decoy-lesions": (lambda seed: decoy_lesions(64, 200, seed=seed), 8),
}


def gate(champion, candidate, evidence, earlier: int = 0) -> dict:
    """The pipeline's decision; `earlier`: the comparisons already made on these images."""
    comparison = compare_paired(correct_on(champion, evidence), correct_on(candidate, evidence))
    decision = promotion_decision(comparison, evidence.kind, {}, {}, CONFIG.promotion, earlier)
    return {
        "promoted": decision.promoted,
        "difference": comparison.difference,
        "p_value": comparison.p_value,
    }


def candidates(vanilla, splits, ann, seed: int, log) -> dict:
    out = {}
    for method in METHODS:
        for scale in LAMBDA_SCALES:
            lam = METHOD_LAMBDA[method] * scale
            out[f"{method} λ={lam:g}"] = retrain(
                vanilla, splits, method, ann, seed, {"lambda": lam}
            )[0]
            log(f"  trained {method} λ={lam:g}")
    for other in NO_FIX_SEEDS:
        out[f"vanilla seed {seed + other}"] = train_plain(splits, seed + other)[0]
    return out


def seed_study(name: str, seed: int, log) -> dict:
    build, cell = DATASETS[name]
    splits = splits_of(build(seed))
    data = splits.data
    vanilla = train_plain(splits, seed)[0]
    queries = np.sort(choose_queries(vanilla, splits, CONFIG.query.k, "entropy", seed))
    ann = simulated_annotations(vanilla, data, queries, {"grid_cell": cell})
    truth = true_audit(data)
    cf = counterfactual_audit(
        vanilla,
        data,
        ann.indices,
        ann.W,
        cell,
        CONFIG.query.review_confidence,
    )
    log(f"{name} seed {seed}: counterfactual audit {cf.describe() if cf else 'none'}")
    models = candidates(vanilla, splits, ann, seed, log)
    default = models[f"{CONFIG.feedback.method} λ={METHOD_LAMBDA[CONFIG.feedback.method]:g}"]
    rows = []
    for champion_name, champion in (("vanilla", vanilla), ("default method", default)):
        for cand_name, cand in models.items():
            if cand is champion:
                continue
            t = gate(champion, cand, truth)
            c = gate(champion, cand, cf) if cf else {"promoted": False, "difference": None}
            rows.append(
                {
                    "dataset": name,
                    "seed": seed,
                    "champion": champion_name,
                    "candidate": cand_name,
                    "true": t,
                    "counterfactual": c,
                    "agree": t["promoted"] == c["promoted"],
                }
            )
    chance = no_new_information(splits, vanilla, ann, cf, seed, log) if cf else None
    return {
        "dataset": name,
        "seed": seed,
        "coverage": [cf.covered, cf.of] if cf else None,
        "marked": float(ann.decoy_marked),
        "rows": rows,
        "chance": chance,
    }


def no_new_information(splits, vanilla, ann, cf, seed: int, log, rounds: int = 10) -> dict:
    """The default method on the same answers, a new seed each round, judged against the
    champion of the moment: how often does the champion change?"""
    method = CONFIG.feedback.method
    champion, changes, p_values = vanilla, [], []
    for r in range(rounds):
        candidate = retrain(vanilla, splits, method, ann, seed + 1000 + r)[0]
        judged = gate(champion, candidate, cf, earlier=r)
        promoted = judged["promoted"]
        changes.append(promoted)
        p_values.append(judged["p_value"])
        if promoted:
            champion = candidate
    log(f"  10 rounds, same answers: champion changed {sum(changes)} times {changes}")
    # the first change replaces the shortcut model (information); later ones are chance
    return {
        "promotions": changes,
        "p_values": p_values,
        "changes_after_first": max(sum(changes) - 1, 0),
    }


def page(result: dict) -> str:
    rows = [r for s in result["per_seed"] for r in s["rows"]]
    agree = sum(r["agree"] for r in rows)
    lines = [
        "# The judge without an audit split (bench/judge.py)",
        "",
        machine_line(result["machine"]),
        "",
        f"Decisions that agree with the true-audit gate: **{agree} of {len(rows)}** "
        f"({agree / len(rows):.0%}); each a first comparison on its images, at level "
        f"{level_for(CONFIG.promotion.level, 1):.3g} (budget {CONFIG.promotion.level}).",
        "",
    ]
    for s in result["per_seed"]:
        cov = s["coverage"]
        chance = s["chance"]
        lines.append(
            f"- {s['dataset']} seed {s['seed']}: counterfactual audit on "
            f"{cov[0] if cov else 0} of {cov[1] if cov else '–'} val images; the answers marked "
            f"the decoy on {s['marked']:.0%} of the queries; 10 rounds with no new information: "
            f"{chance['promotions'] if chance else '–'}"
            + (f", p-values {[float(f'{p:.2g}') for p in chance['p_values']]}" if chance else "")
        )
    lines += [
        "",
        *table(
            [
                "dataset",
                "seed",
                "champion",
                "candidate",
                "true audit Δ (p)",
                "promoted",
                "counterfactual Δ (p)",
                "promoted",
                "agree",
            ],
            [
                [
                    r["dataset"],
                    str(r["seed"]),
                    r["champion"],
                    r["candidate"],
                    f"{r['true']['difference']:+.3f} ({r['true']['p_value']:.2g})",
                    str(r["true"]["promoted"]),
                    "–"
                    if r["counterfactual"]["difference"] is None
                    else f"{r['counterfactual']['difference']:+.3f} ({r['counterfactual']['p_value']:.2g})",
                    str(r["counterfactual"]["promoted"]),
                    "yes" if r["agree"] else "**no**",
                ]
                for r in rows
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--out", default=str(RESULTS / "judge.json"))
    args = parser.parse_args(argv)
    log = progress_log()
    per_seed = [
        seed_study(name, seed, log)
        for name in listed(args.datasets)
        for seed in listed(args.seeds, int)
    ]
    result = {"machine": machine(), "per_seed": per_seed}
    write_report(Path(args.out), result, page)
    return result


if __name__ == "__main__":
    main()
