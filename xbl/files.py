"""Files a reader may open at any moment (dvc.yaml, the metrics DVC reads, an export) are
written whole or not at all: to a temporary name beside them, then renamed over them."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """`text` into `path` in one rename; a failed write leaves the old file and no temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
