"""Pytest plugin: one real Label Studio server for the test session (fixture `labelstudio`).

The server runs through infra/labelstudio.sh, on a free loopback port, with its data in a temp
dir. Its first start migrates an empty database (~30-80 s); the migrated data dir, with the
admin user, organisation and legacy token already created, is kept as a template in
.labelstudio/template, so later sessions copy it and start in a few seconds.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "labelstudio.sh"
LS_VENV = Path(os.environ.get("XBL_LABEL_STUDIO_VENV", REPO / ".labelstudio" / "venv"))
TEMPLATE = REPO / ".labelstudio" / "template"
# Settings the developer's shell may carry; the test server uses only its template's env file.
_SCRUBBED = (
    "XBL_LABEL_STUDIO_USERNAME",
    "XBL_LABEL_STUDIO_PASSWORD",
    "XBL_LABEL_STUDIO_TOKEN",
    "XBL_LABEL_STUDIO_PORT",
    "XBL_LABEL_STUDIO_HOME",
)


def labelstudio_version() -> str | None:
    """The version installed in the Label Studio venv, or None when it is not installed."""
    python = LS_VENV / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import label_studio; print(label_studio.__version__)"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


@dataclass
class LabelStudioServer:
    """A server started by infra/labelstudio.sh; `stop()` and `start()` simulate an outage."""

    home: Path
    port: int
    token: str = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _script(self, action: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env.update(XBL_LABEL_STUDIO_HOME=str(self.home), XBL_LABEL_STUDIO_PORT=str(self.port))
        return subprocess.run(
            ["bash", str(SCRIPT), action], env=env, capture_output=True, text=True
        )

    def start(self) -> None:
        done = self._script("start")
        if done.returncode != 0:
            raise RuntimeError(f"infra/labelstudio.sh start failed:\n{done.stdout}{done.stderr}")

    def stop(self) -> None:
        self._script("stop")


def _build_template(version: str) -> None:
    """Migrate a fresh data dir once (admin user, org and token included) and keep it."""
    partial = TEMPLATE.with_name(f"template.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "env").write_text(
        "XBL_LABEL_STUDIO_USERNAME=admin@xbl.test\n"
        f"XBL_LABEL_STUDIO_PASSWORD={secrets.token_hex(16)}\n"
        f"XBL_LABEL_STUDIO_TOKEN={secrets.token_hex(20)}\n"
    )
    server = LabelStudioServer(partial, free_port(), token="")
    server.start()
    server.stop()
    for name in ("server.pid", "server.port", "server.log"):
        (partial / name).unlink(missing_ok=True)
    (partial / "LABEL_STUDIO_VERSION").write_text(version)
    shutil.rmtree(TEMPLATE, ignore_errors=True)
    partial.rename(TEMPLATE)


def _template_is_current(version: str) -> bool:
    marker = TEMPLATE / "LABEL_STUDIO_VERSION"
    return marker.is_file() and marker.read_text().strip() == version


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory):
    """A running Label Studio server: `.url`, `.token`, `.stop()`, `.start()`."""
    version = labelstudio_version()
    if version is None:
        reason = (
            f"Label Studio is not installed in {LS_VENV}; "
            "run `make labelstudio-install` (infra/labelstudio.sh install)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    ignore = TEMPLATE.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    with open(TEMPLATE.parent / "template.lock", "w") as lock:  # parallel sessions build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _template_is_current(version):
            _build_template(version)
        home = tmp_path_factory.mktemp("labelstudio") / "home"
        shutil.copytree(TEMPLATE, home)
    token = read_env_file(home / "env")["XBL_LABEL_STUDIO_TOKEN"]
    server = LabelStudioServer(home, free_port(), token)
    server.start()
    try:
        yield server
    finally:
        server.stop()
