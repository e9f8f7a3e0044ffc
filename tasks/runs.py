"""MLflow steps: the flow's parent run, a child run per trained model, aliases, the table."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_table_artifact

from services import tracking
from services.faults import crash_point
from tasks import SERVICE_RETRIES
from xbl.config import PromotionConfig, QueryConfig
from xbl.data.prepared import PreparedData
from xbl.feedback.cost import annotation_budget, read_cost
from xbl.feedback.masks import read_feedback
from xbl.judge.evidence import correct_on, explanation_on, gather_evidence
from xbl.judge.paired import compare_paired
from xbl.judge.promotion import promotion_decision
from xbl.report.page import cost_columns, probe_indices, report_columns, saliency_grid
from xbl.train.checkpoint import load_model
from xbl.train.loop import TrainResult

HEADLINE = (
    "audit_accuracy",
    "val_accuracy",
    "test_accuracy",
    "val_macro_precision",
    "val_macro_recall",
    "min_val_loss",
    "val_explanation_score",
    "test_wrong_reason_share_deeplift",
    "test_activation_recall_gradcam",
)


@task(**SERVICE_RETRIES)
def open_parent_run(project: str, experiment: str, name: str, data_version: str) -> str:
    """One MLflow parent run per flow run; children hang under it."""
    client = tracking.client_for(Path(project))
    exp_id = tracking.experiment_id(client, Path(project), experiment)
    tags = {tracking.DATA_VERSION_TAG: data_version}
    run_id = tracking.start_run(client, exp_id, name, tags=tags)
    tracking.log_data_versions(client, run_id, Path(project), _data_versions(tags))
    return run_id


@task(**SERVICE_RETRIES)
def start_model_run(
    project: str,
    parent_id: str,
    name: str,
    data_version: str,
    registered_name: str,
    extra_tags: dict | None = None,
) -> tracking.ModelRun:
    """The model's child run, started before its training so the training task logs each
    epoch to it as it ends; with its data versions as MLflow datasets. A retry, or a rerun of
    the step, first fails the earlier attempt's run and unregisters its model."""
    tags = {tracking.DATA_VERSION_TAG: data_version, **(extra_tags or {})}
    return tracking.ModelRun(project, _start(project, parent_id, name, registered_name, tags))


def _start(project: str, parent_id: str, name: str, registered_name: str, tags: dict) -> str:
    client = tracking.client_for(Path(project))
    exp_id = client.get_run(parent_id).info.experiment_id
    tracking.discard_unfinished_attempts(client, exp_id, parent_id, name, registered_name)
    run_id = tracking.start_run(client, exp_id, name, parent_id, tags)
    tracking.log_data_versions(client, run_id, Path(project), _data_versions(tags))
    return run_id


def _data_versions(tags: dict) -> dict[str, str]:
    """What the run learnt from, by DVC version: the prepared data and any feedback masks."""
    versions = {"prepared": tags[tracking.DATA_VERSION_TAG]}
    if tracking.FEEDBACK_VERSION_TAG in tags:
        versions["feedback"] = tags[tracking.FEEDBACK_VERSION_TAG]
    return versions


