"""`Client.watch`: a job's event stream followed across reconnects — against a scripted
local SSE server (dropped connections, gaps, Retry-After, stop) and against the real
`coordinator serve --dev` (scripts/client-tests.sh keeps 16 events per job there)."""
from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from coordinator_client import (
    BadRequest,
    Client,
    Forbidden,
    JobEvent,
    NotFound,
    TransportError,
    Unauthorized,
)

SECRET = "coh_" + "7" * 49
WRONG_SECRET = "coh_0000000000000000000000000000000000000000000000000"

# One connection's answer: writes to the handler.
Conn = Callable[[BaseHTTPRequestHandler], None]


class Fake:
    """Answers the n-th request with the n-th scripted connection, recording each."""

    def __init__(self, conns: List[Conn]) -> None:
        self.conns = list(conns)
        self.seen: List[Dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake.seen.append({"path": self.path, "headers": dict(self.headers)})
                answer = fake.conns.pop(0) if fake.conns else closed
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def header(self, i: int, name: str) -> Optional[str]:
        for k, v in self.seen[i]["headers"].items():
            if k.lower() == name.lower():
                return str(v)
        return None

    def auth_headers(self, i: int) -> Dict[str, str]:
        return {k.lower(): v for k, v in self.seen[i]["headers"].items()
                if k.lower().startswith(("x-coordinator-", "signature", "x-api-key"))}


@pytest.fixture
def fake() -> Iterator[Callable[[List[Conn]], Fake]]:
    made: List[Fake] = []

    def start(conns: List[Conn]) -> Fake:
        made.append(Fake(conns))
        return made[-1]

    yield start
    for f in made:
        f.httpd.shutdown()
        f.httpd.server_close()


def ev(seq: int, kind: str = "progress", **data: Any) -> bytes:
    body = {"seq": seq, "type": kind, "data": data or {"percent": seq},
            "createdAt": "2026-12-06T00:00:00.000Z"}
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(body)}\n\n".encode()


def done(seq: int) -> bytes:
    return ev(seq, "completed", **{"from": "RUNNING", "to": "COMPLETED"})


def chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


