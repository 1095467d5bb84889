"""The Worker loop against a real `coordinator serve --dev`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Dict, List

import pytest

from coordinator_client import Client, JobContext, Retry, Worker


def queued(client: Client, queue: str, n: int = 1, **kw: Any) -> List[str]:
    ids = []
    for i in range(n):
        job = client.create_job("work", queue=queue, payload={"i": i}, **kw)
        client.set_status(job["id"], "QUEUED")
        ids.append(job["id"])
    return ids


def wait_for(pred, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_complete_on_return_fail_on_exception(client: Client, queue: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    ok, bad = queued(client, queue, 2)

    def handler(job: JobContext) -> Dict[str, Any]:
        if job.id == bad:
            raise ValueError("broken input")
        job.progress(50, "half way")
        return {"seen": job.payload}

    w = Worker(queue, handler, client=client, handle_signals=False)
    assert w.run(stop_when_idle=True) == 2
    done, failed = client.get_job(ok), client.get_job(bad)
    assert done["status"] == "COMPLETED" and done["result"] == {"seen": {"i": 0}}
    assert failed["status"] == "FAILED" and failed["error"] == "ValueError: broken input"
    # The worker says so where it runs, with the traceback the job's `error` leaves out.
    raised = [r for r in caplog.records
              if r.name == "coordinator_client.worker" and r.levelname == "WARNING"
              and bad in r.getMessage()]
    assert len(raised) == 1, caplog.records
    assert raised[0].exc_info is not None and raised[0].exc_info[0] is ValueError


def test_retry_hands_back_until_the_last_attempt(client: Client, queue: str) -> None:
    (jid,) = queued(client, queue, 1, max_attempts=2)
    attempts: List[int] = []

    def handler(job: JobContext) -> None:
        attempts.append(job.attempt)
        raise Retry("flaky dependency")

    Worker(queue, handler, client=client, handle_signals=False, poll_min=0.01).run(max_jobs=2)
    assert attempts == [1, 2]
    job = client.get_job(jid)
    assert job["status"] == "FAILED" and "flaky dependency" in job["error"]
    assert [e["data"].get("to") for e in job["events"] if e["type"] == "status"][-1] == "QUEUED"


def test_heartbeat_renews_the_lease_while_the_handler_runs(client: Client, queue: str) -> None:
    (jid,) = queued(client, queue)
    w = Worker(queue, lambda job: time.sleep(1.0) or "ok", client=client,
               handle_signals=False, heartbeat_interval=0.2)
    w.run(max_jobs=1)
    # The server has the heartbeat route: the lease is renewed without progress events.
    assert w.heartbeat_route is True, "no heartbeat was sent"
    job = client.get_job(jid)
    assert job["status"] == "COMPLETED"
    assert not any(e["type"] == "progress" for e in job["events"])


def test_a_job_outlives_its_first_token(client: Client, queue: str) -> None:
    # scripts/client-tests.sh runs the server with 6 s job tokens: the handler runs
    # longer, so it can report its outcome only with a token a heartbeat renewed.
    (jid,) = queued(client, queue)
    seen: Dict[str, Any] = {}

    def handler(job: JobContext) -> str:
        seen["first"] = job.claim.token
        time.sleep(8.0)
        job.progress(90, "almost")  # with the renewed token too
        seen["client"] = job.client
        return "ok"

    w = Worker(queue, handler, client=client, handle_signals=False, heartbeat_interval=0.5)
    assert w.run(max_jobs=1) == 1
    job = client.get_job(jid)
    assert job["status"] == "COMPLETED" and job["result"] == "ok", job["status"]
    assert seen["client"].auth._token != seen["first"]
    assert "token" not in repr(seen["client"].auth)


def test_an_idle_worker_long_polls_and_gets_new_work(client: Client, queue: str) -> None:
    seen: List[str] = []
    w = Worker(queue, lambda job: seen.append(job.id) or "ok", client=client,
               handle_signals=False, long_poll=30, poll_min=60, poll_max=60)
    t = threading.Thread(target=w.run, kwargs={"max_jobs": 1})
    t.start()
    time.sleep(0.3)  # the worker's first claim is waiting on the server by now
    (jid,) = queued(client, queue)
    # poll_min is 60 s: without the long poll the worker would still be sleeping.
    t.join(25)
    assert not t.is_alive() and seen == [jid]
    assert client.get_job(jid)["status"] == "COMPLETED"


def test_stop_ends_a_waiting_claim_promptly(client: Client, queue: str) -> None:
    ran: List[str] = []
    w = Worker(queue, lambda job: ran.append(job.id), client=client, handle_signals=False,
               long_poll=30)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    time.sleep(1.0)  # the worker waits in its long poll on the empty queue
    stopped = time.monotonic()
    w.stop()
    t.join(10)
    took = time.monotonic() - stopped
    assert not t.is_alive() and took < 3.5, f"the stop took {took:.1f} s"
    assert ran == [] and w.processed == 0
    # A plain client with a stop flag ends its long poll the same way.
    stop = threading.Event()
    c = client.with_stop(stop)
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    assert c.claim(queue, "w1", wait=30) is None
    assert time.monotonic() - started < 3.5
    # Without one, the wait is the server's (one request).
    started = time.monotonic()
    assert client.claim(queue, "w1", wait=1) is None
    assert time.monotonic() - started >= 0.9


def test_cancellation_reaches_the_handler(client: Client, queue: str) -> None:
    (jid,) = queued(client, queue)
    saw: List[bool] = []

    def handler(job: JobContext) -> str:
        saw.append(job.cancelled.wait(15))
        return "too late"

    w = Worker(queue, handler, client=client, handle_signals=False, heartbeat_interval=0.1)
    t = threading.Thread(target=w.run, kwargs={"max_jobs": 1})
    t.start()
    wait_for(lambda: client.get_job(jid)["status"] == "RUNNING")
    client.set_status(jid, "CANCELLED", "operator")
    t.join(20)
    assert saw == [True]
    assert client.get_job(jid)["status"] == "CANCELLED"


def test_sigterm_hands_the_running_job_back(client: Client, queue: str, env: Dict[str, str]) -> None:
    (jid,) = queued(client, queue)
    script = textwrap.dedent(f"""
        import time
        from coordinator_client import Worker
        def handler(job):
            print("started", flush=True)
            time.sleep(60)
        Worker({queue!r}, handler, heartbeat_interval=0.2, shutdown_grace=0.5).run()
        print("stopped", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        assert client.get_job(jid)["status"] == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in out
    job = client.get_job(jid)
    assert job["status"] == "QUEUED" and job["message"] == "worker shutting down"
    # The next worker gets it.
    claim = client.claim(queue, "w2")
    assert claim is not None and claim.id == jid and claim.job["attempts"] == 2
