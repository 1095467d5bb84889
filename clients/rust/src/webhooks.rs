//! Standard Webhooks: verify a delivery you receive, or sign one you send.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::signing::hmac_sha256;

/// Default accepted distance between `webhook-timestamp` and now.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Why a delivery was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookError {
    Missing,
    MalformedTimestamp,
    OutOfRange,
    BadSecret,
    NoMatch,
}

impl std::fmt::Display for WebhookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Missing => "missing webhook headers",
            Self::MalformedTimestamp => "malformed webhook timestamp",
            Self::OutOfRange => "webhook timestamp out of range",
            Self::BadSecret => "a webhook secret is whsec_ followed by base64",
            Self::NoMatch => "no matching webhook signature",
        })
    }
}

impl std::error::Error for WebhookError {}

/// The key bytes of a `whsec_…` secret.
pub fn webhook_key(secret: &str) -> Result<Vec<u8>, WebhookError> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    STANDARD
        .decode(encoded)
        .map_err(|_| WebhookError::BadSecret)
}

fn mac(key: &[u8], id: &str, ts: &str, body: &[u8]) -> [u8; 32] {
    let mut msg = Vec::with_capacity(id.len() + ts.len() + body.len() + 2);
    msg.extend_from_slice(id.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(ts.as_bytes());
    msg.push(b'.');
    msg.extend_from_slice(body);
    hmac_sha256(key, &msg)
}

/// The `webhook-id`, `webhook-timestamp` and `webhook-signature` headers for `body`.
pub fn sign_webhook(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
) -> Result<Vec<(String, String)>, WebhookError> {
    let sig = STANDARD.encode(mac(&webhook_key(secret)?, id, timestamp, body));
    Ok(vec![
        ("webhook-id".to_owned(), id.to_owned()),
        ("webhook-timestamp".to_owned(), timestamp.to_owned()),
        ("webhook-signature".to_owned(), format!("v1,{sig}")),
    ])
}

/// Checks a delivery: headers present (names case-insensitive), timestamp within
/// `tolerance_secs` of `now`, and any `v1,<base64>` entry matching (constant time).
pub fn verify_webhook(
    headers: &[(&str, &str)],
    body: &[u8],
    secret: &str,
    tolerance_secs: i64,
    now: i64,
) -> Result<(), WebhookError> {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| *v)
    };
    let (Some(id), Some(ts), Some(sigs)) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    ) else {
        return Err(WebhookError::Missing);
    };
    if ts.is_empty() || ts.len() > 12 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WebhookError::MalformedTimestamp);
    }
    let sent: i64 = ts.parse().map_err(|_| WebhookError::MalformedTimestamp)?;
    if sent.abs_diff(now) > tolerance_secs.unsigned_abs() {
        return Err(WebhookError::OutOfRange);
    }
    let expected = mac(&webhook_key(secret)?, id, ts, body);
    let mut found = 0u8;
    for entry in sigs.split(' ') {
        let Some(("v1", encoded)) = entry.split_once(',') else {
            continue;
        };
        let Ok(candidate) = STANDARD.decode(encoded) else {
            continue;
        };
        if candidate.len() == expected.len() {
            let diff = candidate
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= u8::from(diff == 0);
        }
    }
    if found == 1 {
        Ok(())
    } else {
        Err(WebhookError::NoMatch)
    }
}
