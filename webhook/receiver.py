"""The receiver: a delivery is authenticated, recorded and queued while Label Studio waits
(its WEBHOOK_TIMEOUT is 1 s); one worker thread then asks for the round's progress and,
once the target is met, starts the round's run."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from webhook.auth import AUTH_MODES, MIN_SECRET_LENGTH, SECRET_ENV, header_refusal, refusal
from webhook.delivery import IgnoredDelivery, parse_delivery
from webhook.store import DeliveryStore
from xbl.labelstudio.results import annotation_target

log = logging.getLogger(__name__)

PURGE_EVERY_S = 3600.0

ProgressCheck = Callable[[int, int], tuple[int, int]]  # (project, round) -> (annotated, tasks)
# (project, round, attempt) -> id of the started run; attempt 0 first, then 1, 2, ... after
# a run that failed (so an idempotency key made from the three is new for each retry)
Starter = Callable[[int, int, int], str | None]
RunFailed = Callable[[str], bool]  # run id -> whether it ended FAILED or CRASHED


@dataclass
class WebhookReceiver:
    """Authenticates, records and queues deliveries; its worker thread starts the runs."""

    secret: str = field(repr=False)
    store: DeliveryStore
    progress: ProgressCheck
    start: Starter
    target_fraction: float = 1.0
    auth: str = "header"  # or "signature": signed requests only
    window_s: float = 300.0  # a signed request's timestamp is at most this far from the clock
    retention_s: float = 7 * 86400.0  # delivery records older than this are deleted
    run_failed: RunFailed | None = None  # None: a started round is never started again
    purge_every_s: float = PURGE_EVERY_S
    _queue: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _worker: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self):
        if len(self.secret or "") < MIN_SECRET_LENGTH:
            raise ValueError(
                f"the webhook secret must have at least {MIN_SECRET_LENGTH} characters "
                f"(set {SECRET_ENV})"
            )
        if not 0 < self.target_fraction <= 1:
            raise ValueError(f"target fraction must be in (0, 1], got {self.target_fraction}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, got {self.auth!r}")
        if not (self.window_s > 0 and self.retention_s > 0):
            raise ValueError("the signature window and the retention must be above 0")

    def authenticate_headers(self, headers) -> tuple[int, str] | None:
        """None when the body may be read, else (HTTP status, error): the headers alone are
        checked (`webhook.auth.header_refusal`), so an unknown sender costs no body read."""
        return header_refusal(headers, self.secret, self.auth)

    def authenticate(self, headers, body: bytes) -> tuple[int, str] | None:
        """None when the request may go on, else (HTTP status, error) (`webhook.auth.refusal`)."""
        return refusal(headers, body, self.secret, self.auth, self.window_s, self.store.first_use)

    def accept(self, payload) -> tuple[int, dict]:
        """(HTTP status, answer) for an authenticated delivery; the work is queued, not done."""
        try:
            delivery = parse_delivery(payload)
        except IgnoredDelivery as why:
            log.info("delivery ignored: %s", why)
            return 200, {"status": "ignored", "reason": str(why)}
        rounds = self.store.record(delivery)
        if not rounds:
            log.info(
                "duplicate %s delivery for annotation(s) %s",
                delivery.action,
                [a for a, _ in delivery.annotations],
            )
            return 200, {"status": "duplicate"}
        for key in rounds:
            self._queue.put(key)
        return 202, {"status": "queued", "rounds": [{"project": p, "round": r} for p, r in rounds]}

    def _failed_run(self, project_id: int, round_: int) -> tuple[bool, str | None]:
        """(whether the round is taken by a live or finished run, the run that failed)."""
        started = self.store.started_run(project_id, round_)
        if started is None:
            return False, None
        flow_run, attempt = started
        if flow_run is None:  # claimed by a process that stopped before it learnt the run
            log.warning(
                "project %d round %d: attempt %d was being started when the receiver stopped;"
                " starting it again (same idempotency key)",
                project_id,
                round_,
                attempt,
            )
            return False, None
        if self.run_failed is None or not self.run_failed(flow_run):
            log.info("project %d round %d: run %s already started", project_id, round_, flow_run)
            return True, None
        log.warning(
            "project %d round %d: run %s (attempt %d) ended failed; starting it again",
            project_id,
            round_,
            flow_run,
            attempt,
        )
        return False, flow_run

    def check_round(self, project_id: int, round_: int) -> None:
        """Start the round's run when enough of it is annotated and it has not started yet,
        or its run ended FAILED or CRASHED."""
        taken, failed = self._failed_run(project_id, round_)
        if not taken:
            done, total = self.progress(project_id, round_)
            target = annotation_target(total, self.target_fraction)
            if total == 0 or done < target:
                log.info(
                    "project %d round %d: %d/%d annotated, waiting for %d",
                    project_id,
                    round_,
                    done,
                    total,
                    target,
                )
            elif (attempt := self.store.claim_round(project_id, round_, failed)) is not None:
                self._start(project_id, round_, attempt, failed, done, total)
        self.store.mark_checked(project_id, round_)

    def _start(
        self, project_id: int, round_: int, attempt: int, failed: str | None, done: int, total: int
    ) -> None:
        try:
            flow_run = self.start(project_id, round_, attempt)
        except BaseException:  # a later delivery may try again
            self.store.release_round(project_id, round_, attempt, failed)
            raise
        self.store.set_flow_run(project_id, round_, flow_run)
        log.info(
            "project %d round %d: %d/%d annotated; started run %s (attempt %d)",
            project_id,
            round_,
            done,
            total,
            flow_run,
            attempt,
        )

    def purge(self) -> None:
        """Delete expired delivery records and signatures (at start, then hourly)."""
        deleted = self.store.expire(self.retention_s, self.window_s)
        if deleted:
            log.info("deleted %d delivery record(s) older than %.0f s", deleted, self.retention_s)

    def _work(self) -> None:
        next_purge = time.monotonic() + self.purge_every_s
        while True:
            try:
                key = self._queue.get(timeout=max(0.0, next_purge - time.monotonic()))
            except queue.Empty:
                key = ()
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.purge_every_s
                try:
                    self.purge()
                except Exception:
                    log.exception("purging expired delivery records failed")
            if key == ():
                continue
            if key is None or self._stopping.is_set():  # queued rounds stay unchecked in the store
                self._queue.task_done()
                return
            try:
                self.check_round(*key)
            except Exception:  # unchecked rows stay; the next delivery or restart retries
                log.exception("project %d round %d: check failed", *key)
            finally:
                self._queue.task_done()

    def start_worker(self) -> None:
        """Run the worker thread, after deleting expired records; rounds left unchecked by a
        previous process go first."""
        self.purge()
        self._stopping.clear()
        for key in self.store.unchecked():
            self._queue.put(key)
        self._worker = threading.Thread(target=self._work, name="xbl-webhook-worker", daemon=True)
        self._worker.start()

    def wait_idle(self) -> None:
        """Block until every queued round has been checked."""
        self._queue.join()

    def stop_worker(self, timeout_s: float = 10.0) -> bool:
        """Stop the worker after the check it is doing; False when that check outlasts
        `timeout_s` (a hung service): the thread is a daemon and dies with the process, and
        the rounds it had not checked are checked again at the next start."""
        if self._worker is None:
            return True
        self._stopping.set()
        self._queue.put(None)
        self._worker.join(timeout_s)
        stopped = not self._worker.is_alive()
        self._worker = None
        return stopped
