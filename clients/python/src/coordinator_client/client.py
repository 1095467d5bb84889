"""`Client`: one method per route of the coordinator service."""
from __future__ import annotations

import copy
import email.utils
import json as _json
import os
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote

import requests

from .errors import (CoordinatorError, InvalidAnswer, ProblemError, ResponseTooLarge, TooManyRequests,
                     TransportError, Unavailable, error_for)
from .events import TERMINAL, JobEvent, job_event, sse_events
from .signing import ApiKeyAuth, BearerAuth, Rfc9421Auth, V1Auth
from .webhooks import sign_webhook

__all__ = ["Client", "Claim", "Job", "JobEvent"]

#: A job as the server returns it (camelCase keys: id, kind, queue, status, progress,
#: payload, result, error, attempts, maxAttempts, createdAt, …).
Job = Dict[str, Any]

RETRY_STATUSES = (429, 503)
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

#: The longest one claim request of a client with a stop flag waits on the server
#: (seconds): its long poll is made of such claims, the flag looked at between them, so
#: a stop ends a waiting claim within this (as the Rust client's ``Client::STOP_POLL``).
STOP_POLL = 2.0

#: The longest a job's event stream may stay silent (seconds) before :meth:`Client.watch`
#: takes the connection for dead and reconnects: the server sends a ``: keep-alive``
#: comment every 15 s on an idle stream.
STREAM_IDLE = 45.0

#: Largest answer body read (as the Rust client); past it :class:`ResponseTooLarge`.
MAX_BODY = 16 * 1024 * 1024
_READ_CHUNK = 64 * 1024


def _ascii_digits(s: str) -> bool:
    """``str.isdigit()`` for ASCII only: it also takes ``"²"`` or ``"٣"``."""
    return s.isascii() and s.isdigit()


@dataclass(frozen=True, repr=False)
class Claim:
    """A claimed job (RUNNING now) and the job token that acts on it."""

    job: Job
    token: str
    token_expires_at: str

    @property
    def id(self) -> str:
        return str(self.job["id"])

    def __repr__(self) -> str:  # never the token
        return (f"Claim(job={self.job!r}, token=..., "
                f"token_expires_at={self.token_expires_at!r})")


def _seg(s: str) -> str:
    return quote(str(s), safe="")


