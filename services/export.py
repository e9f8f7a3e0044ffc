"""Every Label Studio project, with all its tasks, annotations and predictions, exported through
the API to one dated JSON file: what `make clean-all` writes before it wipes the local server.

`python -m services.export [--out-dir exports] [--stamp YYYYmmdd-HHMMSS]` exports the configured server (the local one
unless LABEL_STUDIO_URL is set) and prints where; it exits 1, writing nothing, when the export
fails. The file holds Label Studio's own JSON export per project (re-importable through its UI
or API), beside the project's settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services import labelstudio as ls
from xbl.files import write_whole

EXPORTS_DIR = "exports"


@dataclass(frozen=True)
class Exported:
    path: Path | None  # None: the server holds no project, so no file was written
    projects: int
    tasks: int
    annotations: int

    def summary(self, url: str) -> str:
        if self.path is None:
            return f"Label Studio at {url} holds no project: nothing to export"
        return (
            f"exported {self.projects} project(s), {self.tasks} task(s) and "
            f"{self.annotations} annotation(s) from Label Studio at {url} to {self.path}"
        )


def export_all(client: ls.LabelStudioClient, out_dir: Path, stamp: str | None = None) -> Exported:
    """Write every project's tasks and annotations to out_dir/labelstudio-STAMP.json (STAMP: the
    UTC time, YYYYmmdd-HHMMSS, unless given)."""
    projects = [_project(client, p) for p in client.sdk.projects.list()]
    tasks = [t for p in projects for t in p["tasks"]]
    annotations = sum(len(t.get("annotations") or []) for t in tasks)
    if not projects:
        return Exported(None, 0, 0, 0)
    now = datetime.now(UTC)
    snapshot = {"exported_at": now.isoformat(), "server": client.url, "projects": projects}
    stamp = stamp or f"{now:%Y%m%d-%H%M%S}"
    path = _write_new(Path(out_dir), f"labelstudio-{stamp}", snapshot)
    return Exported(path, len(projects), len(tasks), annotations)


def _project(client: ls.LabelStudioClient, project) -> dict:
    """The project's settings and Label Studio's JSON export of all its tasks."""
    chunks = client.sdk.projects.exports.download_sync(
        project.id, export_type="JSON", download_all_tasks=True
    )
    return {
        "id": project.id,
        "title": project.title,
        "settings": json.loads(json.dumps(project.dict(), default=str)),
        "tasks": json.loads(b"".join(chunks)),
    }


def _write_new(out_dir: Path, stem: str, snapshot: dict) -> Path:
    """A new file, never over an earlier export, written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ignore = out_dir / ".gitignore"  # annotators' work stays out of git, as .labelstudio/ does
    if not ignore.exists():
        ignore.write_text("*\n")
    path, n = out_dir / f"{stem}.json", 1
    while path.exists():  # two exports in one second
        path, n = out_dir / f"{stem}-{n}.json", n + 1
    write_whole(path, json.dumps(snapshot, indent=1, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(EXPORTS_DIR))
    parser.add_argument("--stamp", default=None, help="the file's date (default: now, UTC)")
    args = parser.parse_args(argv)
    try:
        client = ls.connect()
        exported = export_all(client, args.out_dir, args.stamp)
    except Exception as err:  # noqa: BLE001  (any failure means: do not wipe)
        print(f"export: Label Studio's annotations could not be exported: {err}", file=sys.stderr)
        return 1
    print(exported.summary(client.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
