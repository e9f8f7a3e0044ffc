"""A PNG of a local HTML page, taken by headless Chromium (Debian's /usr/bin/chromium).

Chromium runs with a fresh profile in a temporary folder, no GPU, no sync, no component
updates, no background networking and a host resolver that resolves nothing: the page is a
file:// URL whose images lie beside it, and nothing goes out. Where Chromium is missing, fails
or hangs, `screenshot` answers False and the caller draws the PNG some other way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def available() -> bool:
    return CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)


def screenshot(page: Path, png: Path, width: int, height: int, timeout_s: float = 90.0) -> bool:
    """Render `page` in a window of width x height into `png`; whether it worked. The window
    is the caller's to size: Chromium shoots the window, not the page."""
    if not available():
        return False
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="xbl-chromium-") as home:
        env = {
            **os.environ,
            "HOME": home,  # crash reports and caches land here, not in the user's home
            "XDG_CONFIG_HOME": home,
            "XDG_CACHE_HOME": home,
        }
        command = [
            str(CHROMIUM),
            *FLAGS,
            f"--user-data-dir={home}/profile",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            Path(page).resolve().as_uri(),
        ]
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its helper processes go with it on a timeout
        )
        try:
            _, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            log.warning("chromium took more than %.0f s to render %s", timeout_s, page)
            return False
        finally:
            # a helper process that outlived the browser (the group is ours alone)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    if process.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
        log.warning("chromium could not render %s (exit %s) %s", page, process.returncode, tail)
        return False
    return True