@task(**SERVICE_RETRIES)
def log_model_run(
    project: str,
    parent_id: str,
    name: str,
    params: dict,
    trained: TrainResult,
    evaluation: dict,
    data_version: str,
    registered_name: str,
    extra_tags: dict | None = None,
    extra_files: tuple[str, ...] = (),
    run: tracking.ModelRun | None = None,
) -> dict:
    """A child run with settings, per-epoch curves, final metrics, confusion matrix and model:
    `run` when the training logged to it (start_model_run), else a new one."""
    root = Path(project)
    client = tracking.client_for(root)
    tags = {tracking.DATA_VERSION_TAG: data_version, **(extra_tags or {})}
    run_id = run.run_id if run else _start(project, parent_id, name, registered_name, tags)
    # a retry of this step must not leave the failed attempt's model version behind
    tracking.unregister_models(client, run_id, registered_name)
    live = tracking.logged_epochs(client, run_id)
    tracking.log_history(client, run_id, [r for r in trained.history if r["epoch"] not in live])
    final = _final_metrics(trained, evaluation)
    tracking.log_batch(client, run_id, final, {**params, "device": trained.device}, tags)
    crash_point("mlflow-logging")  # fault drill: the run started, its model not logged
    tracking.log_confusion_matrix(
        client, run_id, np.array(evaluation["confusion_matrix"]), evaluation["classes"]
    )
    tracking.log_file(client, run_id, Path(trained.checkpoint), "checkpoint")
    for path in (root / "dvc.lock", *map(Path, extra_files)):
        if path.is_file():
            tracking.log_file(client, run_id, path)
    model, meta = load_model(trained.checkpoint)
    version = tracking.log_model(
        run_id,
        model,
        meta["in_channels"],
        meta["image_size"],
        evaluation["classes"],
        registered_name,
    )
    client.set_terminated(run_id)
    return {"run_id": run_id, "name": name, "model_version": version, "metrics": final}


def _final_metrics(trained: TrainResult, evaluation: dict) -> dict:
    final = {
        **evaluation["metrics"],
        "min_val_loss": trained.min_val_loss,
        "best_epoch": trained.best_epoch,
    }
    if trained.effective_lambda is not None:
        final["effective_lambda"] = trained.effective_lambda
    return final


@task(**SERVICE_RETRIES)
def log_probe_saliency(
    project: str, run_id: str, dataset: str, checkpoint: str, round_number: int
) -> str:
    """The model's saliency maps of the fixed probe images (the report's probes: the same
    held-out images every round) as image `saliency/probes` at step `round_number` (0: a
    baseline), so MLflow's image charts set runs side by side and slide over the rounds."""
    client = tracking.client_for(Path(project))
    data = PreparedData.load(Path(dataset))
    model = load_model(checkpoint)[0]
    title = client.get_run(run_id).info.run_name
    with tempfile.TemporaryDirectory() as tmp:
        grid = saliency_grid({title: model}, data, probe_indices(data), Path(tmp) / "probes.png")
        tracking.log_images(client, run_id, {PROBE_SALIENCY: grid}, round_number)
    return PROBE_SALIENCY


PROBE_SALIENCY = "saliency/probes"


def _cluster_params(clusters_json: str) -> dict:
    record = json.loads(Path(clusters_json).read_text())
    return {
        "cluster.k": record["k"],
        "cluster.selection": record["selection"],
        "cluster.tasks": len(record["queried"]),
    }


@task(**SERVICE_RETRIES)
def log_round_clusters(project: str, run_id: str, clusters_json: str) -> None:
    """A cluster round's clusters (k, how k was chosen, members) on the round's run."""
    client = tracking.client_for(Path(project))
    tracking.log_params(client, run_id, _cluster_params(clusters_json))
    tracking.log_file(client, run_id, Path(clusters_json), "clusters")


ROUND_COST = (
    "tasks_opened",
    "answers",
    "members_reviewed",
    "regions_relabelled",
    "annotator_seconds",
    "seconds_per_task",
    "propagated_masks",
    "confident",
    "review_tasks",
    "reviewed",
    "accepted",
    "rejected",
)


