"""`dvc metrics` and `dvc plots` read the rounds: two rounds' files, written as the round report
writes them (the candidate's learning curves read back from a real MLflow store), in a git +
DVC project with this repository's dvc.yaml, read by the real DVC CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from services import dvc, tracking
from tasks.report import round_metrics

REPO = Path(__file__).resolve().parents[2]


def git(project: Path, *args: str) -> None:
    ident = ["-c", "user.name=xbl test", "-c", "user.email=test@xbl.invalid"]
    subprocess.run(["git", *ident, *args], cwd=project, check=True, capture_output=True)


def a_round(project: Path, n: int, audit: float, promoted: bool) -> None:
    """Round `n` as round_report records it: the comparison table, the decision, and the
    candidate's curves from its MLflow run."""
    client = tracking.client_for(project)
    exp = tracking.experiment_id(client, project, "xbl")
    run = tracking.start_run(client, exp, f"feedback-round-{n}")
    # a row as the training loop's history has it (a plot missing a field is not drawn)
    history = [
        {
            "epoch": e,
            "train_ce": 1 / (e + n),
            "train_feedback": 0.1 / e,
            "val_loss": 1.1 / (e + n),
            "val_accuracy": 0.5 + e / 9,
        }
        for e in (1, 2, 3)
    ]
    tracking.log_history(client, run, history)
    table = [
        {"role": "baseline", "model": "baseline", "audit_accuracy": 0.75, "val_accuracy": 0.9},
        {"role": "champion", "model": f"feedback-round-{n - 1}", "audit_accuracy": audit - 0.1},
        {"role": "candidate", "model": f"feedback-round-{n}", "audit_accuracy": audit},
    ]
    decision = {"promoted": promoted, "reason": "…", "p_value": 0.001 * n, "difference": 0.1}
    tracking.record_decision(client, run, "champion-run", decision)
    # the verdict alone, as `xbl report` passes it: the paired figures come from the run
    promotion = {"promoted": promoted, "reason": "…"}
    written = round_metrics(client, project, n, table, promotion, run)
    assert {p.name for p in written} == {"round.json", "rounds.csv", "curves.csv"}


def test_dvc_metrics_and_plots_show_the_rounds(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    git(project, "init", "-q")
    dvc.ensure_repo(project)
    a_round(project, 1, audit=0.85, promoted=True)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "round 1")
    a_round(project, 2, audit=0.9, promoted=False)

    shown = json.loads(dvc.dvc(project, "metrics", "show", "--json"))
    [workspace] = shown.values()  # DVC names the workspace "" here, "workspace" elsewhere
    latest = workspace["data"]["metrics/round.json"]["data"]
    assert latest["round"] == 2 and latest["candidate"]["audit_accuracy"] == 0.9
    assert latest["promoted"] is False and latest["p_value"] == 0.002
    print(dvc.dvc(project, "metrics", "show"))  # what a person sees: `pytest -s`

    diff = json.loads(dvc.dvc(project, "metrics", "diff", "HEAD", "--json"))
    changes = diff["metrics/round.json"]
    assert changes["round"] == {"old": 1, "new": 2, "diff": 1}
    assert changes["candidate.audit_accuracy"]["old"] == 0.85

    plots = json.loads(dvc.dvc(project, "plots", "diff", "HEAD", "--json"))["data"]
    by_rev = points(plots["audit-accuracy"], "candidate_audit_accuracy")
    assert by_rev == {"HEAD": {("1", "0.85")}, "workspace": {("1", "0.85"), ("2", "0.9")}}
    curves = points(plots["learning-curves"], "val_loss")
    assert {epoch for epoch, _ in curves["workspace"]} == {"1", "2", "3"}
    assert curves["HEAD"] != curves["workspace"]  # each round its own candidate's curves


def points(rendered: list[dict], field: str) -> dict[str, set[tuple[str, str]]]:
    """A plot's (x, y) points of one field, by git revision, from `dvc plots --json`."""
    [plot] = rendered
    x = plot["content"]["encoding"]["x"]["field"]
    out: dict[str, set] = {}
    for row in plot["content"]["data"]["values"]:
        if row["field"] == field:
            out.setdefault(row["rev"], set()).add((row[x], row["dvc_inferred_y_value"]))
    return out
