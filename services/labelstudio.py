"""The one Label Studio client module: every call to the server goes through here.

Which server: LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY when set (a team's server), else the
local one started by infra/labelstudio.sh (http://127.0.0.1:$XBL_LABEL_STUDIO_PORT, token from
XBL_LABEL_STUDIO_TOKEN or .labelstudio/env). The token is never printed or logged.

Images reach Label Studio as file uploads (served back at /data/upload/...), so a remote server
needs no access to this machine's disk. Label Studio accepts direct uploads only into projects
with a single data key, so they go to a companion project "<title> (images)" that holds files
and no tasks. Tasks are found again by `data.round` and `data.image_id`, which makes pushing a
round idempotent.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from services.faults import crash_point
from services.labelstudio_access import (  # noqa: F401  (the errors are this module's API too)
    LabelStudioError,
    LabelStudioRefused,
    LabelStudioUnavailable,
    authorization,
    is_loopback,
    server_settings,
)
from xbl.labelstudio.interface import labeling_config, review_labeling_config
from xbl.labelstudio.payloads import (
    cell_predictions,
    cells_from_prediction,
    decode_mask,
    review_payload,
    task_payload,
)
from xbl.labelstudio.results import review_verdict
from xbl.progress import progress

log = logging.getLogger(__name__)

# Retries live here, not in the SDK (its own are turned off): a read is repeated after any
# transport error, a gateway/overload answer or a server error (Label Studio answers 500 when
# its database connection was cut, e.g. by a PostgreSQL restart, and reconnects on the next
# request), a write only when it never left (connect).
RETRY_STATUSES = (429, 500, 502, 503, 504)
IMAGES_CONFIG = '<View><Image name="image" value="$image"/></View>'
# The webhook events that can complete a round, and the header that carries the shared secret.
ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED")
SECRET_HEADER = "X-XBL-Webhook-Secret"


@dataclass(frozen=True)
class LabelStudioClient:
    """The server's URL and an SDK client; the token stays inside the SDK and out of repr."""

    url: str
    sdk: LabelStudio = field(repr=False, compare=False)
    token: str = field(repr=False, compare=False, default="")  # for the calls the SDK lacks

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r}, token='***')"


# --- settings and connection -----------------------------------------------------------------


def _transient(err: Exception, write: bool) -> bool:
    if isinstance(err, ApiError):
        return not write and err.status_code in RETRY_STATUSES
    return isinstance(
        err, (httpx.ConnectError, httpx.ConnectTimeout) if write else httpx.TransportError
    )


def _retry(
    call: Callable[[], Any], write: bool = False, attempts: int = 4, first_delay_s: float = 0.5
):
    """Run `call`, retrying transient failures with exponential backoff."""
    for attempt in range(attempts):
        try:
            return call()
        except (httpx.TransportError, ApiError) as err:
            if not _transient(err, write):
                raise
            reason = (
                f"HTTP {err.status_code}"
                if isinstance(err, ApiError)
                else f"{type(err).__name__}: {err}"
            )
            if attempt == attempts - 1:
                raise LabelStudioUnavailable(f"Label Studio unreachable ({reason})") from err
            delay = first_delay_s * 2**attempt
            log.warning("Label Studio unreachable (%s); retry in %.1fs", reason, delay)
            time.sleep(delay)


def connect(
    url: str | None = None, token: str | None = None, timeout_s: float = 30.0
) -> LabelStudioClient:
    """A checked connection (reachable, token accepted) to the configured server."""
    env_url, env_token = server_settings() if not (url and token) else (url, token)
    url, token = (url or env_url).rstrip("/"), token or env_token
    if not token:
        raise LabelStudioRefused(
            "no Label Studio API token: set LABEL_STUDIO_API_KEY, or start the local "
            "server with `infra/labelstudio.sh start` (it writes .labelstudio/env)"
        )
    http = httpx.Client(timeout=timeout_s, trust_env=not is_loopback(url))  # no proxy for loopback
    try:
        sdk = LabelStudio(base_url=url, api_key=token, httpx_client=http, max_retries=0)
        _retry(sdk.users.whoami, attempts=2)
    except LabelStudioUnavailable as err:
        http.close()
        raise LabelStudioUnavailable(
            f"Label Studio is not reachable at {url} (start the local server with "
            "`infra/labelstudio.sh start`)"
        ) from err
    except ApiError as err:
        http.close()
        refused = err.status_code in (401, 403)
        what = "rejected the API token" if refused else "answered"
        error = LabelStudioRefused if refused else LabelStudioError
        raise error(f"Label Studio at {url} {what} (HTTP {err.status_code})") from None
    return LabelStudioClient(url, sdk, token)


