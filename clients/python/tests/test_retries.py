"""Retries, Retry-After and typed errors against a scripted local HTTP server."""
from __future__ import annotations

import json
import socket
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Tuple

import pytest

from coordinator_client import Client, TransportError, Unavailable
from coordinator_client.client import retry_after_seconds
from coordinator_client.errors import BadRequest, Conflict, ServerError, TooManyRequests

Answer = Tuple[int, dict, bytes]


class Scripted:
    def __init__(self) -> None:
        self.answers: List[Answer] = []
        self.seen: List[dict] = []


@pytest.fixture
def fake() -> Iterator[Tuple[str, Scripted]]:
    script = Scripted()

    class Handler(BaseHTTPRequestHandler):
        def do_any(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            script.seen.append({"method": self.command, "path": self.path,
                                "headers": dict(self.headers), "body": body})
            status, headers, out = script.answers.pop(0) if script.answers else (200, {}, b"{}")
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
    yield f"http://127.0.0.1:{server.server_address[1]}", script
    server.shutdown()
    server.server_close()


def problem(status: int, **extra: object) -> bytes:
    return json.dumps({"type": "urn:coordinator:problem:x", "title": "T", "status": status,
                       "detail": "d", **extra}).encode()


PJ = {"Content-Type": "application/problem+json"}


def test_503_and_429_are_retried_with_retry_after_and_signed_afresh(fake) -> None:
    url, script = fake
    sleeps: List[float] = []
    script.answers = [
        (503, {**PJ, "Retry-After": "2"}, problem(503)),
        (429, {**PJ, "Retry-After": "1"}, problem(429)),
        (200, {"Content-Type": "application/json"}, b'{"ok":true}'),
    ]
    c = Client(url, "svc", "coh_secret", sleep=sleeps.append)
    assert c.health() == {"ok": True}
    assert sleeps == [2.0, 1.0]
    sigs = [s["headers"]["X-Coordinator-Signature"] for s in script.seen]
    nonces = [s["headers"]["X-Coordinator-Nonce"] for s in script.seen]
    assert len(set(sigs)) == 3 and len(set(nonces)) == 3


def test_backoff_without_retry_after_then_typed_error(fake) -> None:
    url, script = fake
    sleeps: List[float] = []
    script.answers = [(503, PJ, problem(503))] * 3
    c = Client(url, api_key="cok_x", retries=2, backoff=0.5, sleep=sleeps.append)
    with pytest.raises(Unavailable) as e:
        c.create_job("build")
    assert e.value.status == 503 and e.value.detail == "d"
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0
    assert script.seen[0]["headers"]["X-API-Key"] == "cok_x"
    assert json.loads(script.seen[0]["body"]) == {"kind": "build"}


def test_retry_after_http_date_is_capped() -> None:
    assert retry_after_seconds(formatdate(1_000_100, usegmt=True), now=1_000_000) == 100
    assert retry_after_seconds("garbage") is None
    # ASCII digits only: "²" and "٣" are digits to str.isdigit(), not to HTTP.
    assert retry_after_seconds("\u00b2") is None
    assert retry_after_seconds("\u0663") is None
    assert retry_after_seconds(" 7 ") == 7
    assert retry_after_seconds(None) is None


def test_a_problem_keeps_the_whole_document_and_the_headers(fake) -> None:
    url, script = fake
    page = b"<html>bad gateway</html>" * 100
    script.answers = [
        (409, {**PJ, "X-Request-Id": "r1"},
         b'{"type":"urn:coordinator:problem:conflict","title":"Conflict",'
         b'"detail":"job is COMPLETED","jobStatus":"COMPLETED"}'),
        (502, {"Content-Type": "text/html"}, page),
        (502, {"Content-Type": "application/json"}, b'["not", "a", "problem"]'),
    ]
    c = Client(url, api_key="k", retries=0)
    with pytest.raises(Conflict) as e:
        c.complete_job("j1")
    p = e.value
    assert (p.type, p.title, p.detail) == ("urn:coordinator:problem:conflict", "Conflict",
                                           "job is COMPLETED")
    assert p.problem["jobStatus"] == "COMPLETED" and p.problem["status"] == 409
    assert p.headers["X-Request-Id"] == "r1"
    assert str(p) == "409 Conflict: job is COMPLETED"
    for _ in range(2):  # not a problem document: the reason phrase, the body's start
        with pytest.raises(ServerError) as e2:
            c.health()
        assert e2.value.problem["status"] == 502 and e2.value.title == "Bad Gateway"
        assert e2.value.detail == e2.value.problem["detail"]
        assert len(e2.value.detail) <= 500
    assert e2.value.detail == '["not", "a", "problem"]'


def test_errors_are_typed(fake) -> None:
    url, script = fake
    script.answers = [
        (400, PJ, problem(400, field="kind")),
        (409, PJ, problem(409)),
        (500, {"Content-Type": "text/plain"}, b"boom"),
        (429, {**PJ, "Retry-After": "3"}, problem(429)),
    ]
    c = Client(url, api_key="k", retries=0)
    with pytest.raises(BadRequest) as e:
        c.create_job("bad kind")
    assert e.value.field == "kind"
    with pytest.raises(Conflict):
        c.complete_job("j1")
    with pytest.raises(ServerError) as e2:
        c.health()
    assert e2.value.detail == "boom"
    with pytest.raises(TooManyRequests) as e3:
        c.health()
    assert e3.value.headers["Retry-After"] == "3"


def test_connection_errors_retry_only_when_safe() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    sleeps: List[float] = []
    c = Client(f"http://127.0.0.1:{port}", api_key="k", retries=2, sleep=sleeps.append, timeout=2)
    with pytest.raises(TransportError):
        c.health()
    assert len(sleeps) == 2
    sleeps.clear()
    with pytest.raises(TransportError):
        c.create_job("build")
    assert sleeps == []
    with pytest.raises(TransportError):
        c.create_job("build", idempotency_key="k1")
    assert len(sleeps) == 2


def test_a_proxys_503_is_retried_only_when_resending_is_safe(fake) -> None:
    url, script = fake
    page = (503, {"Content-Type": "text/html"}, b"<html>503 Service Unavailable</html>")
    sleeps: List[float] = []
    c = Client(url, api_key="k", retries=2, sleep=sleeps.append)
    # Not the server's refusal: the job may have been created already.
    script.answers = [page, (201, {"Content-Type": "application/json"}, b'{"id":"j2"}')]
    with pytest.raises(Unavailable):
        c.create_job("build")
    assert len(script.seen) == 1 and sleeps == []
    script.answers = [page]
    with pytest.raises(Unavailable):
        c.claim("q", "w1")
    assert len(script.seen) == 2 and sleeps == []
    # A GET, or a request with an Idempotency-Key, is sent again.
    script.answers = [page, (200, {"Content-Type": "application/json"}, b'{"ok":true}')]
    assert c.health() == {"ok": True}
    script.answers = [page, (201, {"Content-Type": "application/json"}, b'{"id":"j3"}')]
    assert c.create_job("build", idempotency_key="k1")["id"] == "j3"
    assert len(script.seen) == 6 and len(sleeps) == 2
    # The server's own refusal (problem+json) is retried for any request.
    script.answers = [(503, {**PJ, "Retry-After": "0"}, problem(503)),
                      (201, {"Content-Type": "application/json"}, b'{"id":"j4"}')]
    assert c.create_job("build")["id"] == "j4"


def test_a_stop_ends_the_pause_between_retries_and_starts_no_retry(fake) -> None:
    url, script = fake
    script.answers = [(503, {**PJ, "Retry-After": "30"}, problem(503))] * 5
    stop = threading.Event()
    c = Client(url, api_key="k").with_stop(stop)
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        c.health()
    assert time.monotonic() - t0 < 5
    assert len(script.seen) == 1
    # Once stopping, no retry is started, by a token client of it too.
    script.answers = [(503, PJ, problem(503)), (200, {"Content-Type": "application/json"}, b"{}")]
    with pytest.raises(Unavailable):
        c.with_token("t").health()
    assert len(script.seen) == 2
