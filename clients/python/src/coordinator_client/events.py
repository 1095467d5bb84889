"""A job's event stream (``GET /coordinator/jobs/{id}/events`` as Server-Sent Events):
the events it yields and the SSE reading :meth:`Client.watch` is made of."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, List, Optional, Tuple

from .errors import InvalidAnswer, ResponseTooLarge

__all__ = ["JobEvent", "TERMINAL"]

#: The statuses after which a job's stream ends.
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")

#: The longest one SSE event (its lines together) this client reads, bytes.
MAX_EVENT = 16 * 1024 * 1024


@dataclass(frozen=True)
class JobEvent:
    """One job event, as ``GET /coordinator/jobs/{id}`` lists them.

    ``gap``: when events before this one are no longer kept on the server (a job keeps
    only its newest ``COORDINATOR_EVENTS_PER_JOB``) and so were never seen by this
    watch, their ``(first, last)`` seq; else ``None``."""

    seq: int
    type: str
    data: Any
    created_at: str
    gap: Optional[Tuple[int, int]] = None

    @property
    def status(self) -> Optional[str]:
        """The job's status after this event, for an event that changes it (``to``)."""
        to = self.data.get("to") if isinstance(self.data, dict) else None
        return to if isinstance(to, str) else None


@dataclass
class SseEvent:
    """One dispatched SSE event: its ``id:``, ``event:`` and joined ``data:`` lines."""

    id: Optional[str]
    event: str
    data: str


def sse_events(chunks: Iterable[bytes]) -> Iterator[Optional[SseEvent]]:
    """The events of an SSE body (https://html.spec.whatwg.org/#event-stream-interpretation),
    read as the chunks come: comments (``: keep-alive``, ``: gap: …``) are dropped, an
    event without ``data:`` is not dispatched, a last event not ended by a blank line
    (a cut connection) is dropped. Yields ``None`` for every chunk that completed no
    event, so a caller can look at its stop flag while the stream is idle."""
    buf = b""
    ident: Optional[str] = None
    event = ""
    data: List[str] = []
    pending = 0
    for chunk in chunks:
        buf += chunk
        dispatched = False
        while True:
            cut = _line_end(buf)
            if cut is None:
                break
            end, nxt = cut
            line = buf[:end].decode("utf-8", errors="replace")
            buf = buf[nxt:]
            if line == "":
                if data:
                    yield SseEvent(ident, event or "message", "\n".join(data))
                    dispatched = True
                event, data, pending = "", [], 0
                continue
            pending += len(line)
            if pending > MAX_EVENT:
                raise ResponseTooLarge("an event of the stream is larger than 16 MiB")
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                ident = value
        if len(buf) > MAX_EVENT:
            raise ResponseTooLarge("a line of the stream is longer than 16 MiB")
        if not dispatched:
            yield None


def _line_end(buf: bytes) -> Optional[Tuple[int, int]]:
    """Where the first line of ``buf`` ends (CRLF, LF or CR) and the next begins; a CR
    at the very end may still be followed by its LF."""
    lf = buf.find(b"\n")
    cr = buf.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 < len(buf):
        return (cr, cr + 2) if buf[cr + 1:cr + 2] == b"\n" else (cr, cr + 1)
    return None


def job_event(sse: SseEvent, where: str) -> JobEvent:
    """The job event an SSE event carries in its ``data:``."""
    try:
        doc = json.loads(sse.data)
    except ValueError as e:
        raise InvalidAnswer(f"{where}: an event's data is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidAnswer(f"{where}: an event's data is not a JSON object")
    seq, kind = doc.get("seq"), doc.get("type", sse.event)
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(kind, str):
        raise InvalidAnswer(f"{where}: an event has no integer seq or no type")
    return JobEvent(seq=seq, type=kind, data=doc.get("data"),
                    created_at=str(doc.get("createdAt", "")))
