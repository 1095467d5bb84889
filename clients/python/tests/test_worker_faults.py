"""The Worker against a tiny fake server: faults the real server cannot produce (a
proxy's 503, a heartbeat that never answers, an answer that is not JSON)."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from coordinator_client import (
    BadRequest,
    Client,
    CoordinatorError,
    InvalidAnswer,
    JobContext,
    ProblemError,
    Worker,
)
from coordinator_client.client import Claim

#: (status, headers, body) for a request (method, path); None: never answer.
Route = Callable[[str, str], Optional[Tuple[int, Dict[str, str], bytes]]]


class Fake:
    def __init__(self) -> None:
        self.route: Route = lambda method, path: (200, {"Content-Type": "application/json"}, b"{}")
        self.seen: List[Tuple[str, str]] = []
        self.release = threading.Event()


@pytest.fixture
def fake() -> Iterator[Tuple[str, Fake]]:
    state = Fake()

    class Handler(BaseHTTPRequestHandler):
        def do_any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            state.seen.append((self.command, self.path))
            answer = state.route(self.command, self.path)
            if answer is None:  # hang until the test ends
                state.release.wait(60)
                return
            status, headers, out = answer
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PATCH = do_any

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    state.release.set()
    server.shutdown()
    server.server_close()


JSON = {"Content-Type": "application/json"}
PROXY_503 = (503, {"Content-Type": "text/html"}, b"<html>503 Service Unavailable</html>")


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def claim(lease: float = 30.0, token: float = 600.0) -> Claim:
    now = datetime.now(timezone.utc)
    job = {"id": "j1", "status": "RUNNING", "attempts": 1, "maxAttempts": 3,
           "startedAt": stamp(now), "leaseExpiresAt": stamp(now + timedelta(seconds=lease))}
    return Claim(job=job, token="tok", token_expires_at=stamp(now + timedelta(seconds=token)))


def paths(fake: Fake, suffix: str) -> List[str]:
    return [p for _, p in fake.seen if p.endswith(suffix)]


def test_a_transient_progress_failure_does_not_fail_the_job(fake) -> None:
    url, state = fake
    state.route = lambda m, p: PROXY_503 if p.endswith("/progress") else (200, JSON, b"{}")
    results: List[bool] = []

    def handler(job: JobContext) -> str:
        results.append(job.progress(50, "half way"))
        return "ok"

    w = Worker("q", handler, client=Client(url, api_key="k", retries=1, backoff=0.01),
               handle_signals=False)
    w.process(claim())
    assert results == [False]
    assert paths(state, "/complete") == ["/coordinator/jobs/j1/complete"]
    assert paths(state, "/fail") == []


def test_progress_without_an_answer_is_not_fatal() -> None:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    ctx = JobContext(claim(), Client(f"http://127.0.0.1:{port}", token="t", retries=0))
    assert ctx.progress(10) is False
    assert not ctx.is_cancelled and ctx.percent == 0


def test_cancelled_is_false_until_set() -> None:
    # First-hour finding (2026-12-06): `job.cancelled` was a plain Event, always true,
    # so a handler's `if job.cancelled: return` completed every job without running it.
    ctx = JobContext(claim(), Client("http://127.0.0.1:1", token="t", retries=0))
    assert not ctx.cancelled and not ctx.lost
    ctx.cancelled.set()
    assert ctx.cancelled and ctx.is_cancelled and not ctx.lost


def test_a_lost_lease_cancels_the_job_and_a_stuck_heartbeat_blocks_nothing(fake) -> None:
    url, state = fake
    # Heartbeats never get an answer: the 2 s lease runs out without a renewal.
    state.route = lambda m, p: None if p.endswith("/heartbeat") else (200, JSON, b"{}")
    saw: List[bool] = []

    def handler(job: JobContext) -> str:
        saw.append(job.cancelled.wait(10))
        return "too late"

    w = Worker("q", handler, client=Client(url, api_key="k"), handle_signals=False)
    t0 = time.monotonic()
    w.process(claim(lease=2.0))
    took = time.monotonic() - t0
    assert saw == [True]
    assert took < 5, took
    # Not completed, failed or handed back: the job is no longer ours.
    assert [p for _, p in state.seen if not p.endswith("/heartbeat")] == []
    beats = paths(state, "/heartbeat")
    assert 1 <= len(beats) <= 3, beats  # one attempt each, no retries


def test_a_renewed_lease_is_kept(fake) -> None:
    url, state = fake
    beat = json.dumps({"leaseExpiresAt": "2026-01-01T00:00:00Z", "cancelRequested": False})
    state.route = lambda m, p: (200, JSON, beat.encode() if p.endswith("/heartbeat") else b"{}")

    def handler(job: JobContext) -> str:
        time.sleep(2.5)  # longer than the lease: only heartbeats keep it
        return "done" if not job.is_cancelled else "cancelled"

    w = Worker("q", handler, client=Client(url, api_key="k"), handle_signals=False)
    w.process(claim(lease=1.5))
    assert len(paths(state, "/heartbeat")) >= 3
    assert paths(state, "/complete") == ["/coordinator/jobs/j1/complete"]


HTML_200 = (200, {"Content-Type": "text/html"}, b"<html>hello from the proxy</html>")


def test_a_non_json_answer_is_a_coordinator_error(fake) -> None:
    url, state = fake
    state.route = lambda m, p: HTML_200
    c = Client(url, api_key="k", retries=0)
    for call in (c.health, lambda: c.heartbeat("j1"), lambda: c.claim("q", "w"),
                 lambda: c.get_job("j1"), c.openapi):
        with pytest.raises(InvalidAnswer) as e:
            call()
        assert isinstance(e.value, CoordinatorError)
    # A JSON answer without a token is no claim either.
    state.route = lambda m, p: (200, JSON, b'{"id":"j1"}')
    with pytest.raises(InvalidAnswer):
        c.claim("q", "w")


def test_a_worker_outlives_answers_that_are_not_json(fake) -> None:
    url, state = fake
    state.route = lambda m, p: HTML_200
    w = Worker("q", lambda job: "ok", client=Client(url, api_key="k", retries=0),
               handle_signals=False)
    assert w.run(stop_when_idle=True) == 0  # the claim's answer is logged, not raised
    # The heartbeat thread goes on beating through such answers.
    state.route = lambda m, p: HTML_200 if p.endswith("/heartbeat") else (200, JSON, b"{}")
    w = Worker("q", lambda job: time.sleep(1.0) or "ok",
               client=Client(url, api_key="k", retries=0), handle_signals=False,
               heartbeat_interval=0.2)
    w.process(claim(lease=30))
    assert len(paths(state, "/heartbeat")) >= 3
    assert paths(state, "/complete") == ["/coordinator/jobs/j1/complete"]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_claim_refused_with_a_client_error_stops_the_worker(fake, status: int) -> None:
    url, state = fake
    body = json.dumps({"type": "urn:coordinator:problem:x", "title": "T", "status": status,
                       "detail": "queue: bad"}).encode()
    state.route = lambda m, p: (status, {"Content-Type": "application/problem+json"}, body)
    w = Worker("q", lambda job: "ok", client=Client(url, api_key="k", retries=0),
               handle_signals=False, long_poll=0, poll_min=0.01, poll_max=0.01)
    raised: List[BaseException] = []

    def go() -> None:
        try:
            w.run()
        except CoordinatorError as e:
            raised.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    still_running = t.is_alive()
    w.stop()
    t.join(10)
    assert not still_running, f"the worker kept claiming ({len(state.seen)} claims)"
    assert len(raised) == 1 and isinstance(raised[0], ProblemError)
    assert raised[0].status == status
    assert status != 400 or isinstance(raised[0], BadRequest)
    assert len(state.seen) == 1


def test_stopping_the_worker_ends_its_pause_between_retries(fake) -> None:
    url, state = fake
    body = json.dumps({"type": "urn:coordinator:problem:x", "title": "T", "status": 503,
                       "detail": "busy"}).encode()
    state.route = lambda m, p: (503, {"Content-Type": "application/problem+json",
                                      "Retry-After": "30"}, body)
    w = Worker("q", lambda job: "ok", client=Client(url, api_key="k"), handle_signals=False,
               long_poll=1)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    time.sleep(0.3)  # the claim was refused: the client waits 30 s to ask again
    t0 = time.monotonic()
    w.stop()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 3
    assert len(state.seen) == 1


def test_a_job_claimed_as_the_worker_stops_is_handed_back(fake) -> None:
    url, state = fake
    c = claim()
    answer = json.dumps({**c.job, "token": "tok_j1", "tokenExpiresAt": c.token_expires_at})
    w: Optional[Worker] = None

    def route(method: str, path: str) -> Tuple[int, Dict[str, str], bytes]:
        if path.endswith("/claim"):
            assert w is not None
            w.stop()  # the stop comes while the claim that gets the job is in flight
            time.sleep(0.2)
            return 200, JSON, answer.encode()
        return 200, JSON, json.dumps({**c.job, "status": "QUEUED"}).encode()

    state.route = route
    ran: List[str] = []
    w = Worker("q", lambda job: ran.append(job.id), client=Client(url, api_key="k"),
               handle_signals=False, long_poll=20)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert ran == []  # not run: the worker is stopping ...
    assert state.seen[-1] == ("PATCH", "/coordinator/jobs/j1/status")  # ... but handed back
    assert paths(state, "/claim") == ["/coordinator/queues/q/claim"]


@pytest.mark.parametrize("result", [{"at": datetime(2026, 1, 1)}, {"x": float("nan")}, {1, 2}])
def test_a_result_that_is_not_json_fails_the_job_and_the_worker_goes_on(fake, result) -> None:
    url, state = fake
    c = claim()
    answers = [json.dumps({**c.job, "token": "tok_j1",
                           "tokenExpiresAt": c.token_expires_at}).encode()]

    def route(method: str, path: str) -> Tuple[int, Dict[str, str], bytes]:
        if path.endswith("/claim"):
            return (200, JSON, answers.pop()) if answers else (204, {}, b"")
        return 200, JSON, json.dumps({**c.job, "status": "FAILED"}).encode()

    state.route = route
    w = Worker("q", lambda job: result, client=Client(url, api_key="k", retries=0),
               handle_signals=False)
    # Before: the TypeError (or the NaN the server refused) left the job RUNNING, and
    # the TypeError ended `run` itself.
    assert w.run(stop_when_idle=True) == 1
    assert paths(state, "/complete") == []
    assert paths(state, "/fail") == ["/coordinator/jobs/j1/fail"]
