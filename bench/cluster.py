"""One answer, many images: does an answer on a cluster's representative, carried to its members
by localising the marked concept, close more of the shortcut gap than per-image answers?

Per seed (the seed draws the data, the decoys and the initial weights, as in bench/efficacy.py):
the vanilla baseline and a model trained without decoys; the baseline's DeepLIFT maps of the
whole training pool are clustered (`cluster_explanations`), the clusters ranked by how much
saliency falls off the members' shared object (`cluster_suspicion`), and the simulated
annotator (`oracle_ignore_cells` on the top cells, as in the pipeline) answers only the
representatives of the top B clusters. Each answer's "ignore" mask is carried to the members
(`fit_concept`, `localise`); confident masks train, the others are dropped, or, in the
"review" variant, reviewed by the simulated annotator with one click each (accepted when at most
`oracle_overlap` of the mask lies on the object). Against it: B per-image answers chosen by
entropy and at random. All retrain with the default feedback method from scratch.

The mask threshold and the confidence threshold are chosen on the audit split (decoys
re-drawn at random) at the largest cluster budget; the test split is read once, at the end, for
the chosen configuration and the per-image baselines.

    python -m bench.cluster              # 3 seeds on decoy-digits (~15 min on 2 shared cores)
    python -m bench.cluster --quick      # 1 seed, one threshold pair: a smoke run
    python -m bench.cluster --lesions    # add decoy-lesions (small_cnn, 64 px; slow)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    BASELINE,
    FEEDBACK,
    ORACLE_OVERLAP,
    RESULTS,
    Annotations,
    Splits,
    accuracy,
    annotations,
    decoy_splits,
    machine,
    machine_line,
    mean_std,
    oracle_clicks,
    pool_saliency,
    query_round,
    recovery,
    retrain,
    train_plain,
    write_json,
)
from xbl.clustering import (
    Clusters,
    cluster_explanations,
    cluster_suspicion,
    fit_concept,
    label_purity,
    layer_activations,
    localise,
    mask_agreement,
)
from xbl.data import PreparedData, to_tensor
from xbl.lesions import decoy_lesions

METHOD = FEEDBACK["method"]
CLUSTER_BUDGETS = (3, 5)
MASK_THRESHOLDS = (0.5, 0.8)  # concept strength that makes a member's pixel "ignore"
CONFIDENCE = 0.5  # peak strength a member needs to train without review
REVIEWED = ((0.5, 0.8),)  # (mask threshold, confidence) with a review of the doubtful members
STRATEGIES = ("entropy", "random")


@dataclass(frozen=True)
class Setting:
    strategy: str  # cluster | entropy | random
    budget: int  # annotator answers on whole images (representatives or queried images)
    mask_threshold: float = 0.0
    confidence: float = 0.0
    review: bool = False

    @property
    def name(self) -> str:
        if self.strategy != "cluster":
            return f"{self.strategy} {self.budget}"
        review = " +review" if self.review else ""
        return f"cluster {self.budget} t={self.mask_threshold} τ={self.confidence}{review}"


@dataclass
class SeedContext:
    dataset: str
    seed: int
    splits: Splits
    base: torch.nn.Module
    clean: torch.nn.Module
    reference: dict
    answers: Annotations  # the oracle's answer on every pool image (only some are used)
    clusters: Clusters
    suspicion: np.ndarray
    acts: np.ndarray  # the pool's activations in the explained layer
    rows: dict[Setting, dict] = field(default_factory=dict)
    models: dict[Setting, torch.nn.Module] = field(default_factory=dict)


# ---------------------------------------------------------------- data
def splits_of(data: PreparedData) -> Splits:
    parts = []
    for split in ("train", "val", "test", "audit"):
        idx = data.indices(split)
        parts += [to_tensor(data.images[idx]), torch.from_numpy(data.labels[idx])]
    return Splits(data, *parts)


def dataset_splits(dataset: str, seed: int, lesions_per_class: int) -> tuple[Splits, Splits]:
    """(confounded, reference) splits; the reference is trained on to give the clean model."""
    if dataset == "decoy-digits":
        return decoy_splits(True, seed), decoy_splits(False, seed)
    make = dict(image_size=64, n_per_class=lesions_per_class, seed=seed)
    # the same lesions with marks that carry no label: the fair clean reference (docs/methods.md)
    return splits_of(decoy_lesions(**make)), splits_of(decoy_lesions(**make, correlated=False))


def prepare_seed(dataset: str, seed: int, cfg: dict, log) -> SeedContext:
    splits, clean_splits = dataset_splits(dataset, seed, cfg["lesions_per_class"])
    base, _ = train_plain(splits, seed, cfg["baseline"])
    clean, _ = train_plain(clean_splits, seed, cfg["baseline"])
    reference = {
        "vanilla": accuracy(base, splits.audit_x, splits.audit_y),
        "clean": accuracy(clean, splits.audit_x, splits.audit_y),
    }
    pool, data = splits.pool, splits.data
    attr = pool_saliency(base, data, pool)
    answers = annotations(oracle_clicks(attr, data, pool), data)
    start = time.perf_counter()
    clusters = cluster_explanations(attr, seed=seed)
    suspicion = cluster_suspicion(attr.numpy(), data.images[pool], clusters)
    log(
        f"{dataset} seed {seed}: audit vanilla {reference['vanilla']:.3f}, clean "
        f"{reference['clean']:.3f}; {clusters.k} clusters by {clusters.selection} "
        f"({time.perf_counter() - start:.1f} s), sizes {clusters.summary()['sizes']}"
    )
    acts = layer_activations(base, splits.train_x).numpy()
    return SeedContext(
        dataset, seed, splits, base, clean, reference, answers, clusters, suspicion, acts
    )


# ---------------------------------------------------------------- the cluster answers
def ranked_clusters(ctx: SeedContext) -> np.ndarray:
    return np.argsort(-ctx.suspicion, kind="stable")


def review_accepts(mask: np.ndarray, relevance: np.ndarray) -> bool:
    """The simulated reviewer's click: accept a nonempty mask that lies (almost) off the object,
    by the same overlap rule the oracle applies to cells."""
    return bool(mask.any()) and (mask & relevance).sum() / mask.sum() <= ORACLE_OVERLAP


def cluster_feedback(ctx: SeedContext, s: Setting) -> tuple[Annotations, dict]:
    """The representatives' own answers plus the masks carried to their members."""
    data, pool = ctx.splits.data, ctx.splits.pool
    h, w = data.images.shape[-2:]
    rows, W, keep = [], [], []
    quality = {"pred": [], "true": [], "confident": [], "reviews": 0, "accepted": 0, "marks": 0}
    for c in ranked_clusters(ctx)[: s.budget]:
        rep = ctx.clusters.representatives[c]
        rows.append(rep)
        W.append(ctx.answers.W[rep])
        keep.append(ctx.answers.keep[rep])
        if not ctx.answers.W[rep].any():
            continue  # "nothing to ignore": the answer is spent, nothing to carry
        quality["marks"] += 1
        members = ctx.clusters.members(c)
        members = members[members != rep]
        concept = fit_concept(ctx.acts[rep], ctx.answers.W[rep])
        carried = localise(concept, ctx.acts[members], (h, w), s.mask_threshold)
        confident = carried.confident(s.confidence)
        quality["pred"].append(carried.masks)
        quality["true"].append(data.confounder[pool[members]])
        quality["confident"].append(confident)
        for j, m in enumerate(members):
            use = confident[j]
            if not use and s.review and carried.masks[j].any():
                quality["reviews"] += 1
                use = review_accepts(carried.masks[j], data.relevance[pool[m]])
                quality["accepted"] += int(use)
            if use:
                rows.append(m)
                W.append(carried.masks[j])
                keep.append(np.zeros((h, w), dtype=bool))
    ann = Annotations(pool[np.array(rows)], np.stack(W), np.stack(keep), 0.0, 0.0, 0.0)
    return ann, mask_quality(quality)


