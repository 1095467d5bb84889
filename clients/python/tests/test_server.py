"""The client against a real `coordinator serve --dev` (scripts/client-tests.sh)."""
from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any, Dict, List

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
    # Signed exactly as sent (a percent-encoded UTF-8 value, parameters in no order):
    # the server recomputes the same canonical string and answers for the route, not 401.
    page = client.request("GET", "/coordinator/jobs?kind=%E2%9C%93&queue=q-none&limit=2")
    assert page.status_code == 200 and page.json()["items"] == []
    with pytest.raises(NotFound):
        client.request("GET", f"/coordinator/jobs/{uuid.uuid4()}/events?after=0")
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
    # Why the server refused: the problem document as it came (as the Rust client).
    assert e.value.problem["status"] == 400 and e.value.detail and e.value.title
    assert e.value.type.startswith("urn:coordinator:problem:")
    assert e.value.headers["Content-Type"].startswith("application/problem+json")
    assert e.value.detail in str(e.value)
    with pytest.raises(NotFound) as nf:
        client.get_job(str(uuid.uuid4()))
    assert nf.value.problem["status"] == 404 and nf.value.detail
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


def _signed_rfc9421(c: Client, method: str, url: str, body: bytes = b"") -> requests.PreparedRequest:
    req = requests.Request(method, url, data=body or None, auth=c.auth,
                           headers={"Content-Type": "application/json"} if body else {})
    return c.session.prepare_request(req)


def test_rfc9421_signed_requests_pass_and_tampered_ones_fail(env: Dict[str, str], queue: str) -> None:
    """The RFC 9421 signer against the server's verifier: the request as signed is
    accepted; the same request with one byte of method, path, query, body or
    `created` changed is refused (401) and has no effect."""
    base = env["COORDINATOR_URL"]
    c = Client(base, env["COORDINATOR_CALLER"], env["COORDINATOR_HMAC_SECRET"],
               scheme="rfc9421", retries=0)
    kind = "k" + uuid.uuid4().hex[:8]
    body = json.dumps({"kind": kind, "queue": queue}, separators=(",", ":")).encode()

    def send(p: requests.PreparedRequest) -> requests.Response:
        return c.session.send(p, timeout=10)

    def refused(p: requests.PreparedRequest, what: str) -> None:
        r = send(p)
        assert r.status_code == 401, f"{what}: the server accepted a tampered request: {r.status_code} {r.text}"
        assert r.json().get("reason") != "replayed request", what

    # Tampered first, each signed afresh, so no refusal is a replay.
    p = _signed_rfc9421(c, "POST", base + "/coordinator/jobs", body)
    p.body = body.replace(kind.encode(), (kind[:-1] + "z").encode())
    refused(p, "body")
    p = _signed_rfc9421(c, "GET", base + f"/coordinator/jobs?queue={queue}")
    p.method = "POST"
    refused(p, "method")
    p = _signed_rfc9421(c, "GET", base + f"/coordinator/jobs?queue={queue}")
    p.url = base + f"/coordinator/jobS?queue={queue}"
    refused(p, "path")
    p = _signed_rfc9421(c, "GET", base + f"/coordinator/jobs?queue={queue}")
    p.url = base + f"/coordinator/jobs?queue={queue[:-1]}x"
    refused(p, "query")
    p = _signed_rfc9421(c, "GET", base + f"/coordinator/jobs?queue={queue}")
    sig_input = p.headers["Signature-Input"]
    created = int(sig_input.split(";created=")[1].split(";")[0])
    p.headers["Signature-Input"] = sig_input.replace(f"created={created}", f"created={created - 1}")
    refused(p, "created")
    # Nothing was created by the tampered POST.
    assert client_for(env).list_jobs(queue=queue)["items"] == []

    # The untampered request passes.
    r = send(_signed_rfc9421(c, "POST", base + "/coordinator/jobs", body))
    assert r.status_code == 201, r.text
    sent = r.request.headers
    assert sent["Content-Digest"].startswith("sha-256=:")
    assert '"content-digest"' in sent["Signature-Input"] and sent["Signature"].startswith("sig1=:")
    assert r.json()["kind"] == kind
    r = send(_signed_rfc9421(c, "GET", base + f"/coordinator/jobs?queue={queue}"))
    assert r.status_code == 200, r.text
    assert [j["kind"] for j in r.json()["items"]] == [kind]
    # And the client's own methods work with it.
    assert c.get_job(r.json()["items"][0]["id"])["kind"] == kind


