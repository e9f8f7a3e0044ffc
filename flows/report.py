"""`xbl report RUN_ID`: draw a finished round's report again from what MLflow and the
project hold (the round flow draws it once, at the end of the round)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.baseline import run_dir
from services import dvc
from tasks.report import round_report
from tasks.rounds import restore_checkpoint
from tasks.runs import compare_models, current_model, feedback_run_facts
from xbl.config import load_config
from xbl.paths import feedback_manifest, round_dir
from xbl.report.page import report_columns


@flow(name="xbl-round-report", log_prints=True)
def report_flow(run_id: str, project: str = ".", params_file: str = "params.yaml") -> str:
    root = Path(project).resolve()
    cfg = load_config(root / params_file)
    facts = feedback_run_facts(str(root), run_id)
    here = dvc.locked_out_hash(root, "prepare", cfg.data.out)
    if here != facts["data_version"]:
        raise ValueError(
            f"run {run_id} used data version {facts['data_version']}, the project holds {here}: "
            f"restore it first with `xbl data checkout {run_id}`"
        )
    baseline = current_model(str(root), cfg.mlflow.model_name, "baseline", here)
    roles = {
        "baseline": baseline["run_id"] if baseline else None,
        "champion": facts["compared_with"],
        "candidate": run_id,
    }
    roles = {role: run for role, run in roles.items() if run}
    n = facts["round"]
    manifests = [feedback_manifest(root, k) for k in facts["rounds"]]
    rounds = round_dir(root, n)
    return round_report(
        str(root),
        str(root / cfg.data.out),
        n,
        column_checkpoints(root, roles),
        roles,
        str(rounds / "queries.json"),
        [str(m) for m in manifests if m.is_file()],
        compare_models(str(root), roles),
        facts["promotion"],
        run_id,
        str(rounds),
    )


def column_checkpoints(
    root: Path, roles: dict[str, str], at_hand: dict[str, str] | None = None
) -> dict[str, str]:
    """The weights behind each column of the report (one column per model): a run's own
    checkpoint where the caller has it `at_hand` (run id to path), else downloaded from it."""
    at_hand = at_hand or {}
    return {
        title: at_hand.get(run) or restore_checkpoint(str(root), run, str(run_dir(root) / run))
        for title, run in report_columns(roles).items()
    }
