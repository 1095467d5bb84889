"""Client, worker loop and request signers for the coordinator service."""
from .client import Claim, Client, Job
from .events import JobEvent
from .errors import (
    BadRequest,
    Conflict,
    CoordinatorError,
    Forbidden,
    InvalidAnswer,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    RequestTimeout,
    ResponseTooLarge,
    ServerError,
    TooManyRequests,
    TransportError,
    Unauthorized,
    Unavailable,
)
from .signing import (
    ApiKeyAuth,
    BearerAuth,
    Rfc9421Auth,
    V1Auth,
    canonical_v1,
    content_digest,
    rfc9421_headers,
    sign_rfc9421,
    sign_v1,
    signature_base,
    v1_headers,
)
from .webhooks import WebhookVerificationError, sign_webhook, verify_webhook
from .worker import JobCancelled, JobContext, Retry, Worker

__version__ = "0.1.0"

__all__ = [
    "ApiKeyAuth", "BadRequest", "BearerAuth", "Claim", "Client", "Conflict",
    "CoordinatorError", "Forbidden", "InvalidAnswer", "Job", "JobCancelled", "JobContext",
    "JobEvent", "MethodNotAllowed", "NotFound", "PayloadTooLarge", "ProblemError",
    "RequestTimeout", "ResponseTooLarge", "Retry", "Rfc9421Auth", "ServerError", "TooManyRequests",
    "TransportError", "Unauthorized", "Unavailable", "V1Auth",
    "WebhookVerificationError", "Worker", "canonical_v1", "content_digest",
    "rfc9421_headers", "sign_rfc9421", "sign_v1", "sign_webhook", "signature_base",
    "v1_headers", "verify_webhook",
]
