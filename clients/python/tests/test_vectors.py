"""The signers against docs/signing-vectors.json (no server needed). The RFC 9421
answers are also verified with the independent http-message-signatures library."""
from __future__ import annotations

import http.client
from typing import Any, Dict

import pytest
import requests
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms

from coordinator_client import signing
from coordinator_client.signing import (
    Rfc9421Auth,
    V1Auth,
    canonical_v1,
    rfc9421_headers,
    sign_rfc9421,
    sign_v1,
    signature_base,
    v1_headers,
)


def test_the_file_has_every_kind_of_case(vectors: Dict[str, Any]) -> None:
    for scheme in ("v1", "rfc9421"):
        vs = vectors[scheme]
        assert len(vs) >= 5
        assert any(v["body"] for v in vs)
        assert any(not v["body"].isascii() for v in vs)
        assert any("%C3%A9" in v.get("target", v.get("url", "")) for v in vs)
        assert any("?" in v.get("target", v.get("url", "")) for v in vs)


def test_v1_canonical_signature_and_headers(vectors: Dict[str, Any]) -> None:
    for v in vectors["v1"]:
        canonical = canonical_v1(v["method"], v["target"], v["caller"], v["timestamp"], v["nonce"], v["body"])
        assert canonical == v["canonical"], v["name"]
        assert sign_v1(v["secret"], canonical) == v["signature"], v["name"]
        headers = v1_headers(
            v["method"], v["target"], v["body"].encode(), v["caller"], v["secret"],
            key_version=v["key_version"], timestamp=v["timestamp"], nonce=v["nonce"],
        )
        assert headers == v["headers"], v["name"]
        # One changed body byte changes the signature.
        assert sign_v1(v["secret"], canonical_v1(
            v["method"], v["target"], v["caller"], v["timestamp"], v["nonce"], v["body"] + " "
        )) != v["signature"]


