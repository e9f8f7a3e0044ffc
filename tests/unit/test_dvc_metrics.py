"""The rounds' figures as files DVC reads (xbl/report/rounds.py), dvc.yaml naming what they
hold, and dvc.lock being what `dvc repro` would record for the files as they are."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xbl.config import TrainConfig
from xbl.errors import DataError
from xbl.report.rounds import (
    CURVES_FILE,
    METRICS_ROOT,
    ROUND_COLUMNS,
    ROUND_FILE,
    ROUNDS_FILE,
    round_record,
    write_round_metrics,
)
from xbl.train.loop import training_loop
from xbl.train.models import SmallCNN

REPO = Path(__file__).resolve().parents[2]
DVC = [sys.executable, "-m", "dvc"]


def a_table(audit: float = 0.75, candidate_audit: float = 0.94) -> list[dict]:
    figures = {"val_accuracy": 0.9, "test_accuracy": 0.74, "val_explanation_score": 0.3}
    return [
        {"role": "baseline = champion", "model": "baseline", "audit_accuracy": audit, **figures},
        {"role": "candidate", "model": "feedback-round-1", "audit_accuracy": candidate_audit},
    ]


PROMOTED = {"promoted": True, "reason": "better", "p_value": 4.7e-16, "difference": 0.19}
CURVES = [{"epoch": 2, "train_ce": 0.5, "val_loss": 0.6}, {"epoch": 1, "train_ce": 1.0}]


def rounds(folder: Path) -> list[dict]:
    with (folder / ROUNDS_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_shared_row_stands_for_each_role_and_a_missing_figure_is_left_out():
    record = round_record(3, [*a_table(), {"role": "x", "audit_accuracy": 1.0}], PROMOTED)
    assert record["round"] == 3 and record["promoted"] is True
    assert record["baseline"] == record["champion"]
    assert record["candidate"] == {"audit_accuracy": 0.94}  # no val figures: none invented
    assert "x" not in record
    assert record["p_value"] == 4.7e-16  # not rounded to 0: DVC shows what it gets
    assert "level" not in record


def test_no_evidence_means_no_p_value_and_nan_is_left_out():
    table = [{"role": "candidate", "audit_accuracy": float("nan"), "val_accuracy": 0.8}]
    record = round_record(1, table, {"promoted": False, "reason": "no evidence"})
    assert record == {"round": 1, "promoted": False, "candidate": {"val_accuracy": 0.8}}
    json.dumps(record, allow_nan=False)


def test_the_files_hold_the_round_and_a_round_written_again_replaces_its_row(tmp_path):
    folder = tmp_path / METRICS_ROOT
    written = write_round_metrics(folder, 1, a_table(), PROMOTED, CURVES)
    assert sorted(p.name for p in written) == sorted([ROUND_FILE, ROUNDS_FILE, CURVES_FILE])
    first = {p: p.read_text() for p in written}
    write_round_metrics(folder, 1, a_table(), PROMOTED, CURVES)
    assert {p: p.read_text() for p in written} == first
    write_round_metrics(folder, 1, a_table(audit=0.5), PROMOTED, CURVES)
    [row] = rounds(folder)
    assert row["round"] == "1" and row["baseline_audit_accuracy"] == "0.5"
    assert row["champion_audit_accuracy"] == "0.5" and row["promoted"] == "1"
    assert row["candidate_val_accuracy"] == ""  # the candidate's row had none
    assert list(row) == list(ROUND_COLUMNS)
    assert json.loads((folder / ROUND_FILE).read_text())["baseline"]["audit_accuracy"] == 0.5
    assert not list(folder.glob(".*.tmp"))


def test_rounds_stay_in_order_and_an_earlier_round_leaves_the_latest_files(tmp_path):
    folder = tmp_path / METRICS_ROOT
    write_round_metrics(folder, 2, a_table(candidate_audit=0.96), PROMOTED, CURVES)
    latest = {name: (folder / name).read_text() for name in (ROUND_FILE, CURVES_FILE)}
    written = write_round_metrics(folder, 1, a_table(), {"promoted": False}, [])
    assert [p.name for p in written] == [ROUNDS_FILE]
    assert [r["round"] for r in rounds(folder)] == ["1", "2"]
    assert {name: (folder / name).read_text() for name in latest} == latest
    assert json.loads((folder / ROUND_FILE).read_text())["round"] == 2


def test_the_curves_are_one_row_per_epoch_in_order(tmp_path):
    folder = tmp_path / METRICS_ROOT
    write_round_metrics(folder, 1, a_table(), PROMOTED, CURVES)
    lines = (folder / CURVES_FILE).read_text().splitlines()
    assert lines == ["epoch,train_ce,val_loss", "1,1.0,", "2,0.5,0.6"]
    write_round_metrics(folder, 2, a_table(), PROMOTED, [])
    assert (folder / CURVES_FILE).read_text() == "epoch\n"  # not round 1's curves


def test_a_bad_rounds_file_names_every_bad_row_and_nothing_is_written(tmp_path):
    folder = tmp_path / METRICS_ROOT
    folder.mkdir()
    bad = "round,promoted\n1,1\nlast,0\n2,1\n,0\n"
    (folder / ROUNDS_FILE).write_text(bad)
    with pytest.raises(DataError, match=r"row 3: round 'last'; row 5: round ''"):
        write_round_metrics(folder, 3, a_table(), PROMOTED, CURVES)
    assert (folder / ROUNDS_FILE).read_text() == bad
    assert sorted(p.name for p in folder.iterdir()) == [ROUNDS_FILE]


# --- dvc.yaml names what the files hold --------------------------------------------------------


def declared() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def plotted(path: str) -> set[str]:
    """The fields dvc.yaml's plots read from `path`, x and y."""
    fields = set()
    for plot in declared()["plots"]:
        [spec] = plot.values()
        if path in spec["y"]:
            fields |= {spec["x"], *spec["y"][path]}
    return fields


def test_dvc_yaml_declares_the_files_the_report_writes():
    assert declared()["metrics"] == [f"{METRICS_ROOT}/{ROUND_FILE}"]
    assert plotted(f"{METRICS_ROOT}/{ROUNDS_FILE}") <= set(ROUND_COLUMNS)
    assert plotted(f"{METRICS_ROOT}/{ROUNDS_FILE}") and plotted(f"{METRICS_ROOT}/{CURVES_FILE}")


def test_the_plotted_curves_are_ones_training_records():
    """dvc.yaml's learning curves name the keys of the training loop's history, which MLflow
    holds as `curve/<key>` and the report writes to curves.csv."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 4, (16,))
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=8, patience=0)
    history = training_loop(SmallCNN(n_classes=4), (x, y), (x, y), cfg).history
    assert plotted(f"{METRICS_ROOT}/{CURVES_FILE}") <= set(history[0])


# --- dvc.lock ----------------------------------------------------------------------------------


def test_the_committed_dvc_lock_is_what_dvc_repro_would_record(tmp_path):
    """`dvc status` on a copy of the files a clone has (tracked, or new and not ignored): the
    stage's command, dependencies and settings must be those dvc.lock records. Its output
    (data/prepared) is not in a clone, so only it may differ."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    status = subprocess.run(
        [*DVC, "status", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    stale = {
        stage: [change for change in changes if set(change) != {"changed outs"}]
        for stage, changes in json.loads(status.stdout).items()
    }
    assert not any(stale.values()), (
        f"dvc.lock is stale: {stale}. Record the stage again with `PATH=.venv/bin:$PATH "
        "dvc repro prepare` (a few seconds; data/prepared comes out the same when only code changed) "
        "and commit dvc.lock"
    )
