"""The one MLflow module: experiments, parent/child runs, their data versions (as datasets),
metrics (in batches), images, models and aliases.

Runs are addressed by id (never the thread-local active run), so Prefect may run these
calls on any worker thread.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from services import lock
from services import offline as _offline  # noqa: F401
from services.tracking_names import (  # noqa: F401  (this module's API too)
    CHAMPION,
    COMPARED_WITH_TAG,
    DATA_VERSION_TAG,
    DECISION_TAG,
    FEEDBACK_ROUNDS_TAG,
    FEEDBACK_VERSION_TAG,
    HOLDER_TAG,
    PROMOTED_TAG,
    PROMOTION_TAG,
    QUERY_MODEL_TAG,
    ROUND_TAG,
    TRAIN_SETTINGS_TAG,
    tracking_uri,
)
from xbl.paths import FEEDBACK_ROOT, round_name


def client_for(project: Path) -> MlflowClient:
    uri = tracking_uri(project)
    _point_fluent_api_at(uri)
    return MlflowClient(uri, uri)


def _point_fluent_api_at(uri: str) -> None:
    """mlflow.log_model and friends follow the global URI; set it without exporting it.

    mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ, which
    tracking_uri() reads as the user's choice: the first project a process touched would
    then capture every later project's runs and models (a scheduled worker serving two
    projects, a test session)."""
    exported = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in exported.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def experiment_id(client: MlflowClient, project: Path, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (Path(project).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(
    client: MlflowClient,
    exp_id: str,
    name: str,
    parent_id: str | None = None,
    tags: dict | None = None,
) -> str:
    tags = dict(tags or {})
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


@dataclass(frozen=True)
class ModelRun:
    """A model's run, started before its training so its curves reach MLflow as it trains."""

    project: str
    run_id: str


# what a model learnt from, as MLflow datasets: the prepared images (the DVC `prepare` stage's
# output) and, for a feedback model, every round's masks; name -> (DVC file, input context)
DVC_INPUTS = {
    "prepared": ("dvc.lock", "training"),
    "feedback": (f"{FEEDBACK_ROOT}.dvc", "feedback"),
}


def log_data_versions(
    client: MlflowClient, run_id: str, project: Path, versions: dict[str, str]
) -> None:
    """Each DVC-versioned input of the run (`versions`: a DVC_INPUTS name -> its DVC content
    hash) as a dataset whose digest is that hash, in one call: the UI's Datasets column."""
    inputs = []
    for name, md5 in versions.items():
        dvc_file, context = DVC_INPUTS[name]
        source = {"repo": str(Path(project).resolve()), "dvc_file": dvc_file, "md5": md5}
        dataset = Dataset(name, md5, "dvc", json.dumps(source))
        inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)


def log_images(client: MlflowClient, run_id: str, images: dict[str, Path], step: int) -> None:
    """PNG files as time-stepped images (key -> file): the UI's image charts show a key side
    by side across runs, with a slider over the steps (here: rounds)."""
    for key, path in images.items():
        client.log_image(run_id, mlflow.Image(str(path)), key=key, step=step)


def logged_images(client: MlflowClient, run_id: str, key: str) -> dict[int, str]:
    """The steps at which the run logged image `key`, each to its artifact path."""
    prefix = f"{key.replace('/', '~')}+step+"
    found = {}
    for item in client.list_artifacts(run_id, "images"):
        name = Path(item.path).name
        if name.startswith(prefix) and name.endswith(".png"):
            found[int(name[len(prefix) :].split("+")[0])] = item.path
    return found


# MLflow's limits on one log_batch call (mlflow.utils.validation)
BATCH_METRICS, BATCH_PARAMS_OR_TAGS, BATCH_ENTITIES = 1000, 100, 1000


def log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: dict | None = None,
    params: dict | None = None,
    tags: dict | None = None,
) -> None:
    """Metrics (the finite ones, at step 0), nested params (as dotted keys) and tags, in as few
    calls as MLflow's limits allow: one request, where one call per value was one each."""
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    _log_entities(client, run_id, _metric_list(metrics or {}), _flat_params(params or {}), tag_list)


def _log_entities(
    client: MlflowClient,
    run_id: str,
    metrics: list[Metric] = (),
    params: list[Param] = (),
    tags: list[RunTag] = (),
) -> None:
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, t = params[:BATCH_PARAMS_OR_TAGS], tags[:BATCH_PARAMS_OR_TAGS]
        m = metrics[: min(BATCH_METRICS, BATCH_ENTITIES - len(p) - len(t))]
        client.log_batch(run_id, metrics=m, params=p, tags=t)
        metrics, params, tags = metrics[len(m) :], params[len(p) :], tags[len(t) :]