def mask_quality(q: dict) -> dict:
    """Pixel agreement of the carried masks with the true confounder masks, for all members
    of the queried clusters and split by confidence (calibration)."""
    out = {"reviews": q["reviews"], "accepted": q["accepted"], "marked_answers": q["marks"]}
    if not q["pred"]:
        return out | {"members": 0}
    pred, true = np.concatenate(q["pred"]), np.concatenate(q["true"])
    confident = np.concatenate(q["confident"])
    out |= {"members": int(len(pred)), "confident_share": float(confident.mean())}
    out |= {f"all_{k}": v for k, v in mask_agreement(pred, true).items()}
    for name, sel in (("confident", confident), ("flagged", ~confident)):
        out |= {f"{name}_{k}": v for k, v in mask_agreement(pred[sel], true[sel]).items()}
    return out


def per_image_feedback(ctx: SeedContext, s: Setting) -> Annotations:
    chosen = np.sort(query_round(ctx.base, ctx.splits, s.budget, s.strategy, ctx.seed))
    pos = np.searchsorted(ctx.splits.pool, chosen)
    a = ctx.answers
    return Annotations(chosen, a.W[pos], a.keep[pos], 0.0, 0.0, 0.0)


# ---------------------------------------------------------------- running
def run(ctx: SeedContext, s: Setting, cfg: dict, log) -> dict:
    if s in ctx.rows:
        return ctx.rows[s]
    if s.strategy == "cluster":
        ann, quality = cluster_feedback(ctx, s)
    else:
        ann, quality = per_image_feedback(ctx, s), {}
    start = time.perf_counter()
    model, result, _ = retrain(ctx.base, ctx.splits, METHOD, ann, ctx.seed, cfg["feedback"])
    audit = accuracy(model, ctx.splits.audit_x, ctx.splits.audit_y)
    row = {
        "dataset": ctx.dataset,
        "seed": ctx.seed,
        "setting": s.name,
        **s.__dict__,
        "trained_images": int(len(ann.indices)),
        "decoy_in_W": float((ann.W & ctx.splits.data.confounder[ann.indices]).any((1, 2)).mean()),
        "audit_accuracy": audit,
        "audit_recovery": recovery(audit, ctx.reference["vanilla"], ctx.reference["clean"]),
        "diverged": result is None,
        "seconds": time.perf_counter() - start,
        **quality,
    }
    ctx.rows[s], ctx.models[s] = row, model
    log(
        f"{ctx.dataset} seed {ctx.seed} {s.name}: {row['trained_images']} images train, "
        f"audit recovery {row['audit_recovery']:+.2f}"
        + (f", mask IoU {quality.get('all_iou', float('nan')):.2f}" if quality else "")
    )
    return row


