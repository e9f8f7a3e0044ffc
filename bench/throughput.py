"""Baseline training throughput: xbl's `training_loop` against a bare PyTorch loop, in the same run.

Both train the same SmallCNN (same initial weights) on the same decoy-digits training split,
same batch size, optimiser and number of epochs; the bare loop does nothing else, xbl's loop
also evaluates the validation split each epoch and keeps the best weights. A third variant,
xbl's loop with a one-image validation split, separates the loop's own overhead from the
validation pass. Runs alternate and the medians are compared, since the machine is shared.

    python -m bench.throughput [--epochs 5] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import decoy_splits, new_model, timed, timing_options, train_config
from bench.render import RESULTS, machine, machine_line, write_json
from xbl.train.loop import training_loop


def bare_loop(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> None:
    """The least a training loop can do: shuffle, forward, cross-entropy, backward, step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def measure(
    epochs: int = 5, repeats: int = 3, batch_size: int = 64, lr: float = 1e-3, seed: int = 0
) -> dict:
    splits = decoy_splits()
    n_images = len(splits.train_y) * epochs
    cfg = train_config(
        {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed, "patience": 0}
    )
    seconds = {"xbl": [], "bare": [], "xbl_without_validation": []}
    timed(
        bare_loop, new_model(splits, seed), splits.train_x, splits.train_y, 1, batch_size, lr, seed
    )  # warm-up: first-call allocations and thread start-up count for neither
    for _ in range(repeats):
        _, t = timed(
            training_loop,
            new_model(splits, seed),
            (splits.train_x, splits.train_y),
            (splits.val_x, splits.val_y),
            cfg,
        )
        seconds["xbl"].append(t)
        _, t = timed(
            bare_loop,
            new_model(splits, seed),
            splits.train_x,
            splits.train_y,
            epochs,
            batch_size,
            lr,
            seed,
        )
        seconds["bare"].append(t)
        _, t = timed(
            training_loop,
            new_model(splits, seed),
            (splits.train_x, splits.train_y),
            (splits.val_x[:1], splits.val_y[:1]),
            cfg,
        )
        seconds["xbl_without_validation"].append(t)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "machine": machine(),
        "settings": {
            "epochs": epochs,
            "repeats": repeats,
            "batch_size": batch_size,
            "lr": lr,
            "train_images": len(splits.train_y),
            "val_images": len(splits.val_y),
            "model": "small_cnn",
            "device": "cpu",
        },
        "seconds": seconds,
        "images_per_s": {k: n_images / t for k, t in median.items()},
        "xbl_over_bare_time": median["xbl"] / median["bare"],
        "xbl_without_validation_over_bare_time": median["xbl_without_validation"] / median["bare"],
        "note": "xbl's loop also evaluates the validation split once per epoch and copies the "
        "best weights; the bare loop only trains. 'xbl_without_validation' is xbl's loop "
        "with a one-image validation split: the loop's own overhead.",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    timing_options(parser, RESULTS / "throughput.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.epochs, args.repeats)
    write_json(Path(args.out), result)
    ips = result["images_per_s"]
    print(
        f"{machine_line(result['machine'])}\n"
        f"xbl train: {ips['xbl']:.0f} images/s · bare loop: {ips['bare']:.0f} images/s · "
        f"xbl takes {result['xbl_over_bare_time']:.2f}x the bare loop's time "
        f"({result['xbl_without_validation_over_bare_time']:.2f}x without the validation pass)"
        f" -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
