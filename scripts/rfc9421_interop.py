"""RFC 9421 interop: requests signed by two unmodified PyPI libraries
(requests-http-signature and http-message-signatures, HMAC-SHA256 with
Content-Digest) must pass against a running server, and the same requests with one
byte of the method, path, query, body or `created` changed must fail.

env: COORDINATOR_URL, COORDINATOR_CALLER, COORDINATOR_HMAC_SECRET (a dev server's
credentials; scripts/rfc9421-interop.sh sets them). Exit status 1 on any failure.
"""

import os
import re
import sys
import uuid

import requests
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms
from requests_http_signature import HTTPSignatureAuth
from requests_http_signature import algorithms as rhs_algorithms

URL = os.environ["COORDINATOR_URL"].rstrip("/")
CALLER = os.environ["COORDINATOR_CALLER"]
SECRET = os.environ["COORDINATOR_HMAC_SECRET"].encode()

failures = 0


def check(label, resp, want):
    global failures
    ok = resp.status_code == want
    print(f"{'ok  ' if ok else 'FAIL'} {resp.status_code} (want {want})  {label}")
    if not ok:
        print(f"     {resp.text[:400]}")
        failures += 1


def job_body():
    return ('{"kind":"rfc9421","payload":{"n":"%s"}}' % uuid.uuid4().hex).encode()


# 1. requests-http-signature, as a team would use it (defaults plus a nonce).
auth = HTTPSignatureAuth(
    signature_algorithm=rhs_algorithms.HMAC_SHA256,
    key=SECRET,
    key_id=CALLER,
    use_nonce=True,
)
check("requests-http-signature GET /coordinator/health",
      requests.get(f"{URL}/coordinator/health", auth=auth), 200)
check("requests-http-signature POST /coordinator/jobs",
      requests.post(f"{URL}/coordinator/jobs", data=job_body(),
                    headers={"Content-Type": "application/json"}, auth=auth), 201)
check("requests-http-signature GET with a query",
      requests.get(f"{URL}/coordinator/jobs?limit=1&queue=interop", auth=auth), 200)
bad = HTTPSignatureAuth(signature_algorithm=rhs_algorithms.HMAC_SHA256,
                        key=b"coh_not-the-secret", key_id=CALLER)
check("requests-http-signature with a wrong secret",
      requests.get(f"{URL}/coordinator/health", auth=bad), 401)

# 2. http-message-signatures on a prepared request, then tampered copies.
signer = HTTPMessageSigner(
    signature_algorithm=algorithms.HMAC_SHA256,
    key_resolver=MappingKeyResolver(public_keys={}, private_keys={CALLER: SECRET}),
)


def signed(method, path, body=b"", components=("@method", "@path", "@query", "content-digest")):
    req = requests.Request(method, f"{URL}{path}", data=body or None,
                           headers={"Content-Type": "application/json"}).prepare()
    signer.sign(req, key_id=CALLER, nonce=uuid.uuid4().hex,
                covered_component_ids=components, body=req.body or b"")
    return req


def send(req):
    with requests.Session() as s:
        return s.send(req)


check("http-message-signatures POST /coordinator/jobs",
      send(signed("POST", "/coordinator/jobs", job_body())), 201)
# A POST with a query (the claim reads `wait`): an empty queue answers 204 at once.
check("http-message-signatures POST /coordinator/queues/interop/claim?wait=0",
      send(signed("POST", "/coordinator/queues/interop/claim?wait=0",
                  b'{"worker":"interop"}')), 204)
check("http-message-signatures GET /coordinator/health (@target-uri)",
      send(signed("GET", "/coordinator/health",
                  components=("@method", "@target-uri", "@authority"))), 200)

# Tampering, one byte each, after signing.
r = signed("POST", "/coordinator/jobs?x=1", job_body())
r.method = "PUT"
check("tampered method", send(r), 401)
r = signed("POST", "/coordinator/jobs?x=1", job_body())
r.url = r.url.replace("/coordinator/jobs", "/coordinator/jobz")
check("tampered path", send(r), 401)
r = signed("POST", "/coordinator/jobs?x=1", job_body())
r.url = r.url.replace("x=1", "x=2")
check("tampered query", send(r), 401)
r = signed("POST", "/coordinator/jobs?x=1", job_body())
r.body = r.body.replace(b"rfc9421", b"rfc9422")
check("tampered body", send(r), 401)
r = signed("POST", "/coordinator/jobs?x=1", job_body())
r.headers["Signature-Input"] = re.sub(
    r"created=(\d+)", lambda m: f"created={int(m.group(1)) - 1}", r.headers["Signature-Input"])
check("tampered created", send(r), 401)
# Replay of an accepted request.
r = signed("GET", "/coordinator/health")
check("first use", send(r), 200)
check("replayed request", send(r), 401)

if failures:
    print(f"rfc9421 interop: {failures} check(s) failed", file=sys.stderr)
    sys.exit(1)
print("rfc9421 interop: all checks passed")