def project_link(client: LabelStudioClient, project_id: int) -> str:
    """Where an annotator opens the project."""
    return f"{client.url}/projects/{project_id}/data"


# --- projects --------------------------------------------------------------------------------


def _find_project(client: LabelStudioClient, title: str) -> int | None:
    found = _retry(
        lambda: [p.id for p in client.sdk.projects.list(title=title) if p.title == title]
    )
    return min(found) if found else None


def _use_model_version(client: LabelStudioClient, project_id: int, model_version: str) -> None:
    """Pre-label tasks with this model version's cells ("Label All Tasks" shows them drawn)."""
    if client.sdk.projects.get(project_id).model_version == model_version:
        return
    try:
        client.sdk.projects.update(project_id, model_version=model_version)
    except ApiError as err:  # the server accepts a version only once predictions carry it
        log.debug("model_version %s not set yet: %s", model_version, err.body)


def ensure_project(
    client: LabelStudioClient, title: str, model_version: str, cluster: bool = False
) -> int:
    """The project with this title (created with the xbl labeling config when missing; the
    cluster variant, with the members' montage and the answer's scope, for cluster rounds)."""
    sdk = client.sdk
    project_id = _find_project(client, title)
    settings = dict(
        label_config=labeling_config(cluster=cluster),
        show_collab_predictions=True,
        show_skip_button=False,
    )  # a skipped task would never count as annotated
    if project_id is not None:
        _retry(lambda: sdk.projects.update(project_id, **settings), write=True)
    else:
        project_id = _retry(
            lambda: (
                sdk.projects.create(
                    title=title,
                    model_version=model_version,
                    description="xbl explanation feedback",
                    **settings,
                ).id
            ),
            write=True,
        )
    _retry(lambda: _use_model_version(client, project_id, model_version))
    return project_id


def _images_project(client: LabelStudioClient, project_id: int) -> int:
    """The companion project that receives the uploaded images (no tasks, one data key)."""
    title = f"{_retry(lambda: client.sdk.projects.get(project_id).title)} (images)"
    return _find_project(client, title) or _retry(
        lambda: (
            client.sdk.projects.create(
                title=title,
                label_config=IMAGES_CONFIG,
                description=f"Uploaded images for project {project_id}; it holds no tasks. Do not delete.",
            ).id
        ),
        write=True,
    )


# --- tasks -----------------------------------------------------------------------------------


def _field(obj: Any, name: str, default: Any = None) -> Any:
    """Task parts come back as dicts or SDK models depending on the endpoint."""
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _round_tasks(
    client: LabelStudioClient, project_id: int, round_: int, fields: str = "task_only"
) -> list:
    query = json.dumps(
        {
            "filters": {
                "conjunction": "and",
                "items": [
                    {
                        "filter": "filter:tasks:data.round",
                        "operator": "equal",
                        "type": "Number",
                        "value": int(round_),
                    }
                ],
            }
        }
    )
    tasks = _retry(
        lambda: list(client.sdk.tasks.list(project=project_id, query=query, fields=fields))
    )
    return [t for t in tasks if str((t.data or {}).get("round")) == str(int(round_))]


@dataclass(frozen=True)
class PushedRounds:
    """What the experiment's project holds: its id (None before the first push), each round's
    model version (the MLflow run whose explanations its tasks show), every queried image."""

    project_id: int | None
    rounds: dict[int, str]
    queried: set[str]


def pushed_rounds(client: LabelStudioClient, title: str) -> PushedRounds:
    """The rounds the experiment's project holds; empty when it does not exist yet."""
    project_id = _find_project(client, title)
    if project_id is None:
        return PushedRounds(None, {}, set())
    tasks = _retry(lambda: list(client.sdk.tasks.list(project=project_id, fields="all")))
    rounds: dict[int, str] = {}
    images: set[str] = set()
    for task in tasks:
        data, predictions = task.data or {}, _field(task, "predictions") or []
        images.add(str(data.get("image_id")))
        if predictions and data.get("round") is not None:
            rounds[int(data["round"])] = str(_field(predictions[-1], "model_version"))
    return PushedRounds(project_id, rounds, images)


