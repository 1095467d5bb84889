"""`Worker`: claim jobs from a queue and run a handler on each.

    def build(job: JobContext) -> dict:
        job.progress(50, "compiling")
        return {"artifact": "x.tar"}

    Worker("ci", build).run()

Each claim is a long poll (``long_poll`` seconds, default 20): the server answers as
soon as a job is claimable, so an idle worker neither spins nor sleeps past new work.
The long poll is made of claims of at most ``client.STOP_POLL`` (2 s) each, the stop
flag looked at between them: a stop ends a waiting claim within that, and a job the
last claim brought is handed straight back.
While the handler runs, a heartbeat thread renews the lease (``POST …/heartbeat``
where the server has it, else a progress report) every ``heartbeat_interval`` seconds,
or more often when the job's lease or token is short (:meth:`Worker.beat_interval`). The handler's return value completes
the job; an exception fails it, or hands it back to the queue when it is a
:class:`Retry` (or one of ``retry_on``) and attempts remain. When the server says the
job is no longer ours (cancelled, requeued, ended: 409/401/403/404 on a heartbeat),
or when the lease has run out without a renewal (each heartbeat is one attempt bounded
by the time left; the lease is timed on this host's monotonic clock from the send time
of the claim or of the last renewal), ``job.cancelled`` is set and the outcome is not
reported. Progress reports are best-effort: a transient failure is logged and the
handler carries on. SIGTERM (or :meth:`Worker.stop`) sets ``job.cancelled``, waits
``shutdown_grace`` seconds for the handler, and hands an unfinished job back (RUNNING →
QUEUED) instead of dropping it; it also ends the client's pauses between retries.
"""
from __future__ import annotations

import logging
import os
import random
import re
import signal
import socket
import threading
import time
from datetime import datetime
from typing import Any, Callable, Dict, Optional, Tuple, Type

from .client import Claim, Client, Job
from .errors import (
    Conflict,
    CoordinatorError,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ProblemError,
    Unauthorized,
)

__all__ = ["Worker", "JobContext", "Retry", "JobCancelled"]

log = logging.getLogger("coordinator_client.worker")


class Retry(Exception):
    """Raise from a handler to hand the job back to the queue for another attempt."""


class JobCancelled(Exception):
    """Raised by :meth:`JobContext.raise_if_cancelled` once the job is no longer ours
    or the worker is stopping."""


class Flag(threading.Event):
    """A :class:`threading.Event` that is true only once set, so that
    ``if job.cancelled:`` means what it says (a plain ``Event`` is always true, and a
    handler written that way returned at once and completed every job)."""

    def __bool__(self) -> bool:
        return self.is_set()


class JobContext:
    """What a handler gets: the job, its payload, a job-token client, progress
    reporting and the cancellation flag."""

    def __init__(self, claim: Claim, client: Client,
                 claimed_at: Optional[float] = None) -> None:
        self.claim = claim
        self.job: Job = claim.job
        self.id: str = claim.id
        self.payload: Any = claim.job.get("payload")
        self.attempt: int = int(claim.job.get("attempts", 1))
        self.max_attempts: int = int(claim.job.get("maxAttempts", 1))
        self.client = client
        self.cancelled = Flag()
        #: Set when the server told us the job is no longer ours.
        self.lost = Flag()
        self.percent: int = int(claim.job.get("progress", 0) or 0)
        #: The lease's length (from the server's timestamps), None when unknown.
        self.lease_length: Optional[float] = lease_length(claim)
        #: When the lease runs out, on this host's monotonic clock: the send time of
        #: the claim (``claimed_at``) or of the last renewal, plus ``lease_length``.
        self.lease_deadline: Optional[float] = None
        if self.lease_length is not None:
            sent = time.monotonic() if claimed_at is None else claimed_at
            self.lease_deadline = sent + self.lease_length
        self._lease_lock = threading.Lock()

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.id)

    def lease_left(self) -> Optional[float]:
        """Seconds until the lease runs out without a renewal (negative: it has), or
        None when the lease's length is unknown."""
        deadline = self.lease_deadline
        return None if deadline is None else deadline - time.monotonic()

    def lease_expired(self) -> bool:
        left = self.lease_left()
        return left is not None and left <= 0

    def _renewed(self, sent_at: float) -> None:
        """A request sent at ``sent_at`` (monotonic) renewed the lease."""
        if self.lease_length is None:
            return
        with self._lease_lock:
            until = sent_at + self.lease_length
            if self.lease_deadline is None or until > self.lease_deadline:
                self.lease_deadline = until

    def progress(self, percent: int, message: Optional[str] = None) -> bool:
        """Report progress (also renews the lease). Best-effort: a transient failure
        (no answer, 408, 429, 5xx) is logged and ``False`` returned — the heartbeat
        keeps the lease. Raises :class:`JobCancelled` when the job is no longer ours;
        any other error answer (e.g. a 400 for a bad ``percent``) is raised."""
        sent = time.monotonic()
        try:
            self.client.report_progress(self.id, percent, message)
        except (Conflict, Unauthorized, Forbidden, NotFound):
            self._lose()
            raise JobCancelled(self.id) from None
        except CoordinatorError as e:
            if not _transient(e):
                raise
            log.warning("job %s: progress report failed: %s (carrying on)", self.id, e)
            return False
        self.percent = percent
        self._renewed(sent)
        return True

    def _lose(self) -> None:
        self.lost.set()
        self.cancelled.set()


