"""What `xbl status` shows, read in a fraction of a second and without torch: the open round,
whether a run holds it now, its answers in Label Studio, the champion and the last decision.

Importing mlflow (1.3-1.7 s here) or the Label Studio SDK's client (1.2 s) alone would spend
the 2 s budget, so both services are read over HTTP with one short try each, and a SQLite
tracking store with a read-only SQL query on MLflow's own tables. A store that is neither, or a
SQLite schema this query does not know, is read through the mlflow client: slower, never wrong.
Nothing here writes: a missing store stays missing, the round lock is only peeked at.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from services import lock
from services.labelstudio_access import (
    LabelStudioRefused,
    authorization,
    is_loopback,
    server_settings,
)
from services.tracking_names import (  # noqa: F401  (tracking_uri: this module's API too)
    BASELINE,
    CHAMPION,
    FEEDBACK_ROUNDS_TAG,
    PROMOTED_TAG,
    PROMOTION_TAG,
    ROUND_TAG,
    tracking_uri,
)
from xbl.config import load_config, project_title
from xbl.errors import ProjectBusy
from xbl.paths import ROUNDS_ROOT

TIMEOUT_S = 1.0  # each request; an outage costs at most this, once
SHOWN_METRICS = ("audit_accuracy", "test_accuracy", "val_accuracy")


@dataclass(frozen=True)
class Model:
    """A registered model version behind an alias, with its run's headline metrics."""

    version: str
    run_id: str
    run_name: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class Decision:
    """The newest finished feedback run's promotion decision."""

    run_id: str
    run_name: str | None
    round: int | None
    promoted: bool
    reason: str


@dataclass(frozen=True)
class Tracked:
    """What the tracking store holds for the project; `error` when it could not be read."""

    uri: str
    champion: Model | None = None
    baseline: Model | None = None
    decision: Decision | None = None
    completed: frozenset[int] = frozenset()  # rounds whose feedback run finished
    error: str | None = None


@dataclass(frozen=True)
class Progress:
    """The open round in Label Studio; `error` when the server could not be asked."""

    url: str
    project_id: int | None = None  # None: the project has no task yet
    annotated: int = 0
    total: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Status:
    project: Path
    experiment: str
    tracked: Tracked
    open_round: int | None  # on disk and not yet finished in the tracking store
    running: str | None  # the run holding the round lock now, described
    labelstudio: Progress | None  # None when no round is open


def project_status(project: Path, params_file: str = "params.yaml") -> Status:
    cfg = load_config(project / params_file)
    tracked = read_tracking(tracking_uri(project), cfg.mlflow.experiment, cfg.mlflow.model_name)
    # which rounds are finished only the tracking store knows: unread, no round is called open
    unfinished = set() if tracked.error else set(rounds_on_disk(project)) - tracked.completed
    open_round = max(unfinished, default=None)
    progress = None if open_round is None else labelstudio_progress(project_title(cfg), open_round)
    return Status(
        project,
        cfg.mlflow.experiment,
        tracked,
        open_round,
        round_holder(project),
        progress,
    )


# --- the project's own folder ----------------------------------------------------------------


def rounds_on_disk(project: Path) -> tuple[int, ...]:
    """The rounds whose queries were chosen here (data/rounds/round-N), oldest first."""
    found = (re.fullmatch(r"round-(\d+)", p.name) for p in (project / ROUNDS_ROOT).glob("round-*"))
    return tuple(sorted(int(m[1]) for m in found if m))


def round_holder(project: Path) -> str | None:
    """The run holding the project's round lock now, described; None when it is free."""
    try:
        lock.check_free(project)  # a shared peek: a running round is never disturbed
    except ProjectBusy as busy:
        record = lock.Holder.from_json((project / lock.LOCK_FILE).read_text())
        return record.describe() if record else str(busy)
    return None


# --- MLflow ----------------------------------------------------------------------------------


def read_tracking(uri: str, experiment: str, model_name: str) -> Tracked:
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            return _tracked(uri, _RestStore(uri), experiment, model_name)
        except httpx.TransportError as err:
            return Tracked(uri, error=f"MLflow unreachable at {uri} ({type(err).__name__})")
        except httpx.HTTPStatusError as err:
            code = err.response.status_code
            return Tracked(uri, error=f"MLflow at {uri} answered HTTP {code}")
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if not path.is_file():
            return Tracked(uri)  # nothing logged yet: reading through mlflow would create it
        try:
            return _tracked(uri, _SqlStore(path), experiment, model_name)
        except sqlite3.DatabaseError:
            pass  # a schema this query does not know (or a locked file): mlflow's client knows
    from mlflow.exceptions import MlflowException

    try:
        return _tracked(uri, _ClientStore(uri), experiment, model_name)
    except MlflowException as err:  # a database that is down, a URI mlflow cannot use
        return Tracked(uri, error=f"tracking store {uri} unreadable: {err.message}")


