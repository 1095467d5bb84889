"""RFC 9457 problem+json answers as typed exceptions."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type

from requests.structures import CaseInsensitiveDict


class CoordinatorError(Exception):
    """Base class of every error this package raises."""


class TransportError(CoordinatorError):
    """The request did not get an HTTP answer (connection refused, reset, timeout)."""


class ResponseTooLarge(CoordinatorError):
    """The answer's body is larger than the client reads (16 MiB): the connection is
    closed with the rest unread. Not retried."""


class InvalidAnswer(CoordinatorError, ValueError):
    """A success answer this client cannot read (not JSON, or not the expected
    document), e.g. a proxy's HTML page with status 200."""


class ProblemError(CoordinatorError):
    """An HTTP error answer. ``problem`` is the problem+json document (or a stand-in
    built from the status when the body was not one); ``headers`` the answer's, looked
    up case-insensitively (as the Rust client's ``Problem::header``)."""

    status: int = 0

    def __init__(self, status: int, problem: Dict[str, Any],
                 headers: Optional[Mapping[str, str]] = None):
        self.status = status
        self.problem = problem
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(headers or {})
        self.type: str = str(problem.get("type", "about:blank"))
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.title}: {self.detail}".strip())


class BadRequest(ProblemError):
    """400; ``field`` names the offending field."""

    @property
    def field(self) -> Optional[str]:
        return self.problem.get("field")


class Unauthorized(ProblemError):
    """401; ``reason`` says which rule failed, ``canonical`` is the server's signed
    string (or signature base) for a signature mismatch."""

    @property
    def reason(self) -> Optional[str]:
        return self.problem.get("reason")

    @property
    def canonical(self) -> Optional[str]:
        return self.problem.get("canonical")

    @property
    def server_time(self) -> Optional[int]:
        return self.problem.get("server_time")


class Forbidden(ProblemError):
    """403: the credential lacks the route's scope, or a job token the job."""


class NotFound(ProblemError):
    """404."""


class MethodNotAllowed(ProblemError):
    """405."""


class RequestTimeout(ProblemError):
    """408."""


class Conflict(ProblemError):
    """409: the state machine refused the change (e.g. the job is not RUNNING)."""


class PayloadTooLarge(ProblemError):
    """413."""


class TooManyRequests(ProblemError):
    """429 (after the client's retries ran out)."""


class Unavailable(ProblemError):
    """503 (after the client's retries ran out)."""


class ServerError(ProblemError):
    """Any other 5xx."""


_BY_STATUS: Dict[int, Type[ProblemError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    429: TooManyRequests,
    503: Unavailable,
}


def error_for(status: int, problem: Dict[str, Any],
              headers: Optional[Mapping[str, str]] = None) -> ProblemError:
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ProblemError)
    return cls(status, problem, headers)