_WORKER_NAME = re.compile(r"[^A-Za-z0-9_.:-]")


def default_worker_name() -> str:
    name = _WORKER_NAME.sub("-", f"{socket.gethostname()}-{os.getpid()}")
    return name[:64] or "worker"


class Worker:
    """Claims jobs of ``queue`` and runs ``handler(JobContext)`` on each."""

    def __init__(
        self,
        queue: str,
        handler: Callable[[JobContext], Any],
        *,
        client: Optional[Client] = None,
        name: Optional[str] = None,
        heartbeat_interval: float = 30.0,
        poll_min: float = 0.5,
        poll_max: float = 10.0,
        long_poll: float = 20.0,
        shutdown_grace: float = 10.0,
        retry_on: Tuple[Type[BaseException], ...] = (),
        handle_signals: bool = True,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self._stop = threading.Event()
        # The stop flag also ends its pauses between retries, and stops its retries.
        self.client = (client or Client.from_env()).with_stop(self._stop)
        self.name = name or default_worker_name()
        self.heartbeat_interval = heartbeat_interval
        self.poll_min = poll_min
        self.poll_max = poll_max
        #: Seconds each claim waits on the server for a job (0: plain polling).
        self.long_poll = long_poll
        self.shutdown_grace = shutdown_grace
        self.retry_on = (Retry,) + tuple(retry_on)
        self.handle_signals = handle_signals
        #: None until the first heartbeat tells whether the server has the route.
        self.heartbeat_route: Optional[bool] = None
        self.processed = 0

    def stop(self) -> None:
        """Ask the loop to stop: what SIGTERM does. Thread- and signal-safe."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- the loop -----------------------------------------------------------------

    def run(self, max_jobs: Optional[int] = None, stop_when_idle: bool = False) -> int:
        """Claim and process jobs until stopped (SIGTERM, :meth:`stop`), ``max_jobs``
        have been processed, or — with ``stop_when_idle`` — the queue is empty.
        Returns the number of jobs processed. A claim refused with a client error
        (400, 401, 403, 404, 422, …: a bad queue or worker name, a credential that may
        not claim) is raised; a transient one (no answer, 408, 409, 429, 5xx) is logged
        and the claim asked again after a pause."""
        previous = None
        install = self.handle_signals and threading.current_thread() is threading.main_thread()
        if install:
            previous = signal.signal(signal.SIGTERM, lambda *_: self.stop())
        try:
            delay = self.poll_min
            # A worker that stops when idle asks once; otherwise each claim long-polls.
            wait = None if stop_when_idle or self.long_poll <= 0 else self.long_poll
            while not self.stopping and (max_jobs is None or self.processed < max_jobs):
                started = time.monotonic()
                try:
                    claim = self.client.claim(self.queue, self.name, wait=wait)
                except CoordinatorError as e:
                    if _refused(e):
                        raise  # asking again would be refused again: not ours to fix
                    log.warning("claim on %s failed: %s", self.queue, e)
                    claim = None
                if claim is not None and self.stopping:
                    # Stopped during the long poll: hand the job straight back.
                    self._hand_back(claim)
                    break
                if claim is None:
                    if stop_when_idle:
                        break
                    if wait is not None and time.monotonic() - started >= wait / 2:
                        continue  # the server held the claim open: ask again at once
                    self._stop.wait(delay * (0.75 + random.random() / 2))
                    delay = min(self.poll_max, delay * 2)
                    continue
                delay = self.poll_min
                # The lease starts when the server hands the job out: for a long poll
                # that may be long after the claim was sent, and at most the answer's
                # travel (taken as up to 1 s) before it came.
                self.process(claim, claimed_at=max(started, time.monotonic() - 1.0))
                self.processed += 1
        except KeyboardInterrupt:
            self.stop()
        finally:
            if install:
                signal.signal(signal.SIGTERM, previous)
        return self.processed

    def run_once(self) -> bool:
        """Claim one job and process it; ``False`` when the queue was empty."""
        started = time.monotonic()
        claim = self.client.claim(self.queue, self.name)
        if claim is None:
            return False
        self.process(claim, claimed_at=started)
        self.processed += 1
        return True

    def _hand_back(self, claim: Claim) -> None:
        try:
            self.client.with_token(claim.token).set_status(claim.id, "QUEUED", "worker stopping")
        except CoordinatorError as e:
            log.warning("handing job %s back failed: %s (the lease will requeue it)", claim.id, e)

    # ---- one job --------------------------------------------------------------------

    def beat_interval(self, claim: Claim) -> float:
        """``heartbeat_interval``, shortened for this job so that its lease (a third of
        it) and its job token (a quarter of its lifetime) are renewed in time. Both
        lengths come from the server's own timestamps (``startedAt`` to
        ``leaseExpiresAt`` and to ``tokenExpiresAt``), so this host's clock does not
        matter."""
        interval = self.heartbeat_interval
        for length, share in ((lease_length(claim), 3), (_span(claim, claim.token_expires_at), 4)):
            if length is not None:
                interval = min(interval, max(0.1, length / share))
        return interval

    def process(self, claim: Claim, claimed_at: Optional[float] = None) -> None:
        """Run the handler on one claimed job and report its outcome. ``claimed_at``
        (``time.monotonic()`` when the claim was sent, default now) starts the lease's
        clock: once the lease has run out without a renewal the job is no longer
        ours — the handler is cancelled and its outcome never reported."""
        ctx = JobContext(claim, self.client.with_token(claim.token), claimed_at)
        done = threading.Event()
        outcome: Dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = self.handler(ctx)
            except BaseException as e:  # noqa: B902 - reported below, never lost
                outcome["error"] = e
            finally:
                done.set()

        beat = threading.Thread(target=self._heartbeat,
                                args=(ctx, done, self.beat_interval(claim)), daemon=True,
                                name=f"heartbeat-{ctx.id}")
        work = threading.Thread(target=target, daemon=True, name=f"job-{ctx.id}")
        beat.start()
        work.start()
        deadline: Optional[float] = None
        try:
            while not done.wait(0.1):
                if ctx.lease_expired() and not ctx.lost.is_set():
                    # Also when the heartbeat thread is stuck in a request.
                    self._lease_lost(ctx)
                if self.stopping and deadline is None:
                    ctx.cancelled.set()
                    deadline = time.monotonic() + self.shutdown_grace
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except KeyboardInterrupt:
            self.stop()
            ctx.cancelled.set()
        finished = done.is_set()
        if ctx.lease_expired() and not ctx.lost.is_set():
            self._lease_lost(ctx)
        self._settle(ctx, finished, outcome)
        # Stops the heartbeat thread; it is not waited for: a request in flight ends
        # within the time that was left on the lease.
        done.set()

    def _lease_lost(self, ctx: JobContext) -> None:
        log.warning("job %s: the lease ran out without a renewal; cancelling the "
                    "handler, the outcome will not be reported", ctx.id)
        ctx._lose()

    def _settle(self, ctx: JobContext, finished: bool, outcome: Dict[str, Any]) -> None:
        tc = ctx.client
        try:
            if ctx.lost.is_set():
                log.info("job %s is no longer ours; not reporting its outcome", ctx.id)
                return
            error = outcome.get("error")
            if not finished or (self.stopping and error is not None):
                log.info("handing job %s back: worker stopping", ctx.id)
                tc.set_status(ctx.id, "QUEUED", "worker shutting down")
                return
            if error is None:
                try:
                    tc.complete_job(ctx.id, outcome.get("result"))
                except CoordinatorError:
                    raise
                except (TypeError, ValueError) as e:
                    # Nothing was sent: the result cannot be JSON. Failing the job says
                    # why; leaving it would keep it RUNNING until its lease ran out, and
                    # the error would end the worker's loop.
                    tc.fail_job(ctx.id, "the handler's result cannot be sent as JSON: "
                                + _describe(e))
            elif isinstance(error, JobCancelled):
                tc.set_status(ctx.id, "QUEUED", "handler cancelled")
            elif isinstance(error, self.retry_on) and ctx.attempt < ctx.max_attempts:
                log.warning("job %s: the handler raised %s; handing it back for a retry",
                            ctx.id, _describe(error))
                tc.set_status(ctx.id, "QUEUED", _describe(error)[:4096])
            else:
                # With its traceback: the job's `error` keeps only the message, and a
                # worker whose handlers fail should say so where it runs (WARNING
                # reaches stderr even when the application set up no logging).
                log.warning("job %s: the handler raised; failing the job", ctx.id,
                            exc_info=(type(error), error, error.__traceback__))
                tc.fail_job(ctx.id, _describe(error))
        except (Conflict, Unauthorized, Forbidden, NotFound) as e:
            log.info("job %s changed under us: %s", ctx.id, e)
        except CoordinatorError as e:
            log.warning("reporting job %s failed: %s (the lease will requeue it)", ctx.id, e)

    def _heartbeat(self, ctx: JobContext, done: threading.Event, interval: float) -> None:
        """Renew the lease every ``interval`` seconds, each time with one attempt whose
        timeout is the time left on the lease; past the lease without a renewal the
        job is lost."""
        while True:
            left = ctx.lease_left()
            if done.wait(interval if left is None else max(0.0, min(interval, left))):
                return
            if ctx.lost.is_set():
                return
            left = ctx.lease_left()
            if left is not None and left <= 0:
                self._lease_lost(ctx)
                return
            timeout = self.client.timeout if left is None else max(
                0.05, min(self.client.timeout, left))
            sent = time.monotonic()
            try:
                if self.heartbeat_route is not False:
                    try:
                        ctx.client.heartbeat(ctx.id, timeout=timeout, retries=0)
                        self.heartbeat_route = True
                        ctx._renewed(sent)
                        continue
                    except (NotFound, MethodNotAllowed):
                        if self.heartbeat_route:
                            raise  # the route exists: the job is gone
                        self.heartbeat_route = False
                ctx.client.report_progress(ctx.id, ctx.percent, timeout=timeout, retries=0)
                ctx._renewed(sent)
            except (Conflict, Unauthorized, Forbidden, NotFound) as e:
                log.info("job %s: %s; cancelling the handler", ctx.id, e)
                ctx._lose()
                return
            except CoordinatorError as e:
                log.warning("heartbeat for job %s failed: %s", ctx.id, e)
            except Exception:  # noqa: BLE001 - the thread must outlive any one beat
                log.exception("heartbeat for job %s failed", ctx.id)


def _refused(e: CoordinatorError) -> bool:
    """A client error answer: sending the same request again gets the same answer."""
    return isinstance(e, ProblemError) and 400 <= e.status < 500 and e.status not in (
        408, 409, 429)


def _transient(e: CoordinatorError) -> bool:
    """An error that says nothing about the job: no (readable) answer, or the server
    (or a proxy) busy or failing."""
    if isinstance(e, ProblemError):
        return e.status in (408, 429) or e.status >= 500
    return True


def _span(claim: Claim, until: Any) -> Optional[float]:
    """Seconds from the job's ``startedAt`` to ``until`` (server timestamps both)."""
    started, end = _epoch(claim.job.get("startedAt")), _epoch(until)
    if started is None or end is None or end <= started:
        return None
    return end - started


def lease_length(claim: Claim) -> Optional[float]:
    """The job's lease length in seconds (``startedAt`` to ``leaseExpiresAt``, both the
    server's, so this host's clock does not matter), or None when unknown."""
    return _span(claim, claim.job.get("leaseExpiresAt"))


def _epoch(stamp: Any) -> Optional[float]:
    """An RFC 3339 timestamp of the server (``…Z``) as seconds since the epoch."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, ProblemError):
        text = f"{type(e).__name__}: {e.detail or e}"
    return text[:65536] or type(e).__name__
