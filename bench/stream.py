"""Images on disk: speed and memory of the streamed path, against bare torch loops in the same run.

Synthetic RGB images (64 px, uint8, seeded noise: reading and the model's arithmetic do not care
what they show) are saved as a prepared dataset folder and read back through xbl's loader.
  - pool scoring: xbl's `predict_proba` over the on-disk pool against a bare `model(x)` loop
    over the same DataLoader;
  - training: xbl's `training_loop` (a one-image validation split, so the validation pass is
    excluded) against a bare shuffle/forward/CE/backward/step loop over the same DataLoader;
  - memory: peak resident memory of a process that scores a pool of N and of 4N images, each in
    its own process, streamed from disk and, for contrast, loaded whole as xbl did before;
  - storage: rows read from the .npy arrays against decoding one PNG file per image, the other
    layout the issue allowed.
Runs alternate and medians are compared; the machine is shared.

    python -m bench.stream [--n 5000] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.common import timed, timing_options
from bench.render import RESULTS, machine, machine_line, write_json
from xbl.config import TrainConfig
from xbl.data.images import ShuffledBatches, batches, in_order
from xbl.data.prepared import PreparedData
from xbl.train.loop import predict_proba, training_loop
from xbl.train.models import build_model

SIZE, CLASSES, BATCH = 64, 3, 64


def synthetic(n: int, seed: int = 0) -> PreparedData:
    rng = np.random.default_rng(seed)
    return PreparedData(
        images=rng.integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8),
        labels=rng.integers(0, CLASSES, n).astype(np.int64),
        split=np.array(["train"] * (n - 1) + ["val"]),
        relevance=np.ones((n, SIZE, SIZE), bool),
        confounder=np.zeros((n, SIZE, SIZE), bool),
        ids=np.array([f"{i:06d}.png" for i in range(n)]),
        classes=np.array([str(k) for k in range(CLASSES)]),
    )


def stored(n: int, root: Path) -> PreparedData:
    folder = root / f"prepared-{n}"
    if not folder.exists():
        synthetic(n).save(folder)
    return PreparedData.load(folder)


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 3, CLASSES, SIZE)


@torch.no_grad()
def bare_scoring(net: torch.nn.Module, pool) -> None:
    net.eval()
    for x, _ in batches(pool, in_order(len(pool), 128)):
        F.softmax(net(x), dim=1)


def bare_training(net: torch.nn.Module, train, epochs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    loader = batches(train, ShuffledBatches(len(train), BATCH, gen))
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def speed(data: PreparedData, repeats: int, epochs: int) -> dict:
    pool, val = data.split_images("train"), data.split_images("val")
    cfg = TrainConfig(epochs=epochs, batch_size=BATCH, patience=0, lr=1e-3)
    seconds = {k: [] for k in ("xbl_scoring", "bare_scoring", "xbl_training", "bare_training")}
    bare_scoring(model(), pool)  # warm-up: page cache and first-call allocations
    for _ in range(repeats):
        seconds["xbl_scoring"].append(timed(predict_proba, model(), pool)[1])
        seconds["bare_scoring"].append(timed(bare_scoring, model(), pool)[1])
        seconds["xbl_training"].append(timed(training_loop, model(), pool, val, cfg)[1])
        seconds["bare_training"].append(timed(bare_training, model(), pool, epochs, 0)[1])
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        "seconds": seconds,
        "scoring_images_per_s": {
            "xbl": len(pool) / median["xbl_scoring"],
            "bare": len(pool) / median["bare_scoring"],
        },
        "scoring_speed_over_bare": median["bare_scoring"] / median["xbl_scoring"],
        "training_speed_over_bare": median["bare_training"] / median["xbl_training"],
    }


# Run in a fresh process per measurement, so each peak is its own. Beside the process's peak
# (what the issue asks for, dominated by torch itself), a thread samples the resident memory
# while the pool is read and scored: the growth over what the process held before.
PEAK_SCRIPT = """
import os, resource, sys, threading, time, torch
from xbl.data.images import to_tensor
from xbl.data.prepared import PreparedData
from bench.stream import model
from xbl.train.loop import predict_proba
torch.set_num_threads(1)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
data, how, net = PreparedData.load(sys.argv[1]), sys.argv[2], model()
before, high, scoring = rss(), [0], [True]
def watch():
    while scoring[0]:
        high[0] = max(high[0], rss())
        time.sleep(0.002)
