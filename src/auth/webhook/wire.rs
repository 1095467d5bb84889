//! The wire format of Standard Webhooks (docs/design.md §4): header syntax, signed content,
//! MAC check. Pure: no I/O, no actix types (the verifier is `auth::webhook`).
//!
//! Signed content is `webhook-id.webhook-timestamp.body`, HMAC-SHA256 keyed by the
//! base64-decoded secret after `whsec_`; `webhook-signature` is a space-separated list
//! of `v1,<base64>` entries, any of which may match. An empty list never passes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::crypto::{ct_eq, hmac_sha256_parts};

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// Longest accepted `webhook-id`.
const MAX_ID_LEN: usize = 256;
const MAX_TIMESTAMP_DIGITS: usize = 12;
/// Caps on the `webhook-signature` header, checked before any decoding.
const MAX_SIGNATURE_HEADER_BYTES: usize = 4096;
const MAX_SIGNATURE_ENTRIES: usize = 20;
const SIGNATURE_VERSION: &str = "v1";

/// The webhook headers after the syntactic checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookHeaders {
    pub id: String,
    pub timestamp: i64,
    /// Every usable `v1` signature, decoded.
    pub signatures: Vec<[u8; 32]>,
}

/// Why the webhook headers were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum WebhookError {
    /// A required header is absent; carries the first missing header's name.
    #[error("missing webhook headers ({0})")]
    Missing(&'static str),
    #[error("malformed webhook id")]
    MalformedId,
    #[error("malformed webhook timestamp")]
    MalformedTimestamp,
    /// Over the size or entry cap.
    #[error("malformed webhook signature")]
    MalformedSignature,
    /// No usable `v1` signature in the header.
    #[error("no webhook signature")]
    NoSignature,
}

impl WebhookError {
    /// Short reason for a 401 body and the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing webhook headers",
            Self::MalformedId => "malformed webhook id",
            Self::MalformedTimestamp => "malformed webhook timestamp",
            Self::MalformedSignature => "malformed webhook signature",
            Self::NoSignature => "no webhook signature",
        }
    }
}

/// Checks presence, id, timestamp and the signature list.
///
/// Entries with another version tag, and `v1` entries whose base64 is empty or does
/// not decode to 32 bytes, are skipped; if nothing usable remains the result is
/// [`WebhookError::NoSignature`].
pub fn parse_headers(
    id: Option<&str>,
    ts: Option<&str>,
    sig: Option<&str>,
) -> Result<WebhookHeaders, WebhookError> {
    let id = id.ok_or(WebhookError::Missing(HEADER_ID))?;
    let ts = ts.ok_or(WebhookError::Missing(HEADER_TIMESTAMP))?;
    let sig = sig.ok_or(WebhookError::Missing(HEADER_SIGNATURE))?;

    let id_ok =
        !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic());
    if !id_ok {
        return Err(WebhookError::MalformedId);
    }
    let ts_ok = !ts.is_empty()
        && ts.len() <= MAX_TIMESTAMP_DIGITS
        && ts.bytes().all(|b| b.is_ascii_digit());
    if !ts_ok {
        return Err(WebhookError::MalformedTimestamp);
    }
    let Ok(timestamp) = ts.parse::<i64>() else {
        return Err(WebhookError::MalformedTimestamp);
    };

    if sig.len() > MAX_SIGNATURE_HEADER_BYTES {
        return Err(WebhookError::MalformedSignature);
    }
    let entries: Vec<&str> = sig.split(' ').filter(|e| !e.is_empty()).collect();
    if entries.len() > MAX_SIGNATURE_ENTRIES {
        return Err(WebhookError::MalformedSignature);
    }
    let signatures: Vec<[u8; 32]> = entries
        .into_iter()
        .filter_map(|entry| {
            let (version, encoded) = entry.split_once(',')?;
            if version != SIGNATURE_VERSION || encoded.is_empty() {
                return None;
            }
            let decoded = STANDARD.decode(encoded).ok()?;
            <[u8; 32]>::try_from(decoded.as_slice()).ok()
        })
        .collect();
    if signatures.is_empty() {
        return Err(WebhookError::NoSignature);
    }
    Ok(WebhookHeaders {
        id: id.to_owned(),
        timestamp,
        signatures,
    })
}

fn mac(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
    hmac_sha256_parts(
        key,
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    )
}

/// `v1,<base64 HMAC-SHA256 of id.timestamp.body>` (for tests and the CLI).
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    format!(
        "{SIGNATURE_VERSION},{}",
        STANDARD.encode(mac(key, id, timestamp, body))
    )
}

