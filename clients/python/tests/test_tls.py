"""HTTPS with a private CA: ``ca_file`` (or ``COORDINATOR_CA_FILE``) trusts the CA that
issued a local test server's certificate; without it the request is refused. The
certificate and CA are the throw-away fixtures of the Rust client's tests."""
from __future__ import annotations

import http.server
import pathlib
import ssl
import threading
from typing import Iterator, List

import pytest

from coordinator_client import Client, TransportError

TLS = pathlib.Path(__file__).resolve().parents[2] / "rust" / "tests" / "tls"


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: List[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        _Handler.seen.append(self.path)
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(TLS / "server.pem", TLS / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_ca_file_trusts_the_private_ca(https_url: str) -> None:
    _Handler.seen.clear()
    c = Client(https_url, api_key="x", ca_file=str(TLS / "ca.pem"), retries=0)
    assert c.livez() == {"ok": True}
    # A job token client made from it shares the session, so the CA too.
    assert c.with_token("t").request("GET", "/livez", auth=None).json() == {"ok": True}
    env_client = Client.from_env({"COORDINATOR_URL": https_url, "COORDINATOR_CLIENT_API_KEY": "x",
                                  "COORDINATOR_CA_FILE": str(TLS / "ca.pem")}, retries=0)
    assert env_client.livez() == {"ok": True}
    assert _Handler.seen == ["/livez"] * 3


def test_without_the_ca_the_server_is_refused(https_url: str) -> None:
    _Handler.seen.clear()
    c = Client(https_url, api_key="x", retries=0)
    with pytest.raises(TransportError) as e:
        c.livez()
    assert "certificate" in str(e.value).lower()
    assert _Handler.seen == []


def test_a_missing_ca_file_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="CA file"):
        Client("https://localhost:1", api_key="x", ca_file=str(TLS / "missing.pem"))