def client_for(env: Dict[str, str]) -> Client:
    return Client(env["COORDINATOR_URL"], env["COORDINATOR_CALLER"], env["COORDINATOR_HMAC_SECRET"])


def test_long_poll_claim(client: Client, queue: str) -> None:
    # Empty queue: the wait ends with None.
    assert client.claim(queue, "w1", wait=0.2) is None
    job = client.create_job("build", queue=queue)
    got: List[Any] = []
    t = threading.Thread(target=lambda: got.append(client_for_thread(client).claim(queue, "w1", wait=30)))
    t.start()
    # Queued while the claim is waiting: the waiting claim gets it (a plain claim would
    # already have answered None).
    time.sleep(0.3)
    client.set_status(job["id"], "QUEUED")
    t.join(40)
    assert len(got) == 1 and got[0] is not None and got[0].id == job["id"], got
    with pytest.raises(ValueError):
        client.claim(queue, "w1", wait=61)


def client_for_thread(c: Client) -> Client:
    return Client(c.url, auth=c.auth, retries=0)


def test_heartbeat_then_cancel_reaches_the_worker(client: Client, queue: str) -> None:
    job = client.create_job("build", queue=queue)
    client.set_status(job["id"], "QUEUED")
    claim = client.claim(queue, "w1")
    assert claim is not None
    tc = client.with_token(claim.token)
    events = len(client.get_job(claim.id)["events"])
    beat = tc.heartbeat(claim.id)
    assert beat["cancelRequested"] is False and beat["leaseExpiresAt"]
    assert len(client.get_job(claim.id)["events"]) == events  # no event per heartbeat
    assert client.cancel_job(claim.id, "superseded")["status"] == "CANCELLED"
    # The worker's next calls, with its (now revoked) job token, say cancelled.
    for call in (lambda: tc.heartbeat(claim.id), lambda: tc.report_progress(claim.id, 60),
                 lambda: tc.complete_job(claim.id, {"late": True})):
        with pytest.raises(Conflict) as e:
            call()
        assert e.value.type == "urn:coordinator:problem:job-cancelled"
    assert client.get_job(claim.id)["result"] is None
    assert client.retry_job(claim.id)["status"] == "QUEUED"


def test_list_jobs_and_queue_controls(client: Client, queue: str) -> None:
    a = client.create_job("build", queue=queue)
    b = client.create_job("test", queue=queue)
    page = client.list_jobs(queue=queue, limit=1)
    assert [j["id"] for j in page["items"]] == [b["id"]] and page["nextCursor"]
    rest = client.list_jobs(queue=queue, limit=1, cursor=page["nextCursor"])
    assert [j["id"] for j in rest["items"]] == [a["id"]]
    assert client.list_jobs(queue=queue, status=["RUNNING", "FAILED"])["items"] == []
    client.set_status(a["id"], "QUEUED")
    q = client.patch_queue(queue, paused=True, max_running=2)
    assert q["paused"] is True and q["maxRunning"] == 2
    assert client.claim(queue, "w1") is None  # paused
    mine = [x for x in client.list_queues()["queues"] if x["queue"] == queue]
    assert mine and mine[0]["depth"]["QUEUED"] == 1 and mine[0]["paused"] is True
    q = client.patch_queue(queue, paused=False, max_running=None)
    assert q["paused"] is False and q["maxRunning"] is None
    claim = client.claim(queue, "w1")
    assert claim is not None and claim.id == a["id"]
