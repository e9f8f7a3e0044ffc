"""No command deletes annotators' work or silently uses other data, through the real services:
`--params FILE` reaches the DVC stage and its record (real DVC), `xbl data checkout` keeps later
rounds' masks (real DVC and MLflow), and `make clean-all` exports every Label Studio annotation
before it wipes the server (a real Label Studio)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from services import dvc, tracking
from services import labelstudio as ls
from services.checkout import restore_run_data
from services.export import export_all
from tasks.data import prepare_data
from tests.integration.ls_server import (
    LS_VENV,
    TEMPLATE,
    LabelStudioServer,
    free_port,
    read_env_file,
)
from tests.integration.project import make_project

REPO = Path(__file__).resolve().parents[2]
PREPARED = "data/prepared"
SHAPES = ("circle", "square")


def summary(project: Path) -> dict:
    return json.loads((project / PREPARED / "summary.json").read_text())


@pytest.fixture
def two_settings(tmp_path) -> Path:
    """A project whose params.yaml names the built-in digits and whose other.yaml names a
    folder of the user's own images (two classes, 10 PNGs each)."""
    project = make_project(tmp_path / "project")
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        folder = project / "data" / "raw" / "shapes" / shape
        folder.mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["dataset"] = "data/raw/shapes"
    (project / "other.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def test_params_file_reaches_the_dvc_stage_and_its_record(two_settings):
    project = two_settings
    spec = (project / "dvc.yaml").read_text()

    other = prepare_data.fn(str(project), PREPARED, "other.yaml")
    assert summary(project)["classes"] == list(SHAPES)
    assert summary(project)["n_images"] == 20
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"]
    assert lock["cmd"].endswith("--params other.yaml")
    assert lock["params"] == {
        "other.yaml": {"data": yaml.safe_load((project / "other.yaml").read_text())["data"]}
    }
    assert (project / "dvc.yaml").read_text() == spec  # set back: `dvc repro` reads params.yaml

    dvc.dvc(project, "repro", "prepare")  # by hand
    assert summary(project)["classes"] == [str(d) for d in range(10)]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"]
    assert list(lock["params"]) == ["params.yaml"]

    again = prepare_data.fn(str(project), PREPARED, "other.yaml")
    assert again.version == other.version  # the same data, from DVC's cache
    assert summary(project)["classes"] == list(SHAPES)
    default = prepare_data.fn(str(project), PREPARED)
    assert default.version != other.version


def test_a_failing_stage_names_the_input_and_is_not_retried(two_settings):
    from xbl.errors import XblError

    project = two_settings
    bad = yaml.safe_load((project / "other.yaml").read_text())
    bad["data"]["dataset"] = "data/raw/missing.csv"
    (project / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(XblError, match="data/raw/missing.csv"):
        prepare_data.fn(str(project), PREPARED, "bad.yaml")
    assert "params_file: params.yaml" in (project / "dvc.yaml").read_text()


# --- xbl data checkout ---------------------------------------------------------------------------


def write_masks(project: Path, round_: int, names: dict[str, bytes]) -> None:
    folder = project / "data" / "feedback" / f"round-{round_}"
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        (folder / "masks" / name).write_bytes(data)
    (folder / "manifest.csv").write_text("image_id\n" + "\n".join(names) + "\n")


def log_round_run(project: Path, version: str) -> str:
    """An MLflow run as a feedback round logs it: the data version, dvc.lock, feedback.dvc."""
    client = tracking.client_for(project)
    exp = tracking.experiment_id(client, project, "safety")
    run = client.create_run(
        exp, tags={tracking.DATA_VERSION_TAG: version}, run_name="feedback-round-1"
    )
    for name in ("dvc.lock", "data/feedback.dvc"):
        client.log_artifact(run.info.run_id, str(project / name))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def checked_out_after_round_2(two_settings):
    """Round 1 learnt from its masks on the folder data; round 2's masks came later and a
    round-1 mask was collected again; then the project moved to the built-in data."""
    project = two_settings
    dvc.ensure_repo(project)
    data = prepare_data.fn(str(project), PREPARED, "other.yaml")
    write_masks(project, 1, {"a.png": b"a1", "b.png": b"b1"})
    dvc.add(project, "data/feedback")
    dvc.push(project, "data/feedback.dvc")
    run_id = log_round_run(project, data.version)
    round_1 = tree(project / "data" / "feedback")
    write_masks(project, 2, {"c.png": b"c2"})
    (project / "data" / "feedback" / "round-1" / "masks" / "a.png").write_bytes(b"a1 again")
    dvc.add(project, "data/feedback")
    pointer = (project / "data" / "feedback.dvc").read_text()
    prepare_data.fn(str(project), PREPARED)
    return project, run_id, data, round_1, pointer


def test_checkout_restores_the_data_and_keeps_later_masks(checked_out_after_round_2):
    project, run_id, data, round_1, pointer = checked_out_after_round_2
    feedback = project / "data" / "feedback"
    before = tree(feedback)

    restored = restore_run_data(project, run_id)

    assert restored.version == data.version
    assert summary(project)["classes"] == list(SHAPES)  # the run's data
    assert tree(feedback) == before  # nothing removed, nothing overwritten
    assert restored.masks.restored == ()
    assert restored.masks.kept == ("round-1/masks/a.png",)
    assert "round-2" in "\n".join(restored.masks.lines())
    assert (project / "data" / "feedback.dvc").read_text() == pointer  # still the latest
    assert not list(project.glob(".xbl-checkout-*"))


def test_checkout_brings_back_removed_masks_from_the_remote(checked_out_after_round_2):
    project, run_id, _, round_1, _ = checked_out_after_round_2
    feedback = project / "data" / "feedback"
    shutil.rmtree(feedback / "round-1")
    shutil.rmtree(project / ".dvc" / "cache")  # only the DVC remote holds them now

    restored = restore_run_data(project, run_id)

    assert {k: v for k, v in tree(feedback).items() if k.startswith("round-1/")} == round_1
    assert (feedback / "round-2" / "masks" / "c.png").read_bytes() == b"c2"
    assert sorted(restored.masks.restored) == sorted(round_1)


# --- the Label Studio export before `make clean-all` ---------------------------------------------

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="verdict" toName="image"><Choice value="ok"/><Choice value="wrong"/></Choices>'
    "</View>"
)


def annotate(client: ls.LabelStudioClient, title: str, verdict: str) -> int:
    """A project with one task and one submitted annotation; returns the annotation's id."""
    sdk = client.sdk
    project = sdk.projects.create(title=title, label_config=LABEL_CONFIG)
    sdk.projects.import_tasks(project.id, request=[{"image": "/data/upload/1/x.png", "round": 1}])
    task = next(iter(sdk.tasks.list(project=project.id)))
    result = [
        {
            "from_name": "verdict",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [verdict]},
        }
    ]
    return sdk.annotations.create(task.id, result=result, lead_time=4.0).id


