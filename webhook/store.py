"""Seen deliveries and started rounds, in SQLite in the state dir, so a restart remembers
both: a redelivery never counts twice, and a round starts one run."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from webhook.delivery import Delivery


class DeliveryStore:
    """Seen deliveries and started rounds, in SQLite so a restart remembers both."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS deliveries (
        action TEXT, annotation_id INTEGER, project_id INTEGER, round INTEGER,
        received_at REAL, checked INTEGER DEFAULT 0, PRIMARY KEY (action, annotation_id));
    CREATE TABLE IF NOT EXISTS started_rounds (
        project_id INTEGER, round INTEGER, flow_run TEXT, started_at REAL,
        PRIMARY KEY (project_id, round));
    CREATE TABLE IF NOT EXISTS signatures (signature TEXT PRIMARY KEY, timestamp REAL);
    CREATE INDEX IF NOT EXISTS deliveries_received ON deliveries (received_at);
    """

    def __init__(self, state_dir: str | Path):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        ignore = state_dir / ".gitignore"  # state, never source: out of git wherever it lives
        if not ignore.exists():
            ignore.write_text("*\n")
        # One connection behind a lock: handler threads and the worker share it.
        self._db = sqlite3.connect(state_dir / "deliveries.sqlite3", check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(self.SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(started_rounds)")}
            if "attempt" not in columns:  # a state dir from before retries
                self._db.execute(
                    "ALTER TABLE started_rounds ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0"
                )

    def _run(self, sql: str, *args) -> sqlite3.Cursor:
        with self._lock, self._db:
            return self._db.execute(sql, args)

    def record(self, delivery: Delivery, received_at: float | None = None) -> list[tuple[int, int]]:
        """Store the delivery's annotations; the (project, round) pairs with a new one."""
        new = set()
        for annotation_id, round_ in delivery.annotations:
            cursor = self._run(
                "INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?, ?, 0)",
                delivery.action,
                annotation_id,
                delivery.project_id,
                round_,
                time.time() if received_at is None else received_at,
            )
            if cursor.rowcount:
                new.add((delivery.project_id, round_))
        return sorted(new)

    def unchecked(self) -> list[tuple[int, int]]:
        """Rounds with deliveries recorded but not yet checked (the process stopped first)."""
        rows = self._run("SELECT DISTINCT project_id, round FROM deliveries WHERE checked = 0")
        return [tuple(row) for row in rows.fetchall()]

    def mark_checked(self, project_id: int, round_: int) -> None:
        self._run(
            "UPDATE deliveries SET checked = 1 WHERE project_id = ? AND round = ?",
            project_id,
            round_,
        )

    def started(self, project_id: int, round_: int) -> bool:
        return self.started_run(project_id, round_) is not None

    def started_run(self, project_id: int, round_: int) -> tuple[str | None, int] | None:
        """(run id, attempt) of the round's run; None when it has not been started."""
        rows = self._run(
            "SELECT flow_run, attempt FROM started_rounds WHERE project_id = ? AND round = ?",
            project_id,
            round_,
        )
        row = rows.fetchone()
        return None if row is None else (row[0], row[1])

    def claim_round(
        self, project_id: int, round_: int, failed_run: str | None = None
    ) -> int | None:
        """The attempt number for the first caller only (the round is now taken), else None.
        With `failed_run`: take over a round whose run `failed_run` ended failed. A claim
        whose run was never recorded (the process stopped while starting it) is claimed again
        with its attempt number: the run's idempotency key is the same, so a run the stopped
        process did create is found, not made twice. One worker thread claims, so no claim
        of this process is in flight here."""
        if failed_run is None:
            cursor = self._run(
                "INSERT OR IGNORE INTO started_rounds VALUES (?, ?, NULL, ?, 0)",
                project_id,
                round_,
                time.time(),
            )
            if cursor.rowcount:
                return 0
            started = self.started_run(project_id, round_)
            return started[1] if started is not None and started[0] is None else None
        with self._lock, self._db:
            taken = self._db.execute(
                "UPDATE started_rounds SET flow_run = NULL, attempt = attempt + 1, started_at = ?"
                " WHERE project_id = ? AND round = ? AND flow_run = ?",
                (time.time(), project_id, round_, failed_run),
            ).rowcount
            if not taken:
                return None
            return self._db.execute(
                "SELECT attempt FROM started_rounds WHERE project_id = ? AND round = ?",
                (project_id, round_),
            ).fetchone()[0]

    def release_round(
        self, project_id: int, round_: int, attempt: int = 0, failed_run: str | None = None
    ) -> None:
        """Undo a claim whose start failed, so a later delivery tries again: the first attempt
        forgets the round; a retry puts the failed run back (its attempt number stays used);
        a claim taken again after a stop stays, to be taken again with its attempt number."""
        if failed_run is None and attempt == 0:
            self._run(
                "DELETE FROM started_rounds WHERE project_id = ? AND round = ? AND attempt = 0",
                project_id,
                round_,
            )
        elif failed_run is not None:
            self._run(
                "UPDATE started_rounds SET flow_run = ? WHERE project_id = ? AND round = ?",
                failed_run,
                project_id,
                round_,
            )

    def first_use(self, signature: str, timestamp: float) -> bool:
        """Record a verified signature; False when it was seen before (a replay)."""
        cursor = self._run("INSERT OR IGNORE INTO signatures VALUES (?, ?)", signature, timestamp)
        return bool(cursor.rowcount)

    def expire(self, retention_s: float, window_s: float, now: float | None = None) -> int:
        """Delete checked delivery records older than `retention_s`, and signatures whose
        timestamp is out of the window anyway (a replay of one is refused as stale). Rows
        not yet checked stay until they are. Returns the number of deliveries deleted."""
        now = time.time() if now is None else now
        deleted = self._run(
            "DELETE FROM deliveries WHERE checked = 1 AND received_at < ?", now - retention_s
        ).rowcount
        self._run("DELETE FROM signatures WHERE timestamp < ?", now - window_s)
        return deleted

    def count(self, table: str) -> int:
        if table not in ("deliveries", "started_rounds", "signatures"):
            raise ValueError(f"no table {table!r}")
        return self._run(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608 (checked)

    def set_flow_run(self, project_id: int, round_: int, flow_run: str | None) -> None:
        self._run(
            "UPDATE started_rounds SET flow_run = ? WHERE project_id = ? AND round = ?",
            flow_run,
            project_id,
            round_,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
