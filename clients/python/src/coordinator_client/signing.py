"""Request signers: the `v1` scheme and the RFC 9421 HMAC-SHA256 profile.

Both are ``requests`` auth objects usable on their own::

    requests.get(url, auth=V1Auth("svc", secret))

and both sign the request *as prepared*: the target is ``PreparedRequest.path_url``
(what goes on the request line) and the body is the exact bytes sent (a ``str`` body
is sent as the UTF-8 bytes signed, whatever the version of requests). Each call signs
afresh with a new timestamp and nonce, so a retried request is never a replay.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Callable, Dict, Optional, Sequence, Union
from urllib.parse import urlsplit

import requests

HEADER_CALLER = "X-Coordinator-Caller"
HEADER_TIMESTAMP = "X-Coordinator-Timestamp"
HEADER_NONCE = "X-Coordinator-Nonce"
HEADER_KEY_VERSION = "X-Coordinator-Key-Version"
HEADER_SIGNATURE = "X-Coordinator-Signature"

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

BodyLike = Union[bytes, str, None]


def _body_bytes(body: object) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    raise TypeError(
        "cannot sign a streamed or file body: pass the exact bytes (data=bytes or json=)"
    )


def _send_as_signed(r: requests.PreparedRequest) -> None:
    """Make a ``str`` body the UTF-8 bytes that are signed. requests before 2.32 leaves
    it a ``str`` (its ``Content-Length`` counting characters), which http.client sends
    as Latin-1, or refuses past U+00FF: a signature over the UTF-8 bytes would never
    match what went out."""
    if isinstance(r.body, str):
        r.body = r.body.encode("utf-8")
        r.headers["Content-Length"] = str(len(r.body))


def new_nonce() -> str:
    """32 random hex characters."""
    return secrets.token_hex(16)


# ---- v1 ---------------------------------------------------------------------------


def canonical_v1(
    method: str, target: str, caller: str, timestamp: str, nonce: str, body: BodyLike
) -> str:
    """The seven `v1` lines joined by ``\\n``: ``v1``, METHOD, target exactly as sent,
    caller, timestamp, nonce (may be empty), hex SHA-256 of the body."""
    raw = _body_bytes(body)
    digest = hashlib.sha256(raw).hexdigest() if raw else _EMPTY_SHA256
    return "\n".join(["v1", method.upper(), target, caller, timestamp, nonce, digest])


def sign_v1(secret: str, canonical: str) -> str:
    """Lower-case hex HMAC-SHA256 of ``canonical``, keyed by the UTF-8 secret string."""
    return hmac.new(secret.encode("utf-8"), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def v1_headers(
    method: str,
    target: str,
    body: BodyLike,
    caller: str,
    secret: str,
    *,
    key_version: Optional[int] = None,
    timestamp: Optional[str] = None,
    nonce: Optional[str] = None,
) -> Dict[str, str]:
    """The ``X-Coordinator-*`` headers for one request. ``nonce=""`` signs without one."""
    ts = timestamp if timestamp is not None else str(int(time.time()))
    n = new_nonce() if nonce is None else nonce
    headers = {HEADER_CALLER: caller, HEADER_TIMESTAMP: ts}
    if n:
        headers[HEADER_NONCE] = n
    if key_version is not None:
        headers[HEADER_KEY_VERSION] = str(key_version)
    headers[HEADER_SIGNATURE] = sign_v1(secret, canonical_v1(method, target, caller, ts, n, body))
    return headers


class V1Auth(requests.auth.AuthBase):
    """Signs each request with the `v1` scheme (``X-Coordinator-*`` headers)."""

    def __init__(self, caller: str, secret: str, key_version: Optional[int] = None) -> None:
        self.caller = caller
        self._secret = secret
        self.key_version = key_version

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        _send_as_signed(r)
        r.headers.update(
            v1_headers(
                r.method or "GET",
                r.path_url,
                r.body,
                self.caller,
                self._secret,
                key_version=self.key_version,
            )
        )
        return r

    def __repr__(self) -> str:  # never the secret
        return f"V1Auth(caller={self.caller!r}, key_version={self.key_version!r})"


# ---- RFC 9421 ---------------------------------------------------------------------

_DIGESTS: Dict[str, Callable[[bytes], "hashlib._Hash"]] = {
    "sha-256": hashlib.sha256,
    "sha-512": hashlib.sha512,
}


def content_digest(body: BodyLike, algorithm: str = "sha-256") -> str:
    """An RFC 9530 ``Content-Digest`` value, e.g. ``sha-256=:base64:``."""
    h = _DIGESTS[algorithm](_body_bytes(body)).digest()
    return f"{algorithm}=:{base64.b64encode(h).decode('ascii')}:"


def _sf_string(s: str) -> str:
    if not s.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        raise ValueError(f"not a structured-field string: {s!r}")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def component_value(name: str, method: str, url: str, headers: Dict[str, str]) -> str:
    """The value of one covered component (RFC 9421 section 2) of a request."""
    parts = urlsplit(url)
    path = parts.path or "/"
    if name == "@method":
        return method.upper()
    if name == "@target-uri":
        query = "?" + parts.query if parts.query or url.endswith("?") else ""
        return f"{parts.scheme}://{parts.netloc}{path}{query}"
    if name == "@authority":
        netloc = parts.netloc.rsplit("@", 1)[-1]
        host, sep, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
        if port and {"http": "80", "https": "443"}.get(parts.scheme.lower()) == port:
            port = ""
        return host.lower() + (":" + port if port else "")
    if name == "@path":
        return path
    if name == "@query":
        return "?" + parts.query
    if name.startswith("@"):
        raise ValueError(f"unsupported derived component {name}")
    for k, v in headers.items():
        if k.lower() == name:
            return v.strip()
    raise ValueError(f"covered header {name} is not in the request")


def signature_params(
    components: Sequence[str],
    *,
    created: int,
    keyid: str,
    expires: Optional[int] = None,
    nonce: Optional[str] = None,
    alg: Optional[str] = "hmac-sha256",
) -> str:
    """The ``@signature-params`` value: the component list, then created, keyid, alg,
    expires and nonce (the order http-message-signatures uses)."""
    out = "(" + " ".join(_sf_string(c) for c in components) + ")"
    out += f";created={int(created)};keyid={_sf_string(keyid)}"
    if alg:
        out += f";alg={_sf_string(alg)}"
    if expires is not None:
        out += f";expires={int(expires)}"
    if nonce is not None:
        out += f";nonce={_sf_string(nonce)}"
    return out


def signature_base(
    method: str, url: str, headers: Dict[str, str], components: Sequence[str], params: str
) -> str:
    """The RFC 9421 signature base: one ``"name": value`` line per covered component,
    then ``"@signature-params"``; no trailing newline."""
    lines = [f"{_sf_string(c)}: {component_value(c, method, url, headers)}" for c in components]
    lines.append(f'"@signature-params": {params}')
    return "\n".join(lines)


def sign_rfc9421(secret: Union[str, bytes], base: str) -> str:
    """Base64 HMAC-SHA256 of the signature base (key: the UTF-8 secret string)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return base64.b64encode(hmac.new(key, base.encode("ascii"), hashlib.sha256).digest()).decode()