def _metric_list(metrics: dict) -> list[Metric]:
    now = _now_ms()
    return [
        Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)
    ]


def _flat_params(params: dict, prefix: str = "") -> list[Param]:
    """Nested settings as dotted keys (MLflow params are flat strings)."""
    flat = []
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat += _flat_params(value, prefix=f"{name}.")
        else:
            flat.append(Param(name, str(value)))
    return flat


def log_params(client: MlflowClient, run_id: str, params: dict, prefix: str = "") -> None:
    _log_entities(client, run_id, params=_flat_params(params, prefix))


def _curve_metrics(row: dict) -> list[Metric]:
    """An epoch's row of the learning curves, under `curve/` so they never shadow the final
    metrics of the best epoch; step = the epoch."""
    now, step = _now_ms(), int(row["epoch"])
    return [Metric(f"curve/{k}", float(v), now, step) for k, v in row.items() if k != "epoch"]


def log_history(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    _log_entities(client, run_id, [m for row in history for m in _curve_metrics(row)])


def epoch_logger(client: MlflowClient, run_id: str) -> Callable[[dict], None]:
    """A training callback: each epoch's row to the run as it ends, in one log_batch call."""
    return lambda row: _log_entities(client, run_id, _curve_metrics(row))


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    """The epochs whose curves the run holds (logged live, or by an earlier attempt)."""
    return {m.step for m in client.get_metric_history(run_id, "curve/val_loss")}


def log_metrics(client: MlflowClient, run_id: str, metrics: dict) -> None:
    log_batch(client, run_id, metrics=metrics)


def log_series(client: MlflowClient, run_id: str, key: str, values: list[float]) -> None:
    """One metric's values at steps 0, 1, ... (one per task, say), in batches."""
    now = _now_ms()
    _log_entities(client, run_id, [Metric(key, float(v), now, i) for i, v in enumerate(values)])


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_file(
    client: MlflowClient, run_id: str, path: Path, artifact_dir: str | None = None
) -> None:
    client.log_artifact(run_id, str(path), artifact_dir)


def log_confusion_matrix(
    client: MlflowClient,
    run_id: str,
    cm: np.ndarray,
    classes: list[str],
    name: str = "confusion_matrix.png",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
    )
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        client.log_artifact(run_id, str(path))


CLASSIFIER_CODE = Path(__file__).with_name("mlflow_classifier.py")


def log_model(
    run_id: str, model, channels: int, size: int, classes: list[str], registered_name: str
) -> str:
    """Log and register the model as a pyfunc that loads with only mlflow, numpy and torch
    (services/mlflow_classifier.py): the network as a `torch.export` program with a dynamic
    batch, the class names, an input example and pinned requirements. `channels` and `size`:
    the images it takes, (N, channels, size, size) uint8. Returns the registered version."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    model = model.cpu().eval()
    example = np.zeros((1, channels, size, size), np.uint8)
    program = torch.export.export(
        model,
        (torch.zeros(2, channels, size, size),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    card = {"classes": list(classes), "channels": channels, "image_size": size}
    outputs = [ColSpec("string", "class"), ColSpec("double", "probability")]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, size, size))]),
        outputs=Schema([*outputs, *(ColSpec("float", f"p_{name}") for name in classes)]),
    )
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        torch.export.save(program, Path(tmp) / "model.pt2")
        (Path(tmp) / "card.json").write_text(json.dumps(card))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(CLASSIFIER_CODE),
            artifacts={"program": f"{tmp}/model.pt2", "card": f"{tmp}/card.json"},
            signature=signature,
            input_example=example,
            pip_requirements=model_requirements(),
            metadata=card,
            registered_model_name=registered_name,
        )
    return str(info.registered_model_version)


def model_requirements() -> list[str]:
    """What loading the model needs, pinned to what logged it (a local build tag such as
    `+cpu` dropped, so a CUDA machine installs its own build of the same release)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch", "numpy")]


def set_alias(client: MlflowClient, registered_name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(registered_name, alias, version)


def alias_version(client: MlflowClient, registered_name: str, alias: str):
    """The model version behind an alias, or None when the alias is not set."""
    try:
        return client.get_model_version_by_alias(registered_name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def run_exists(client: MlflowClient, run_id: str) -> bool:
    """Whether this store holds the run (and has not deleted it). Only the store's own "no
    such run" answers False: an outage raises, so a caller's retries wait it out instead of
    taking a live round for a lost one."""
    try:
        return client.get_run(run_id).info.lifecycle_stage != "deleted"
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def model_record(
    client: MlflowClient,
    registered_name: str,
    alias: str,
    data_version: str,
    tags: dict[str, str] | None = None,
):
    """The model behind `alias` as a record (run id, version, metrics), or None when the alias
    is unset, its run is gone or failed, it was trained on another data version (its figures
    are not comparable with this data's) or its run lacks one of `tags`."""
    version = alias_version(client, registered_name, alias)
    if version is None or not run_exists(client, version.run_id):
        return None
    run = client.get_run(version.run_id)
    wanted = {DATA_VERSION_TAG: data_version, **(tags or {})}
    if run.info.status != "FINISHED" or any(run.data.tags.get(k) != v for k, v in wanted.items()):
        return None
    return run_record(run, str(version.version))


def run_record(run, model_version: str | None) -> dict:
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "model_version": model_version,
        "metrics": dict(run.data.metrics),
    }


def latest_feedback_record(client: MlflowClient, exp_id: str, data_version: str):
    """The newest feedback model that finished its round on this data version, or None."""
    runs = client.search_runs(
        [exp_id],
        f"attributes.status = 'FINISHED' and tags.`{PROMOTION_TAG}` != '' and "
        f"tags.`{DATA_VERSION_TAG}` = '{data_version}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    versions = client.search_model_versions(f"run_id = '{runs[0].info.run_id}'")
    return run_record(runs[0], str(versions[0].version) if versions else None)


def round_parent(client: MlflowClient, exp_id: str, round_number: int, query_run: str) -> str:
    """The parent run of an open round: the one named for it that carries its query model."""
    runs = client.search_runs(
        [exp_id],
        f"attributes.run_name = '{round_name(round_number)}' and attributes.status != 'FAILED' and "
        f"tags.`{QUERY_MODEL_TAG}` = '{query_run}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise LookupError(
            f"round {round_number} is open in Label Studio, but the tracking store has no "
            f"parent run '{round_name(round_number)}' tagged {QUERY_MODEL_TAG}={query_run}"
        )
    return runs[0].info.run_id


def recorded_decision(client: MlflowClient, run_id: str) -> dict | None:
    raw = client.get_run(run_id).data.tags.get(DECISION_TAG)
    return json.loads(raw) if raw else None


def record_decision(client: MlflowClient, run_id: str, compared_with: str, decision: dict) -> None:
    """The decision on the candidate's run, its paired figures as metrics; the JSON tag last
    (its presence means the decision is complete)."""
    figures = (
        "p_value",
        "candidate_accuracy",
        "difference",
        "ci_low",
        "ci_high",
        "images",
        "level",
        "champion_evidence_explanation_score",
        "candidate_evidence_explanation_score",
    )
    log_batch(
        client,
        run_id,
        metrics={f"promotion/{k}": decision[k] for k in figures if k in decision},
        tags={COMPARED_WITH_TAG: compared_with, PROMOTED_TAG: str(decision["promoted"]).lower()},
    )
    client.set_tag(run_id, DECISION_TAG, json.dumps(decision))


def judged_comparisons(client: MlflowClient, candidate_run: str, data_version: str) -> int:
    """How many paired comparisons were decided before on this data version's images (in the
    candidate's experiment, the candidate's own excluded): the promotion level shrinks with
    each (xbl/judge/promotion.py, level_for). A wiped tracking store starts the count again."""
    exp_id = client.get_run(candidate_run).info.experiment_id
    runs = client.search_runs(
        [exp_id],
        f"tags.`{DECISION_TAG}` != '' and tags.`{DATA_VERSION_TAG}` = '{data_version}'",
        max_results=10000,
    )
    return sum(
        run.info.run_id != candidate_run
        and json.loads(run.data.tags[DECISION_TAG]).get("evidence", "none") != "none"
        for run in runs
    )


def finish_recorded_promotion(client: MlflowClient, run_id: str) -> None:
    """Carry out a recorded decision: the alias to the run's model when it was promoted, then
    the promotion tag that marks its round done. Idempotent."""
    decision = recorded_decision(client, run_id)
    if decision["promoted"]:
        for version in client.search_model_versions(f"run_id = '{run_id}'"):
            set_alias(client, version.name, CHAMPION, version.version)
    client.set_tag(run_id, PROMOTION_TAG, decision["reason"])


def _close_parent(client: MlflowClient, run) -> None:
    """The round's parent run, left RUNNING by a process that died after the decision."""
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id and client.get_run(parent_id).info.status == "RUNNING":
        client.set_terminated(parent_id)


def finish_recorded_promotions(client: MlflowClient, exp_id: str) -> list[str]:
    """A run that died between recording its decision and tagging its round done is finished
    from the record, never judged again nor discarded, and its round's parent run is closed.
    Returns the runs finished (their rounds' reports are still to draw)."""
    runs = client.search_runs(
        [exp_id], f"attributes.status = 'FINISHED' and tags.`{DECISION_TAG}` != ''"
    )
    unfinished = [r for r in runs if PROMOTION_TAG not in r.data.tags]
    for run in unfinished:
        finish_recorded_promotion(client, run.info.run_id)
        _close_parent(client, run)
    return [r.info.run_id for r in unfinished]


def download_checkpoint(client: MlflowClient, run_id: str, out_dir: Path) -> Path:
    """The checkpoint a model run logged (under `checkpoint/`)."""
    files = [a.path for a in client.list_artifacts(run_id, "checkpoint") if not a.is_dir]
    if not files:
        raise FileNotFoundError(f"run {run_id} logged no checkpoint")
    return download_artifact(client, run_id, files[0], out_dir / run_id)


def round_runs(client: MlflowClient, exp_id: str, round_number: int) -> list:
    return client.search_runs([exp_id], f"tags.`{ROUND_TAG}` = '{round_number}'")


def completed_rounds(client: MlflowClient, exp_id: str) -> set[int]:
    """Rounds whose feedback run finished all the way through promotion, and the rounds such
    a run learnt from (an orphaned round, once adopted, is done: its masks are on disk)."""
    runs = client.search_runs(
        [exp_id],
        f"attributes.status = 'FINISHED' and tags.`{PROMOTION_TAG}` != ''",
        max_results=5000,
    )
    done = set()
    for run in runs:
        tags = run.data.tags
        if ROUND_TAG in tags:
            done.add(int(tags[ROUND_TAG]))
        done |= {int(n) for n in tags.get(FEEDBACK_ROUNDS_TAG, "").split(",") if n}
    return done


def discard_incomplete_round(
    client: MlflowClient, exp_id: str, registered_name: str, round_number: int
) -> int:
    """A crash mid-retraining leaves a run without promotion: fail it and unregister its
    model, so a rerun starts the retraining clean. Returns how many runs were discarded."""
    runs = [
        run
        for run in round_runs(client, exp_id, round_number)
        if not (run.info.status == "FINISHED" and PROMOTION_TAG in run.data.tags)
    ]
    for run in runs:
        client.set_tag(run.info.run_id, ROUND_TAG, f"{round_number}-discarded")
    return _discard(client, runs, registered_name)


def discard_unpushed_round(
    client: MlflowClient, exp_id: str, registered_name: str, round_number: int
) -> int:
    """A run that died before pushing its round leaves a parent run and a registered baseline
    that no task points to: fail them and unregister it, so the rerun's baseline is the only
    one. Only an attempt whose holder is gone is discarded (`lock.holder_gone`, read from the
    parent's HOLDER_TAG): a parent still RUNNING because its run is alive is never touched.
    Returns how many attempts were discarded."""
    parents = client.search_runs(
        [exp_id],
        f"attributes.run_name = '{round_name(round_number)}' and attributes.status = 'RUNNING'",
    )
    dead = [p for p in parents if lock.holder_gone(round_holder(p))]
    for parent in dead:
        children = client.search_runs(
            [exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        _discard(client, [*children, parent], registered_name)
    return len(dead)


def round_holder(run) -> lock.Holder | None:
    """The run that opened a round's parent run, as recorded on it; None when not recorded."""
    return lock.Holder.from_json(run.data.tags.get(HOLDER_TAG))


def discard_unfinished_attempts(
    client: MlflowClient, exp_id: str, parent_id: str, name: str, registered_name: str
) -> int:
    """Before a retried step logs a model run again: fail the earlier attempt's run under the
    same parent and unregister its model, so a retry leaves one run and one version. (A parent
    has one child per name; an attempt that died after logging its model may already show as
    FINISHED, since MLflow's run context closes it.)"""
    runs = client.search_runs(
        [exp_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' and "
        f"attributes.run_name = '{name}' and "
        "attributes.status != 'FAILED'",
    )
    return _discard(client, runs, registered_name)


def _discard(client: MlflowClient, runs: list, registered_name: str) -> int:
    """Fail the runs and unregister their models, except the champion's: deleting it would
    take the alias with it and leave the registry without a champion."""
    for run in runs:
        unregister_models(client, run.info.run_id, registered_name)
        client.set_terminated(run.info.run_id, status="FAILED")
    return len(runs)


def unregister_models(client: MlflowClient, run_id: str, registered_name: str) -> None:
    """Delete the model versions the run registered, except the champion's."""
    champion = alias_version(client, registered_name, CHAMPION)
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if champion is None or str(version.version) != str(champion.version):
            client.delete_model_version(registered_name, version.version)


def download_artifact(client: MlflowClient, run_id: str, path: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(out_dir)))
