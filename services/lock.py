"""One round per project at a time: a lock file in the project that names its holder.

`fcntl.flock` on `.xbl/round.lock`: the kernel drops the lock when the holding process ends,
however it ends (an exception, SIGKILL, the OOM killer), so a dead run never blocks the next.
The file records the holder (pid, host, flow run, since) for the refusal message. The same
record, stored on a round's MLflow parent run, lets `holder_gone` tell a dead attempt, whose
leftovers may be cleaned up, from a live one, which must never be touched.

This module also remembers which locks this process holds, and whether it holds the team-wide
slot of an experiment (taken by the flow, through Prefect): holding it proves that no other
holder of that experiment, on any host, is still running a round.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xbl.errors import ProjectBusy

LOCK_FILE = ".xbl/round.lock"

_HELD: dict[str, Holder] = {}  # lock file -> this process's holder of it
_TEAM_SLOTS: set[str] = set()  # experiments whose team-wide round slot this process holds


@dataclass(frozen=True)
class Holder:
    """Who runs a round: enough to name it to a person, and to tell later whether it ended."""

    pid: int
    host: str
    since: str  # UTC, ISO 8601, to the second
    lock: str  # the lock file it held on `host`
    flow_run: str | None = None  # the Prefect flow run id
    flow_run_name: str | None = None
    team: str | None = None  # the experiment whose team-wide slot it holds (team mode)
    started: int | None = None  # its process's start (clock ticks since boot): a reused pid differs
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def describe(self) -> str:
        run = f"flow run {self.flow_run_name!r} ({self.flow_run})" if self.flow_run else "a run"
        return f"{run}, pid {self.pid} on host {self.host}, since {self.since}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Holder | None:
        """The holder a record names; None for an empty or unreadable record (a holder
        killed between taking the lock and writing its name, or a run from before holders
        were recorded)."""
        try:
            return cls(**json.loads(text)) if text else None
        except (TypeError, ValueError):
            return None


def this_host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from its closing one
    return int(stat.rsplit(")", 1)[1].split()[19])


def _new_holder(lock: Path, flow_run: str | None, name: str | None, team: str | None) -> Holder:
    return Holder(
        pid=os.getpid(),
        host=this_host(),
        since=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        lock=str(lock),
        flow_run=flow_run,
        flow_run_name=name,
        team=team,
        started=_process_start(os.getpid()),
    )


@contextmanager
def project_lock(
    project: Path,
    flow_run: str | None = None,
    flow_run_name: str | None = None,
    team: str | None = None,
) -> Iterator[Holder]:
    """Hold `project`'s round lock for the `with` block, or raise ProjectBusy at once, naming
    the holder. `team`: the experiment whose team-wide slot the caller is about to take, so
    that the record says so."""
    path = Path(project).resolve() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open's descriptors are not inherited across exec, so a child (dvc, torchrun) that
    # outlives this process cannot keep the project locked.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, fcntl.LOCK_EX, project)
        holder = _new_holder(path, flow_run, flow_run_name, team)
        _write(fd, holder.to_json())
        _HELD[str(path)] = holder
        try:
            yield holder
        finally:
            del _HELD[str(path)]
            _write(fd, "")  # nobody holds it now: a reader must not name a finished run
    finally:
        os.close(fd)  # the last descriptor closed drops the flock


def check_free(project: Path) -> None:
    """Raise ProjectBusy, naming the holder, if a round holds `project`'s lock now.

    A peek: it takes the lock shared for an instant and writes nothing, so it never shows up
    as a holder in another run's refusal (two peeks do not exclude each other)."""
    path = Path(project).resolve() / LOCK_FILE
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _take(fd, fcntl.LOCK_SH, project)
    finally:
        os.close(fd)


NAMING_WAIT_S = 2.0  # how long a refusal waits for a holder to write its name


def _take(fd: int, mode: int, project: Path) -> None:
    """flock `fd` in `mode` at once, or raise ProjectBusy naming the holder.

    An empty record while the lock is held means a peek (`check_free`) holds it shared for an
    instant, or a holder has not yet written its name: try again for a moment rather than
    refuse a free project or name nobody."""
    deadline = time.monotonic() + NAMING_WAIT_S
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = _record(fd)
            if holder is not None or time.monotonic() > deadline:
                raise ProjectBusy(busy_message(project, holder)) from None
        time.sleep(0.05)


def busy_message(project: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a run that has not yet written its name"
    return (
        f"project {Path(project).resolve()} is busy: its round lock ({LOCK_FILE}) is held by "
        f"{who}. One round per project at a time: wait for it to end, or stop that process "
        "(the lock frees itself when the process exits)."
    )


def _record(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return Holder.from_json(os.read(fd, 65536).decode(errors="replace"))


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
    os.fsync(fd)


@contextmanager
def holding_team_slot(experiment: str) -> Iterator[None]:
    """Mark, for the `with` block, that this process holds `experiment`'s team-wide slot."""
    _TEAM_SLOTS.add(experiment)
    try:
        yield
    finally:
        _TEAM_SLOTS.discard(experiment)


def process_ended(holder: Holder) -> bool:
    """Whether `holder`'s process is certainly gone: on this host, its pid is free or now
    belongs to a process that started later. A holder on another host cannot be checked here."""
    if holder.host != this_host():
        return False
    if holder.pid == os.getpid():
        return holder.token not in {h.token for h in _HELD.values()}
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, under another user
    started = _process_start(holder.pid)
    return None not in (started, holder.started) and started != holder.started


def holder_gone(holder: Holder | None) -> bool:
    """Whether the run recorded as `holder` has certainly ended, so that what it left half-done
    may be cleaned up. False whenever it may still be running.

    No record: written before holders were recorded, or by a run killed in the instant between
    opening its parent run and naming itself; the caller holds the round lock, so no live run
    of this project is without one."""
    if holder is None:
        return True
    if holder.token in {h.token for h in _HELD.values()}:
        return False  # this very run
    if holder.host == this_host() and holder.lock in _HELD:
        return True  # it held the lock this process holds now: it let go of it
    if holder.host != this_host():
        # only the team-wide slot, which allows one holder per experiment, proves it ended
        return holder.team is not None and holder.team in _TEAM_SLOTS
    return process_ended(holder)
