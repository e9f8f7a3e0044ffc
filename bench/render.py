"""How the benchmarks write what they found: strict JSON, markdown tables of mean ± std, the
machine a run came from, PNG figures, and the progress lines of a long run."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where the numbers come from: they only compare within one machine and one run."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def machine_line(info: dict) -> str:
    return (
        f"{info['date']} · {info['platform']} · {info['cpu_count']} CPU(s), "
        f"{info['torch_threads']} torch thread(s) · torch {info['torch']}"
    )


def _strict(value):
    """NaN and infinities become null: the file stays valid JSON for any reader."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")
    return path


def write_report(
    path: Path,
    result: dict,
    page: Callable[[dict], str],
    plot: Callable[[dict, Path], Path] | None = None,
) -> list[Path]:
    """The result at `path` (.json), its page beside it (.md) and, if it has one, its figure
    (.png)."""
    written = [write_json(path, result), path.with_suffix(".md")]
    written[1].write_text(page(result))
    if plot:
        written.append(plot(result, path.with_suffix(".png")))
    return written


def rewrite_page(path: Path, page: Callable[[dict], str]) -> dict:
    """The page beside the result at `path` written again from it (after the page changed);
    returns the result."""
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(page(result))
    return result


def fmt(ms, digits: int = 2, sign: bool = False, spread: bool = True) -> str:
    """mean ± std (`ms` a pair); "–" where the mean is undefined (null or NaN); the mean alone
    without `spread` (one seed, whose std of 0 would read as a measured one)."""
    mean, std = ms
    if mean is None or not np.isfinite(mean):
        return "–"
    text = f"{mean:{'+' if sign else ''}.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if spread else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def pyplot():
    """matplotlib's pyplot drawing to files only (no display on a benchmark machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def progress_log() -> Callable[[str], None]:
    """A printer of progress lines stamped with the minutes since it was made."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", flush=True)

    return log
