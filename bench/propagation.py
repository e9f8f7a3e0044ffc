"""One answer, many images: how much of the shortcut gap do B annotator tasks close when each
answer on a cluster's representative is carried to other images by localising its concept,
against B per-image answers chosen by entropy or at random?

Per dataset and seed (the seed draws the data, the confounders and the initial weights): a
vanilla model on the confounded data and a clean reference (decoy-digits without decoys;
decoy-lesions with marks that carry no label), both early-stopped on their validation loss.
The vanilla model's DeepLIFT maps of the training pool are clustered (`cluster_explanations`),
clusters ranked by `cluster_suspicion`. The simulated annotator (`oracle_clicks`: the top cells
of the map, "ignore" on the cells off the object) answers one image per task:

- cluster: the next task is the most central unasked member of the cluster asked least so
  far, the most suspicious first, skipping clusters that earlier answers already cover (half
  their members with a carried mask that trains); the answer's "ignore" cells become a
  concept in the explained layer (`fit_concept`) and a mask in each image of the cluster
  (reach `members`) or of the whole pool (`pool`),
  localised either pixel-wise (`localise`, as the cluster benchmark this file replaced did) or
  on the annotation grid
  with the answer's extent (`localise_cells`, one concept per group of touching marked
  cells). Masks at or above the confidence τ train. With `+review` each carried concept is
  shown as a montage of its MONTAGE most confident masks and kept or dropped with one click
  (kept when at least half lie off the object, by the oracle's overlap rule); if kept, its
  doubtful nonempty masks are reviewed one click each, most confident first, REVIEW_CAP at
  most;
- entropy / random: B per-image answers, as in bench/efficacy.py.

Annotator tasks = answered images (the x axis); review clicks are counted separately. An
imperfect annotator (`imperfect`: evidence cells marked "ignore", or ignore marks left out, at
RATE) answers the tasks and, in review, errs the same way at the same rate (accepts a mask on
the object, or rejects a good one). Everything retrains from scratch with the pipeline's
default feedback method.

Choices on the audit split only (validation images with the confounder re-drawn at random):
the propagation (localisation, reach, τ) with the best mean audit recovery at the dataset's
goal budget (5 tasks on decoy-digits, 10 on decoy-lesions) with the perfect annotator. The test
split is read once, at the end, for the chosen propagation and the per-image strategies.

    python -m bench.propagation              # decoy-digits, 3 seeds (~25 min, 1 core)
    python -m bench.propagation --datasets decoy-lesions --tasks 1,5,10 --candidates 0,4 \
        --imperfect wrong --imperfect-strategies random    # decoy-lesions, 2 seeds, cut to fit
    python -m bench.propagation --report-only  # join the parts present (each run writes its
                                               # own: run the two side by side on 2 cores)
    python -m bench.propagation --quick --out-dir /tmp/p   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bench import protocol, render
from bench.common import (
    BASELINE,
    FEEDBACK,
    ORACLE_OVERLAP,
    Annotations,
    Clicks,
    Splits,
    annotations,
    choose_queries,
    decoy_splits,
    imperfect,
    listed,
    oracle_clicks,
    pool_saliency,
    retrain,
    splits_of,
)
from xbl.data.lesions import decoy_lesions
from xbl.labelstudio.oracle import imperfect_verdict, oracle_accepts
from xbl.query.clustering import (
    Clusters,
    Propagated,
    cluster_explanations,
    cluster_suspicion,
    explanation_features,
    fit_concept,
    label_purity,
    layer_activations,
    localise,
    localise_cells,
    marked_cells,
    mask_agreement,
)

METHOD = FEEDBACK["method"]
DATASETS = ("decoy-digits", "decoy-lesions")
GOAL = {"decoy-digits": (5, 0.95), "decoy-lesions": (10, 0.90)}  # (tasks, share of the gap)
TASKS = (1, 3, 5, 10)
STRATEGIES = ("entropy", "random")
IMPERFECT = (("wrong", 0.3), ("incomplete", 0.3))
MONTAGE = 8  # carried masks shown with a concept, judged with one click
REVIEW_CAP = 20  # further review clicks per carried concept, one per doubtful mask
COVERED = 0.5  # a cluster counts as answered once this share of its members has a mask


@dataclass(frozen=True)
class Propagation:
    """How an answer is carried: localisation (`pixel` or `cells`), reach (`members` of the
    answered cluster or the whole `pool`), the strength a pixel or cell needs (`threshold`) and
    the confidence a mask needs to train without review (τ)."""

    localisation: str
    reach: str
    threshold: float
    confidence: float

    @property
    def name(self) -> str:
        return f"{self.localisation}/{self.reach} t={self.threshold:g} τ={self.confidence:g}"


CANDIDATES = (
    Propagation("pixel", "members", 0.8, 0.5),  # the cluster benchmark's choice (2026-12-03)
    Propagation("cells", "members", 0.5, 0.5),
    Propagation("cells", "members", 0.5, 1.0),
    Propagation("cells", "pool", 0.5, 0.5),
    Propagation("cells", "pool", 0.5, 1.0),
)


@dataclass(frozen=True)
class Setting:
    strategy: str  # cluster | entropy | random
    tasks: int
    annotator: str = "perfect"  # perfect | wrong | incomplete
    rate: float = 0.0
    propagation: Propagation | None = None
    review: bool = False

    @property
    def label(self) -> str:
        """The strategy as tables and the plot name it."""
        return self.strategy + (" +review" if self.review else "")

    @property
    def name(self) -> str:
        who = "" if self.annotator == "perfect" else f" {self.annotator} {self.rate:.0%}"
        how = f" [{self.propagation.name}]" if self.propagation else ""
        return f"{self.label} {self.tasks}{who}{how}"


@dataclass
class SeedContext:
    dataset: str
    seed: int
    ref: protocol.Reference  # the splits and the vanilla and clean models
    cell: int  # annotation grid cell in pixels
    clicks: Clicks  # the perfect oracle's answers on every pool image (only some are used)
    clusters: Clusters
    suspicion: np.ndarray
    centrality: np.ndarray  # (n,) distance of each pool image's explanation to its cluster mean
    acts: np.ndarray  # the pool's activations in the explained layer
    answers: dict[tuple[str, float], Annotations] = field(default_factory=dict)
    rows: dict[Setting, dict] = field(default_factory=dict)
    models: dict[Setting, torch.nn.Module] = field(default_factory=dict)
    trained: dict[str, tuple] = field(
        default_factory=dict
    )  # annotations' hash -> (model, diverged)

    @property
    def splits(self) -> Splits:
        return self.ref.splits

    @property
    def reference(self) -> dict:
        """Audit accuracy of the vanilla and clean models."""
        return {"vanilla": self.ref.vanilla_audit, "clean": self.ref.clean_audit}


# ---------------------------------------------------------------- data and the vanilla model
def dataset_splits(dataset: str, seed: int, cfg: dict) -> tuple[Splits, Splits, int]:
    """(confounded, clean reference, annotation grid cell in pixels)."""
    if dataset == "decoy-digits":
        return decoy_splits(True, seed), decoy_splits(False, seed), int(cfg["digits_cell"])
    size, n = cfg["lesion_size"], cfg["lesions_per_class"]
    confounded = decoy_lesions(size, n, seed=seed)
    # the same lesions with marks that carry no label: the fair clean reference
    reference = decoy_lesions(size, n, seed=seed, correlated=False)
    return splits_of(confounded), splits_of(reference), size // cfg["lesion_grid"]


def prepare_seed(dataset: str, seed: int, cfg: dict, log) -> SeedContext:
    splits, clean_splits, cell = dataset_splits(dataset, seed, cfg)
    ref = protocol.references(splits, clean_splits, seed, cfg["baseline"])
    base = ref.vanilla
    pool, data = splits.pool, splits.data
    attr = pool_saliency(base, data, pool)
    clicks = oracle_clicks(attr, data, pool, {"grid_cell": cell})
    clusters = cluster_explanations(attr, seed=seed)
    suspicion = cluster_suspicion(attr.numpy(), data.images[pool], clusters)
    features = explanation_features(attr)
    centre = np.stack([features[clusters.members(c)].mean(0) for c in range(clusters.k)])
    centrality = ((features - centre[clusters.labels]) ** 2).sum(1)
    log(
        f"{dataset} seed {seed}: {len(pool)} pool images, audit vanilla "
        f"{ref.vanilla_audit:.3f}, clean {ref.clean_audit:.3f}; {clusters.k} clusters "
        f"by {clusters.selection}, sizes {clusters.summary()['sizes']}"
    )
    acts = layer_activations(base, splits.train_x).numpy()
    return SeedContext(
        dataset, seed, ref, cell, clicks, clusters, suspicion, centrality, acts,
    )  # fmt: skip


def answers_of(ctx: SeedContext, annotator: str, rate: float) -> Annotations:
    """The annotator's answers on every pool image (positions = pool order)."""
    key = (annotator, rate)
    if key not in ctx.answers:
        clicks = ctx.clicks
        if annotator != "perfect":
            clicks = imperfect(clicks, annotator, rate, ctx.seed)
        ctx.answers[key] = annotations(clicks, ctx.splits.data)
    return ctx.answers[key]