def settings_for(cfg: dict) -> list[Setting]:
    """Cluster answers at each budget, confident masks only for each mask threshold; with
    review where it can differ (a review sees the members whose nonempty mask is not confident:
    none unless the confidence threshold is above the mask threshold); per-image answers."""
    variants = [(t, c, False) for t in cfg["mask_thresholds"] for c in cfg["confidences"]]
    variants += [(t, c, True) for t, c in cfg["reviewed"]]
    out = [Setting("cluster", b, *v) for b in cfg["cluster_budgets"] for v in variants]
    budgets = sorted({*cfg["cluster_budgets"], *cfg["per_image_budgets"]})
    return out + [Setting(st, b) for st in STRATEGIES for b in budgets]


def choose(rows: list[dict], cfg: dict) -> dict:
    """Per review variant, the (mask threshold, confidence) with the best mean audit recovery
    at the largest cluster budget."""
    budget = max(cfg["cluster_budgets"])
    out = {}
    for review in (False, True):
        scores: dict[tuple, list[float]] = {}
        for r in rows:
            if r["strategy"] == "cluster" and r["budget"] == budget and r["review"] == review:
                key = (r["mask_threshold"], r["confidence"])
                scores.setdefault(key, []).append(r["audit_recovery"])
        if scores:
            t, c = max(scores, key=lambda k: np.mean(scores[k]))
            out["review" if review else "confident"] = {"mask_threshold": t, "confidence": c}
    return out


