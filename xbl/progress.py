"""Progress bars for the steps that take minutes on real data (pool scoring, saliency, carrying
marks over a pool, uploads, data generation). On a terminal a bar says what it is doing and how
far it is; when output is not a terminal (a scheduled run, a log file, the tests) nothing is
drawn, so logs stay readable."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether a person watches: stderr is a terminal and XBL_PROGRESS is not 0."""
    return os.environ.get("XBL_PROGRESS", "1") != "0" and sys.stderr.isatty()


def progress(items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """`items`, one at a time, drawing a bar labelled `what` on a terminal."""
    if not on_terminal():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # on stderr, beside the logs: stdout stays the command's answer
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total if total is not None else _length(items))
        for item in items:
            yield item
            bar.advance(task)


def batch_starts(count: int, size: int, what: str) -> Iterator[int]:
    """The start of each batch of `size` out of `count`, with a bar counting batches."""
    starts = range(0, count, size)
    return progress(starts, what, len(starts))


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
