"""The project's round lock: one holder at a time, a refusal that names it, freed when its
process dies, and the rule that tells a dead attempt (safe to clean up) from a live one."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from services import lock
from xbl.errors import ProjectBusy, XblError

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys
from services import lock
with lock.project_lock(sys.argv[1], "8c2f4e0a-run-a", "brave-fox", team=sys.argv[2] or None):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin, or kills us
"""


def hold_in_another_process(project: Path, team: str = "") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(project), team],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder(tmp_path):
    proc = hold_in_another_process(tmp_path)
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_is_refused_at_once_with_the_holder_named(tmp_path, holder):
    started = time.monotonic()
    with pytest.raises(ProjectBusy) as refused, lock.project_lock(tmp_path):
        pytest.fail("two holders at once")
    assert time.monotonic() - started < 1.0  # it does not wait for the holder
    message = str(refused.value)
    assert isinstance(refused.value, XblError)  # the CLI prints it as one line
    for named in (f"pid {holder.pid}", f"host {lock.this_host()}", "'brave-fox'", "run-a"):
        assert named in message
    assert f"since {time.strftime('%Y-%m-%d', time.gmtime())}" in message
    assert str(tmp_path) in message and lock.LOCK_FILE in message


def test_the_lock_frees_itself_when_its_holder_is_killed(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with lock.project_lock(tmp_path, "run-b") as mine:
        assert mine.pid == os.getpid() and mine.flow_run == "run-b"
        record = lock.Holder.from_json((tmp_path / lock.LOCK_FILE).read_text())
        assert record == mine


def test_released_when_the_run_ends_even_by_an_error(tmp_path):
    with pytest.raises(RuntimeError), lock.project_lock(tmp_path):
        raise RuntimeError("a step failed")
    assert (tmp_path / lock.LOCK_FILE).read_text() == ""  # nobody is named once it is free
    with lock.project_lock(tmp_path):
        pass


def test_a_second_run_in_the_same_process_is_refused_too(tmp_path):
    """A worker or a test may run two flows in one process: flock tells their descriptors apart."""
    with lock.project_lock(tmp_path, "run-a") as first:
        with pytest.raises(ProjectBusy, match="run-a"), lock.project_lock(tmp_path, "run-b"):
            pass
        assert lock.Holder.from_json((tmp_path / lock.LOCK_FILE).read_text()) == first


def test_a_holder_survives_the_round_trip_and_a_bad_record_names_nobody():
    holder = lock.Holder(1, "h", "2026-12-07 10:00:00 UTC", "/p/.xbl/round.lock", "id", "fox")
    assert lock.Holder.from_json(holder.to_json()) == holder
    for bad in ("", None, "{", '{"pid": 1}', "[1, 2]"):
        assert lock.Holder.from_json(bad) is None


def _recorded(project: Path) -> lock.Holder:
    return lock.Holder.from_json((project / lock.LOCK_FILE).read_text())


def test_a_live_holder_is_never_taken_for_gone(tmp_path, holder):
    alive = _recorded(tmp_path)
    assert alive.pid == holder.pid
    assert not lock.holder_gone(alive)
    assert not lock.process_ended(alive)
    with lock.project_lock(tmp_path / "other") as mine:  # holding another project's lock
        assert not lock.holder_gone(mine)  # this very run
        assert not lock.holder_gone(alive)


def test_a_holder_whose_process_ended_is_gone(tmp_path, holder):
    dead = _recorded(tmp_path)
    holder.stdin.close()  # it leaves its `with` block and exits
    holder.wait()
    assert lock.process_ended(dead) and lock.holder_gone(dead)
    # its pid, once a later process has it, does not bring it back
    later = hold_in_another_process(tmp_path / "other")
    try:
        assert lock.process_ended(replace(dead, pid=later.pid))
        assert not lock.process_ended(replace(_recorded(tmp_path / "other"), token="x"))
    finally:
        later.kill()
        later.wait()


def test_an_earlier_holder_of_the_lock_this_run_holds_is_gone(tmp_path):
    """Same process (a flow that failed, then a rerun in the same worker): the lock it held
    is held by this run now, so it is not running."""
    with lock.project_lock(tmp_path, "run-a") as earlier:
        pass
    assert lock.holder_gone(earlier)
    with lock.project_lock(tmp_path, "run-b") as now:
        assert lock.holder_gone(earlier) and not lock.holder_gone(now)


def test_a_holder_on_another_host_is_gone_only_to_the_holder_of_its_team_slot(tmp_path):
    remote = lock.Holder(4242, "another-host", "2026-12-07 10:00:00 UTC", str(tmp_path), team="e")
    assert not lock.holder_gone(remote)  # its pid means nothing here
    with lock.holding_team_slot("other-experiment"):
        assert not lock.holder_gone(remote)
    with lock.holding_team_slot("e"):
        assert lock.holder_gone(remote)  # the slot allows one holder: it cannot be running
        assert not lock.holder_gone(replace(remote, team=None))  # it never took the slot
    assert not lock.holder_gone(remote)


def test_an_unrecorded_attempt_counts_as_gone():
    """A parent run opened before holders were recorded; the caller holds the lock."""
    assert lock.holder_gone(None)


def test_the_cli_peek_names_the_holder_and_never_shows_up_as_one(tmp_path, holder):
    with pytest.raises(ProjectBusy, match="'brave-fox'"):
        lock.check_free(tmp_path)
    holder.stdin.close()
    holder.wait()
    lock.check_free(tmp_path)  # free again: the peek passes and leaves no name behind
    assert (tmp_path / lock.LOCK_FILE).read_text() == ""


def test_a_run_waits_out_a_peek_instead_of_being_refused_by_it(tmp_path):
    """Two `xbl round` at once: one's peek may hold the lock, shared, in the very instant the
    other's flow takes it. The flow waits that instant out; the peek is nobody to name."""
    (tmp_path / ".xbl").mkdir()
    fd = os.open(tmp_path / lock.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    threading.Timer(0.3, os.close, (fd,)).start()
    with lock.project_lock(tmp_path, "run-a") as mine:
        assert _recorded(tmp_path) == mine


def test_a_holder_that_never_names_itself_is_refused_after_a_moment(tmp_path):
    (tmp_path / ".xbl").mkdir()
    fd = os.open(tmp_path / lock.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with (
            pytest.raises(ProjectBusy, match="not yet written its name"),
            lock.project_lock(tmp_path),
        ):
            pass
        assert lock.NAMING_WAIT_S <= time.monotonic() - started < lock.NAMING_WAIT_S + 1
    finally:
        os.close(fd)