# ---------------------------------------------------------------- cluster tasks
def review_click(mask: np.ndarray, relevance: np.ndarray, s: Setting, rng) -> bool:
    """The simulated reviewer: accept a mask that lies (almost) off the object, by the oracle's
    overlap rule; an imperfect one errs in its own direction at its rate."""
    good = oracle_accepts(mask, relevance, ORACLE_OVERLAP)
    return good if s.annotator == "perfect" else imperfect_verdict(good, s.annotator, s.rate, rng)


def answer_parts(W: np.ndarray, cell: int) -> list[np.ndarray]:
    """The answer's marked cells split into groups that touch (8-connected on the grid): a
    decoy and a stroke marked by mistake become two concepts, each carried and judged alone."""
    grid = W[::cell, ::cell]
    labels, n = ndimage.label(grid, structure=np.ones((3, 3)))
    up = labels.repeat(cell, axis=0).repeat(cell, axis=1)[: W.shape[0], : W.shape[1]]
    return [W & (up == k) for k in range(1, n + 1)]


def review(prop: Propagated, found, confident, images, s: Setting, q: dict, rng) -> np.ndarray:
    """The review of one carried concept: a montage of its MONTAGE most confident masks, one
    click keeping or dropping the concept (kept when at least half the shown masks lie off the
    object); if kept, one click for each doubtful mask, most confident first, REVIEW_CAP at
    most. Returns which masks may train."""
    relevance = q["relevance"]
    order = np.flatnonzero(found)[np.argsort(-prop.confidence[found], kind="stable")]
    shown = order[:MONTAGE]
    q["reviews"] += 1
    votes = [review_click(prop.masks[j], relevance[images[j]], s, rng) for j in shown]
    if not votes or np.mean(votes) < 0.5:
        q["dropped_concepts"] += 1
        return np.zeros(len(found), dtype=bool)
    keep = confident.copy()
    for j in [j for j in order if not confident[j]][:REVIEW_CAP]:
        q["reviews"] += 1
        keep[j] = review_click(prop.masks[j], relevance[images[j]], s, rng)
        q["accepted"] += int(keep[j])
    return keep