def test_v1_auth_signs_the_prepared_request(vectors: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for v in vectors["v1"]:
        monkeypatch.setattr(signing.time, "time", lambda: float(v["timestamp"]))
        monkeypatch.setattr(signing, "new_nonce", lambda: v["nonce"])
        auth = V1Auth(v["caller"], v["secret"], v["key_version"])
        req = requests.Request(
            v["method"], "http://127.0.0.1:8080" + v["target"],
            data=v["body"].encode() or None, auth=auth,
        ).prepare()
        assert req.path_url == v["target"], v["name"]
        for name, value in v["headers"].items():
            assert req.headers[name] == value, (v["name"], name)
        assert v["secret"] not in repr(auth)


def _verify_with_library(v: Dict[str, Any], headers: Dict[str, str]) -> None:
    class Keys(HTTPSignatureKeyResolver):
        def resolve_public_key(self, key_id: str) -> bytes:
            return v["secret"].encode()

    class Verifier(HTTPMessageVerifier):
        def validate_created_and_expires(self, *args: Any, **kwargs: Any) -> None:
            pass  # the vectors' times are fixed in the past

    req = requests.Request(v["method"], v["url"], data=v["body"].encode() or None, headers=headers).prepare()
    verifier = Verifier(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=Keys())
    results = verifier.verify(req, max_age=None, body=v["body"].encode())
    assert results and results[0].label == v["label"]


def test_rfc9421_base_signature_and_headers(vectors: Dict[str, Any]) -> None:
    for v in vectors["rfc9421"]:
        headers = rfc9421_headers(
            v["method"], v["url"], v["body"].encode(), v["keyid"], v["secret"],
            created=v["created"], expires=v["expires"], nonce=v["nonce"] or "",
            label=v["label"], use_path="@path" in v["components"],
            authority="@authority" in v["components"], digest=v["digest"] or "sha-256",
        )
        assert headers == v["headers"], v["name"]
        lower = {k.lower(): val for k, val in headers.items()}
        base = signature_base(v["method"], v["url"], lower, v["components"], v["signature_params"])
        assert base == v["signature_base"], v["name"]
        assert sign_rfc9421(v["secret"], base) == v["signature"], v["name"]
        _verify_with_library(v, headers)
        # The library refuses a one-byte change of the body.
        tampered = dict(v, body=v["body"] + " ")
        if v["body"]:
            with pytest.raises(Exception):
                _verify_with_library(tampered, headers)


def test_rfc9421_auth_object(vectors: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    v = next(v for v in vectors["rfc9421"] if v["nonce"] and v["body"])
    monkeypatch.setattr(signing.time, "time", lambda: float(v["created"]))
    monkeypatch.setattr(signing, "new_nonce", lambda: v["nonce"])
    caller, _, version = v["keyid"].partition(":")
    auth = Rfc9421Auth(caller, v["secret"], int(version) if version else None, label=v["label"])
    req = requests.Request(v["method"], v["url"], data=v["body"].encode(), auth=auth).prepare()
    for name, value in v["headers"].items():
        assert req.headers[name] == value, name


def test_rfc9421_appendix_b25(vectors: Dict[str, Any]) -> None:
    import base64

    ref = vectors["rfc9421_reference"][0]
    headers = {name: value for name, value in ref["components"]}
    names = [name for name, _ in ref["components"]]
    base = signature_base("POST", "http://example.com/foo?param=Value&Pet=dog", headers, names,
                          ref["signature_params"])
    assert base == ref["signature_base"]
    assert sign_rfc9421(base64.b64decode(ref["key_base64"]), base) == ref["signature"]


@pytest.mark.parametrize("url, port, rebuilt", [
    ("https://Coordinator.Example:443/coordinator/health?x=1", 443,
     "https://coordinator.example/coordinator/health?x=1"),
    ("http://coordinator.example:80/coordinator/health", 80,
     "http://coordinator.example/coordinator/health"),
    ("http://user:pw@coordinator.example:8080/coordinator/jobs", 8080,
     "http://coordinator.example:8080/coordinator/jobs"),
])
def test_rfc9421_auth_signs_the_target_uri_the_server_rebuilds(
        url: str, port: int, rebuilt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server rebuilds ``@target-uri`` from the ``Host`` header it got (lower-cased,
    a default port left out): http.client leaves a URL's default port and user info
    out of ``Host``, so a signature over the URL as spelled would never verify."""
    kind = http.client.HTTPSConnection if url.startswith("https") else http.client.HTTPConnection
    conn = kind("coordinator.example", port)
    conn.putrequest("GET", "/")  # buffered, not sent
    host = next(line for line in conn._buffer if line.startswith(b"Host:"))  # type: ignore[attr-defined]
    assert host.decode() == "Host: " + rebuilt.split("/")[2]
    monkeypatch.setattr(signing.time, "time", lambda: 1700000000.0)
    monkeypatch.setattr(signing, "new_nonce", lambda: "n1")
    req = requests.Request("GET", url, auth=Rfc9421Auth("svc", "coh_x")).prepare()
    params = req.headers["Signature-Input"].split("=", 1)[1]
    base = signature_base("GET", rebuilt, {}, ["@method", "@target-uri"], params)
    assert req.headers["Signature"] == f"sig1=:{sign_rfc9421('coh_x', base)}:"


@pytest.mark.parametrize("auth", [V1Auth("svc", "coh_x"), Rfc9421Auth("svc", "coh_x")])
def test_a_text_body_is_signed_and_sent_as_the_same_utf8_bytes(auth: Any) -> None:
    """requests before 2.32 leaves a ``str`` body a ``str`` (with ``Content-Length``
    counting characters), which http.client sends as Latin-1 (or refuses): the
    signers make it the UTF-8 bytes they sign."""
    req = requests.Request("POST", "http://127.0.0.1:8080/coordinator/jobs",
                           data=b"placeholder").prepare()
    text = '{"kind":"build","payload":{"note":"naïve ✓"}}'
    req.body = text  # as requests 2.25-2.31 prepare a str body
    req.headers["Content-Length"] = str(len(text))
    req = auth(req)
    raw = text.encode("utf-8")
    assert req.body == raw
    assert req.headers["Content-Length"] == str(len(raw))
    if isinstance(auth, V1Auth):
        h = req.headers
        canonical = canonical_v1("POST", "/coordinator/jobs", "svc", h["X-Coordinator-Timestamp"],
                                 h["X-Coordinator-Nonce"], raw)
        assert h["X-Coordinator-Signature"] == sign_v1("coh_x", canonical)
    else:
        assert req.headers["Content-Digest"] == signing.content_digest(raw)
