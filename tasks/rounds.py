"""Round state, read from the services: Label Studio has what was pushed and answered,
MLflow what was retrained and promoted, DVC the masks. No process has to stay alive."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task

from services import labelstudio as ls
from services import tracking
from tasks import SERVICE_RETRIES
from xbl.data.prepared import PreparedData
from xbl.errors import DataError


@dataclass(frozen=True)
class RoundState:
    number: int  # the round this run works on
    open: bool  # pushed earlier and not yet retrained: resume it
    query_run_id: str | None  # the model that chose the round's queries and drew their maps
    completed: tuple[int, ...]
    queried: tuple[str, ...]  # image ids in any round: never asked twice
    project_id: int | None  # the experiment's Label Studio project, once pushed to
    project_url: str | None
    orphaned: tuple[int, ...] = ()  # pushed rounds whose baseline this MLflow store lacks
    # feedback runs whose promotion this run finished from the record (a crash came between
    # the decision and the round's end): their reports are drawn before the next round
    finished_from_record: tuple[str, ...] = ()


@task(**SERVICE_RETRIES)
def read_round_state(project: str, experiment: str, title: str) -> RoundState:
    """Which round this run works on, from what Label Studio and MLflow hold.

    A round pushed to Label Studio whose baseline run the tracking store does not have (the
    store was wiped, or points elsewhere) cannot be resumed: it is orphaned, its annotations
    stay in Label Studio and join the next retraining, and this run opens a new round."""
    client, exp_id = _experiment(project, experiment)
    finished = tuple(tracking.finish_recorded_promotions(client, exp_id))
    if finished:
        get_run_logger().warning(
            "finished the promotion of run(s) %s from the decision recorded before a crash; "
            "drawing their round reports",
            list(finished),
        )
    completed = tracking.completed_rounds(client, exp_id)
    labelstudio = ls.connect()
    pushed = ls.pushed_rounds(labelstudio, title)
    url = ls.project_link(labelstudio, pushed.project_id) if pushed.project_id else None
    unfinished = sorted(set(pushed.rounds) - completed)
    orphaned = tuple(n for n in unfinished if not tracking.run_exists(client, pushed.rounds[n]))
    if orphaned:
        get_run_logger().warning(
            "Label Studio project %r (%s) holds round(s) %s whose baseline runs are not in the "
            "MLflow store %s (wiped, or another store?): they cannot be resumed; their "
            "annotations stay in Label Studio and join this round's retraining. `make "
            "clean-all` clears both stores for a fresh start.",
            title,
            url,
            list(orphaned),
            client.tracking_uri,
        )
    open_rounds = [n for n in unfinished if n not in orphaned]
    done, asked = tuple(sorted(completed)), tuple(sorted(pushed.queried))
    if open_rounds:
        n = open_rounds[-1]
        return RoundState(
            n, True, pushed.rounds[n], done, asked, pushed.project_id, url, orphaned, finished
        )
    n = max([*completed, *pushed.rounds, 0]) + 1
    return RoundState(n, False, None, done, asked, pushed.project_id, url, orphaned, finished)


def _experiment(project: str, experiment: str):
    client = tracking.client_for(Path(project))
    return client, tracking.experiment_id(client, Path(project), experiment)


def _discard_logged(
    discard, client, exp_id: str, registered_name: str, round_number: int, what: str
) -> int:
    """Run one of tracking's discard_* cleanups and say in the run's log what it removed."""
    discarded = discard(client, exp_id, registered_name, round_number)
    if discarded:
        get_run_logger().warning("round %d: discarded %d %s", round_number, discarded, what)
    return discarded


@task(**SERVICE_RETRIES)
def discard_unpushed(project: str, experiment: str, registered_name: str, round_number: int) -> int:
    """Before a new round trains its baseline: clear what an earlier attempt at this round left
    in MLflow when it died before the push (Label Studio has no task of it)."""
    client, exp_id = _experiment(project, experiment)
    return _discard_logged(
        tracking.discard_unpushed_round,
        client,
        exp_id,
        registered_name,
        round_number,
        "attempt(s) that died before the push",
    )


@task(**SERVICE_RETRIES)
def resume_round(
    project: str, experiment: str, registered_name: str, n: int, query_run: str
) -> str:
    """The open round's parent run, once any half-done retraining of it is discarded."""
    client, exp_id = _experiment(project, experiment)
    _discard_logged(
        tracking.discard_incomplete_round,
        client,
        exp_id,
        registered_name,
        n,
        "unfinished retraining run(s)",
    )
    return tracking.round_parent(client, exp_id, n, query_run)


@task(**SERVICE_RETRIES)
def query_model(
    project: str, experiment: str, registered_name: str, data_version: str, which: str
) -> dict | None:
    """The model that chooses this round's queries (`query.model`): the champion, or the
    newest feedback model; None when there is none yet on this data version (the baseline
    then chooses)."""
    client, exp_id = _experiment(project, experiment)
    if which == "latest":
        return tracking.latest_feedback_record(client, exp_id, data_version)
    return tracking.model_record(client, registered_name, "champion", data_version)


@task(**SERVICE_RETRIES)
def model_of_run(project: str, run_id: str) -> dict:
    """A logged model's record (run id, version, metrics), by its run."""
    client = tracking.client_for(Path(project))
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    return tracking.run_record(
        client.get_run(run_id), str(versions[0].version) if versions else None
    )


@task(**SERVICE_RETRIES)
def restore_checkpoint(project: str, run_id: str, out_dir: str) -> str:
    """A logged model's checkpoint, downloaded from its run."""
    client = tracking.client_for(Path(project))
    checkpoint = tracking.download_artifact(client, run_id, "checkpoint", Path(out_dir))
    return str(next(checkpoint.glob("*.pt")))


@task(**SERVICE_RETRIES)
def queries_from_labelstudio(project_id: int, round_number: int, dataset: str, out_dir: str) -> str:
    """Rebuild a resumed (or orphaned) round's queries.json from its tasks: what annotators
    actually saw."""
    data = PreparedData.load(Path(dataset))
    index = {str(image_id): i for i, image_id in enumerate(data.ids)}
    tasks = ls.round_task_data(ls.connect(), project_id, round_number)
    missing = [t["image_id"] for t in tasks if t["image_id"] not in index]
    if missing:
        raise DataError(
            f"round {round_number}: task images {missing[:5]} are not in the "
            "prepared dataset; was the data changed mid-round?"
        )
    queries = [{**t, "index": int(index[t["image_id"]])} for t in tasks]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "queries.json").write_text(json.dumps(queries, indent=1, default=_plain))
    return str(out / "queries.json")


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)