def carry(ctx: SeedContext, p: Propagation, rep: int, W: np.ndarray, targets: np.ndarray):
    """The answer W on pool position `rep` localised in the pool positions `targets`."""
    concept = fit_concept(ctx.acts[rep], W)
    size = ctx.splits.data.images.shape[-2:]
    if p.localisation == "pixel":
        return localise(concept, ctx.acts[targets], size, p.threshold)
    cells = marked_cells(W, ctx.cell)
    return localise_cells(concept, ctx.acts[targets], size, ctx.cell, cells, p.threshold)


def next_task(ctx: SeedContext, asked: set[int], trained: set[int]) -> int | None:
    """The most central unasked member of the cluster asked least often so far, the most
    suspicious first, skipping clusters that earlier answers already cover (COVERED of their
    members asked or with a mask that trains) while any other is left."""
    candidates = []
    for rank, c in enumerate(np.argsort(-ctx.suspicion, kind="stable")):
        members = ctx.clusters.members(c)
        unasked = [m for m in members[np.argsort(ctx.centrality[members], kind="stable")]]
        unasked = [int(m) for m in unasked if m not in asked]
        if unasked:
            covered = np.mean([m in trained or m in asked for m in members]) >= COVERED
            times = sum(int(m) in asked for m in members)
            candidates.append(((covered, times, rank), unasked[0]))
    return min(candidates)[1] if candidates else None


