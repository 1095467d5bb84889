#!/usr/bin/env python3
"""Writes docs/signing-vectors.json: known answers for the `v1` signature scheme and
the RFC 9421 HTTP Message Signatures profile (HMAC-SHA256, RFC 9530 Content-Digest).

usage: signing_vectors.py [--check]   (--check: exit 1 if the file differs)

Python 3 standard library only, written straight from the specifications
(README "Signing requests"; RFC 9421 sections 2 and 3; RFC 9530), so that the clients'
signers and the server's are checked against an implementation none of them shares.
The `v1` answers are also checked by the server's own signer (tests/api/signing_vectors.rs)
and the RFC 9421 ones by the PyPI library http-message-signatures
(clients/python/tests/test_vectors.py).
"""
import base64
import hashlib
import hmac
import json
import pathlib
import sys
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "signing-vectors.json"

SECRET = "coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg1rvF0S"
SECRET_2 = "coh_zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIH0aBcDe"
JOB = "0190a0a0-0000-7000-8000-000000000001"


def v1(name, method, target, body, nonce, secret=SECRET, caller="svc",
       timestamp="1700000000", key_version=None, note=None):
    body_bytes = body.encode("utf-8")
    canonical = "\n".join([
        "v1", method.upper(), target, caller, timestamp, nonce,
        hashlib.sha256(body_bytes).hexdigest(),
    ])
    signature = hmac.new(secret.encode("utf-8"), canonical.encode("utf-8"),
                         hashlib.sha256).hexdigest()
    headers = {
        "X-Coordinator-Caller": caller,
        "X-Coordinator-Timestamp": timestamp,
    }
    if nonce:
        headers["X-Coordinator-Nonce"] = nonce
    if key_version is not None:
        headers["X-Coordinator-Key-Version"] = str(key_version)
    headers["X-Coordinator-Signature"] = signature
    v = {
        "name": name,
        "method": method,
        "target": target,
        "caller": caller,
        "timestamp": timestamp,
        "nonce": nonce,
        "key_version": key_version,
        "body": body,
        "secret": secret,
        "body_sha256": hashlib.sha256(body_bytes).hexdigest(),
        "canonical": canonical,
        "signature": signature,
        "headers": headers,
    }
    if note:
        v["note"] = note
    return v


def sf_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def content_digest(alg, body):
    h = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}[alg]
    return f"{alg}=:{base64.b64encode(h(body).digest()).decode()}:"


def component_value(name, method, url, headers):
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    path = parts.path or "/"
    if name == "@method":
        return method.upper()
    if name == "@target-uri":
        query = "?" + parts.query if parts.query or url.endswith("?") else ""
        return f"{parts.scheme}://{parts.netloc}{path}{query}"
    if name == "@authority":
        host, _, port = parts.netloc.rpartition(":") if ":" in parts.netloc else (parts.netloc, "", "")
        if port and {"http": "80", "https": "443"}.get(scheme) == port:
            port = ""
        return host.lower() + (":" + port if port else "")
    if name == "@path":
        return path
    if name == "@query":
        return "?" + parts.query
    return headers[name]


def rfc9421(name, method, url, body, components, created, keyid, secret=SECRET,
            nonce=None, expires=None, digest="sha-256", label="sig1", note=None):
    body_bytes = body.encode("utf-8")
    headers = {}
    if body_bytes:
        headers["content-digest"] = content_digest(digest, body_bytes)
    params = f";created={created};keyid={sf_string(keyid)};alg=\"hmac-sha256\""
    if expires is not None:
        params += f";expires={expires}"
    if nonce is not None:
        params += f";nonce={sf_string(nonce)}"
    signature_params = "(" + " ".join(sf_string(c) for c in components) + ")" + params
    lines = [f"{sf_string(c)}: {component_value(c, method, url, headers)}" for c in components]
    lines.append(f'"@signature-params": {signature_params}')
    base = "\n".join(lines)
    signature = base64.b64encode(
        hmac.new(secret.encode("utf-8"), base.encode("ascii"), hashlib.sha256).digest()
    ).decode()
    out_headers = {}
    if body_bytes:
        out_headers["Content-Digest"] = headers["content-digest"]
    out_headers["Signature-Input"] = f"{label}={signature_params}"
    out_headers["Signature"] = f"{label}=:{signature}:"
    v = {
        "name": name,
        "method": method,
        "url": url,
        "body": body,
        "secret": secret,
        "keyid": keyid,
        "created": created,
        "expires": expires,
        "nonce": nonce,
        "label": label,
        "components": components,
        "digest": digest if body_bytes else None,
        "signature_params": signature_params,
        "signature_base": base,
        "signature": signature,
        "headers": out_headers,
    }
    if note:
        v["note"] = note
    return v