@task(**SERVICE_RETRIES)
def log_round_annotation(
    project: str, run_id: str, manifests: list[str], clusters_json: str | None = None
) -> dict:
    """What the feedback cost, on the feedback run: this round's annotator actions and seconds
    (`round/…`, each task's seconds as `round/task_seconds` by step) and, for a cluster round,
    how its answers spread; `annotator_seconds` over every round the model learnt from (the
    comparison table's cost column); cost.json and clusters.json as artifacts."""
    client = tracking.client_for(Path(project))
    cost = read_cost(manifests[-1])
    tracking.log_metrics(client, run_id, {f"round/{k}": cost[k] for k in ROUND_COST if k in cost})
    seconds = [item["seconds"] for item in cost.get("per_task", [])]
    tracking.log_series(client, run_id, "round/task_seconds", seconds)
    budget = annotation_budget(manifests)
    tracking.log_metrics(
        client,
        run_id,
        {
            "annotator_seconds": budget["annotator_seconds"],
            "annotator_tasks": budget["answers"] + budget["reviews"],
        },
    )
    cost_file = Path(manifests[-1]).parent / "cost.json"
    if cost_file.is_file():
        tracking.log_file(client, run_id, cost_file, "annotation")
    if clusters_json and Path(clusters_json).is_file():
        tracking.log_params(client, run_id, _cluster_params(clusters_json))
        tracking.log_file(client, run_id, Path(clusters_json), "clusters")
    return cost


@task(**SERVICE_RETRIES)
def set_model_alias(project: str, registered_name: str, alias: str, version: str) -> None:
    tracking.set_alias(tracking.client_for(Path(project)), registered_name, alias, version)


@task(**SERVICE_RETRIES)
def close_run(project: str, run_id: str) -> None:
    tracking.client_for(Path(project)).set_terminated(run_id)


@task
def publish_table(rows: dict[str, dict], key: str, description: str) -> list[dict]:
    """Headline metrics per model as a Prefect table artifact (and returned for printing)."""
    table = [
        {"model": name, **{m: round(float(metrics[m]), 4) for m in HEADLINE if m in metrics}}
        for name, metrics in rows.items()
    ]
    create_table_artifact(table=table, key=key, description=description)
    return table


@task(**SERVICE_RETRIES)
def current_model(
    project: str,
    registered_name: str,
    alias: str,
    data_version: str,
    tags: dict[str, str] | None = None,
) -> dict | None:
    """The model behind `alias` trained on this data version (and carrying `tags`), or None."""
    client = tracking.client_for(Path(project))
    return tracking.model_record(client, registered_name, alias, data_version, tags)


@task(**SERVICE_RETRIES)
def tag_run(project: str, run_id: str, tags: dict[str, str]) -> None:
    tracking.log_batch(tracking.client_for(Path(project)), run_id, tags=tags)


@task(**SERVICE_RETRIES)
def promote(
    project: str,
    registered_name: str,
    data_version: str,
    baseline: dict,
    candidate: dict,
    rule: PromotionConfig,
    dataset: str,
    manifests: list[str],
    query: QueryConfig,
) -> dict:
    """Move alias `champion` to the candidate when it beats the current champion (the
    baseline while there is none) on shortcut-free evidence. A rejected candidate leaves the
    champion as it was: the shortcut baseline is never made champion by default.

    Atomic: the decision and the run it was compared with are recorded on the candidate's run
    before the alias moves, and the promotion tag (a round is done once its run has one) comes
    last. A retry reads the recorded decision back instead of judging again (by then the
    champion may be the candidate itself), and a crashed round is finished from it
    (tracking.finish_recorded_promotion)."""
    client = tracking.client_for(Path(project))
    decision = tracking.recorded_decision(client, candidate["run_id"])
    if decision is None:
        champion = (
            tracking.model_record(client, registered_name, "champion", data_version) or baseline
        )
        earlier = tracking.judged_comparisons(client, candidate["run_id"], data_version)
        decision = _judge(
            client, champion, baseline, candidate, rule, dataset, manifests, query, earlier
        )
        tracking.record_decision(client, candidate["run_id"], champion["run_id"], decision)
    crash_point("promotion")  # fault drill: the decision recorded, not carried out
    tracking.finish_recorded_promotion(client, candidate["run_id"])
    champion = tracking.run_record(client.get_run(decision["compared_with"]), None)
    return {**decision, "champion": champion}