def _as_shown(task: Any) -> dict:
    """A task as an annotator meets it: its data, its id and the cells pre-drawn on it (None
    when it has no prediction)."""
    data, predictions = dict(task.data), _field(task, "predictions") or []
    cells = None
    if predictions:
        prediction = _field(predictions[-1], "result")
        cells = cells_from_prediction(prediction, data["cell"], data["height"], data["width"])
    return {**data, "cells": cells, "task_id": task.id}


def round_task_data(client: LabelStudioClient, project_id: int, round_: int) -> list[dict]:
    """The round's task data with the cells that were shown (from each task's prediction)."""
    shown = map(_as_shown, _round_tasks(client, project_id, round_, fields="all"))
    return [{**t, "cells": [list(c) for c in t["cells"] or []]} for t in shown]


def upload_file(client: LabelStudioClient, project_id: int, path: str | Path) -> str:
    """Upload a local file into a (single data key) project; returns the host-relative URL
    Label Studio serves it at."""
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    def post() -> httpx.Response:
        # the SDK has no upload call: the same REST endpoint, through our own client
        with _http(client) as http, path.open("rb") as fh:
            return http.post(
                f"/api/projects/{project_id}/import",
                params={"commit_to_project": "false"},
                files={"file": (path.name, fh, mime)},
            )

    response = _retry(post, write=True)
    if response.status_code != 201:
        raise LabelStudioError(
            f"upload of {path.name} failed: HTTP {response.status_code} {response.text[:300]}"
        )
    file_id = response.json()["file_upload_ids"][0]
    name = _retry(lambda: client.sdk.files.get(file_id).file)
    return f"{urlparse(client.url).path.rstrip('/')}/data/{name}"


def _http(client: LabelStudioClient, timeout_s: float = 60.0) -> httpx.Client:
    """An authenticated client of the server, for the REST calls the SDK does not make."""
    http = httpx.Client(
        base_url=client.url, timeout=timeout_s, trust_env=not is_loopback(client.url)
    )
    http.headers["Authorization"] = authorization(http, client.token)
    return http


def _task(client: LabelStudioClient, images_id: int, query: dict, model_version: str) -> dict:
    urls = {
        "image_url": upload_file(client, images_id, query["image_path"]),
        "overlay_url": upload_file(client, images_id, query["overlay_path"]),
    }
    if "montage_path" in query:
        urls["montage_url"] = upload_file(client, images_id, query["montage_path"])
    crash_point("push-partial")  # fault drill: files uploaded, the round's tasks not created
    task = task_payload({**query, **urls})
    task["predictions"] = [
        cell_predictions(
            query["cells"],
            query["cell"],
            query["height"],
            query["width"],
            model_version,
            score=query["entropy"],
        )
    ]
    return task


def _not_pushed(client: LabelStudioClient, project_id: int, items: list[dict]) -> list[dict]:
    """The items whose (image_id, round) has no task in the project yet (first of each)."""
    seen = {
        (str(t.data["image_id"]), int(t.data["round"]))
        for round_ in {int(q["round"]) for q in items}
        for t in _round_tasks(client, project_id, round_)
    }
    new = []
    for item in items:
        key = (str(item["image_id"]), int(item["round"]))
        if key not in seen:
            seen.add(key)
            new.append(item)
    return new


def push_round(
    client: LabelStudioClient, project_id: int, queries: list[dict], model_version: str
) -> dict:
    """Upload each query's image and overlay and create its task with the pre-drawn cells;
    a task whose (image_id, round) is already in the project is skipped."""
    new = _not_pushed(client, project_id, queries)
    images_id = _images_project(client, project_id) if new else None
    tasks = [
        _task(client, images_id, query, model_version)
        for query in progress(new, f"uploading {len(new)} tasks to Label Studio")
    ]
    if tasks:  # one request: the round's tasks and predictions are created together
        _retry(lambda: client.sdk.projects.import_tasks(project_id, request=tasks), write=True)
        _retry(lambda: _use_model_version(client, project_id, model_version))
    return {"created": len(tasks), "skipped": len(queries) - len(tasks)}


# --- annotations -----------------------------------------------------------------------------


def _done_annotations(task: Any) -> list:
    return [a for a in (_field(task, "annotations") or []) if not _field(a, "was_cancelled")]


