"""The client against local HTTP servers and on its own (no coordinator needed):
redirects are never followed, answers are capped at 16 MiB, a claim's repr hides its
token, configuration numbers are ASCII digits."""
from __future__ import annotations

import json
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from coordinator_client import Claim, Client, ProblemError, ResponseTooLarge
from coordinator_client.client import MAX_BODY

MiB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


class Server:
    """A local HTTP server whose every request is recorded and answered by ``answer``."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.seen: List[Dict[str, Any]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                seen.append({"method": self.command, "path": self.path,
                             "headers": dict(self.headers), "body": self.rfile.read(n)})
                try:
                    answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up (the size cap)

            do_GET = do_POST = do_PATCH = do_any

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler], None]], Server]]:
    servers: List[Server] = []

    def start(answer: Callable[[BaseHTTPRequestHandler], None]) -> Server:
        servers.append(Server(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"{}",
         headers: Optional[Dict[str, str]] = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


# ---- redirects ----------------------------------------------------------------------


def _credentials() -> List[Dict[str, Any]]:
    return [{"caller": "svc", "secret": "coh_secret"},
            {"caller": "svc", "secret": "coh_secret", "scheme": "rfc9421"},
            {"api_key": "cok_secret"},
            {"token": "tok_secret"}]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("creds", _credentials(), ids=["v1", "rfc9421", "api-key", "token"])
def test_a_redirect_is_never_followed_and_raises(serve, status: int, creds: Dict[str, Any]) -> None:
    elsewhere = serve(lambda h: send(h, 200, b'{"id":"j1"}'))
    here = serve(lambda h: send(h, status, b"", {"Location": elsewhere.url + h.path}))
    c = Client(here.url, retries=0, **creds)
    with pytest.raises(ProblemError) as e:
        c.create_job("build", payload={"x": 1})  # a POST with a signed body
    assert e.value.status == status
    assert e.value.headers["Location"].startswith(elsewhere.url)
    with pytest.raises(ProblemError) as e2:
        c.health()  # a GET
    assert e2.value.status == status
    assert len(here.seen) == 2
    assert elsewhere.seen == []  # neither the credential nor the body went there


@pytest.mark.parametrize("queue", ["..", ".", "%2e%2E"])
def test_a_dot_segment_is_refused_before_anything_is_sent(serve, queue: str) -> None:
    # `..` would be normalised away: PATCH /coordinator/queues/.. became PATCH /coordinator/.
    here = serve(lambda h: send(h, 200, b"{}"))
    c = Client(here.url, api_key="k", retries=0)
    with pytest.raises(ValueError, match="URL normalisation"):
        c.request("PATCH", f"/coordinator/queues/{queue}", json={"paused": True})
    if queue != "%2e%2E":
        with pytest.raises(ValueError):
            c.patch_queue(queue, paused=True)
    assert here.seen == []
    c.request("GET", "/a/b..c/.d?x=/../")  # dots inside a segment or the query are fine
    assert len(here.seen) == 1


def test_a_redirect_on_a_custom_session_is_not_followed_either(serve) -> None:
    elsewhere = serve(lambda h: send(h, 200))
    here = serve(lambda h: send(h, 307, b"", {"Location": elsewhere.url + h.path}))
    c = Client(here.url, api_key="cok_secret", retries=0, session=requests.Session())
    with pytest.raises(ProblemError):
        c.claim("ci", "w1")
    assert elsewhere.seen == []


# ---- the answer size cap ------------------------------------------------------------


def stream_body(h: BaseHTTPRequestHandler) -> None:
    """``?status=&size=&framing=length|chunked|close``: ``size`` bytes of JSON-ish
    filler, sent in 1 MiB pieces."""
    q = {k: v[0] for k, v in parse_qs(urlsplit(h.path).query).items()}
    status, size, framing = int(q.get("status", 200)), int(q["size"]), q.get("framing", "length")
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    if framing == "length":
        h.send_header("Content-Length", str(size))
    elif framing == "chunked":
        h.send_header("Transfer-Encoding", "chunked")
    else:
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    piece = b" " * MiB
    left = size
    while left > 0:
        part = piece[:min(left, MiB)]
        if framing == "chunked":
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        else:
            h.wfile.write(part)
        left -= len(part)
    if framing == "chunked":
        h.wfile.write(b"0\r\n\r\n")


def test_the_cap_is_16_mib() -> None:
    assert MAX_BODY == 16 * MiB


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("status", [200, 400, 500, 503])
def test_an_answer_past_the_cap_raises_and_memory_stays_bounded(
    serve, framing: str, status: int
) -> None:
    big = serve(stream_body)
    c = Client(big.url, api_key="k", retries=0)
    # 64 MiB sent, unless the client hangs up: without the cap all of it would be held.
    path = f"/big?status={status}&size={64 * MiB}&framing={framing}"
    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLarge, match="larger than 16 MiB"):
            c.request("GET", path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_BODY, f"peak {peak / MiB:.1f} MiB"


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_one_byte_past_the_cap_raises_and_the_cap_itself_is_read(serve, framing: str) -> None:
    big = serve(stream_body)
    c = Client(big.url, api_key="k", retries=0)
    with pytest.raises(ResponseTooLarge):
        c.request("GET", f"/x?size={MAX_BODY + 1}&framing={framing}")
    resp = c.request("GET", f"/x?size={MAX_BODY}&framing={framing}")
    assert len(resp.content) == MAX_BODY


def test_a_capped_answer_is_not_retried_and_the_client_stays_usable(serve) -> None:
    script: List[Callable[[BaseHTTPRequestHandler], None]] = [
        lambda h: stream_body_of(h, 503, 17 * MiB),
        lambda h: send(h, 200, b'{"ok":true}', JSON),
        lambda h: stream_body_of(h, 200, 17 * MiB),
    ]
    s = serve(lambda h: script.pop(0)(h))
    sleeps: List[float] = []
    c = Client(s.url, api_key="k", retries=3, sleep=sleeps.append)
    # A 503 is retried without its body being read; the next answer is read.
    assert c.health() == {"ok": True}
    assert len(sleeps) == 1
    # Too large is not retried, even where a resend would be safe.
    with pytest.raises(ResponseTooLarge):
        c.create_job("build", idempotency_key="k1")
    assert len(s.seen) == 3 and len(sleeps) == 1


def stream_body_of(h: BaseHTTPRequestHandler, status: int, size: int) -> None:
    h.path = f"/?status={status}&size={size}"
    stream_body(h)


def test_json_and_text_still_work_on_a_capped_read(serve) -> None:
    doc = {"items": [{"id": str(i)} for i in range(2000)], "nextCursor": None}
    s = serve(lambda h: send(h, 200, json.dumps(doc).encode(), JSON))
    c = Client(s.url, api_key="k")
    assert c.list_jobs() == doc
    assert json.loads(c.metrics()) == doc


# ---- what a claim shows -------------------------------------------------------------


def test_a_claims_repr_never_shows_its_token(serve) -> None:
    answer = {"id": "j1", "status": "RUNNING", "token": "tok_SECRET",
              "tokenExpiresAt": "2026-01-01T00:00:00Z"}
    s = serve(lambda h: send(h, 200, json.dumps(answer).encode(), JSON))
    claim = Client(s.url, api_key="k").claim("ci", "w1")
    assert claim is not None and claim.token == "tok_SECRET" and claim.id == "j1"
    for shown in (repr(claim), str(claim), f"{claim!r}", repr([claim])):
        assert "tok_SECRET" not in shown
        assert "token=..." in shown and "'j1'" in shown and "2026-01-01" in shown
    direct = Claim(job={"id": "j2"}, token="tok_OTHER", token_expires_at="")
    assert "tok_OTHER" not in repr(direct)
    assert direct == Claim(job={"id": "j2"}, token="tok_OTHER", token_expires_at="")


# ---- configuration numbers ----------------------------------------------------------


@pytest.mark.parametrize("version", ["\u00b2", "\u0663", "3x", "-1", " 3", "0", "00"])
def test_a_key_version_is_ascii_digits(version: str) -> None:
    env = {"COORDINATOR_URL": "http://127.0.0.1:1", "COORDINATOR_CALLER": "svc",
           "COORDINATOR_HMAC_SECRET": "coh_secret", "COORDINATOR_KEY_VERSION": version}
    with pytest.raises(ValueError, match="COORDINATOR_KEY_VERSION"):
        Client.from_env(env)
    env["COORDINATOR_KEY_VERSION"] = "3"
    assert "key_version=3" in repr(Client.from_env(env).auth)


def test_a_worker_heartbeats_often_enough_for_a_short_lease_or_token() -> None:
    from coordinator_client import Worker

    w = Worker("q", lambda job: None, client=Client("http://127.0.0.1:9", api_key="k"),
               handle_signals=False)
    job = {"id": "j", "startedAt": "2026-12-06T01:00:00.000Z",
           "leaseExpiresAt": "2026-12-06T01:00:30.000Z"}
    short_token = Claim(job=job, token="t", token_expires_at="2026-12-06T01:00:06.000Z")
    assert w.beat_interval(short_token) == 1.5  # a quarter of the token's 6 s
    long_token = Claim(job=job, token="t", token_expires_at="2026-12-06T02:00:00.000Z")
    assert w.beat_interval(long_token) == 10.0  # a third of the 30 s lease
    w.heartbeat_interval = 2.0
    assert w.beat_interval(long_token) == 2.0  # never longer than configured
    odd = Claim(job={"id": "j"}, token="t", token_expires_at="not a time")
    assert w.beat_interval(odd) == 2.0


def test_from_env_without_credentials_says_where_the_dev_ones_are() -> None:
    # First-hour finding (2026-12-06): the CLI reads .coordinator/dev-credentials.env by
    # itself, the client does not, and its error did not say how to load the file.
    with pytest.raises(ValueError, match=r"\. \.coordinator/dev-credentials\.env"):
        Client.from_env({})
