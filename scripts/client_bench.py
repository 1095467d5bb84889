#!/usr/bin/env python3
"""Signed GET /coordinator/health per second, one client thread, for:
  example  scripts/sign_example.py's signature_headers + urllib (a new connection each)
  client   coordinator_client.Client.health() (one keep-alive connection)

usage: client_bench.py [SECONDS]   (default 5 each; two rounds, alternating)
env:   the serve --dev credentials (COORDINATOR_URL, _CALLER, _HMAC_SECRET)
"""
import os
import pathlib
import sys
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sign_example import signature_headers  # noqa: E402

from coordinator_client import Client  # noqa: E402

URL = os.environ["COORDINATOR_URL"].rstrip("/")
CALLER = os.environ["COORDINATOR_CALLER"]
SECRET = os.environ["COORDINATOR_HMAC_SECRET"]
TARGET = "/coordinator/health"


def example() -> None:
    headers = signature_headers("GET", TARGET, b"", CALLER, SECRET)
    with urllib.request.urlopen(urllib.request.Request(URL + TARGET, headers=headers)) as r:
        assert r.status == 200
        r.read()


def rate(fn, seconds: float):
    """Requests per second, and this process's CPU milliseconds per request."""
    fn()  # warm up (and fail early)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / n


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    client = Client(URL, CALLER, SECRET)
    for name, fn in (("example", example), ("client", client.health),
                     ("example", example), ("client", client.health)):
        per_sec, cpu_ms = rate(fn, seconds)
        print(f"{name:8} {per_sec:8.0f} req/s  {cpu_ms:5.2f} ms client CPU/req")


if __name__ == "__main__":
    main()