def round_progress(client: LabelStudioClient, project_id: int, round_: int) -> tuple[int, int]:
    """(tasks with a submitted annotation, tasks) in this round."""
    tasks = _round_tasks(client, project_id, round_)
    return sum(1 for t in tasks if (t.total_annotations or 0) > 0), len(tasks)


def _latest_annotations(client: LabelStudioClient, project_id: int, round_: int):
    """(task, its latest submitted annotation) for each annotated task of the round."""
    for task in _round_tasks(client, project_id, round_, fields="all"):
        done = _done_annotations(task)
        if done:
            yield task, max(done, key=lambda a: (str(_field(a, "updated_at")), _field(a, "id")))


def collect_annotations(client: LabelStudioClient, project_id: int, round_: int) -> list[dict]:
    """The latest submitted (not cancelled) annotation of each annotated task in the round."""
    out = []
    for task, latest in _latest_annotations(client, project_id, round_):
        out.append(
            {
                "image_id": str(task.data["image_id"]),
                "task_id": task.id,
                "annotation_id": _field(latest, "id"),
                "result": _field(latest, "result") or [],
                # seconds the annotator spent on the task, as Label Studio timed it
                "lead_time": float(_field(latest, "lead_time") or 0.0),
            }
        )
    return out


def _annotator(annotation: Any) -> str:
    """Who submitted it: `completed_by` is a user id, or the user itself on some endpoints."""
    who = _field(annotation, "completed_by")
    return str(_field(who, "id") if who is not None and not isinstance(who, int) else who)


def _each_annotator_latest(done: list) -> list:
    """Per annotator, the latest of their submitted annotations (a second one from the same
    person replaces their first), oldest annotator first."""
    latest: dict[str, Any] = {}
    for a in sorted(done, key=lambda a: (str(_field(a, "updated_at")), _field(a, "id"))):
        latest[_annotator(a)] = a
    return sorted(latest.values(), key=lambda a: _field(a, "id"))


def collect_answers(client: LabelStudioClient, project_id: int, round_: int) -> list[dict]:
    """Every task of the round, with each annotator's latest submitted answer (none when it is
    open): {image_id, task_id, height, width, answers: [{annotation_id, annotator, result,
    lead_time, updated_at}]}."""
    out = []
    for task in _round_tasks(client, project_id, round_, fields="all"):
        done, data = _done_annotations(task), task.data
        answers = [
            {
                "annotation_id": _field(a, "id"),
                "annotator": _annotator(a),
                "result": _field(a, "result") or [],
                "lead_time": float(_field(a, "lead_time") or 0.0),
                "updated_at": str(_field(a, "updated_at")),
            }
            for a in _each_annotator_latest(done)
        ]
        out.append(
            {
                "image_id": str(data["image_id"]),
                "task_id": task.id,
                "height": int(data["height"]),
                "width": int(data["width"]),
                "answers": answers,
            }
        )
    return out


def answer_open_tasks(
    client: LabelStudioClient,
    project_id: int,
    round_: int,
    answer: Callable[[dict], tuple[list[dict], float] | None],
) -> int:
    """Submit, through the API as a person would, `answer`'s (result, lead time) for each of
    the round's tasks that has no annotation yet (`xbl.labelstudio.oracle.Oracle`'s annotate
    or review); a task it answers None stays open. Returns how many were answered."""
    created = 0
    for task in _round_tasks(client, project_id, round_, fields="all"):
        given = None if _done_annotations(task) else answer(_as_shown(task))
        if given is not None:
            _submit(client, task.id, *given)
            created += 1
    return created


def _submit(client: LabelStudioClient, task_id: int, result: list[dict], lead: float) -> None:
    _retry(
        lambda: client.sdk.annotations.create(
            task_id, result=result, was_cancelled=False, lead_time=lead
        ),
        write=True,
    )


# --- review of masks carried to a cluster's members ------------------------------------------


def review_title(title: str) -> str:
    """The experiment's review project: one task per carried mask in doubt."""
    return f"{title} (review)"


def ensure_review_project(client: LabelStudioClient, title: str) -> int:
    """The experiment's review project (`review_title`), created when missing."""
    name = review_title(title)
    settings = dict(
        label_config=review_labeling_config(),
        show_skip_button=False,
        description="xbl: masks carried from a cluster's answer to its members; accept or reject",
    )
    project_id = _find_project(client, name)
    if project_id is not None:
        _retry(lambda: client.sdk.projects.update(project_id, **settings), write=True)
        return project_id
    return _retry(lambda: client.sdk.projects.create(title=name, **settings).id, write=True)