/// True when any listed signature matches, each compared in constant time.
/// `timestamp_raw` is the `webhook-timestamp` header exactly as received.
pub fn verify(key: &[u8], headers: &WebhookHeaders, timestamp_raw: &str, body: &[u8]) -> bool {
    let expected = mac(key, &headers.id, timestamp_raw, body);
    headers.signatures.iter().fold(false, |found, candidate| {
        found | ct_eq(candidate, &expected)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::credential::WebhookSecret;

    // The Standard Webhooks reference test vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: &str = "1614265330";
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn key() -> Vec<u8> {
        WebhookSecret::parse(SECRET).unwrap().key_bytes().to_vec()
    }

    fn headers(sig: &str) -> WebhookHeaders {
        parse_headers(Some(ID), Some(TS), Some(sig)).unwrap()
    }

    #[test]
    fn standard_webhooks_vector() {
        assert_eq!(sign(&key(), ID, TS, BODY), EXPECTED);
        let h = headers(EXPECTED);
        assert_eq!(h.id, ID);
        assert_eq!(h.timestamp, 1_614_265_330);
        assert_eq!(h.signatures.len(), 1);
        assert!(verify(&key(), &h, TS, BODY));
    }

    #[test]
    fn tampering_fails() {
        let h = headers(EXPECTED);
        assert!(!verify(&key(), &h, TS, br#"{"test": 2432232315}"#));
        assert!(!verify(&key(), &h, "1614265331", BODY));
        assert!(!verify(&key(), &h, TS, b""));
        let other_id = parse_headers(Some("msg_other"), Some(TS), Some(EXPECTED)).unwrap();
        assert!(!verify(&key(), &other_id, TS, BODY));
        assert!(!verify(&[0u8; 24], &h, TS, BODY));
    }

    #[test]
    fn any_listed_signature_may_match() {
        let wrong = sign(b"another key", ID, TS, BODY);
        let list = format!("v2,abc {wrong}  {EXPECTED} v1,");
        let h = headers(&list);
        assert_eq!(h.signatures.len(), 2);
        assert!(verify(&key(), &h, TS, BODY));
        assert!(!verify(&key(), &headers(&wrong), TS, BODY));
    }

    #[test]
    fn no_usable_signature() {
        let short = format!("v1,{}", STANDARD.encode([1u8; 31]));
        let bad_b64 = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE"; // unpadded
        for sig in [
            "",
            " ",
            "v1,",
            "v1, v1,",
            "v1",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "V1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            short.as_str(),
            bad_b64,
            "v1,!!!!",
        ] {
            assert_eq!(
                parse_headers(Some(ID), Some(TS), Some(sig)).unwrap_err(),
                WebhookError::NoSignature,
                "{sig:?}"
            );
        }
    }

    #[test]
    fn caps_on_the_signature_header() {
        let twenty = vec![EXPECTED; 20].join(" ");
        assert_eq!(headers(&twenty).signatures.len(), 20);
        let twenty_one = vec![EXPECTED; 21].join(" ");
        assert_eq!(
            parse_headers(Some(ID), Some(TS), Some(&twenty_one)).unwrap_err(),
            WebhookError::MalformedSignature
        );
        let huge = format!("{EXPECTED}{}", " ".repeat(4096));
        assert_eq!(
            parse_headers(Some(ID), Some(TS), Some(&huge)).unwrap_err(),
            WebhookError::MalformedSignature
        );
    }

    #[test]
    fn missing_and_malformed_headers() {
        use WebhookError::*;
        assert_eq!(
            parse_headers(None, Some(TS), Some(EXPECTED)).unwrap_err(),
            Missing(HEADER_ID)
        );
        assert_eq!(
            parse_headers(Some(ID), None, Some(EXPECTED)).unwrap_err(),
            Missing(HEADER_TIMESTAMP)
        );
        let e = parse_headers(Some(ID), Some(TS), None).unwrap_err();
        assert_eq!(e, Missing(HEADER_SIGNATURE));
        assert_eq!(e.reason(), "missing webhook headers");
        let long_id = "a".repeat(257);
        for id in ["", "msg 1", "msg\t1", "msg_\u{e9}", long_id.as_str()] {
            let e = parse_headers(Some(id), Some(TS), Some(EXPECTED)).unwrap_err();
            assert_eq!(e, MalformedId, "{id:?}");
        }
        assert!(parse_headers(Some(&"a".repeat(256)), Some(TS), Some(EXPECTED)).is_ok());
        for ts in ["", "-1", "+1", " 1", "1.5", "1234567890123"] {
            let e = parse_headers(Some(ID), Some(ts), Some(EXPECTED)).unwrap_err();
            assert_eq!(e, MalformedTimestamp, "{ts:?}");
        }
    }

    #[test]
    fn sign_round_trip_with_generated_secret() {
        let secret = WebhookSecret::generate();
        let key = secret.key_bytes();
        let sig = sign(&key, "msg_1", "1700000000", b"{}");
        assert!(sig.starts_with("v1,"));
        let h = parse_headers(Some("msg_1"), Some("1700000000"), Some(&sig)).unwrap();
        assert!(verify(&key, &h, "1700000000", b"{}"));
    }
}