def rfc9421_headers(
    method: str,
    url: str,
    body: BodyLike,
    keyid: str,
    secret: Union[str, bytes],
    *,
    created: Optional[int] = None,
    expires: Optional[int] = None,
    nonce: Optional[str] = None,
    label: str = "sig1",
    use_path: bool = False,
    authority: bool = False,
    digest: str = "sha-256",
) -> Dict[str, str]:
    """``Content-Digest`` (with a body), ``Signature-Input`` and ``Signature``.

    Covers ``@method`` and ``@target-uri`` (or ``@path``, plus ``@query`` when the URL
    has one, with ``use_path``), ``@authority`` when asked, and ``content-digest``
    whenever there is a body. ``nonce=""`` signs without a nonce.
    """
    raw = _body_bytes(body)
    headers: Dict[str, str] = {}
    components = ["@method"]
    if authority:
        components.append("@authority")
    if use_path:
        components.append("@path")
        if urlsplit(url).query:
            components.append("@query")
    else:
        components.append("@target-uri")
    if raw:
        headers["Content-Digest"] = content_digest(raw, digest)
        components.append("content-digest")
    params = signature_params(
        components,
        created=int(time.time()) if created is None else created,
        keyid=keyid,
        expires=expires,
        nonce=(new_nonce() if nonce is None else nonce) or None,
    )
    base = signature_base(method, url, headers, components, params)
    headers["Signature-Input"] = f"{label}={params}"
    headers["Signature"] = f"{label}=:{sign_rfc9421(secret, base)}:"
    return headers