def _tracked(uri: str, store, experiment: str, model_name: str) -> Tracked:
    runs = store.feedback_runs(experiment)  # newest first
    completed = set()
    for _, _, tags in runs:
        completed |= {int(n) for n in tags.get(FEEDBACK_ROUNDS_TAG, "").split(",") if n}
        if tags.get(ROUND_TAG, "").isdigit():
            completed.add(int(tags[ROUND_TAG]))
    return Tracked(
        uri,
        champion=_model(store, model_name, CHAMPION),
        baseline=_model(store, model_name, BASELINE),
        decision=_decision(*runs[0]) if runs else None,
        completed=frozenset(completed),
    )


def _model(store, model_name: str, alias: str) -> Model | None:
    found = store.alias(model_name, alias)
    if found is None:
        return None
    version, run_id = found
    name, metrics = store.run(run_id)
    shown = {k: metrics[k] for k in SHOWN_METRICS if k in metrics}
    return Model(str(version), run_id, name, shown)


def _decision(run_id: str, name: str | None, tags: dict[str, str]) -> Decision:
    rnd = tags.get(ROUND_TAG, "")
    return Decision(
        run_id,
        name,
        int(rnd) if rnd.isdigit() else None,
        tags.get(PROMOTED_TAG) == "true",
        tags[PROMOTION_TAG],
    )


def _sqlite_path(uri: str) -> Path:
    # SQLAlchemy's form: sqlite:///relative/path or sqlite:////absolute/path
    return Path(uri.removeprefix("sqlite:///"))


_FEEDBACK_RUNS_SQL = """
SELECT r.run_uuid, r.name FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id
WHERE e.name = ? AND e.lifecycle_stage = 'active' AND r.lifecycle_stage = 'active'
  AND r.status = 'FINISHED'
  AND EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = ? AND t.value != '')
ORDER BY r.start_time DESC
"""


class _SqlStore:
    """MLflow's SQLite tables, read-only (MLflow 3: runs, tags, latest_metrics, model_versions,
    registered_model_aliases)."""

    def __init__(self, path: Path):
        self.path = path

    def _query(self, sql: str, *args) -> list[tuple]:
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=TIMEOUT_S)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def alias(self, model: str, alias: str) -> tuple[str, str] | None:
        rows = self._query(
            "SELECT v.version, v.run_id FROM registered_model_aliases a JOIN model_versions v "
            "ON v.name = a.name AND v.version = a.version WHERE a.name = ? AND a.alias = ?",
            model,
            alias,
        )
        return rows[0] if rows else None

    def run(self, run_id: str) -> tuple[str | None, dict[str, float]]:
        name = self._query("SELECT name FROM runs WHERE run_uuid = ?", run_id)
        metrics = self._query("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", run_id)
        return (name[0][0] if name else None), dict(metrics)

    def feedback_runs(self, experiment: str) -> list[tuple[str, str | None, dict[str, str]]]:
        runs = self._query(_FEEDBACK_RUNS_SQL, experiment, PROMOTION_TAG)
        tags: dict[str, dict[str, str]] = {run_id: {} for run_id, _ in runs}
        for key, value, run_id in self._query("SELECT key, value, run_uuid FROM tags"):
            if run_id in tags:
                tags[run_id][key] = value
        return [(run_id, name, tags[run_id]) for run_id, name in runs]


class _RestStore:
    """An MLflow tracking server, over its REST API (api/2.0/mlflow)."""

    def __init__(self, uri: str):
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
        self.http = httpx.Client(
            base_url=uri.rstrip("/") + "/api/2.0/mlflow/",
            timeout=TIMEOUT_S,
            headers={"Authorization": f"Bearer {token}"} if token else None,
            auth=(user, password) if user and password else None,
            verify=os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true",
        )

    def _get(self, path: str, **params) -> dict | None:
        """The answer; None when the server says the thing does not exist."""
        response = self.http.get(path, params=params)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def alias(self, model: str, alias: str) -> tuple[str, str] | None:
        found = self._get("registered-models/alias", name=model, alias=alias)
        return (
            None
            if found is None
            else (found["model_version"]["version"], found["model_version"]["run_id"])
        )

    def run(self, run_id: str) -> tuple[str | None, dict[str, float]]:
        run = (self._get("runs/get", run_id=run_id) or {}).get("run", {})
        metrics = {m["key"]: m["value"] for m in run.get("data", {}).get("metrics", [])}
        return run.get("info", {}).get("run_name"), metrics

    def feedback_runs(self, experiment: str) -> list[tuple[str, str | None, dict[str, str]]]:
        found = self._get("experiments/get-by-name", experiment_name=experiment)
        if found is None:
            return []
        query = {
            "experiment_ids": [found["experiment"]["experiment_id"]],
            "filter": f"attributes.status = 'FINISHED' and tags.`{PROMOTION_TAG}` != ''",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1000,
        }
        runs: list[dict] = []
        while True:
            response = self.http.post("runs/search", json=query)
            response.raise_for_status()
            page = response.json()
            runs += page.get("runs", [])
            if not page.get("next_page_token"):
                break
            query["page_token"] = page["next_page_token"]
        return [
            (
                r["info"]["run_id"],
                r["info"].get("run_name"),
                {t["key"]: t["value"] for t in r.get("data", {}).get("tags", [])},
            )
            for r in runs
        ]


