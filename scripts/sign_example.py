#!/usr/bin/env python3
"""Send one signed request to coordinator (Python 3 standard library only).

usage: sign_example.py METHOD PATH [BODY]
env:   COORDINATOR_URL (default http://127.0.0.1:8080), COORDINATOR_CALLER,
       COORDINATOR_HMAC_SECRET, optional COORDINATOR_KEY_VERSION
Prints "HTTP <status>" and the response body; exits 1 on a status of 400 or more.
"""
import hashlib
import hmac
import os
import secrets
import sys
import time
import urllib.error
import urllib.request


def signature_headers(method, target, body, caller, secret, key_version=None):
    """The X-Coordinator-* headers for one request. `target` is the path and ?query
    exactly as sent; `body` the exact bytes sent (b"" for none)."""
    timestamp = str(int(time.time()))
    nonce = secrets.token_hex(16)
    signed = "\n".join([
        "v1",
        method.upper(),
        target,
        caller,
        timestamp,
        nonce,
        hashlib.sha256(body).hexdigest(),
    ])
    signature = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()
    headers = {
        "X-Coordinator-Caller": caller,
        "X-Coordinator-Timestamp": timestamp,
        "X-Coordinator-Nonce": nonce,
        "X-Coordinator-Signature": signature,
    }
    if key_version:
        headers["X-Coordinator-Key-Version"] = key_version
    return headers


def main():
    method, target = sys.argv[1].upper(), sys.argv[2]
    body = sys.argv[3].encode() if len(sys.argv) > 3 else b""
    url = os.environ.get("COORDINATOR_URL", "http://127.0.0.1:8080").rstrip("/")
    headers = signature_headers(
        method,
        target,
        body,
        os.environ["COORDINATOR_CALLER"],
        os.environ["COORDINATOR_HMAC_SECRET"],
        os.environ.get("COORDINATOR_KEY_VERSION"),
    )
    if body:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        url + target, data=body or None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    print(f"HTTP {status}")
    print(text.decode())
    sys.exit(0 if status < 400 else 1)


if __name__ == "__main__":
    main()
