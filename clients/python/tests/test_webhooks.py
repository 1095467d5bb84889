from __future__ import annotations

import pytest

from coordinator_client import WebhookVerificationError, sign_webhook, verify_webhook

# The Standard Webhooks reference vector.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TS = "1614265330"
BODY = b'{"test": 2432232314}'
SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(sig: str = SIG, ts: str = TS) -> dict:
    return {"Webhook-Id": ID, "Webhook-Timestamp": ts, "Webhook-Signature": sig}


def test_reference_vector() -> None:
    assert sign_webhook(SECRET, ID, TS, BODY)["webhook-signature"] == SIG
    assert verify_webhook(headers(), BODY, SECRET, now=int(TS)) == {"test": 2432232314}
    # Any of several listed signatures may match.
    assert verify_webhook(headers(f"v1,AAAA v2,xyz {SIG}"), BODY, SECRET, now=int(TS) + 299)


@pytest.mark.parametrize(
    "hdrs,body,now,why",
    [
        (headers(), BODY + b" ", int(TS), "no matching"),
        (headers("v1," + SIG[3:].replace("g", "h", 1)), BODY, int(TS), "no matching"),
        (headers("v2," + SIG[3:]), BODY, int(TS), "no matching"),
        (headers(), BODY, int(TS) + 301, "out of range"),
        (headers(), BODY, int(TS) - 301, "out of range"),
        (headers(ts="16142653x0"), BODY, int(TS), "malformed"),
        # Unicode digits: str.isdigit() takes them, int() or the server does not.
        (headers(ts="\u00b2"), BODY, 2, "malformed"),
        (headers(ts="1614265330\u00b9"), BODY, int(TS), "malformed"),
        (headers(ts=" 1614265330"), BODY, int(TS), "malformed"),
        (headers(ts=""), BODY, int(TS), "missing"),
        ({**headers(), "Webhook-Id": "msg_\udcff"}, BODY, int(TS), "malformed"),
        ({"webhook-id": ID, "webhook-timestamp": TS}, BODY, int(TS), "missing"),
    ],
)
def test_refusals(hdrs: dict, body: bytes, now: int, why: str) -> None:
    with pytest.raises(WebhookVerificationError, match=why):
        verify_webhook(hdrs, body, SECRET, now=now)


def test_wrong_secret() -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers(), BODY, "whsec_" + "A" * 32, now=int(TS))


def test_a_timestamp_in_other_digits_is_malformed_even_when_signed() -> None:
    # 1614265330 in Arabic-Indic digits, correctly signed: the server refuses it, and
    # so does the verifier (not only by the signature).
    ts = "\u0661\u0666\u0661\u0664\u0662\u0666\u0665\u0663\u0663\u0660"
    assert int(ts) == int(TS)
    signed = sign_webhook(SECRET, ID, ts, BODY)["webhook-signature"]
    with pytest.raises(WebhookVerificationError, match="malformed webhook timestamp"):
        verify_webhook(headers(signed, ts), BODY, SECRET, now=int(TS))