def _url_as_received(url: str) -> str:
    """``url`` with the authority the server rebuilds ``@target-uri`` from: the
    ``Host`` header as http.client sends it (no user info, no default port), lower
    case. The rest (path, ``?query``) is left exactly as prepared."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if i != -1:
            end = min(end, i)
    host = rest[:end].rsplit("@", 1)[-1].lower()
    default = {"http": ":80", "https": ":443"}.get(scheme.lower())
    if default and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme.lower()}://{host}{rest[end:]}"


class Rfc9421Auth(requests.auth.AuthBase):
    """Signs each request with an RFC 9421 HMAC-SHA256 signature and an RFC 9530
    ``Content-Digest``; ``keyid`` is ``CALLER`` or ``CALLER:VERSION``."""

    def __init__(
        self,
        caller: str,
        secret: str,
        key_version: Optional[int] = None,
        *,
        label: str = "sig1",
        use_path: bool = False,
        authority: bool = False,
        digest: str = "sha-256",
    ) -> None:
        self.keyid = caller if key_version is None else f"{caller}:{key_version}"
        self._secret = secret
        self.label = label
        self.use_path = use_path
        self.authority = authority
        self.digest = digest

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        _send_as_signed(r)
        r.headers.update(
            rfc9421_headers(
                r.method or "GET",
                # As the server reads it back: http.client leaves a default port and
                # any user info out of Host, and the server builds the URI from Host.
                _url_as_received(r.url or ""),
                r.body,
                self.keyid,
                self._secret,
                label=self.label,
                use_path=self.use_path,
                authority=self.authority,
                digest=self.digest,
            )
        )
        return r

    def __repr__(self) -> str:
        return f"Rfc9421Auth(keyid={self.keyid!r}, label={self.label!r})"


def _header_value(what: str, value: str) -> str:
    """``value`` when it can be sent as a header value as it is, else ``ValueError``
    naming ``what`` but never showing the value (http.client's own error would: a key
    read from a file with its trailing newline would be in the message)."""
    if (not isinstance(value, str) or value != value.strip(" \t")
            or any(not (0x20 <= ord(c) <= 0x7E or c == "\t") for c in value)):
        raise ValueError(f"{what} is not a valid HTTP header value (a line break, a "
                         "control or non-ASCII character, or surrounding whitespace)")
    return value


class ApiKeyAuth(requests.auth.AuthBase):
    """``X-API-Key: <key>``."""

    def __init__(self, api_key: str) -> None:
        self._key = _header_value("the API key", api_key)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["X-API-Key"] = self._key
        return r

    def __repr__(self) -> str:
        return "ApiKeyAuth(...)"


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <job token>``."""

    def __init__(self, token: str) -> None:
        self._token = _header_value("the job token", token)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def replace(self, token: str) -> None:
        """Act with ``token`` from now on (a renewed job token). One assignment, so a
        request on another thread sends either the old token or the new one."""
        self._token = _header_value("the job token", token)

    def __repr__(self) -> str:
        return "BearerAuth(...)"
