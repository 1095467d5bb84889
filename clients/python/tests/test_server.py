"""The client against a real `coordinator serve --dev` (scripts/client-tests.sh)."""
from __future__ import annotations

import base64
import json
import uuid
from typing import Dict

import pytest
import requests

from coordinator_client import (
    BadRequest,
    Client,
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    V1Auth,
    canonical_v1,
)

WRONG_SECRET = "coh_0000000000000000000000000000000000000000000000000"


def test_open_routes(client: Client) -> None:
    client.livez()
    client.readyz()
    assert "coordinator" in client.metrics() or client.metrics()
    doc = client.openapi()
    assert "/coordinator/queues/{queue}/claim" in doc["paths"]


def test_signed_health_with_v1_and_api_key(client: Client, key_client: Client) -> None:
    h = client.health()
    assert isinstance(h, dict) and h
    assert key_client.health().keys() == h.keys()


def test_v1_auth_works_on_a_plain_requests_call(env: Dict[str, str]) -> None:
    auth = V1Auth(env["COORDINATOR_CALLER"], env["COORDINATOR_HMAC_SECRET"])
    r = requests.get(env["COORDINATOR_URL"] + "/coordinator/health", auth=auth, timeout=10)
    assert r.status_code == 200, r.text
    # The same signed request again is a replay.
    again = requests.get(env["COORDINATOR_URL"] + "/coordinator/health",
                         headers={k: v for k, v in r.request.headers.items() if k.startswith("X-")},
                         timeout=10)
    assert again.status_code == 401 and again.json()["reason"] == "replayed request"


def test_wrong_secret_is_401_with_the_servers_canonical(env: Dict[str, str]) -> None:
    bad = Client(env["COORDINATOR_URL"], env["COORDINATOR_CALLER"], WRONG_SECRET)
    with pytest.raises(Unauthorized) as e:
        bad.create_job("build", queue="q-unused", payload={"x": "naïve ✓"})
    assert e.value.reason == "signature mismatch"
    canonical = e.value.canonical or ""
    lines = canonical.split("\n")
    body = json.dumps({"kind": "build", "queue": "q-unused", "payload": {"x": "naïve ✓"}},
                      separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical == canonical_v1("POST", "/coordinator/jobs", lines[3], lines[4], lines[5], body)


def test_signed_request_with_query_and_non_ascii_path(client: Client) -> None:
    # Signed exactly as sent: the server recomputes the same canonical string and then
    # answers for the route (404: no such job), not 401.
    with pytest.raises(NotFound):
        client.request("GET", f"/coordinator/jobs/{uuid.uuid4()}?x=%E2%9C%93&b=2&a=1")
    with pytest.raises(BadRequest) as e:
        client.claim("café", "w1")  # percent-encoded UTF-8 in the path, then refused
    assert e.value.field == "queue"


def test_a_jobs_whole_life(client: Client, queue: str) -> None:
    job = client.create_job("build", queue=queue, priority=5, payload={"sha": "abc"},
                            idempotency_key=f"k-{queue}")
    assert job["status"] == "PENDING"
    again = client.create_job("build", queue=queue, priority=5, payload={"sha": "abc"},
                              idempotency_key=f"k-{queue}")
    assert again["id"] == job["id"]
    assert client.claim(queue, "w1") is None
    client.set_status(job["id"], "QUEUED")
    claim = client.claim(queue, "w1")
    assert claim is not None and claim.id == job["id"] and claim.job["status"] == "RUNNING"
    tc = client.with_token(claim.token)
    assert tc.report_progress(claim.id, 40, "compiling")["progress"] == 40
    assert tc.get_job(claim.id)["id"] == claim.id
    with pytest.raises(Forbidden):
        tc.claim(queue, "w1")  # a job token cannot claim
    done = tc.complete_job(claim.id, {"artifact": "x.tar"})
    assert done["status"] == "COMPLETED" and done["result"] == {"artifact": "x.tar"}
    with pytest.raises(Unauthorized):
        tc.report_progress(claim.id, 50)  # the job's tokens are revoked now
    events = [e["type"] for e in client.get_job(job["id"])["events"]]
    assert events[0] == "created" and events[-1] == "completed" and "claimed" in events


def test_typed_errors(client: Client, queue: str) -> None:
    with pytest.raises(BadRequest) as e:
        client.create_job("has space")
    assert e.value.field == "kind" and e.value.status == 400
    with pytest.raises(NotFound):
        client.get_job(str(uuid.uuid4()))
    job = client.create_job("build", queue=queue)
    with pytest.raises(Conflict) as c:
        client.complete_job(job["id"])  # PENDING cannot complete
    assert c.value.type == "urn:coordinator:problem:conflict"


def test_fail_and_revoke(client: Client, queue: str) -> None:
    job = client.create_job("build", queue=queue)
    client.set_status(job["id"], "QUEUED")
    claim = client.claim(queue, "w2")
    assert claim is not None
    payload = claim.token.split(".")[1]
    jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    client.revoke_token(jti)
    tc = client.with_token(claim.token)
    with pytest.raises(Unauthorized):
        tc.report_progress(claim.id, 10)
    failed = client.fail_job(claim.id, "gate red", gate_results={"lint": "fail"})
    assert failed["status"] == "FAILED" and failed["error"] == "gate red"


def test_stitcher_routes(client: Client, env: Dict[str, str]) -> None:
    delivery = {"issueNumber": 7, "repository": "acme/app", "action": "commented"}
    first = client.stitcher_webhook(delivery, sender=env["COORDINATOR_CALLER"],
                                    webhook_secret=env["COORDINATOR_WEBHOOK_SECRET"],
                                    webhook_id=f"msg_{uuid.uuid4().hex}")
    assert first["duplicate"] is False
    with pytest.raises(Unauthorized):
        client.stitcher_webhook(delivery, sender=env["COORDINATOR_CALLER"],
                                webhook_secret="whsec_" + base64.b64encode(b"x" * 32).decode())
    d = client.dispatch(8, "acme/app", idempotency_key=f"d-{uuid.uuid4().hex}")
    assert d["status"] == "QUEUED"


def test_rfc9421_signer_sends_well_formed_headers(env: Dict[str, str]) -> None:
    # The server's RFC 9421 verifier is not in this tree yet; whatever it answers, the
    # request must carry a digest and a signature covering it.
    c = Client(env["COORDINATOR_URL"], env["COORDINATOR_CALLER"], env["COORDINATOR_HMAC_SECRET"],
               scheme="rfc9421", retries=0)
    r = c.session.post(env["COORDINATOR_URL"] + "/coordinator/jobs", data=b'{"kind":"b"}',
                       auth=c.auth, timeout=10)
    sent = r.request.headers
    assert sent["Content-Digest"].startswith("sha-256=:")
    assert '"content-digest"' in sent["Signature-Input"] and sent["Signature"].startswith("sig1=:")
    assert r.status_code in (201, 401), r.text