watcher = threading.Thread(target=watch)
watcher.start()
train = data.indices("train")
pool = data.split_images("train") if how == "streamed" else to_tensor(data.images[train])
predict_proba(net, pool)
scoring[0] = False
watcher.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, max(high[0], rss()) - before)
"""


# glibc raises its mmap threshold as large blocks are freed, so the batches' buffers end up on
# the heap, where small live objects between them keep freed memory from returning to the
# system; a fixed threshold sends them back at once. Measured as a third variant.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_rss(folder: Path, how: str) -> dict:
    streamed, env = how.startswith("streamed"), dict(os.environ)
    if how == "streamed_fixed_mmap_threshold":
        env.update(FIXED_MMAP_THRESHOLD)
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(folder), "streamed" if streamed else how],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    peak, growth = (int(v) for v in done.stdout.split()[-2:])
    return {"process_peak_bytes": peak, "growth_while_scoring_bytes": growth}


def memory(n: int, root: Path) -> dict:
    folders = {m: Path(stored(m, root).images.path).parent for m in (n, 4 * n)}
    rss = {
        how: {str(m): peak_rss(folder, how) for m, folder in folders.items()}
        for how in ("streamed", "streamed_fixed_mmap_threshold", "loaded_whole")
    }

    def ratio(how: str, key: str) -> float:
        return rss[how][str(4 * n)][key] / max(rss[how][str(n)][key], 1)

    return {
        "memory": rss,
        "streamed_peak_4n_over_n": ratio("streamed", "process_peak_bytes"),
        "loaded_whole_peak_4n_over_n": ratio("loaded_whole", "process_peak_bytes"),
        "streamed_growth_4n_over_n": ratio("streamed", "growth_while_scoring_bytes"),
        "streamed_fixed_mmap_threshold_growth_4n_over_n": ratio(
            "streamed_fixed_mmap_threshold", "growth_while_scoring_bytes"
        ),
        "loaded_whole_growth_4n_over_n": ratio("loaded_whole", "growth_while_scoring_bytes"),
    }


def storage(data: PreparedData, root: Path, n: int = 2000) -> dict:
    """Images/s reading rows of images.npy against decoding one PNG per image."""
    pngs = root / "png"
    pngs.mkdir(exist_ok=True)
    rows = np.arange(min(n, len(data)))
    for i in rows:
        Image.fromarray(np.moveaxis(data.images[i], 0, -1)).save(pngs / f"{i}.png")
    _, npy = timed(lambda: [data.images[int(i)] for i in rows])
    _, png = timed(lambda: [np.asarray(Image.open(pngs / f"{i}.png")) for i in rows])
    return {"npy_rows_per_s": len(rows) / npy, "png_decodes_per_s": len(rows) / png}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=1)
    timing_options(parser, RESULTS / "stream.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="xbl-stream-") as tmp:
        root = Path(tmp)
        data = stored(args.n, root)
        result = {
            "machine": machine(),
            "settings": {
                "n": args.n,
                "image": f"3x{SIZE}x{SIZE} uint8",
                "model": "small_cnn",
                "batch_size": BATCH,
                "epochs": args.epochs,
                "repeats": args.repeats,
                "loader_workers": 0,
                "device": "cpu",
            },
            **speed(data, args.repeats, args.epochs),
            **memory(args.n, root),
            "storage": storage(data, root),
        }
    write_json(Path(args.out), result)
    print(machine_line(result["machine"]))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "scoring_speed_over_bare",
                    "training_speed_over_bare",
                    "streamed_peak_4n_over_n",
                    "loaded_whole_peak_4n_over_n",
                    "streamed_growth_4n_over_n",
                    "streamed_fixed_mmap_threshold_growth_4n_over_n",
                    "loaded_whole_growth_4n_over_n",
                    "storage",
                )
            },
            indent=1,
        )
    )
    return result


if __name__ == "__main__":
    main()