def _judge(client, champion, baseline, candidate, rule, dataset, manifests, query, earlier) -> dict:
    """The decision as a record: promote?, why, on what evidence, the paired figures; the
    `earlier + 1`-th comparison on these images."""
    data = PreparedData.load(Path(dataset))
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            role: load_model(tracking.download_checkpoint(client, record["run_id"], Path(tmp)))[0]
            for role, record in (
                ("champion", champion),
                ("candidate", candidate),
                ("localiser", baseline),
            )
        }
    marks = read_feedback(manifests, data)
    evidence = gather_evidence(
        data,
        models["localiser"],
        marks.rows,
        marks.ignore,
        query.grid_cell,
        query.review_confidence,
    )
    comparison, metrics = None, {"champion": champion["metrics"], "candidate": candidate["metrics"]}
    if evidence is not None:
        comparison = compare_paired(
            correct_on(models["champion"], evidence), correct_on(models["candidate"], evidence)
        )
        for role in metrics:
            metrics[role] = {**metrics[role], **_evidence_explanation(models[role], evidence)}
    decision = promotion_decision(
        comparison,
        evidence.describe() if evidence else "none",
        metrics["champion"],
        metrics["candidate"],
        rule,
        earlier,
    )
    return {
        **decision.record(),
        **{
            f"{role}_{k}": v for role, m in metrics.items() for k, v in m.items() if "evidence" in k
        },
        "compared_with": champion["run_id"],
    }


def _evidence_explanation(model, evidence) -> dict:
    found = explanation_on(model, evidence)
    if found is None or found["score"] is None:
        return {}
    return {
        "evidence_explanation_score": found["score"],
        "evidence_dead_map_share": found["dead_map_share"],
    }


@task(**SERVICE_RETRIES)
def feedback_run_facts(project: str, run_id: str) -> dict:
    """What a finished feedback run recorded about its round: number, data version, the
    rounds it learnt from, the champion it was judged against and the decision."""
    run = tracking.client_for(Path(project)).get_run(run_id)
    tags = run.data.tags
    if tracking.PROMOTION_TAG not in tags:
        raise ValueError(f"run {run_id} is not a finished feedback run (it has no promotion tag)")
    return {
        "round": int(tags[tracking.ROUND_TAG]),
        "data_version": tags[tracking.DATA_VERSION_TAG],
        "rounds": [int(k) for k in tags.get(tracking.FEEDBACK_ROUNDS_TAG, "").split(",") if k],
        "compared_with": tags.get(tracking.COMPARED_WITH_TAG),
        "promotion": {
            "promoted": tags.get(tracking.PROMOTED_TAG) == "true",
            "reason": tags[tracking.PROMOTION_TAG],
        },
    }


COMPARED = (
    "audit_accuracy",
    "val_accuracy",
    "test_accuracy",
    "val_explanation_score",
    "test_wrong_reason_share_deeplift",
    "test_wrong_reason_share_gradcam",
    "test_wrong_reason_share_inputgrad",
    "annotator_seconds",
)


@task(**SERVICE_RETRIES)
def compare_models(project: str, runs: dict[str, str]) -> list[dict]:
    """Models side by side as MLflow has them: `runs` maps a role (baseline, champion,
    candidate) to a run id; a run in two roles is shown once, under both names."""
    client = tracking.client_for(Path(project))
    rows = []
    for role, run_id in report_columns(runs).items():
        run = client.get_run(run_id)
        metrics = run.data.metrics
        rows.append(
            {
                "role": role,
                "model": run.info.run_name,
                **{m: round(metrics[m], 4) for m in COMPARED if m in metrics},
            }
        )
    rows = cost_columns(rows)
    create_table_artifact(
        table=rows,
        key="baseline-champion-candidate",
        description="Read back from MLflow: the baseline, the champion judged against, the candidate",
    )
    return rows
