"""Standard Webhooks: verify a delivery you receive, or sign one you send.

Signed content is ``webhook-id.webhook-timestamp.body``, HMAC-SHA256 keyed by the
base64-decoded part of the ``whsec_…`` secret; ``webhook-signature`` is a
space-separated list of ``v1,<base64>`` entries, any of which may match.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any, Dict, Mapping, Optional, Union

__all__ = ["verify_webhook", "sign_webhook", "WebhookVerificationError"]

DEFAULT_TOLERANCE_SECS = 300


class WebhookVerificationError(Exception):
    """The delivery is not authentic (or not fresh); ``str(e)`` says why."""


def _key(secret: Union[str, bytes]) -> bytes:
    if isinstance(secret, bytes):
        return secret
    encoded = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("a webhook secret is whsec_ followed by base64") from e


def _mac(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256).digest()


def sign_webhook(secret: Union[str, bytes], msg_id: str, timestamp: str, body: bytes) -> Dict[str, str]:
    """The three ``webhook-*`` headers for a delivery of ``body``."""
    sig = base64.b64encode(_mac(_key(secret), msg_id, timestamp, body)).decode()
    return {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": f"v1,{sig}"}


def verify_webhook(
    headers: Mapping[str, str],
    body: Union[bytes, str],
    secret: Union[str, bytes],
    *,
    tolerance: int = DEFAULT_TOLERANCE_SECS,
    now: Optional[float] = None,
) -> Any:
    """Check a Standard Webhooks delivery and return its JSON body (``None`` if the
    body is not JSON). Raises :class:`WebhookVerificationError` for missing or
    malformed headers, a timestamp more than ``tolerance`` seconds away from ``now``,
    or no matching ``v1`` signature. Header names are matched case-insensitively."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id")
    ts = lower.get("webhook-timestamp")
    sigs = lower.get("webhook-signature")
    if not msg_id or not ts or not sigs:
        raise WebhookVerificationError("missing webhook headers")
    # ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and
    # other scripts' digits (which the server refuses).
    if not (ts.isascii() and ts.isdigit()) or len(ts) > 12:
        raise WebhookVerificationError("malformed webhook timestamp")
    current = time.time() if now is None else now
    if abs(current - int(ts)) > tolerance:
        raise WebhookVerificationError("webhook timestamp out of range")
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    key = _key(secret)
    try:
        expected = _mac(key, msg_id, ts, raw)
    except UnicodeEncodeError:  # e.g. a lone surrogate: no bytes were sent as this id
        raise WebhookVerificationError("malformed webhook id") from None
    found = False
    for entry in sigs.split(" "):
        version, _, encoded = entry.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        found |= hmac.compare_digest(candidate, expected)
    if not found:
        raise WebhookVerificationError("no matching webhook signature")
    try:
        return json.loads(raw)
    except ValueError:
        return None