def cluster_feedback(ctx: SeedContext, s: Setting) -> tuple[Annotations, dict]:
    """B answers on cluster members, each carried by `s.propagation`; what trains, and the
    carried masks' agreement with the true confounder masks."""
    data, pool, p = ctx.splits.data, ctx.splits.pool, s.propagation
    h, w = data.images.shape[-2:]
    answers = answers_of(ctx, s.annotator, s.rate)
    rng = np.random.default_rng([ctx.seed, 7])
    asked: list[int] = []
    carried: dict[int, np.ndarray] = {}  # pool position -> union of the masks that train
    q = {"pred": [], "true": [], "relevance": data.relevance, "marked_answers": 0}
    q |= {"reviews": 0, "accepted": 0, "dropped_concepts": 0}
    for _ in range(s.tasks):
        rep = next_task(ctx, set(asked), set(carried))
        if rep is None:
            break
        asked.append(rep)
        carried.pop(rep, None)  # its own answer replaces anything carried to it
        W = answers.W[rep]
        if not W.any():
            continue  # "nothing to ignore": the task is spent, nothing to carry
        q["marked_answers"] += 1
        targets = ctx.clusters.members(ctx.clusters.labels[rep])
        targets = targets if p.reach == "members" else np.arange(len(pool))
        targets = np.array([t for t in targets if t not in asked], dtype=np.int64)
        for part in answer_parts(W, ctx.cell) if p.localisation == "cells" else [W]:
            try:
                prop: Propagated = carry(ctx, p, rep, part, targets)
            except ValueError:
                continue  # the mark covers the whole image or nothing differs: no concept
            found = prop.masks.any(axis=(1, 2))
            q["pred"].append(prop.masks[found])
            q["true"].append(data.confounder[pool[targets[found]]])
            use = prop.confident(p.confidence)
            if s.review:
                use &= review(prop, found, use, pool[targets], s, q, rng)
            for j in np.flatnonzero(use):
                t = int(targets[j])
                carried[t] = carried.get(t, np.zeros((h, w), dtype=bool)) | prop.masks[j]
    rows = asked + sorted(carried)
    W = np.stack([answers.W[r] for r in asked] + [carried[t] for t in sorted(carried)])
    keep = np.stack([answers.keep[r] for r in asked] + [np.zeros((h, w), bool)] * len(carried))
    order = np.argsort(pool[rows])
    ann = Annotations(pool[rows][order], W[order], keep[order], 0.0, 0.0, 0.0)
    trained = np.stack([carried[t] for t in sorted(carried)]) if carried else None
    return ann, mask_quality(q, trained, data.confounder[pool[sorted(carried)]], len(carried))


def mask_quality(q: dict, trained: np.ndarray | None, truth: np.ndarray, n: int) -> dict:
    """Pixel precision, recall and IoU with the true confounder masks: of every nonempty mask
    localised (`localised_*`, before the confidence cut), and of the masks that train
    (`carried_*`, after the cut and the review, one union per image)."""
    out = {k: q[k] for k in ("reviews", "accepted", "dropped_concepts", "marked_answers")}
    out |= {"carried_images": n}
    if q["pred"]:
        pred, true = np.concatenate(q["pred"]), np.concatenate(q["true"])
        out |= {"localised_images": int(len(pred))}
        out |= {f"localised_{k}": v for k, v in mask_agreement(pred, true).items()}
    if trained is not None:
        out |= {f"carried_{k}": v for k, v in mask_agreement(trained, truth).items()}
    return out


def per_image_feedback(ctx: SeedContext, s: Setting) -> Annotations:
    """B per-image answers (strategy `all`: every pool image answered, the reference of what
    the annotator's masks can do at most)."""
    tasks = None if s.strategy == "all" else s.tasks
    chosen = np.sort(choose_queries(ctx.ref.vanilla, ctx.splits, tasks, s.strategy, ctx.seed))
    pos = np.searchsorted(ctx.splits.pool, chosen)
    a = answers_of(ctx, s.annotator, s.rate)
    return Annotations(chosen, a.W[pos], a.keep[pos], 0.0, 0.0, 0.0)


