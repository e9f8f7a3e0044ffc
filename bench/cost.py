"""What feedback costs: seconds per training epoch of each method against plain training.

Same run, same model, same data; 2 %, 10 % and 100 % of the training images annotated (with
the true decoy masks: the cost does not depend on how good the masks are). Every measurement
is a short fixed-epoch training; the configurations are interleaved (plain, rrr, ..., plain,
rrr, ...) and repeated, and the medians compared, because the machine is shared and noisy.
One-off set-up (eXBL's exemplars, the counterexample copies) is timed apart from the epochs.

    python -m bench.cost [--epochs 2] [--repeats 3] [--fractions 0.02,0.1,1.0]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    FEEDBACK,
    RESULTS,
    decoy_splits,
    feedback_config,
    machine,
    machine_line,
    new_model,
    timed,
    train_config,
    write_json,
)
from xbl.feedback import build_feedback
from xbl.methods import METHODS
from xbl.training_loop import training_loop


def epoch_seconds(
    splits, method: str | None, indices: np.ndarray, epochs: int, settings: dict, seed: int = 0
) -> tuple[float, float]:
    """(seconds per epoch, set-up seconds) of one short training; method None = plain CE."""
    model = new_model(splits, seed)
    feedback, setup = None, 0.0
    if method is not None:
        feedback, setup = timed(
            build_feedback,
            feedback_config(settings, method),
            splits.data,
            indices,
            splits.data.confounder[indices],
            seed,
            model=model,
        )
    cfg = train_config(
        {
            "lr": float(settings["lr"]),
            "epochs": epochs,
            "batch_size": BATCH,
            "seed": seed,
            "patience": 0,
        }
    )
    _, seconds = timed(
        training_loop,
        model,
        splits.train_x,
        splits.train_y,
        splits.val_x,
        splits.val_y,
        cfg,
        feedback=feedback,
    )
    return seconds / epochs, setup


def measure(
    methods=tuple(METHODS),
    fractions=(0.02, 0.1, 1.0),
    epochs: int = 2,
    repeats: int = 3,
    settings: dict | None = None,
    seed: int = 0,
    full_batch: bool = True,
) -> dict:
    """Interleaved, repeated timings; with `full_batch`, also every method at 100 % annotated
    with as many annotated rows per batch as plain rows (the papers' protocol: every training
    image carries the term), for comparison with published ratios."""
    settings = {**FEEDBACK, "normalize_lambda": False, "lambda": 1.0, **(settings or {})}
    splits = decoy_splits()
    pool = splits.pool
    rng = np.random.default_rng(seed)
    fractions = list(fractions)
    annotated = {
        f: np.sort(rng.permutation(pool)[: max(1, round(f * len(pool)))]) for f in fractions + [1.0]
    }
    per_batch = int(settings["per_batch"])
    configs = [Config(None, None, per_batch)]
    configs += [Config(m, f, per_batch) for m in methods for f in fractions]
    if full_batch:
        configs += [Config(m, 1.0, BATCH) for m in methods]
    epoch_s = {c.name: [] for c in configs}
    setup_s = {c.name: [] for c in configs}
    epoch_seconds(splits, None, pool[:0], 1, settings, seed)  # warm-up, not counted
    for _ in range(repeats):
        for c in configs:
            idx = annotated[c.fraction] if c.method else pool[:0]
            per_epoch, setup = epoch_seconds(
                splits, c.method, idx, epochs, {**settings, "per_batch": c.per_batch}, seed
            )
            epoch_s[c.name].append(per_epoch)
            setup_s[c.name].append(setup)
    plain = statistics.median(epoch_s[configs[0].name])
    rows = []
    for c in configs:
        median = statistics.median(epoch_s[c.name])
        rows.append(
            {
                "method": c.method or "plain",
                "annotated_fraction": c.fraction,
                "annotated_images": int(len(annotated[c.fraction])) if c.method else 0,
                "per_batch": c.per_batch if c.method else 0,
                "seconds_per_epoch": median,
                "ratio_to_plain": median / plain,
                "setup_seconds": statistics.median(setup_s[c.name]),
                "all_seconds_per_epoch": epoch_s[c.name],
            }
        )
    return {
        "machine": machine(),
        "settings": {
            "epochs_per_measurement": epochs,
            "repeats": repeats,
            "train_images": len(pool),
            "batch_size": BATCH,
            "per_batch": per_batch,
            "counterexample_copies": int(settings["counterexample_copies"]),
            "device": "cpu",
        },
        "rows": rows,
        "note": f"Each batch of {BATCH} training images gets `per_batch` ({per_batch}) "
        "annotated images mixed in, whatever the annotated fraction, so an epoch's "
        "cost hardly depends on it. The last column puts as many annotated rows as "
        "plain ones in each batch, as when every image carries the term. Times "
        "include the per-epoch validation pass, as in the pipeline.",
    }


BATCH = 64


@dataclass(frozen=True)
class Config:
    method: str | None  # None: plain cross-entropy
    fraction: float | None
    per_batch: int

    @property
    def name(self) -> str:
        if self.method is None:
            return "plain"
        return f"{self.method}@{self.fraction:g}/{self.per_batch}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    per_batch = result["settings"]["per_batch"]
    columns = sorted(
        {(r["annotated_fraction"], r["per_batch"]) for r in rows if r["method"] != "plain"},
        key=lambda c: (c[1] != per_batch, c[0]),
    )
    plain = next(r for r in rows if r["method"] == "plain")
    head = [
        f"{f:.0%} annotated" if pb == per_batch else f"{f:.0%} annotated, {pb} per batch"
        for f, pb in columns
    ]
    lines = [
        "# Cost of feedback per training epoch",
        "",
        f"{machine_line(result['machine'])}",
        "",
        f"Plain training: {plain['seconds_per_epoch']:.3f} s per epoch "
        f"({result['settings']['train_images']} images). Median of "
        f"{result['settings']['repeats']} interleaved repeats; time per epoch relative to "
        "plain training (seconds per epoch in brackets).",
        "",
        "| method | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "plain"):
        cells = []
        for f, pb in columns:
            r = next(
                (
                    r
                    for r in rows
                    if r["method"] == method
                    and r["annotated_fraction"] == f
                    and r["per_batch"] == pb
                ),
                None,
            )
            cells.append(
                f"{r['ratio_to_plain']:.2f}x ({r['seconds_per_epoch']:.2f} s)" if r else "–"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fractions", default="0.02,0.1,1.0")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--no-full-batch", action="store_true", help="skip the every-image-penalised column"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(
        args.methods.split(","),
        [float(f) for f in args.fractions.split(",")],
        args.epochs,
        args.repeats,
        full_batch=not args.no_full_batch,
    )
    out = write_json(Path(args.out), result)
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
