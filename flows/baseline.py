"""prepare → train → evaluate: the baseline on DVC-versioned data, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from services import tracking
from tasks.data import prepare_data
from tasks.links import link_mlflow_runs
from tasks.runs import (
    close_run,
    log_model_run,
    log_probe_saliency,
    open_parent_run,
    publish_table,
    set_model_alias,
    start_model_run,
)
from tasks.training import evaluate_checkpoint, train_baseline
from xbl.config import TrainConfig, as_params, fingerprint, load_config, with_overrides


def run_dir(project: Path) -> Path:
    """Checkpoints of this flow run, under the project (git-ignored)."""
    return project / "runs" / (flow_run.get_name() or "local")


def baseline_fingerprint(train: TrainConfig) -> str:
    """What a baseline is reused by, beside the data version: the train settings that would
    retrain it (where it runs does not change what it learns)."""
    return fingerprint(train, ignore=("device", "devices", "loader_workers"))


@flow(name="xbl-baseline", log_prints=True)
def baseline_flow(
    project: str = ".",
    params_file: str = "params.yaml",
    train_model: str | None = None,
    train_lr: float | None = None,
    train_epochs: int | None = None,
) -> dict:
    """Prepare the data, train the baseline, log it. A setting left empty is params.yaml's;
    one given replaces it for this run only, checked as the file's value is.

    Args:
        project: the project folder (params.yaml, dvc.yaml, data/)
        params_file: the settings file, relative to the project
        train_model: small_cnn, resnet18 or resnet34; empty: train.model
        train_lr: the learning rate; empty: train.lr
        train_epochs: the most epochs (early stopping may end sooner); empty: train.epochs
    """
    root = Path(project).resolve()
    given = {"train.model": train_model, "train.lr": train_lr, "train.epochs": train_epochs}
    cfg = with_overrides(load_config(root / params_file), given)
    data = prepare_data(str(root), cfg.data.out, params_file)
    parent = open_parent_run(str(root), cfg.mlflow.experiment, "baseline", data.version)
    name = cfg.mlflow.model_name
    settings = {tracking.TRAIN_SETTINGS_TAG: baseline_fingerprint(cfg.train)}
    run = start_model_run(str(root), parent, "baseline", data.version, name, settings)
    trained = train_baseline(data.path, cfg.train, str(run_dir(root) / "baseline.pt"), run)
    evaluation = evaluate_checkpoint(trained.checkpoint, data.path)
    child = log_model_run(
        str(root),
        parent,
        "baseline",
        as_params(cfg.train),
        trained,
        evaluation,
        data.version,
        name,
        extra_tags=settings,
        run=run,
    )
    log_probe_saliency(str(root), child["run_id"], data.path, trained.checkpoint, 0)
    set_model_alias(str(root), name, "baseline", child["model_version"])
    close_run(str(root), parent)
    table = publish_table(
        {"baseline": child["metrics"]},
        "baseline-metrics",
        "Baseline: confounded validation vs decoy-randomized test",
    )
    link_mlflow_runs(str(root), cfg.mlflow.experiment, {"baseline": child["run_id"]})
    get_run_logger().info(
        "baseline run %s, model %s v%s", child["run_id"], name, child["model_version"]
    )
    return {
        "parent_run_id": parent,
        "baseline": child,
        "data_version": data.version,
        "table": table,
    }