# ---------------------------------------------------------------- running
def run(ctx: SeedContext, s: Setting, cfg: dict, log) -> dict:
    if s in ctx.rows:
        return ctx.rows[s]
    start = time.perf_counter()
    if s.strategy == "cluster":
        ann, quality = cluster_feedback(ctx, s)
    else:
        ann, quality = per_image_feedback(ctx, s), {}
    data = ctx.splits.data
    same = hashlib.sha1(ann.indices.tobytes() + np.packbits(ann.W).tobytes()).hexdigest()
    if same in ctx.trained:  # e.g. a review with nothing to review: the same training again
        model, diverged = ctx.trained[same]
    else:
        base = ctx.ref.vanilla
        model, result, _ = retrain(base, ctx.splits, METHOD, ann, ctx.seed, cfg["feedback"])
        model, diverged = ctx.trained.setdefault(same, (model, result is None))
    audit, audit_recovery = ctx.ref.audit(model)
    row = {
        "dataset": ctx.dataset,
        "seed": ctx.seed,
        "setting": s.name,
        "strategy": s.label,
        "tasks": s.tasks,
        "annotator": s.annotator,
        "rate": s.rate,
        "propagation": asdict(s.propagation) if s.propagation else None,
        "trained_images": int(len(ann.indices)),
        "decoy_in_W": float((ann.W & data.confounder[ann.indices]).any((1, 2)).mean()),
        "audit_accuracy": audit,
        "audit_recovery": audit_recovery,
        "diverged": diverged,
        "seconds": time.perf_counter() - start,
        **quality,
    }
    ctx.rows[s], ctx.models[s] = row, model
    iou = quality.get("carried_iou")
    log(
        f"{ctx.dataset} seed {ctx.seed} {s.name}: {row['trained_images']} images train, "
        f"audit recovery {row['audit_recovery']:+.2f}"
        + (f", carried IoU {iou:.2f}" if iou is not None else "")
        + (f", {quality['reviews']} review clicks" if s.review else "")
        + f" ({row['seconds']:.0f} s)"
    )
    return row


def choose(contexts: list[SeedContext], cfg: dict, goal: int, log) -> Propagation:
    """The candidate propagation with the best mean audit recovery at the goal budget (perfect
    annotator, no review): every seed runs every candidate, then the mean decides."""
    scores = {}
    for p in cfg["candidates"]:
        rows = [run(ctx, Setting("cluster", goal, propagation=p), cfg, log) for ctx in contexts]
        scores[p] = protocol.nanmean_std(r["audit_recovery"] for r in rows)[0]
    chosen = protocol.best(scores)
    log(
        f"chosen on audit at {goal} tasks: {chosen.name} (mean audit recovery {scores[chosen]:+.2f})"
    )
    return chosen


def settings_after(chosen: Propagation, cfg: dict, goal: int, pool: int) -> list[Setting]:
    """With the propagation fixed: every strategy at every budget (perfect annotator), the
    imperfect annotators at the goal budget, and every pool image answered (the reference)."""
    out = [Setting("all", pool)] if cfg["reference"] else []
    for tasks in cfg["lean_tasks"]:  # budgets cut to fit the time: cluster and random only
        out += [Setting("cluster", tasks, propagation=chosen), Setting("random", tasks)]
    for annotator, rate in [("perfect", 0.0), *cfg["imperfect"]]:
        for tasks in cfg["tasks"] if annotator == "perfect" else [goal]:
            out += [
                Setting("cluster", tasks, annotator, rate, chosen),
                Setting("cluster", tasks, annotator, rate, chosen, review=True),
            ]
            out += [
                Setting(st, tasks, annotator, rate)
                for st in STRATEGIES
                if annotator == "perfect" or st in cfg["imperfect_strategies"]
            ]
    return out


def test_split(contexts: list[SeedContext], tested: list[Setting]) -> list[dict]:
    """Test accuracy and recovery of the settings run after the choice (`test_once`), a row per
    seed and setting."""
    out = []
    for ctx in contexts:
        test = protocol.test_once(ctx.ref, {setting: ctx.models[setting] for setting in tested})
        for setting in tested:
            out.append(
                {
                    **{k: ctx.rows[setting][k] for k in ("dataset", "seed", "setting")},
                    "strategy": setting.label,
                    "tasks": setting.tasks,
                    "annotator": setting.annotator,
                    "rate": setting.rate,
                    "vanilla": test["vanilla"],
                    "clean": test["clean"],
                    **test["models"][setting],
                }
            )
    return out


def cluster_report(ctx: SeedContext) -> dict:
    """What the clustering found, with the truth it never saw: per cluster in rank order, its
    size, suspicion, label purity and the share of members whose decoy the oracle would mark."""
    pool, data = ctx.splits.pool, ctx.splits.data
    answers = answers_of(ctx, "perfect", 0.0)
    ranked = []
    for c in np.argsort(-ctx.suspicion, kind="stable"):
        m = ctx.clusters.members(c)
        ranked.append(
            {
                "cluster": int(c),
                "size": int(len(m)),
                "suspicion": float(ctx.suspicion[c]),
                "label_purity": label_purity(data.labels[pool[m]]),
                "decoy_marked": float((answers.W[m] & data.confounder[pool[m]]).any((1, 2)).mean()),
            }
        )
    return {"dataset": ctx.dataset, "seed": ctx.seed, **ctx.clusters.summary(), "ranked": ranked}


