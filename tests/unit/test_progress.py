"""Progress bars: drawn, saying what runs, only when a person watches a terminal."""

from __future__ import annotations

import contextlib
import os
import pty
import subprocess
import sys

from xbl.progress import batch_starts, progress

DRAW = """
import time
from xbl.progress import progress
for _ in progress(range(3), "scoring 3 pool images"):
    time.sleep(0.2)
print("done", flush=True)
"""


def test_off_a_terminal_it_only_passes_the_items_through(capsys):
    assert list(progress(iter([1, 2, 3]), "counting")) == [1, 2, 3]
    assert list(batch_starts(10, 4, "batches")) == [0, 4, 8]
    assert capsys.readouterr() == ("", "")


def _run_under(stderr_is_terminal: bool, env: dict) -> str:
    primary, secondary = pty.openpty()
    err = secondary if stderr_is_terminal else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-c", DRAW], stdout=subprocess.PIPE, stderr=err, env=env
    )
    out, piped = proc.communicate(timeout=60)
    os.close(secondary)
    drawn = b""
    if stderr_is_terminal:
        os.set_blocking(primary, False)
        with contextlib.suppress(OSError):  # EIO: nothing written, the child's side closed
            drawn = os.read(primary, 65536)
    os.close(primary)
    assert out.decode().strip() == "done"
    return (drawn or piped or b"").decode(errors="replace")


def test_on_a_terminal_a_bar_says_what_it_is_doing_and_xbl_progress_0_quiets_it():
    env = {**os.environ, "COLUMNS": "100"}
    assert "scoring 3 pool images" in _run_under(True, env)
    assert _run_under(False, env) == ""
    assert "scoring" not in _run_under(True, {**env, "XBL_PROGRESS": "0"})