class _ClientStore:
    """Any other store, through mlflow's own client (imported only here: it costs seconds)."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(uri, uri)

    def alias(self, model: str, alias: str) -> tuple[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(model, alias)
        except MlflowException:
            return None
        return str(version.version), version.run_id

    def run(self, run_id: str) -> tuple[str | None, dict[str, float]]:
        run = self.client.get_run(run_id)
        return run.info.run_name, dict(run.data.metrics)

    def feedback_runs(self, experiment: str) -> list[tuple[str, str | None, dict[str, str]]]:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = self.client.search_runs(
            [found.experiment_id],
            f"attributes.status = 'FINISHED' and tags.`{PROMOTION_TAG}` != ''",
            order_by=["attributes.start_time DESC"],
            max_results=50000,
        )
        return [(r.info.run_id, r.info.run_name, dict(r.data.tags)) for r in runs]


# --- Label Studio ----------------------------------------------------------------------------


def labelstudio_progress(title: str, round_: int) -> Progress:
    """(annotated, total) of round `round_` in the experiment's project, as
    services.labelstudio.round_progress counts them: a task with a submitted annotation."""
    url, token = labelstudio_settings()
    if not token:
        return Progress(
            url,
            error=f"no Label Studio API token for {url} (set LABEL_STUDIO_API_KEY, or start the "
            "local server with `xbl labelstudio start`)",
        )
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT_S, trust_env=not is_loopback(url)) as http:
            http.headers["Authorization"] = authorization(http, token)
            return _progress(http, url, title, round_)
    except httpx.TransportError:
        return Progress(url, error=f"Label Studio unreachable at {url}")
    except httpx.HTTPStatusError as err:
        return Progress(
            url, error=f"Label Studio at {url} answered HTTP {err.response.status_code}"
        )


def _progress(http: httpx.Client, url: str, title: str, round_: int) -> Progress:
    projects = _json(http.get("/api/projects/", params={"title": title, "page_size": 100}))
    listed = projects["results"] if isinstance(projects, dict) else projects  # paged or not
    found = [p["id"] for p in listed if p["title"] == title]
    if not found:
        return Progress(url)
    project_id = min(found)  # services.labelstudio._find_project's choice
    tasks = _round_tasks(http, project_id, round_)
    annotated = sum(1 for t in tasks if (t.get("total_annotations") or 0) > 0)
    return Progress(url, project_id, annotated, len(tasks))


def _round_tasks(http: httpx.Client, project_id: int, round_: int) -> list[dict]:
    """The round's tasks, filtered on the server as services.labelstudio._round_tasks does."""
    item = {"filter": "filter:tasks:data.round", "operator": "equal", "type": "Number"}
    query = json.dumps({"filters": {"conjunction": "and", "items": [{**item, "value": round_}]}})
    tasks: list[dict] = []
    for page in range(1, 10_000):
        params = {"project": project_id, "query": query, "fields": "task_only", "page": page}
        answer = http.get("/api/tasks/", params={**params, "page_size": 500})
        if answer.status_code == 404:  # past the last page
            break
        body = _json(answer)
        tasks += body.get("tasks", [])
        if not body.get("tasks") or len(tasks) >= body.get("total", 0):
            break
    return [t for t in tasks if str((t.get("data") or {}).get("round")) == str(round_)]


def _json(response: httpx.Response):
    response.raise_for_status()
    return response.json()


def labelstudio_settings() -> tuple[str, str | None]:
    """The server and token services.labelstudio uses; no token (rather than an error) when
    LABEL_STUDIO_URL is set without LABEL_STUDIO_API_KEY: status reports it."""
    try:
        url, token = server_settings()
    except LabelStudioRefused:
        url, token = os.environ["LABEL_STUDIO_URL"], None
    return url.rstrip("/"), token