def benchmark_dataset(dataset: str, cfg: dict, log) -> dict:
    goal = cfg["goal_tasks"][dataset]
    contexts = [prepare_seed(dataset, seed, cfg, log) for seed in cfg["seeds"][dataset]]
    chosen = choose(contexts, cfg, goal, log)
    tested = settings_after(chosen, cfg, goal, len(contexts[0].splits.pool))
    for ctx in contexts:
        for s in tested:
            run(ctx, s, cfg, log)
    tests = test_split(contexts, tested)
    return {
        "dataset": dataset,
        "references": [{"seed": c.seed, **c.reference} for c in contexts],
        "pool_images": [int(len(c.splits.pool)) for c in contexts],
        "chosen": asdict(chosen) | {"name": chosen.name},
        "rows": [r for c in contexts for r in c.rows.values()],
        "tests": tests,
        "clusters": [cluster_report(c) for c in contexts],
    }


# ---------------------------------------------------------------- summaries and the report
QUALITY = ("carried_precision", "carried_recall", "carried_iou", "carried_images", "reviews")


def summarise(part: dict) -> dict:
    """Mean ± std over seeds of every audit setting and every tested setting."""
    settings = [
        {"setting": name, "n": len(g)}
        | {
            k: protocol.nanmean_std(r.get(k) for r in g)
            for k in ("audit_recovery", "trained_images", "decoy_in_W", *QUALITY)
        }
        for name, g in protocol.by_setting(part["rows"], lambda r: r["setting"]).items()
    ]
    tests = protocol.by_setting(
        part["tests"], lambda t: (t["annotator"], t["strategy"], t["tasks"])
    )
    audited = {r["setting"]: r for r in settings}
    test = []
    for (annotator, strategy, tasks), g in tests.items():
        a = audited[g[0]["setting"]]
        test.append(
            {
                "annotator": annotator,
                "rate": g[0]["rate"],
                "strategy": strategy,
                "tasks": tasks,
                "n": len(g),
                "test_recovery": protocol.mean_std(t["test_recovery"] for t in g),
                "test_accuracy": protocol.mean_std(t["test_accuracy"] for t in g),
                **{k: a[k] for k in ("audit_recovery", "trained_images", *QUALITY)},
            }
        )
    return {"settings": settings, "test": test}


def goal_check(part: dict, cfg: dict) -> dict:
    """Is the goal met: the best strategy's mean test recovery at the goal budget (perfect
    annotator) against the goal's share."""
    tasks, share = cfg["goal_tasks"][part["dataset"]], GOAL[part["dataset"]][1]
    rows = [
        t for t in part["summary"]["test"] if t["tasks"] == tasks and t["annotator"] == "perfect"
    ]
    top = max(rows, key=lambda t: t["test_recovery"][0]) if rows else None
    return {
        "tasks": tasks,
        "share": share,
        "best_strategy": top["strategy"] if top else None,
        "best_test_recovery": top["test_recovery"] if top else None,
        "met": bool(top and top["test_recovery"][0] >= share),
    }


CARRIED = ("carried_precision", "carried_recall", "carried_iou")


def test_row(t: dict) -> list[str]:
    """A row of the test table: one annotator, strategy and number of tasks over seeds."""
    who = t["annotator"] + ("" if t["annotator"] == "perfect" else f" {t['rate']:.0%}")
    review = render.fmt(t["reviews"], 0) if t["strategy"].endswith("review") else "–"
    return [who, t["strategy"], str(t["tasks"]), render.fmt(t["test_recovery"], sign=True)] + [
        render.fmt(t["test_accuracy"], 3),
        render.fmt(t["audit_recovery"], sign=True),
        render.fmt(t["trained_images"], 0),
        review,
        *(render.fmt(t[k]) for k in CARRIED),
    ]