def exported_verdicts(path: Path) -> dict[int, list[str]]:
    """Every exported annotation's chosen verdicts (the session's server also holds other
    tests' projects, whose annotations draw regions instead)."""
    snapshot = json.loads(path.read_text())
    return {
        a["id"]: [c for r in a["result"] for c in r.get("value", {}).get("choices", [])]
        for p in snapshot["projects"]
        for t in p["tasks"]
        for a in t["annotations"]
    }


def test_export_holds_every_annotation(labelstudio, tmp_path):
    client = ls.connect(labelstudio.url, labelstudio.token)
    annotation = annotate(client, "safety-export", "wrong")
    exported = export_all(client, tmp_path / "exports")
    assert exported.path.parent == tmp_path / "exports"
    assert exported.path.name.startswith("labelstudio-")
    assert exported_verdicts(exported.path)[annotation] == ["wrong"]
    titles = [p["title"] for p in json.loads(exported.path.read_text())["projects"]]
    assert "safety-export" in titles
    assert exported.annotations >= 1 and str(exported.path) in exported.summary(client.url)


@pytest.fixture
def own_labelstudio(tmp_path, labelstudio):
    """A second server, from the session's template, that `make clean-all` may wipe."""
    home = tmp_path / "labelstudio"
    shutil.copytree(TEMPLATE, home)
    server = LabelStudioServer(
        home, free_port(), read_env_file(home / "env")["XBL_LABEL_STUDIO_TOKEN"]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_make_clean_all_exports_before_it_wipes(own_labelstudio, tmp_path):
    server = own_labelstudio
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "Makefile", project / "Makefile")
    for package in ("infra", "services", "xbl"):
        (project / package).symlink_to(REPO / package)
    (project / ".venv").symlink_to(REPO / ".venv")
    (project / "data" / "feedback" / "round-1").mkdir(parents=True)
    (project / "data" / "feedback" / "round-1" / "manifest.csv").write_text("image_id\n7\n")
    annotation = annotate(ls.connect(server.url, server.token), "safety-clean-all", "ok")

    mine = ("LABEL_STUDIO_", "XBL_LABEL_STUDIO_", "MAKE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(mine)}
    env.update(
        XBL_LABEL_STUDIO_HOME=str(server.home),
        XBL_LABEL_STUDIO_PORT=str(server.port),
        XBL_LABEL_STUDIO_VENV=str(LS_VENV),
    )
    done = subprocess.run(
        ["make", "--no-print-directory", "clean-all"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    [export] = (project / "exports").glob("labelstudio-*.json")
    assert str(Path("exports") / export.name) in done.stdout  # says where
    assert exported_verdicts(export)[annotation] == ["ok"]
    assert not (server.home / "data").exists()  # wiped only after the export
    [masks] = (project / "exports").glob("feedback-*")
    assert (masks / "feedback" / "round-1" / "manifest.csv").read_text() == "image_id\n7\n"
    assert not (project / "data" / "feedback").exists()
