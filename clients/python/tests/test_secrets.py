"""No credential in an exception: a request that got no answer raises a
``TransportError`` whose text, args, attributes and formatted traceback (also with
the frames' locals) hold neither the API key, the job token, the HMAC secret nor the
signature sent; a credential that cannot be sent as a header is refused without
being shown."""
from __future__ import annotations

import socket
import struct
import threading
import traceback
from typing import Any, Callable, Iterator, List, Set

import pytest

from coordinator_client import Client, InvalidAnswer, TransportError

CANARY = "LEAKCANARY7"


def _listener(answer: Callable[[socket.socket], None]) -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()

    def run() -> None:
        while True:
            conn, _ = s.accept()
            conn.recv(65536)  # the request, credential headers and all
            answer(conn)

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{s.getsockname()[1]}"


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def _strings(obj: Any, seen: Set[int], depth: int = 0) -> Iterator[str]:
    """Every string reachable from ``obj`` through its attributes, items, args, cause
    and context (what a logger or error tracker could show)."""
    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, (str, bytes, bytearray)):
        yield obj if isinstance(obj, str) else bytes(obj).decode("latin-1")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, seen, depth + 1)
            yield from _strings(v, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _strings(v, seen, depth + 1)
        return
    if isinstance(obj, BaseException):
        yield repr(obj)
        for v in (obj.args, obj.__cause__, obj.__context__):
            yield from _strings(v, seen, depth + 1)
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict) and not isinstance(obj, type) and type(obj).__module__ != "builtins":
        yield from _strings(d, seen, depth + 1)


def _library_locals(e: BaseException) -> Iterator[str]:
    """The locals of this library's frames in ``e``'s traceback, as a traceback
    formatted with ``capture_locals`` shows them (the caller's own frames hold what
    it passed in)."""
    tb = e.__traceback__
    while tb is not None:
        if "coordinator_client" in tb.tb_frame.f_code.co_filename:
            for name, value in tb.tb_frame.f_locals.items():
                yield f"{name} = {value!r}"
        tb = tb.tb_next


def _check(e: BaseException, secrets: List[str], frames: bool = True) -> None:
    shown = [str(e), repr(e), "".join(traceback.format_exception(e)), *_strings(e, set())]
    if frames:
        shown.extend(_library_locals(e))
    for secret in secrets:
        for text in shown:
            assert secret not in text, text[:2000]
    assert e.__cause__ is None and e.__context__ is None


@pytest.fixture(params=["refused", "reset", "closed"])
def dead_url(request: pytest.FixtureRequest) -> str:
    if request.param == "refused":
        return _refused_url()
    if request.param == "reset":
        return _listener(_reset)
    return _listener(lambda conn: conn.close())


def test_a_transport_failure_never_shows_the_api_key_or_token(dead_url: str) -> None:
    for kw, secret in (({"api_key": f"cok_{CANARY}"}, f"cok_{CANARY}"),
                       ({"token": f"tok_{CANARY}"}, f"tok_{CANARY}")):
        c = Client(dead_url, retries=0, timeout=5, **kw)
        for call in (c.health, lambda: c.create_job("build", payload={"x": 1}),
                     lambda: c.claim("ci", "w1", wait=1)):
            with pytest.raises(TransportError) as e:
                call()
            _check(e.value, [secret, CANARY])


def test_a_transport_failure_never_shows_the_secret_or_signature(dead_url: str) -> None:
    sent: List[str] = []
    for scheme in ("v1", "rfc9421"):
        c = Client(dead_url, "svc", f"coh_{CANARY}", scheme=scheme, retries=0, timeout=5)
        inner = c.auth
        assert inner is not None

        def record(r: Any, inner: Any = inner) -> Any:
            r = inner(r)
            sent.extend(v for k, v in r.headers.items()
                        if k in ("X-Coordinator-Signature", "Signature"))
            return r

        c.auth = record  # type: ignore[assignment]
        with pytest.raises(TransportError) as e:
            c.create_job("build", payload={"x": 1})
        assert sent
        _check(e.value, [f"coh_{CANARY}", *sent])


def test_a_credential_that_is_no_header_value_is_refused_unshown() -> None:
    for kw in ({"api_key": f"cok_{CANARY}\n"}, {"token": f"tok_{CANARY}\r\nX: y"},
               {"api_key": f" cok_{CANARY}"}):
        with pytest.raises(ValueError) as e:
            Client("http://127.0.0.1:9", **kw).health()
        # Not its frames: the one that got the credential holds it as an argument.
        _check(e.value, [CANARY], frames=False)
    c = Client("http://127.0.0.1:9", token="tok_ok")
    with pytest.raises(ValueError) as e:
        c.auth.replace(f"tok_{CANARY}\n")  # type: ignore[union-attr]
    _check(e.value, [CANARY], frames=False)


def test_an_unreadable_answer_never_shows_the_urls_user_info() -> None:
    # A proxy's page with status 200 where JSON was expected; the base URL carries a
    # password for that proxy (kept out of every message, as the Rust client does).
    page = b"<html>maintenance</html>"

    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                     + str(len(page)).encode() + b"\r\nConnection: close\r\n\r\n" + page)
        conn.close()

    url = _listener(answer).replace("http://", f"http://proxyuser:{CANARY}@")
    c = Client(url, api_key="cok_x", retries=0, timeout=5)
    with pytest.raises(InvalidAnswer) as e:
        c.health()
    assert "/coordinator/health" in str(e.value)
    for text in (str(e.value), repr(e.value), "".join(traceback.format_exception(e.value))):
        assert CANARY not in text, text