def vectors():
    base = "http://127.0.0.1:8080"
    return {
        "description": (
            "Known answers for request signing. `v1`: the X-Coordinator-* scheme "
            "(README, 'Signing requests'): canonical = 7 lines joined by \\n, signature = "
            "lower-case hex HMAC-SHA256 keyed by the UTF-8 bytes of the whole secret. "
            "`rfc9421`: the RFC 9421 profile: alg hmac-sha256 keyed by the same bytes, "
            "keyid CALLER or CALLER:VERSION, covered @method and @target-uri (or @path, "
            "plus @query when there is a query), @authority optional, content-digest "
            "(RFC 9530) whenever there is a body; signature_base is what is MACed, "
            "signature is its base64. `rfc9421_reference`: RFC 9421 Appendix B.2.5, "
            "a check of a generic signature-base builder (not accepted by the server's "
            "profile). Bodies are UTF-8 strings; targets and URLs are exactly as sent. "
            "Generated by scripts/signing_vectors.py."
        ),
        "v1": [
            v1("health, no nonce, no body (the README example)", "GET",
               "/coordinator/health", "", ""),
            v1("create with a query, a nonce and a body", "post",
               "/coordinator/jobs?b=2&a=1", '{"kind":"build"}', "n-1_abc",
               note="method signed in upper case; query not reordered"),
            v1("progress with a key version", "PATCH", f"/coordinator/jobs/{JOB}/progress",
               '{"percent":40,"message":"compiling"}', "0123456789abcdef0123456789abcdef",
               secret=SECRET_2, caller="builder-2", timestamp="1712345678", key_version=3),
            v1("non-ASCII queue name, percent-encoded UTF-8", "POST",
               "/coordinator/queues/caf%C3%A9-%E2%9C%93/claim", '{"worker":"w1"}', "abc",
               note="the target is signed as sent: percent-encoded, not decoded"),
            v1("percent-encoded query, repeated and empty parameters", "GET",
               f"/coordinator/jobs/{JOB}?x=%E2%9C%93&x=2&empty=&sp=a%20b", "", "q-1"),
            v1("non-ASCII body bytes", "POST", "/coordinator/jobs",
               '{"kind":"build","payload":{"note":"naïve ✓ 日本"}}', "u8",
               note="the body is hashed as its UTF-8 bytes"),
            v1("empty body on POST", "POST", f"/coordinator/jobs/{JOB}/complete", "",
               "n2"),
        ],
        "rfc9421": [
            rfc9421("health with @target-uri", "GET", f"{base}/coordinator/health", "",
                    ["@method", "@target-uri"], 1700000000, "svc"),
            rfc9421("create with a query, a body and a nonce", "POST",
                    f"{base}/coordinator/jobs?b=2&a=1", '{"kind":"build"}',
                    ["@method", "@target-uri", "content-digest"], 1700000000, "svc:3",
                    nonce="n-1_abc", label="sig1"),
            rfc9421("@path and @query, @authority, sha-512 digest, expires", "PATCH",
                    f"http://Coordinator.Example:80/coordinator/jobs/{JOB}/progress?trace=1",
                    '{"percent":40}',
                    ["@method", "@authority", "@path", "@query", "content-digest"],
                    1712345678, "builder-2", secret=SECRET_2, expires=1712345978,
                    digest="sha-512", label="coordinator",
                    note="@authority lower-cased, default port dropped"),
            rfc9421("non-ASCII path percent-encoded, @path without a query", "POST",
                    f"{base}/coordinator/queues/caf%C3%A9-%E2%9C%93/claim",
                    '{"worker":"w1"}', ["@method", "@path", "content-digest"],
                    1700000000, "svc"),
            rfc9421("non-ASCII body", "POST", f"{base}/coordinator/jobs",
                    '{"kind":"build","payload":{"note":"naïve ✓ 日本"}}',
                    ["@method", "@target-uri", "content-digest"], 1700000000, "svc",
                    nonce="u8"),
        ],
        "rfc9421_reference": [rfc9421_b25()],
    }


def rfc9421_b25():
    key_b64 = ("uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8"
               "jsasjlTMtDQ==")
    lines = [
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("@authority", "example.com"),
        ("content-type", "application/json"),
    ]
    params = '("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret"'
    base = "\n".join(f'"{n}": {v}' for n, v in lines) + f'\n"@signature-params": {params}'
    sig = base64.b64encode(
        hmac.new(base64.b64decode(key_b64), base.encode(), hashlib.sha256).digest()
    ).decode()
    assert sig == "pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=", sig
    return {
        "name": "RFC 9421 Appendix B.2.5 (hmac-sha256, test-shared-secret)",
        "key_base64": key_b64,
        "components": [[n, v] for n, v in lines],
        "signature_params": params,
        "signature_base": base,
        "signature": sig,
        "headers": {
            "Signature-Input": f"sig-b25={params}",
            "Signature": f"sig-b25=:{sig}:",
        },
    }


def main():
    text = json.dumps(vectors(), indent=2, ensure_ascii=False) + "\n"
    if sys.argv[1:] == ["--check"]:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run scripts/signing_vectors.py", file=sys.stderr)
            sys.exit(1)
        print(f"{OUT}: up to date")
        return
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