def _dot_segment(path: str) -> Optional[str]:
    """A ``.`` or ``..`` path segment (also percent-encoded): URL normalisation drops
    it, so the request would reach another route than the one named."""
    for seg in path.split("?", 1)[0].split("#", 1)[0].split("/"):
        if seg.lower().replace("%2e", ".") in (".", ".."):
            return seg
    return None


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if _ascii_digits(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Client:
    """A coordinator client over one ``requests.Session`` (keep-alive).

    Credentials, one of: ``caller`` + ``secret`` (signed requests, ``scheme="v1"`` or
    ``"rfc9421"``), ``api_key`` (``X-API-Key``), ``token`` (a job token, ``Bearer``), or
    any ``requests`` auth object as ``auth``.

    ``https://`` URLs are verified against the CA bundle ``requests`` uses (certifi), or
    against ``ca_file`` alone (a PEM file, for a private CA) when given.

    503 and 429 answers are retried up to ``retries`` times, waiting ``Retry-After`` when
    the server sends it, else an exponential backoff with jitter (capped at
    ``max_backoff``) — for a POST or PATCH without an ``Idempotency-Key`` only when the
    answer is the server's own refusal (``application/problem+json``, not, say, a
    proxy's page); a connection error is retried only for GET or a request with an
    ``Idempotency-Key``. Each retry is signed afresh. Error answers raise the typed
    exceptions of :mod:`coordinator_client.errors`.

    Redirects are never followed (they would carry the credential, and a signature made
    for another target, to wherever ``Location`` points): a 3xx raises
    :class:`ProblemError` like any other unexpected status. An answer's body is read up
    to :data:`MAX_BODY` (16 MiB); a larger one raises :class:`ResponseTooLarge`.
    """

    def __init__(
        self,
        url: str,
        caller: Optional[str] = None,
        secret: Optional[str] = None,
        *,
        api_key: Optional[str] = None,
        token: Optional[str] = None,
        key_version: Optional[int] = None,
        scheme: str = "v1",
        auth: Optional[requests.auth.AuthBase] = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 30.0,
        session: Optional[requests.Session] = None,
        sleep: Callable[[float], None] = time.sleep,
        ca_file: Optional[str] = None,
        stop: Optional[threading.Event] = None,
    ) -> None:
        self.url = url.rstrip("/")
        if auth is None:
            if caller and secret:
                if scheme == "v1":
                    auth = V1Auth(caller, secret, key_version)
                elif scheme == "rfc9421":
                    auth = Rfc9421Auth(caller, secret, key_version)
                else:
                    raise ValueError(f"unknown signature scheme {scheme!r}")
            elif api_key:
                auth = ApiKeyAuth(api_key)
            elif token:
                auth = BearerAuth(token)
        self.auth = auth
        self.caller = caller
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.session = session or requests.Session()
        self.ca_file = ca_file
        if ca_file is not None:
            if not os.path.isfile(ca_file):
                raise ValueError(f"CA file {ca_file!r} is not a readable file")
            # Only this CA (bundle) is trusted for https://, like curl --cacert. Passed
            # with each request too: requests lets REQUESTS_CA_BUNDLE override a
            # session's `verify`, never a request's.
            self.session.verify = ca_file
        self._sleep = sleep
        #: Once set, no retry is started and a pause between retries ends at once
        #: (the :class:`Worker` passes its stop flag).
        self.stop = stop

    @classmethod
    def from_env(
        cls, env: Optional[Mapping[str, str]] = None, *, prefer: str = "hmac", **kwargs: Any
    ) -> "Client":
        """From ``COORDINATOR_URL`` and ``COORDINATOR_CALLER`` + ``COORDINATOR_HMAC_SECRET``
        (+ ``COORDINATOR_KEY_VERSION``) or ``COORDINATOR_CLIENT_API_KEY`` — the variables
        ``serve --dev`` writes to ``.coordinator/dev-credentials.env`` — and
        ``COORDINATOR_CA_FILE`` (a private CA for ``https://``)."""
        e = os.environ if env is None else env
        url = e.get("COORDINATOR_URL", "http://127.0.0.1:8080")
        if e.get("COORDINATOR_CA_FILE") and "ca_file" not in kwargs:
            kwargs["ca_file"] = e["COORDINATOR_CA_FILE"]
        caller, secret = e.get("COORDINATOR_CALLER"), e.get("COORDINATOR_HMAC_SECRET")
        api_key = e.get("COORDINATOR_CLIENT_API_KEY")
        kv = e.get("COORDINATOR_KEY_VERSION")
        if kv and (not _ascii_digits(kv) or int(kv) == 0):  # versions start at 1
            raise ValueError("COORDINATOR_KEY_VERSION must be a positive integer")
        if prefer == "api_key" and api_key:
            return cls(url, api_key=api_key, **kwargs)
        if caller and secret:
            return cls(url, caller, secret, key_version=int(kv) if kv else None, **kwargs)
        if api_key:
            return cls(url, api_key=api_key, **kwargs)
        raise ValueError(
            "set COORDINATOR_CALLER and COORDINATOR_HMAC_SECRET, or COORDINATOR_CLIENT_API_KEY"
            " (for `coordinator serve --dev`, run in its directory:"
            " `set -a; . .coordinator/dev-credentials.env; set +a`)"
        )

    def with_token(self, token: str) -> "Client":
        """A client acting with a job token, sharing this one's connection pool."""
        return Client(
            self.url,
            token=token,
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            session=self.session,
            sleep=self._sleep,
            ca_file=self.ca_file,
            stop=self.stop,
        )

    def with_stop(self, stop: threading.Event) -> "Client":
        """This client (same credential and connection pool) that starts no retry
        once ``stop`` is set, and whose pauses between retries end when it is."""
        c = copy.copy(self)
        c.stop = stop
        return c

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _pause(self, seconds: float) -> bool:
        """Wait before a retry; ``False`` when stopped (then no retry is sent)."""
        if self._stopping():
            return False
        if self.stop is not None and self._sleep is time.sleep:
            return not self.stop.wait(seconds)
        self._sleep(seconds)
        return not self._stopping()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport ----------------------------------------------------------------

    def _delay(self, attempt: int, resp: Optional[requests.Response]) -> float:
        if resp is not None:
            after = retry_after_seconds(resp.headers.get("Retry-After"))
            if after is not None:
                return min(after, self.max_backoff)
        base = min(self.max_backoff, self.backoff * 2.0 ** attempt)
        return base * (0.5 + random.random() / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        auth: Any = "default",
        ok: Iterable[int] = (200, 201, 202, 204),
        timeout: Union[None, float, Tuple[float, float]] = None,
        retries: Optional[int] = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send one request (retrying 503/429), raise a typed error for any status not
        in ``ok`` (a redirect is never followed: a 3xx raises too). ``json`` is
        serialised once, compactly, and the exact bytes are both signed and sent (a
        value JSON cannot hold, NaN included, raises ``TypeError`` or ``ValueError``
        before anything is sent). The body is read whole, at most :data:`MAX_BODY` bytes (else
        :class:`ResponseTooLarge`). ``retries`` overrides the client's (0: one
        attempt). With ``stream``, a success answer is returned with its body unread (the
        caller reads and closes it)."""
        seg = _dot_segment(path)
        if seg is not None:
            raise ValueError(f"{path}: a path segment {seg!r} would be dropped by URL "
                             "normalisation (a queue or job name cannot be only dots)")
        method = method.upper()
        hdrs = dict(headers or {})
        if json is not None:
            # No NaN or Infinity: they are not JSON, and the server would refuse them
            # (400) only after the request went out.
            body = _json.dumps(json, separators=(",", ":"), ensure_ascii=False,
                               allow_nan=False).encode("utf-8")
            hdrs.setdefault("Content-Type", "application/json")
        # No compression (as the Rust client): the cap bounds what is decoded too.
        hdrs.setdefault("Accept-Encoding", "identity")
        use_auth = self.auth if auth == "default" else auth
        may_resend = method in _SAFE_METHODS or "Idempotency-Key" in hdrs
        url = self.url + path
        max_retries = self.retries if retries is None else retries
        attempt = 0
        while True:
            failure: Optional[TransportError] = None
            try:
                # A redirect would carry the credential headers and a signature made
                # for another target (with a 307/308, the body too) to another host.
                resp = self.session.request(
                    method, url, data=body, headers=hdrs, auth=use_auth,
                    timeout=self.timeout if timeout is None else timeout,
                    verify=self.ca_file if self.ca_file is not None else True,
                    allow_redirects=False, stream=True,
                )
                # A POST or PATCH without an Idempotency-Key is sent again only when
                # the answer is the server's own refusal (problem+json, sent before it
                # does any work): a proxy's 503 may come after the server acted.
                retry = (resp.status_code in RETRY_STATUSES and attempt < max_retries
                         and (may_resend or _is_problem(resp)))
                if retry:
                    resp.close()  # its body is not needed
                elif not stream or resp.status_code not in tuple(ok):
                    _read_body(resp, method, path)
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as e:
                if (may_resend and attempt < max_retries
                        and self._pause(self._delay(attempt, None))):
                    attempt += 1
                    continue
                failure = TransportError(f"{method} {path}: {_transport_reason(e)}")
            if failure is not None:
                # Raised outside the `except`: neither chained (`__cause__`) nor with
                # the original as `__context__`. That one holds the request as sent
                # (`.request.headers`: X-API-Key, Bearer token, signature) and its
                # traceback's frames hold the raw request bytes.
                raise failure
            if retry:
                if not self._pause(self._delay(attempt, resp)):
                    # Stopping: the answer (its body unread) is the error.
                    raise error_for(resp.status_code,
                                    {"status": resp.status_code, "title": resp.reason or ""},
                                    dict(resp.headers))
                attempt += 1
                continue
            if resp.status_code not in tuple(ok):
                raise _problem(resp)
            return resp

    def _json(self, method: str, path: str, **kw: Any) -> Dict[str, Any]:
        resp = self.request(method, path, **kw)
        if not resp.content:
            return {}
        data = _parse(resp)
        if not isinstance(data, dict):
            raise InvalidAnswer(f"{method} {path}: the answer is not a JSON object")
        return data

    # ---- open routes ----------------------------------------------------------------

    def livez(self) -> Any:
        """``GET /livez`` (no credential)."""
        return _decode(self.request("GET", "/livez", auth=None))

    def readyz(self) -> Any:
        """``GET /readyz`` (no credential)."""
        return _decode(self.request("GET", "/readyz", auth=None))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self.request("GET", "/metrics", auth=None).text

    def openapi(self) -> Dict[str, Any]:
        """``GET /openapi.json``."""
        doc: Dict[str, Any] = _parse(self.request("GET", "/openapi.json", auth=None))
        return doc

    # ---- jobs -----------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``GET /coordinator/health`` [health:read]."""
        return self._json("GET", "/coordinator/health")

    def create_job(
        self,
        kind: str,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        payload: Optional[Dict[str, Any]] = None,
        max_attempts: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> Job:
        """``POST /coordinator/jobs`` [jobs:create]: a PENDING job."""
        body: Dict[str, Any] = {"kind": kind}
        for k, v in (("queue", queue), ("priority", priority), ("payload", payload),
                     ("maxAttempts", max_attempts)):
            if v is not None:
                body[k] = v
        hdrs = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/coordinator/jobs", json=body, headers=hdrs)

    def get_job(self, job_id: str) -> Job:
        """``GET /coordinator/jobs/{id}`` [jobs:read]: the job with its events."""
        return self._json("GET", f"/coordinator/jobs/{_seg(job_id)}")

    def watch(self, job_id: str, after: Optional[int] = None, *,
              reconnects: int = 10) -> Iterator[JobEvent]:
        """``GET /coordinator/jobs/{id}/events`` as a live stream [jobs:read]: yields the
        job's events after ``after`` (a ``seq``; ``None``: from the first kept) as
        :class:`JobEvent`, in order, each once, until the job is terminal (COMPLETED,
        FAILED, CANCELLED), then returns.

        A dropped connection, a stream the server ended while the job is not terminal
        (the instance shut down, a read failed) or one silent past :data:`STREAM_IDLE`
        is opened again with ``Last-Event-ID`` — each connection signed afresh — after
        a backoff (``backoff`` doubled per failure, jitter, capped at ``max_backoff``;
        ``Retry-After`` of a 429 or 503 honoured, capped too). After ``reconnects``
        failures in a row without an event in between, the last one is raised
        (:class:`TransportError`, :class:`TooManyRequests`, :class:`Unavailable`). A
        stream that ends cleanly without a terminal event is checked with
        :meth:`get_job`.

        Events the server no longer keeps (a job keeps its newest
        ``COORDINATOR_EVENTS_PER_JOB``) cannot be sent: the first event after such a
        hole carries ``gap=(first, last)``, the seqs missed. Error answers raise at once:
        :class:`Unauthorized` (also on a reconnect once the credential is revoked or,
        for a job token, once its job ended — such a watch may end so before it sees
        the terminal event), :class:`Forbidden`, :class:`NotFound`,
        :class:`BadRequest` (``field`` ``Last-Event-ID``: ``after`` is past the job's
        newest event).

        With a stop flag (:meth:`with_stop`) the generator returns once it is set: it is
        looked at between events, at every keep-alive (within 15 s on an idle stream)
        and ends a pause between reconnects at once."""
        if after is not None and (isinstance(after, bool) or not isinstance(after, int)
                                  or after < 0):
            raise ValueError("after must be an event seq (0 or more)")
        path = f"/coordinator/jobs/{_seg(job_id)}/events"
        where = f"GET {path}"
        last = 0 if after is None else after
        status: Optional[str] = None  # the job's status after the newest event seen
        terminal_read = False  # get_job saw the job terminal: the next end is the last
        failures = 0
        while not self._stopping():
            failure: Optional[CoordinatorError] = None
            wait_for: Optional[float] = None
            clean_end = False
            try:
                resp = self.request(
                    "GET", path, retries=0, stream=True, ok=(200,),
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(last)},
                    timeout=(self.timeout, max(self.timeout, STREAM_IDLE)))
            except (TooManyRequests, Unavailable) as e:
                failure, wait_for = e, retry_after_seconds(e.headers.get("Retry-After"))
            except TransportError as e:
                failure = e
            else:
                ctype = resp.headers.get("Content-Type", "")
                if ctype.split(";", 1)[0].strip().lower() != "text/event-stream":
                    resp.close()
                    raise InvalidAnswer(f"{where}: the answer ({ctype or 'no Content-Type'}) "
                                        "is not an event stream")
                try:
                    for sse in sse_events(resp.iter_content(chunk_size=None)):
                        if self._stopping():
                            return
                        if sse is None:
                            continue
                        event = job_event(sse, where)
                        if event.seq <= last:
                            continue  # sent already (never yielded twice)
                        if event.seq > last + 1:
                            event = replace(event, gap=(last + 1, event.seq - 1))
                        last = event.seq
                        status = event.status or status
                        failures = 0
                        yield event
                    clean_end = True
                except (requests.RequestException, OSError) as e:
                    failure = TransportError(f"{where}: the stream broke: "
                                             f"{_transport_reason(e)}")
                finally:
                    resp.close()
            if clean_end:
                if terminal_read or status in TERMINAL:
                    return
                try:
                    job = self.get_job(job_id)
                except (TooManyRequests, Unavailable, TransportError) as e:
                    failure = e
                else:
                    terminal_read = job.get("status") in TERMINAL
                    if terminal_read:
                        continue  # read what is left; the stream then ends at once
            if failure is not None or clean_end:
                failures += 1
                if failures > reconnects:
                    raise failure or TransportError(
                        f"{where}: the stream ended {failures} times without an event")
                if not self._pause(self._delay(failures - 1, None) if wait_for is None
                                   else min(wait_for, self.max_backoff)):
                    return

    def set_status(self, job_id: str, status: str, message: Optional[str] = None) -> Job:
        """``PATCH /coordinator/jobs/{id}/status`` [jobs:update]."""
        body: Dict[str, Any] = {"status": status}
        if message is not None:
            body["message"] = message
        return self._json("PATCH", f"/coordinator/jobs/{_seg(job_id)}/status", json=body)

    def report_progress(self, job_id: str, percent: int, message: Optional[str] = None, *,
                        timeout: Optional[float] = None,
                        retries: Optional[int] = None) -> Job:
        """``PATCH /coordinator/jobs/{id}/progress`` [jobs:update]; renews the lease.
        ``timeout`` and ``retries`` override the client's for this request."""
        body: Dict[str, Any] = {"percent": percent}
        if message is not None:
            body["message"] = message
        return self._json("PATCH", f"/coordinator/jobs/{_seg(job_id)}/progress", json=body,
                          timeout=timeout, retries=retries)

    def complete_job(self, job_id: str, result: Any = None) -> Job:
        """``POST /coordinator/jobs/{id}/complete`` [jobs:update]."""
        body = {} if result is None else {"result": result}
        return self._json("POST", f"/coordinator/jobs/{_seg(job_id)}/complete", json=body)

    def fail_job(self, job_id: str, error: str, gate_results: Any = None) -> Job:
        """``POST /coordinator/jobs/{id}/fail`` [jobs:update]: RUNNING → FAILED."""
        body: Dict[str, Any] = {"error": error}
        if gate_results is not None:
            body["gateResults"] = gate_results
        return self._json("POST", f"/coordinator/jobs/{_seg(job_id)}/fail", json=body)

    def heartbeat(self, job_id: str, *, timeout: Optional[float] = None,
                  retries: Optional[int] = None) -> Dict[str, Any]:
        """``POST /coordinator/jobs/{id}/heartbeat`` [jobs:update]: renews a RUNNING job's
        lease without an event; answers ``{"leaseExpiresAt", "cancelRequested"}``. A
        cancelled job raises :class:`Conflict` with ``type``
        ``urn:coordinator:problem:job-cancelled`` (with the caller's credential or the
        job's own token); servers without the route answer 404/405
        (:class:`NotFound`/:class:`MethodNotAllowed`).

        Sent with a job token in the second half of its life, the answer also carries
        the token's successor: this client acts with it from then on (so a job may run
        longer than one token lives). The returned dict keeps ``tokenExpiresAt`` but
        never the token itself. ``timeout`` and ``retries`` override the client's (the
        :class:`Worker` sends one attempt, bounded by the time left on the lease)."""
        data = self._json("POST", f"/coordinator/jobs/{_seg(job_id)}/heartbeat", json={},
                          timeout=timeout, retries=retries)
        token = data.pop("token", None)
        if isinstance(token, str) and token and isinstance(self.auth, BearerAuth):
            self.auth.replace(token)
        return data

    def claim(self, queue: str, worker: str, wait: Optional[float] = None) -> Optional[Claim]:
        """``POST /coordinator/queues/{queue}/claim`` [jobs:update]: the best QUEUED job,
        now RUNNING, with its job token; ``None`` when the queue is empty (204).

        With ``wait`` (seconds, at most 60) the server holds the request open until a
        job becomes claimable or the wait ends (a long poll); the read timeout is
        stretched to cover it. A client with a stop flag (:meth:`with_stop`, as every
        :class:`Worker`'s) asks in claims that wait at most :data:`STOP_POLL` each, and
        ends the wait with ``None`` once the flag is set: a request in flight cannot be
        called back without losing a job the server may just have handed out, so it is
        let finish — a job it brings is returned (the worker hands it back)."""
        if wait is not None and not 0 <= wait <= 60:
            raise ValueError("wait must be between 0 and 60 seconds")
        if wait is None or self.stop is None:
            return self._claim(queue, worker, wait)
        deadline = time.monotonic() + wait
        while not self._stopping():
            part = min(STOP_POLL, max(0.0, deadline - time.monotonic()))
            sent = time.monotonic()
            claim = self._claim(queue, worker, part)
            now = time.monotonic()
            # Answered well before its wait: the server did not hold the claim (say, it
            # is shutting down); the caller pauses rather than this asking again.
            if claim is not None or now >= deadline or now - sent < part / 2:
                return claim
        return None

    def _claim(self, queue: str, worker: str, wait: Optional[float]) -> Optional[Claim]:
        """One claim request, waiting up to ``wait`` on the server."""
        body: Dict[str, Any] = {"worker": worker}
        timeout = None
        if wait is not None:
            body["wait"] = wait
            timeout = max(self.timeout, wait + 10.0)
        resp = self.request(
            "POST", f"/coordinator/queues/{_seg(queue)}/claim", json=body, ok=(200, 204),
            timeout=timeout,
        )
        if resp.status_code == 204:
            return None
        data = _parse(resp)
        token = data.pop("token", None) if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise InvalidAnswer(f"POST /coordinator/queues/{_seg(queue)}/claim: "
                                "the answer holds no job token")
        expires = data.pop("tokenExpiresAt", "")
        return Claim(job=data, token=token, token_expires_at=expires)

    def list_jobs(
        self,
        *,
        queue: Optional[str] = None,
        status: Iterable[str] = (),
        kind: Optional[str] = None,
        created_after: Optional[str] = None,
        created_before: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Dict[str, Any]:
        """``GET /coordinator/jobs`` [jobs:read]: one page, newest first
        (``{"items": [...], "nextCursor": ...}``)."""
        params = [("status", s) for s in status]
        for k, v in (("queue", queue), ("kind", kind), ("createdAfter", created_after),
                     ("createdBefore", created_before), ("limit", limit), ("cursor", cursor)):
            if v is not None:
                params.append((k, str(v)))
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params)
        return self._json("GET", "/coordinator/jobs" + (f"?{query}" if query else ""))

    def cancel_job(self, job_id: str, reason: Optional[str] = None) -> Job:
        """``POST /coordinator/jobs/{id}/cancel`` [jobs:update, not a job token]."""
        body = {} if reason is None else {"reason": reason}
        return self._json("POST", f"/coordinator/jobs/{_seg(job_id)}/cancel", json=body)

    def retry_job(self, job_id: str) -> Job:
        """``POST /coordinator/jobs/{id}/retry`` [jobs:update, not a job token]: a FAILED
        or CANCELLED job back to QUEUED with a fresh attempt budget."""
        return self._json("POST", f"/coordinator/jobs/{_seg(job_id)}/retry", json={})

    def list_queues(self) -> Dict[str, Any]:
        """``GET /coordinator/queues`` [health:read]."""
        return self._json("GET", "/coordinator/queues")

    _UNSET: Any = object()

    def patch_queue(self, queue: str, *, paused: Optional[bool] = None,
                    max_running: Any = _UNSET) -> Dict[str, Any]:
        """``PATCH /coordinator/queues/{queue}`` [admin]; ``max_running=None`` removes
        the limit, leaving it out keeps it."""
        body: Dict[str, Any] = {}
        if paused is not None:
            body["paused"] = paused
        if max_running is not Client._UNSET:
            body["maxRunning"] = max_running
        return self._json("PATCH", f"/coordinator/queues/{_seg(queue)}", json=body)

    # ---- stitcher and admin -----------------------------------------------------------

    def stitcher_webhook(
        self,
        payload: Dict[str, Any],
        *,
        sender: Optional[str] = None,
        webhook_secret: Optional[str] = None,
        webhook_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """``POST /stitcher/webhook`` (or ``/stitcher/webhook/{sender}``). With
        ``webhook_secret`` the delivery is signed with Standard Webhooks instead of the
        client's credential (the server accepts one or the other, never both)."""
        body = _json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        hdrs = {"Content-Type": "application/json"}
        if idempotency_key:
            hdrs["Idempotency-Key"] = idempotency_key
        auth: Any = "default"
        if webhook_secret:
            wid = webhook_id or f"msg_{os.urandom(12).hex()}"
            hdrs.update(sign_webhook(webhook_secret, wid, str(int(time.time())), body))
            auth = None
        elif webhook_id:
            hdrs["webhook-id"] = webhook_id
        path = "/stitcher/webhook" + (f"/{_seg(sender)}" if sender else "")
        out: Dict[str, Any] = _parse(self.request("POST", path, body=body, headers=hdrs, auth=auth))
        return out

    def dispatch(
        self,
        issue_number: int,
        repository: str,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        payload: Optional[Dict[str, Any]] = None,
        idempotency_key: Optional[str] = None,
    ) -> Dict[str, Any]:
        """``POST /stitcher/dispatch`` [stitcher:dispatch]: a QUEUED job."""
        body: Dict[str, Any] = {"issueNumber": issue_number, "repository": repository}
        for k, v in (("queue", queue), ("priority", priority), ("payload", payload)):
            if v is not None:
                body[k] = v
        hdrs = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/stitcher/dispatch", json=body, headers=hdrs)

    def revoke_token(self, jti: str, expires_at: Optional[str] = None) -> Dict[str, Any]:
        """``POST /admin/tokens/revoke`` [admin]."""
        body: Dict[str, Any] = {"jti": jti}
        if expires_at is not None:
            body["expiresAt"] = expires_at
        return self._json("POST", "/admin/tokens/revoke", json=body)


def _read_body(resp: requests.Response, method: str, path: str) -> None:
    """Read the answer's body into ``resp`` (``.content``, ``.json()`` and ``.text``
    then work as usual), at most :data:`MAX_BODY` bytes: past that the connection is
    closed with the rest unread and :class:`ResponseTooLarge` raised."""
    too_large = ResponseTooLarge(
        f"{method} {path}: the answer ({resp.status_code}) is larger than "
        f"{MAX_BODY // (1024 * 1024)} MiB"
    )
    declared = resp.headers.get("Content-Length", "").strip()
    if _ascii_digits(declared) and int(declared) > MAX_BODY:
        resp.close()
        raise too_large
    chunks: List[bytes] = []
    size = 0
    try:
        for chunk in resp.iter_content(_READ_CHUNK):
            size += len(chunk)
            if size > MAX_BODY:
                raise too_large
            chunks.append(chunk)
    except BaseException:
        resp.close()
        raise
    # What requests itself does when it reads a body that is not streamed.
    resp._content = b"".join(chunks)
    resp._content_consumed = True


def _transport_reason(e: BaseException) -> str:
    """What went wrong with a request that got no answer: the exception's type and
    text (urllib3's and the socket's: host, port, URL path, OS error — never a request
    header), nothing of the request object it carries."""
    return f"{type(e).__name__}: {e}"


def _is_problem(resp: requests.Response) -> bool:
    """The answer is a problem+json document: the service's own error answer."""
    ctype = resp.headers.get("Content-Type", "")
    return ctype.split(";", 1)[0].strip().lower() == "application/problem+json"


def _parse(resp: requests.Response) -> Any:
    """The answer's JSON body; :class:`InvalidAnswer` when it is not JSON (a proxy's
    page, a cut-off body)."""
    try:
        return resp.json()
    except ValueError as e:
        ctype = resp.headers.get("Content-Type", "")
        # The path, never the URL: a base URL's `user:password@` would be in it.
        raise InvalidAnswer(
            f"{resp.request.method} {resp.request.path_url}: the answer ({resp.status_code}, "
            f"{ctype or 'no Content-Type'}) is not JSON: {e}") from e


def _decode(resp: requests.Response) -> Any:
    if "json" in resp.headers.get("Content-Type", ""):
        return _parse(resp)
    return resp.text


def _problem(resp: requests.Response) -> ProblemError:
    """The error for an answer: its problem document with every member, ``status``
    added when missing; for a body that is not a JSON object (a proxy's page), a
    stand-in with the reason phrase and the body's first 500 characters (as the Rust
    client's ``Problem``)."""
    try:
        parsed = resp.json()
    except ValueError:
        parsed = None
    problem: Dict[str, Any] = (parsed if isinstance(parsed, dict)
                               else {"title": resp.reason or "", "detail": resp.text[:500]})
    problem.setdefault("status", resp.status_code)
    return error_for(resp.status_code, problem, dict(resp.headers))