def push_reviews(client: LabelStudioClient, project_id: int, members: list[dict]) -> dict:
    """One review task per member (its image with the carried mask drawn, `image_path`, and
    the mask itself in the task data), skipping members already pushed in that round."""
    new = _not_pushed(client, project_id, members)
    if new:
        images_id = _images_project(client, project_id)
        tasks = [
            review_payload({**m, "image_url": upload_file(client, images_id, m["image_path"])})
            for m in progress(new, f"uploading {len(new)} review tasks to Label Studio")
        ]
        _retry(lambda: client.sdk.projects.import_tasks(project_id, request=tasks), write=True)
    return {"created": len(new), "skipped": len(members) - len(new)}


def collect_reviews(client: LabelStudioClient, project_id: int, round_: int) -> list[dict]:
    """The round's answered reviews: member, verdict (True accept, False reject, None
    neither), the carried mask, its confidence and the reviewer's seconds."""
    out = []
    for task, latest in _latest_annotations(client, project_id, round_):
        data = task.data
        out.append(
            {
                "image_id": str(data["image_id"]),
                "task_id": task.id,
                "accepted": review_verdict(_field(latest, "result") or []),
                "mask": decode_mask(data["mask"], data["height"], data["width"]),
                "confidence": float(data["confidence"]),
                "representative": str(data["representative"]),
                "lead_time": float(_field(latest, "lead_time") or 0.0),
            }
        )
    return out


def wait_for_round(
    client_factory: Callable[[], LabelStudioClient],
    project_id: int,
    round_: int,
    target: int,
    timeout_s: float,
    poll_s: float,
    on_progress: Callable[[int, int], None] | None = None,
    max_backoff_s: float = 30.0,
) -> tuple[int, int]:
    """Poll until `target` tasks of the round are annotated or `timeout_s` passes; returns
    the last (annotated, total). An outage is waited out with exponential backoff; a server
    never reached before the timeout raises LabelStudioUnavailable."""
    deadline = time.monotonic() + timeout_s
    client, last, failures = None, None, 0
    while True:
        try:
            client = client or client_factory()
            progress = round_progress(client, project_id, round_)
        except LabelStudioUnavailable as err:
            client, failures = None, failures + 1
            delay = min(max_backoff_s, poll_s * 2 ** (failures - 1))
            log.warning("waiting for round %s: %s; next try in %.1fs", round_, err, delay)
        else:
            failures, delay = 0, poll_s
            if progress != last and on_progress is not None:
                on_progress(*progress)
            last = progress
            if progress[0] >= target:
                return progress
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if last is None:
                raise LabelStudioUnavailable(
                    f"Label Studio stayed unreachable for {timeout_s:.0f}s"
                )
            return last
        time.sleep(min(delay, remaining))


# --- webhooks --------------------------------------------------------------------------------


def register_webhook(
    client: LabelStudioClient, project_id: int | None, url: str, secret: str
) -> int:
    """Point a project's (None: the organisation's) annotation events at the receiver; an
    existing webhook with the same URL is updated rather than duplicated. Returns its id."""
    settings = dict(
        url=url,
        send_payload=True,
        send_for_all_actions=False,
        is_active=True,
        headers={SECRET_HEADER: secret},
        actions=list(ACTIONS),
    )
    scope = str(project_id) if project_id is not None else None
    listed = _retry(lambda: list(client.sdk.webhooks.list(project=scope)))
    same = [w for w in listed if w.url == url and w.project == project_id]
    if same:
        _retry(lambda: client.sdk.webhooks.update(same[0].id, **settings), write=True)
        return same[0].id
    return _retry(lambda: client.sdk.webhooks.create(project=project_id, **settings).id, write=True)


def progress_checker(
    url: str | None = None, token: str | None = None
) -> Callable[[int, int], tuple[int, int]]:
    """(project, round) -> (annotated, tasks), on one connection reopened after an outage."""
    client = None

    def check(project_id: int, round_: int) -> tuple[int, int]:
        nonlocal client  # one caller thread (the webhook receiver's worker)
        try:
            client = client or connect(url, token)
            return round_progress(client, project_id, round_)
        except LabelStudioUnavailable:
            client = None
            raise

    return check