def markdown(result: dict) -> str:
    lines = [
        "# Propagation: the shortcut gap closed per annotator task",
        "",
        f"{render.machine_line(result['machine'])}. Method `{METHOD}` (the pipeline's default, λ "
        f"{FEEDBACK['lambda']:g}), retrained from scratch. Recovery = (acc − vanilla) / "
        "(clean − vanilla) per seed, mean ± std over seeds. **Tasks** = images the annotator "
        "answers (cluster representatives or queried images); review clicks are counted "
        f"separately (one per carried concept for its montage of {MONTAGE} masks, then at most "
        f"{REVIEW_CAP} on its doubtful masks). Choices on the audit split; the test split "
        "read once.",
        "",
    ]
    for part in result["parts"]:
        cfg, ds = part["settings"], part["dataset"]
        refs = part["references"]
        lines += [
            f"## {ds}",
            "",
            f"Seeds {cfg['seeds'][ds]} (each draws the data, the confounders and the initial "
            f"weights); {part['pool_images'][0]} pool images per seed; "
            f"{part['seconds'] / 60:.1f} min. Audit vanilla "
            f"{render.fmt(protocol.mean_std(r['vanilla'] for r in refs), 3)}, clean "
            f"{render.fmt(protocol.mean_std(r['clean'] for r in refs), 3)}.",
        ]
        if ds == "decoy-lesions":
            lines[-1] += (
                f" `small_cnn`, {cfg['lesion_size']} px, {cfg['lesions_per_class']} images per "
                f"class, {cfg['lesion_grid']}×{cfg['lesion_grid']} annotation grid."
            )
        goal = part["goal"]
        verdict = "**met**" if goal["met"] else "**not met**"
        top = goal["best_test_recovery"]
        order = {"perfect": 0, "wrong": 1, "incomplete": 2}
        tests = sorted(
            part["summary"]["test"],
            key=lambda t: (order[t["annotator"]], t["tasks"], t["strategy"]),
        )
        candidates = [
            s
            for s in part["summary"]["settings"]
            if "[" in s["setting"] and s["setting"].startswith(f"cluster {goal['tasks']} [")
        ]
        lines += [
            "",
            f"Goal: ≥ {goal['share']:.0%} of the gap with ≤ {goal['tasks']} tasks: {verdict} "
            f"(best at {goal['tasks']} tasks: {goal['best_strategy']}, test recovery "
            f"{render.fmt(top, sign=True) if top else '–'}). Propagation chosen on audit: "
            f"`{part['chosen']['name']}`.",
            "",
            "### Test (read once): recovery against annotator tasks",
            "",
            *render.table(
                ["annotator", "strategy", "tasks", "test recovery", "test accuracy"]
                + ["audit recovery", "images trained", "review clicks"]
                + ["carried masks: precision", "recall", "IoU"],
                [test_row(t) for t in tests],
            ),
            "",
            f"### Audit: the candidate propagations at {goal['tasks']} tasks (perfect annotator)",
            "",
            *render.table(
                ["propagation", "audit recovery", "images trained", "decoy in W"]
                + ["carried precision", "recall", "IoU"],
                [
                    [
                        s["setting"].split("[")[1].rstrip("]"),
                        render.fmt(s["audit_recovery"], sign=True),
                    ]
                    + [render.fmt(s["trained_images"], 0), render.fmt(s["decoy_in_W"])]
                    + [render.fmt(s[k]) for k in CARRIED]
                    for s in candidates
                ],
            ),
        ]
        lines += ["", "### Clusters (rank order; the truth the learner never saw)", ""]
        for c in part["clusters"]:
            ranked = ", ".join(
                f"{r['size']} ({r['suspicion']:.2f}; purity {r['label_purity']:.2f}; "
                f"decoy marked {r['decoy_marked']:.0%})"
                for r in c["ranked"]
            )
            lines.append(f"- seed {c['seed']}: k = {c['k']} ({c['selection']}); {ranked}")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    plt = render.pyplot()
    from matplotlib.ticker import NullFormatter

    parts = result["parts"]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    styles = {"cluster": "C0", "cluster +review": "C2", "entropy": "C1", "random": "C7"}
    marks = {"wrong": "v", "incomplete": "^"}
    for ax, part in zip(axes[0], parts):
        test = part["summary"]["test"]
        for strategy, colour in styles.items():
            rows = sorted(
                (t for t in test if t["strategy"] == strategy and t["annotator"] == "perfect"),
                key=lambda t: t["tasks"],
            )
            if rows:
                x = [t["tasks"] for t in rows]
                y = np.array([t["test_recovery"] for t in rows], dtype=float)  # null: NaN
                ax.errorbar(x, y[:, 0], y[:, 1], color=colour, marker="o", capsize=3,
                            label=strategy)  # fmt: skip
            for who, mark in marks.items():
                for t in test:
                    if t["strategy"] == strategy and t["annotator"] == who:
                        y = float(np.array(t["test_recovery"][0], dtype=float))
                        ax.plot(t["tasks"] * 1.05, y, mark, color=colour,
                                label=f"{strategy}, {who} {t['rate']:.0%}")  # fmt: skip
        for t in test:
            if t["strategy"] == "all":
                y = float(np.array(t["test_recovery"][0], dtype=float))
                ax.axhline(y, color="C3", ls="--", lw=1,
                           label=f"every pool image answered ({t['tasks']})")  # fmt: skip
        goal = part["goal"]
        ax.axhline(goal["share"], color="k", ls=":", lw=1)
        ax.axvline(goal["tasks"], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ticks = sorted({*part["settings"]["tasks"], *part["settings"].get("lean_tasks", [])})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("annotator tasks")
        ax.set_ylabel("test recovery (share of the gap)")
        ax.set_title(f"{part['dataset']} ({len(part['references'])} seeds)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=7, loc="lower right")
    return render.save_figure(fig, path)


def report(out: Path, name: str) -> dict:
    """Join the parts present (one per dataset) into name.{json,md,png}."""
    parts = [
        json.loads((out / f"{name}.{ds}.json").read_text())
        for ds in DATASETS
        if (out / f"{name}.{ds}.json").exists()
    ]
    result = {"machine": parts[-1]["machine"], "parts": parts}
    render.write_report(out / f"{name}.json", result, markdown, plot)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="decoy-digits", help="comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="decoy-digits seeds")
    parser.add_argument("--lesion-seeds", default="0,1")
    parser.add_argument("--lesions-per-class", type=int, default=300)
    parser.add_argument("--tasks", default=",".join(map(str, TASKS)))
    parser.add_argument("--lean-tasks", default="", help="budgets with cluster and random only")
    parser.add_argument("--no-reference", action="store_true", help="skip every-image answered")
    parser.add_argument("--candidates", default=None, help="indices into CANDIDATES (all)")
    parser.add_argument("--imperfect", default="wrong,incomplete", help="kinds, at RATE")
    parser.add_argument(
        "--imperfect-strategies", default="entropy,random", help="per-image ones, beside cluster"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, short training: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(render.RESULTS))
    parser.add_argument("--report-only", action="store_true", help="join the parts written")
    args = parser.parse_args(argv)
    if args.report_only:
        return report(Path(args.out_dir), "propagation")
    torch.set_num_threads(args.threads)
    cfg = {
        "seeds": {
            "decoy-digits": listed(args.seeds, int),
            "decoy-lesions": listed(args.lesion_seeds, int),
        },
        "tasks": listed(args.tasks, int),
        "lean_tasks": [int(t) for t in args.lean_tasks.split(",") if t],
        "reference": not args.no_reference,
        "goal_tasks": {ds: GOAL[ds][0] for ds in DATASETS},
        "candidates": [CANDIDATES[i] for i in listed(args.candidates, int)]
        if args.candidates
        else list(CANDIDATES),
        "imperfect": [list(i) for i in IMPERFECT if i[0] in listed(args.imperfect)],
        "imperfect_strategies": listed(args.imperfect_strategies),
        "digits_cell": 4,
        "lesion_size": 64,
        "lesion_grid": 8,
        "lesions_per_class": args.lesions_per_class,
        "baseline": BASELINE,
        "feedback": FEEDBACK,
        "quick": args.quick,
    }
    if args.quick:  # tiny: one seed, 2 candidates, 1-epoch retraining, every budget ≤ 2 tasks
        cfg["seeds"] = {ds: [0] for ds in DATASETS}
        cfg["candidates"] = [CANDIDATES[0], CANDIDATES[-1]]
        cfg["imperfect"] = [list(IMPERFECT[0])]
        cfg["imperfect_strategies"] = ["random"]
        cfg["baseline"] = {**BASELINE, "epochs": 2}
        cfg["feedback"] = {**FEEDBACK, "epochs": 1}
        cfg["goal_tasks"] = {ds: max(cfg["tasks"]) for ds in DATASETS}
    out = Path(args.out_dir)
    log = render.progress_log()
    for dataset in listed(args.datasets):
        begun = time.perf_counter()
        part = benchmark_dataset(dataset, cfg, log)
        part |= {"machine": render.machine(), "seconds": time.perf_counter() - begun}
        part["settings"] = {
            **cfg,
            "candidates": [asdict(c) for c in cfg["candidates"]],
            "method": METHOD,
            "review_cap": REVIEW_CAP,
        }
        part["summary"] = summarise(part)
        part["goal"] = goal_check(part, cfg)
        render.write_json(out / f"propagation.{dataset}.json", part)
        log(f"{dataset}: goal {part['goal']}")
    result = report(out, "propagation")
    log(f"wrote {out}/propagation.json, .md and .png")
    return result


if __name__ == "__main__":
    main()