def test_once(contexts: list[SeedContext], chosen: dict, cfg: dict) -> list[dict]:
    """Test accuracy and recovery of the chosen cluster configurations and of the per-image
    answers: the only place the test split is read."""
    out = []
    for ctx in contexts:
        s = ctx.splits
        vanilla = accuracy(ctx.base, s.test_x, s.test_y)
        clean = accuracy(ctx.clean, s.test_x, s.test_y)
        for setting, model in ctx.models.items():
            if setting.strategy == "cluster":
                pick = chosen.get("review" if setting.review else "confident", {})
                if (setting.mask_threshold, setting.confidence) != tuple(pick.values()):
                    continue
            acc = accuracy(model, s.test_x, s.test_y)
            out.append(
                {
                    "dataset": ctx.dataset,
                    "seed": ctx.seed,
                    "setting": setting.name,
                    "strategy": setting.strategy + (" +review" if setting.review else ""),
                    "budget": setting.budget,
                    "vanilla": vanilla,
                    "clean": clean,
                    "test_accuracy": acc,
                    "test_recovery": recovery(acc, vanilla, clean),
                }
            )
    return out


def cluster_report(ctx: SeedContext) -> dict:
    """What the clustering found, with the truth it never saw: per cluster in rank order, its
    size, label purity, and the share of members whose decoy the oracle would mark."""
    pool, data = ctx.splits.pool, ctx.splits.data
    report = []
    for c in ranked_clusters(ctx):
        m = ctx.clusters.members(c)
        report.append(
            {
                "cluster": int(c),
                "size": int(len(m)),
                "suspicion": float(ctx.suspicion[c]),
                "label_purity": label_purity(data.labels[pool[m]]),
                "decoy_marked": float(
                    (ctx.answers.W[m] & data.confounder[pool[m]]).any((1, 2)).mean()
                ),
                "representative_marks_decoy": bool(
                    (
                        ctx.answers.W[ctx.clusters.representatives[c]]
                        & data.confounder[pool[ctx.clusters.representatives[c]]]
                    ).any()
                ),
            }
        )
    return {"seed": ctx.seed, **ctx.clusters.summary(), "ranked": report}


# ---------------------------------------------------------------- summaries and the report
QUALITY = (
    "all_precision",
    "all_recall",
    "all_iou",
    "confident_share",
    "confident_precision",
    "flagged_precision",
    "reviews",
)


def _nanmean_std(values) -> tuple[float, float]:
    a = np.array([np.nan if v is None else v for v in values], dtype=float)
    a = a[np.isfinite(a)]
    return mean_std(a) if len(a) else (float("nan"), 0.0)


