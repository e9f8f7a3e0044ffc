"""What a Label Studio delivery reports: which annotations, of which xbl rounds, in which
project. The round is read from the task's data, where xbl put it when it pushed the task."""

from __future__ import annotations

from dataclasses import dataclass

from services.labelstudio import ACTIONS


class IgnoredDelivery(ValueError):
    """A well-formed request that asks for nothing (another action, a task outside a round)."""


@dataclass(frozen=True)
class Delivery:
    """One webhook request: which annotations were created, in which project and rounds."""

    action: str
    project_id: int
    annotations: tuple[tuple[int, int], ...]  # (annotation id, round)


def _as_list(value) -> list:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict)]


def _id(value) -> int | None:
    """An id given as a number or as an object that has one."""
    value = value.get("id") if isinstance(value, dict) else value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _task_rounds(tasks: list[dict]) -> dict[int, int]:
    """task id -> round, for the tasks xbl pushed (their data carries the round)."""
    rounds = {}
    for task in tasks:
        round_ = _id((task.get("data") or {}).get("round"))
        if round_ is not None and _id(task) is not None:
            rounds[_id(task)] = round_
    return rounds


def parse_delivery(payload) -> Delivery:
    """The annotations of an ANNOTATION(S)_CREATED payload that belong to an xbl round."""
    if not isinstance(payload, dict):
        raise IgnoredDelivery("payload is not a JSON object")
    action = payload.get("action")
    if action not in ACTIONS:
        raise IgnoredDelivery(f"action {action!r} is not handled")
    tasks = _as_list(payload.get("task"))
    rounds = _task_rounds(tasks)
    project = _id(payload.get("project")) or next((_id(t.get("project")) for t in tasks), None)
    found = tuple(
        (_id(a), rounds[_id(a.get("task"))])
        for a in _as_list(payload.get("annotation"))
        if _id(a) is not None and _id(a.get("task")) in rounds
    )
    if not found or project is None:
        raise IgnoredDelivery("no annotation of a task with data.round (is send_payload on?)")
    return Delivery(action, project, found)