def stream(*parts: bytes, end: bool = True) -> Conn:
    """An SSE answer sending ``parts`` as chunks; ``end``: a clean end, else the
    connection is cut."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for p in parts:
            chunk(h, p)
        if end:
            h.wfile.write(b"0\r\n\r\n")
        else:
            h.close_connection = True
        h.wfile.flush()

    return answer


def answer(status: int, body: Dict[str, Any], **headers: str) -> Conn:
    def send(h: BaseHTTPRequestHandler) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/problem+json" if status >= 400
                      else "application/json")
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    return send


def closed(h: BaseHTTPRequestHandler) -> None:
    h.close_connection = True


def seqs(events: List[JobEvent]) -> List[int]:
    return [e.seq for e in events]


def quick(url: str, **kw: Any) -> Tuple[Client, List[float]]:
    slept: List[float] = []
    return Client(url, "ci", SECRET, sleep=slept.append, **kw), slept


# ---- against a scripted server ------------------------------------------------------


@pytest.mark.parametrize("scheme", ["v1", "rfc9421", "api_key"])
def test_a_dropped_stream_resumes_with_last_event_id_signed_afresh(fake, scheme) -> None:
    f = fake([
        stream(ev(1, "created", to="PENDING"), ev(2), ev(3), end=False),
        # The server sends 2 and 3 again (a retried read): never yielded twice.
        stream(ev(2), ev(3), ev(4), done(5)),
    ])
    if scheme == "api_key":
        c = Client(f.url, api_key="cok_test", sleep=lambda s: None)
    else:
        c = Client(f.url, "ci", SECRET, scheme=scheme, sleep=lambda s: None)
    got = list(c.watch("j1"))
    assert seqs(got) == [1, 2, 3, 4, 5]
    assert all(e.gap is None for e in got)
    assert got[-1].status == "COMPLETED" and got[0].type == "created"
    assert [f.header(i, "Last-Event-ID") for i in range(2)] == ["0", "3"]
    assert all(f.header(i, "Accept") == "text/event-stream" for i in range(2))
    assert f.seen[0]["path"] == "/coordinator/jobs/j1/events"
    first, second = f.auth_headers(0), f.auth_headers(1)
    assert first and second
    if scheme != "api_key":
        assert first != second  # each connection has its own signature


def test_a_stream_the_server_ends_is_reopened_until_the_job_is_terminal(fake) -> None:
    f = fake([
        stream(ev(1), ev(2)),  # ended (say, the instance shut down): job not terminal
        answer(200, {"id": "j1", "status": "RUNNING"}),
        stream(b": keep-alive\n\n", ev(3), done(4)),
    ])
    c, _ = quick(f.url)
    assert seqs(list(c.watch("j1", after=0))) == [1, 2, 3, 4]
    assert [s["path"] for s in f.seen] == [
        "/coordinator/jobs/j1/events", "/coordinator/jobs/j1", "/coordinator/jobs/j1/events"]
    assert f.header(2, "Last-Event-ID") == "2"


def test_a_stream_of_a_job_already_terminal_ends_without_a_loop(fake) -> None:
    f = fake([
        stream(),
        answer(200, {"id": "j1", "status": "FAILED"}),
        stream(),
    ])
    c, slept = quick(f.url)
    assert list(c.watch("j1", after=7)) == []
    assert len(f.seen) == 3 and slept == []


def test_a_gap_is_reported_on_the_first_event_after_it(fake) -> None:
    f = fake([stream(b": gap: events 3 to 5 are no longer kept\n\n", ev(6), ev(7), done(9))])
    c, _ = quick(f.url)
    got = list(c.watch("j1", after=2))
    assert seqs(got) == [6, 7, 9]
    assert got[0].gap == (3, 5) and got[1].gap is None
    assert got[2].gap == (8, 8)  # a jump in seq alone is reported the same way


def test_retry_after_is_honoured_between_connections(fake) -> None:
    f = fake([
        answer(429, {"title": "busy", "status": 429}, Retry_After="1"),
        answer(503, {"title": "overloaded", "status": 503}, Retry_After="2"),
        stream(ev(1), done(2)),
    ])
    c, slept = quick(f.url)
    assert seqs(list(c.watch("j1"))) == [1, 2]
    assert slept == [1.0, 2.0]


def test_reconnects_are_bounded_and_back_off(fake) -> None:
    f = fake([closed] * 10)
    c, slept = quick(f.url, backoff=0.5, max_backoff=3.0)
    with pytest.raises(TransportError) as e:
        list(c.watch("j1", reconnects=4))
    assert len(f.seen) == 5 and len(slept) == 4
    assert all(s <= 3.0 for s in slept) and slept[-1] >= 1.5
    assert SECRET not in str(e.value) and e.value.__context__ is None


@pytest.mark.parametrize("status,exc", [(401, Unauthorized), (403, Forbidden),
                                        (404, NotFound), (400, BadRequest)])
def test_an_error_answer_raises_at_once(fake, status, exc) -> None:
    f = fake([answer(status, {"title": "no", "status": status, "field": "Last-Event-ID"})])
    c, slept = quick(f.url)
    with pytest.raises(exc):
        list(c.watch("j1"))
    assert len(f.seen) == 1 and slept == []


def test_a_stop_ends_the_watch(fake) -> None:
    stop = threading.Event()
    f = fake([stream(ev(1), ev(2), ev(3), done(4))])
    c = Client(f.url, "ci", SECRET).with_stop(stop)
    got = []
    for e in c.watch("j1"):
        got.append(e)
        stop.set()
    assert seqs(got) == [1]
    # A stop also ends the pause before a reconnect at once.
    f2 = fake([closed] * 3)
    stop2 = threading.Event()
    c2 = Client(f2.url, "ci", SECRET, backoff=30.0).with_stop(stop2)
    threading.Timer(0.3, stop2.set).start()
    t0 = time.monotonic()
    assert list(c2.watch("j1")) == []
    assert time.monotonic() - t0 < 5


def test_after_must_be_a_seq() -> None:
    c = Client("http://127.0.0.1:9", "ci", SECRET)
    for bad in (-1, True, "3"):
        with pytest.raises(ValueError):
            next(c.watch("j1", after=bad))  # type: ignore[arg-type]


# ---- against the dev server ---------------------------------------------------------


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def _watch_in_thread(c: Client, job_id: str, **kw: Any) -> Tuple[threading.Thread, Dict[str, Any]]:
    out: Dict[str, Any] = {"events": []}

    def run() -> None:
        try:
            for e in c.watch(job_id, **kw):
                out["events"].append(e)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_live_watch_follows_a_job_to_its_end(client: Client, key_client: Client,
                                             env: Dict[str, str], queue: str) -> None:
    job = client.create_job("build", queue=queue)
    t, out = _watch_in_thread(key_client, job["id"])
    client.set_status(job["id"], "QUEUED")
    claim = client.claim(queue, "w-watch")
    assert claim is not None
    tc = client.with_token(claim.token)
    for p in (10, 50, 90):
        tc.report_progress(claim.id, p)
    tc.complete_job(claim.id, {"ok": True})
    t.join(20)
    assert not t.is_alive() and "error" not in out
    got: List[JobEvent] = out["events"]
    assert seqs(got) == list(range(1, len(got) + 1))
    assert [e.type for e in got] == ["created", "status", "claimed", "progress", "progress",
                                     "progress", "completed"]
    assert got[-1].status == "COMPLETED" and got[-1].data["result"] == {"ok": True}
    assert all(e.gap is None and e.created_at for e in got)
    # From a seq on, and with rfc9421: the rest, then the end (the job is terminal).
    rfc = Client(env["COORDINATOR_URL"], env["COORDINATOR_CALLER"],
                 env["COORDINATOR_HMAC_SECRET"], scheme="rfc9421")
    assert seqs(list(rfc.watch(job["id"], after=4))) == [5, 6, 7]


def test_live_watch_reports_a_gap(client: Client, queue: str) -> None:
    job = client.create_job("build", queue=queue)
    client.set_status(job["id"], "QUEUED")
    claim = client.claim(queue, "w-gap")
    assert claim is not None
    tc = client.with_token(claim.token)
    for p in range(1, 31):  # the dev server of the client tests keeps 16 events per job
        tc.report_progress(claim.id, p)
    client.cancel_job(claim.id, "enough")
    got = list(client.watch(job["id"], after=1))
    assert got[0].gap is not None and got[0].gap[0] == 2 and got[0].gap[1] == got[0].seq - 1
    assert seqs(got) == list(range(got[0].seq, got[-1].seq + 1))
    assert all(e.gap is None for e in got[1:]) and got[-1].status == "CANCELLED"


def test_live_watch_errors(client: Client, env: Dict[str, str], queue: str) -> None:
    job = client.create_job("build", queue=queue)
    bad = Client(env["COORDINATOR_URL"], env["COORDINATOR_CALLER"], WRONG_SECRET)
    with pytest.raises(Unauthorized):
        next(bad.watch(job["id"]))
    with pytest.raises(NotFound):
        next(client.watch(str(uuid.uuid4())))
    with pytest.raises(BadRequest) as e:
        next(client.watch(job["id"], after=99))
    assert e.value.field == "Last-Event-ID"


def test_live_a_revoked_token_ends_the_stream_and_the_reconnect_is_401(
        client: Client, queue: str) -> None:
    job = client.create_job("build", queue=queue)
    client.set_status(job["id"], "QUEUED")
    claim = client.claim(queue, "w-revoked")
    assert claim is not None
    t, out = _watch_in_thread(client.with_token(claim.token), claim.id)
    deadline = time.monotonic() + 10
    while len(out["events"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seqs(out["events"]) == [1, 2, 3]  # created, status, claimed
    client.revoke_token(_jti(claim.token))
    t.join(20)
    assert not t.is_alive()
    assert isinstance(out.get("error"), Unauthorized), out
    client.cancel_job(claim.id)