def summarise(rows: list[dict], tests: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    settings = []
    for (dataset, name), group in groups.items():
        entry = {"dataset": dataset, "setting": name, "n": len(group)}
        for key in ("audit_recovery", "trained_images", "decoy_in_W", *QUALITY):
            if key in group[0]:
                entry[key] = _nanmean_std(r.get(key) for r in group)
        settings.append(entry)
    test_groups: dict[tuple, list[dict]] = {}
    for t in tests:
        test_groups.setdefault((t["dataset"], t["strategy"], t["budget"]), []).append(t)
    test = [
        {
            "dataset": d,
            "strategy": st,
            "budget": b,
            "n": len(g),
            "test_recovery": mean_std(t["test_recovery"] for t in g),
            "test_accuracy": mean_std(t["test_accuracy"] for t in g),
        }
        for (d, st, b), g in sorted(test_groups.items())
    ]
    return {"settings": settings, "test": test}


def _fmt(ms, digits: int = 2, sign: bool = False) -> str:
    mean, std = ms
    if not np.isfinite(mean):
        return "–"
    return f"{mean:{'+' if sign else ''}.{digits}f} ± {std:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        "# Cluster propagation: one answer for a whole cluster",
        "",
        f"{machine_line(result['machine'])}; {result['seconds'] / 60:.1f} min; method "
        f"`{METHOD}`, seeds {result['settings']['seeds']}. Recovery = (acc − vanilla) / "
        "(clean − vanilla) per seed; mean ± std over seeds. Choices on audit, test read once.",
        "",
        "## Test (read once): gap closed per number of answers",
        "",
        "| dataset | answers | strategy | test recovery | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for t in sorted(result["summary"]["test"], key=lambda t: (t["dataset"], t["budget"])):
        lines.append(
            f"| {t['dataset']} | {t['budget']} | {t['strategy']} | "
            f"{_fmt(t['test_recovery'], sign=True)} | {_fmt(t['test_accuracy'], 3)} |"
        )
    lines += ["", f"Chosen on audit: {result['chosen']}", ""]
    lines += [
        "## Audit: every setting, with the carried masks against the true confounder masks",
        "",
        "| dataset | setting | audit recovery | trained images | decoy in W | mask precision "
        "| recall | IoU | confident share | precision confident / flagged | reviews |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]["settings"]:
        q = {k: _fmt(s[k]) if k in s else "–" for k in QUALITY}
        lines.append(
            f"| {s['dataset']} | {s['setting']} | {_fmt(s['audit_recovery'], sign=True)} | "
            f"{_fmt(s['trained_images'], 0)} | {_fmt(s['decoy_in_W'])} | {q['all_precision']} | "
            f"{q['all_recall']} | {q['all_iou']} | {q['confident_share']} | "
            f"{q['confident_precision']} / {q['flagged_precision']} | {q['reviews']} |"
        )
    lines += ["", "## Clusters (rank order; truth the learner never saw)", ""]
    for c in result["clusters"]:
        ranked = ", ".join(
            f"{r['size']} ({r['suspicion']:.2f}; purity {r['label_purity']:.2f}; decoy marked "
            f"{r['decoy_marked']:.0%}{'' if r['representative_marks_decoy'] else '; rep: no decoy mark'})"
            for r in c["ranked"]
        )
        lines.append(
            f"- {c['dataset']} seed {c['seed']}: k = {c['k']} ({c['selection']}); {ranked}"
        )
    return "\n".join(lines) + "\n"


def benchmark(cfg: dict, log) -> dict:
    contexts, rows = [], []
    for dataset in cfg["datasets"]:
        ds_cfg = cfg if dataset == "decoy-digits" else {**cfg, **cfg["lesions"]}
        for seed in cfg["seeds"] if dataset == "decoy-digits" else cfg["lesions"]["seeds"]:
            ctx = prepare_seed(dataset, seed, ds_cfg, log)
            rows += [run(ctx, s, ds_cfg, log) for s in settings_for(ds_cfg)]
            contexts.append(ctx)
    chosen = {}
    tests = []
    for dataset in cfg["datasets"]:
        ds_cfg = cfg if dataset == "decoy-digits" else {**cfg, **cfg["lesions"]}
        chosen[dataset] = choose([r for r in rows if r["dataset"] == dataset], ds_cfg)
        ctxs = [c for c in contexts if c.dataset == dataset]
        tests += test_once(ctxs, chosen[dataset], ds_cfg)
    clusters = [{"dataset": c.dataset, **cluster_report(c)} for c in contexts]
    return {
        "rows": rows,
        "tests": tests,
        "chosen": chosen,
        "clusters": clusters,
        "summary": summarise(rows, tests),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, one threshold pair")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lesions", action="store_true", help="add decoy-lesions (slow)")
    parser.add_argument("--lesion-seeds", default="0")
    parser.add_argument("--lesions-per-class", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = {
        "datasets": ["decoy-digits"] + (["decoy-lesions"] if args.lesions else []),
        "seeds": [int(s) for s in args.seeds.split(",")],
        "cluster_budgets": list(CLUSTER_BUDGETS),
        "per_image_budgets": [],
        "mask_thresholds": list(MASK_THRESHOLDS),
        "confidences": [CONFIDENCE],
        "reviewed": [list(r) for r in REVIEWED],
        "baseline": BASELINE,
        "feedback": FEEDBACK,
        "lesions_per_class": args.lesions_per_class,
        "lesions": {
            "seeds": [int(s) for s in args.lesion_seeds.split(",")],
            "cluster_budgets": [5],
            "per_image_budgets": [],
            "mask_thresholds": [0.8],
            "confidences": [0.5],
            "reviewed": [],
        },
    }
    if args.quick:
        cfg.update(seeds=[0], cluster_budgets=[5], mask_thresholds=[0.8], reviewed=[])
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    result = {"machine": machine(), "settings": cfg, **benchmark(cfg, log)}
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out_dir)
    name = "cluster-quick" if args.quick else "cluster"
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown(result))
    log(f"wrote {out / name}.json and .md")
    return result


if __name__ == "__main__":
    main()
