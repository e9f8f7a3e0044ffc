"""No command deletes annotators' work or silently uses other data, checked without a service:
which settings file dvc.yaml's stage reads, how a run's masks join the project's, where an
export is written, and what `make clean` and a failed `make clean-all` leave behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services import dvc, export
from services.checkout import MasksRestored, merge_missing
from xbl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path) -> Path:
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("data: {}\n")
    (tmp_path / "other.yaml").write_text("data: {}\n")
    return tmp_path


def reads(project: Path) -> str | None:
    return dvc._params_var((project / "dvc.yaml").read_text())


# --- the settings file of the DVC stage --------------------------------------------------------


def test_the_repositorys_stage_reads_params_yaml(project):
    assert reads(project) == "params.yaml"


def test_a_run_with_another_file_sets_it_for_the_run_and_back(project):
    original = (project / "dvc.yaml").read_text()
    with dvc.stage_params(project, "other.yaml"):
        assert reads(project) == "other.yaml"
        during = (project / "dvc.yaml").read_text()
    assert during.replace("other.yaml", "params.yaml", 1) == original  # only the value changed
    assert (project / "dvc.yaml").read_text() == original


def test_the_stage_is_set_back_when_the_run_fails(project):
    with pytest.raises(RuntimeError), dvc.stage_params(project, "other.yaml"):
        raise RuntimeError("dvc repro failed")
    assert reads(project) == "params.yaml"


def test_a_file_left_by_a_killed_run_is_set_back_by_the_next(project):
    with dvc.stage_params(project, "other.yaml"):
        killed = (project / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(
        killed.replace("params_file: params.yaml", "params_file: other.yaml")
    )
    with dvc.stage_params(project, "params.yaml"):
        assert reads(project) == "params.yaml"
    assert reads(project) == "params.yaml"


@pytest.mark.parametrize(
    ("name", "why"),
    [("../elsewhere.yaml", "outside the project"), ("missing.yaml", "not found")],
)
def test_a_settings_file_dvc_cannot_record_is_refused(project, name, why):
    (project.parent / "elsewhere.yaml").write_text("data: {}\n")
    with pytest.raises(ConfigError, match=why), dvc.stage_params(project, name):
        pass
    assert reads(project) == "params.yaml"


def test_a_name_the_shell_would_split_is_refused(project):
    (project / "my settings.yaml").write_text("data: {}\n")
    with pytest.raises(ConfigError, match="rename it"):
        dvc.params_in_project(project, "my settings.yaml")


def test_an_old_dvc_yaml_runs_params_yaml_and_refuses_another_file(project):
    old = "stages:\n  prepare:\n    cmd: python -m xbl.data.prepare --params params.yaml\n"
    (project / "dvc.yaml").write_text(old)
    with dvc.stage_params(project, "params.yaml"):
        pass
    with pytest.raises(ConfigError, match="params_file"), dvc.stage_params(project, "other.yaml"):
        pass
    assert (project / "dvc.yaml").read_text() == old


# --- a run's masks join the project's, never replace them ---------------------------------------


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def contents(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_a_runs_masks_fill_gaps_and_keep_every_later_mask(tmp_path):
    theirs, ours = tmp_path / "run", tmp_path / "feedback"
    write(
        theirs,
        {"round-1/manifest.csv": "m1", "round-1/masks/a.png": "a", "round-1/masks/b.png": "b"},
    )
    write(ours, {"round-1/manifest.csv": "m1 collected again", "round-1/masks/a.png": "a"})
    write(ours, {"round-2/manifest.csv": "m2", "round-2/masks/c.png": "c"})
    done = merge_missing(theirs, ours)
    assert done == MasksRestored(
        restored=("round-1/masks/b.png",),
        kept=("round-1/manifest.csv",),
        later=("round-2/manifest.csv", "round-2/masks/c.png"),
    )
    assert contents(ours) == {
        "round-1/manifest.csv": "m1 collected again",
        "round-1/masks/a.png": "a",
        "round-1/masks/b.png": "b",
        "round-2/manifest.csv": "m2",
        "round-2/masks/c.png": "c",
    }
    text = "\n".join(done.lines())
    assert "1 mask file(s) of the run written back" in text
    assert "round-2" in text and "round-1/manifest.csv" in text


def test_masks_removed_from_the_project_come_back_whole(tmp_path):
    theirs, ours = tmp_path / "run", tmp_path / "feedback"
    write(theirs, {"round-1/manifest.csv": "m1", "round-1/masks/a.png": "a"})
    done = merge_missing(theirs, ours)
    assert contents(ours) == contents(theirs)
    assert done.kept == () and done.later == ()
    assert not [p for p in ours.rglob(".*")]  # no temporary file left


# --- the Label Studio export file --------------------------------------------------------------


def test_an_export_never_overwrites_an_earlier_one(tmp_path):
    first = export._write_new(tmp_path / "exports", "labelstudio-20261207-101500", {"n": 1})
    second = export._write_new(tmp_path / "exports", "labelstudio-20261207-101500", {"n": 2})
    assert first != second
    assert json.loads(first.read_text()) == {"n": 1}
    assert json.loads(second.read_text()) == {"n": 2}
    assert (tmp_path / "exports" / ".gitignore").read_text() == "*\n"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [
        ".gitignore",
        "labelstudio-20261207-101500-1.json",
        "labelstudio-20261207-101500.json",
    ]


def test_an_export_that_cannot_reach_label_studio_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # discard port: nobody there
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k" * 40)
    assert export.main(["--out-dir", str(tmp_path / "exports")]) == 1
    assert "could not be exported" in capsys.readouterr().err
    assert not (tmp_path / "exports").exists()


# --- make clean and make clean-all -------------------------------------------------------------

USER_WORK = (
    "data/raw/manifest.csv",
    "data/feedback/round-1/masks/a.png",
    "data/feedback.dvc",
    "data/rounds/round-1/queries.json",
    ".labelstudio/data/label_studio.sqlite3",
    ".dvc-remote/files/md5/ab/cdef",
    "exports/labelstudio-20261207-101500.json",
)
DERIVED = ("runs/x/baseline.pt", "mlflow.db", "mlartifacts/1/a", ".prefect/x", "data/prepared/y")


@pytest.fixture
def made_project(tmp_path) -> Path:
    """A project folder with the Makefile and its scripts, and a file at every kept place."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for package in ("infra", "services", "xbl"):
        (tmp_path / package).symlink_to(REPO / package)
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    write(tmp_path, {rel: rel for rel in USER_WORK + DERIVED})
    return tmp_path


def make(project: Path, target: str, **env: str) -> subprocess.CompletedProcess:
    scrubbed = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XBL_LABEL_STUDIO_", "LABEL_STUDIO_", "MAKE"))
    }
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=project,
        env={**scrubbed, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_clean_keeps_everything_an_annotator_or_user_made(made_project):
    done = make(made_project, "clean")
    assert done.returncode == 0, done.stderr
    for rel in USER_WORK:
        assert (made_project / rel).read_text() == rel
    assert not [rel for rel in DERIVED if (made_project / rel).exists()]


def test_make_clean_all_removes_nothing_when_label_studio_cannot_be_exported(made_project):
    """Label Studio's data is there, but its server cannot start (no install): no export, so
    nothing at all is removed."""
    done = make(made_project, "clean-all", XBL_LABEL_STUDIO_VENV=str(made_project / "no-venv"))
    assert done.returncode != 0
    assert "clean-all: nothing removed" in done.stderr
    for rel in USER_WORK + DERIVED:
        assert (made_project / rel).read_text() == rel
