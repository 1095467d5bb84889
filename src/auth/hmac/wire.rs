//! The wire format of the HMAC request-signature scheme (docs/design.md §4): the
//! `X-Coordinator-*` headers and the canonical string. Pure: no I/O, no actix types (the
//! verifier is `auth::hmac`).
//!
//! The server builds the signed string with [`CanonicalRequest`]. `coordinator sign`
//! and `coordinator call` sign with the coordinator-client crate
//! (`coordinator_client::signing`); a unit test in `cli/client.rs` and
//! tests/api/signing_vectors.rs hold its string to this one, so `--explain` compares
//! like with like.

use crate::crypto::{ct_eq, hmac_sha256, hmac_sha256_hex, sha256_hex};

pub const HEADER_CALLER: &str = "x-coordinator-caller";
pub const HEADER_TIMESTAMP: &str = "x-coordinator-timestamp";
pub const HEADER_SIGNATURE: &str = "x-coordinator-signature";
pub const HEADER_KEY_VERSION: &str = "x-coordinator-key-version";
pub const HEADER_NONCE: &str = "x-coordinator-nonce";

/// First line of the signed string.
pub const SCHEME_VERSION: &str = "v1";
/// Hex characters in a signature (HMAC-SHA256).
pub const SIGNATURE_HEX_LEN: usize = 64;
const MAX_CALLER_LEN: usize = 32;
const MAX_TIMESTAMP_DIGITS: usize = 12;
const MAX_KEY_VERSION_DIGITS: usize = 10;
const MAX_NONCE_LEN: usize = 64;

/// The parts of a request that the signature covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonicalRequest<'a> {
    pub method: &'a str,
    /// Path and `?query` exactly as sent: not decoded, not reordered.
    pub target: &'a str,
    pub caller: &'a str,
    pub timestamp: &'a str,
    /// Empty when the request carries no nonce.
    pub nonce: &'a str,
    /// Lower-case hex SHA-256 of the raw body.
    pub body_sha256_hex: String,
}

impl<'a> CanonicalRequest<'a> {
    /// Builds the request, hashing `body`.
    pub fn new(
        method: &'a str,
        target: &'a str,
        caller: &'a str,
        timestamp: &'a str,
        nonce: &'a str,
        body: &[u8],
    ) -> Self {
        Self {
            method,
            target,
            caller,
            timestamp,
            nonce,
            body_sha256_hex: sha256_hex(body),
        }
    }

    /// The `v1` lines joined by `\n`, method upper-cased, no trailing newline.
    pub fn to_signed_string(&self) -> String {
        let method = self.method.to_ascii_uppercase();
        [
            SCHEME_VERSION,
            method.as_str(),
            self.target,
            self.caller,
            self.timestamp,
            self.nonce,
            self.body_sha256_hex.as_str(),
        ]
        .join("\n")
    }

    /// Name/value pairs in signed-string order, for a component-by-component comparison.
    pub fn components(&self) -> Vec<(&'static str, String)> {
        vec![
            ("version", SCHEME_VERSION.to_owned()),
            ("method", self.method.to_ascii_uppercase()),
            ("target", self.target.to_owned()),
            ("caller", self.caller.to_owned()),
            ("timestamp", self.timestamp.to_owned()),
            ("nonce", self.nonce.to_owned()),
            ("body_sha256", self.body_sha256_hex.clone()),
        ]
    }
}

/// The signed string for a request; `nonce` is `""` when absent.
pub fn canonical(
    method: &str,
    target: &str,
    caller: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> String {
    CanonicalRequest::new(method, target, caller, timestamp, nonce, body).to_signed_string()
}

/// Lower-case hex HMAC-SHA256 of `signed_string`, keyed by the UTF-8 bytes of the
/// whole secret string (prefix and checksum included).
pub fn sign(secret: &str, signed_string: &str) -> String {
    hmac_sha256_hex(secret.as_bytes(), signed_string.as_bytes())
}

/// Constant-time check of a hex signature (either case). Anything that is not exactly
/// 64 hex characters is `false`.
pub fn verify(secret: &str, signed_string: &str, signature_hex: &str) -> bool {
    let mut given = [0u8; 32];
    if hex::decode_to_slice(signature_hex, &mut given).is_err() {
        return false;
    }
    let expected = hmac_sha256(secret.as_bytes(), signed_string.as_bytes());
    ct_eq(&expected, &given)
}

/// The HMAC-scheme headers after the cheap syntactic checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHeaders {
    pub caller: String,
    pub timestamp: i64,
    /// The timestamp exactly as sent; this is what the signed string contains.
    pub timestamp_raw: String,
    /// 64 lower-case hex characters.
    pub signature: String,
    pub key_version: Option<i32>,
    pub nonce: Option<String>,
}

/// Why the signature headers were refused before any lookup.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum SignatureHeaderError {
    /// A required header is absent; carries the first missing header's name.
    #[error("missing signature headers ({0})")]
    Missing(&'static str),
    #[error("malformed caller")]
    MalformedCaller,
    #[error("malformed timestamp")]
    MalformedTimestamp,
    #[error("malformed signature")]
    MalformedSignature,
    #[error("malformed key version")]
    MalformedKeyVersion,
    #[error("malformed nonce")]
    MalformedNonce,
}

impl SignatureHeaderError {
    /// Short reason for a 401 body and the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing signature headers",
            Self::MalformedCaller => "malformed caller",
            Self::MalformedTimestamp => "malformed timestamp",
            Self::MalformedSignature => "malformed signature",
            Self::MalformedKeyVersion => "malformed key version",
            Self::MalformedNonce => "malformed nonce",
        }
    }
}

/// `^[a-z][a-z0-9_-]{0,31}$`.
pub fn is_valid_caller_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let starts_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    starts_ok
        && name.len() <= MAX_CALLER_LEN
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn all_digits(s: &str, max_len: usize) -> bool {
    !s.is_empty() && s.len() <= max_len && s.bytes().all(|b| b.is_ascii_digit())
}

/// Checks the headers' syntax, cheaply and before any lookup: presence of the three
/// required headers, then caller, timestamp, signature, key version, nonce.
pub fn parse_headers(
    caller: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    key_version: Option<&str>,
    nonce: Option<&str>,
) -> Result<SignatureHeaders, SignatureHeaderError> {
    use SignatureHeaderError as E;
    let caller = caller.ok_or(E::Missing(HEADER_CALLER))?;
    let timestamp_raw = timestamp.ok_or(E::Missing(HEADER_TIMESTAMP))?;
    let signature = signature.ok_or(E::Missing(HEADER_SIGNATURE))?;

    if !is_valid_caller_name(caller) {
        return Err(E::MalformedCaller);
    }
    if !all_digits(timestamp_raw, MAX_TIMESTAMP_DIGITS) {
        return Err(E::MalformedTimestamp);
    }
    // At most 12 digits, so this cannot overflow; still checked rather than unwrapped.
    let Ok(timestamp) = timestamp_raw.parse::<i64>() else {
        return Err(E::MalformedTimestamp);
    };
    if signature.len() != SIGNATURE_HEX_LEN || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(E::MalformedSignature);
    }
    let key_version = key_version
        .map(|raw| {
            if !all_digits(raw, MAX_KEY_VERSION_DIGITS) {
                return Err(E::MalformedKeyVersion);
            }
            match raw.parse::<i32>() {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(E::MalformedKeyVersion),
            }
        })
        .transpose()?;
    let nonce = nonce
        .map(|raw| {
            let ok = !raw.is_empty()
                && raw.len() <= MAX_NONCE_LEN
                && raw
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if ok {
                Ok(raw.to_owned())
            } else {
                Err(E::MalformedNonce)
            }
        })
        .transpose()?;
    Ok(SignatureHeaders {
        caller: caller.to_owned(),
        timestamp,
        timestamp_raw: timestamp_raw.to_owned(),
        signature: signature.to_ascii_lowercase(),
        key_version,
        nonce,
    })
}

/// `|now - ts| <= skew_secs`, without overflow. A negative skew admits nothing.
pub fn timestamp_in_window(ts: i64, now: i64, skew_secs: i64) -> bool {
    u64::try_from(skew_secs).is_ok_and(|skew| ts.abs_diff(now) <= skew)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg1rvF0S";
    const BODY: &[u8] = br#"{"kind":"build"}"#;
    const SIG: &str = "4bfc5bbd579d98fd67445a802a82004eb2d80ba6302568aa6499062f92027957";

    fn kat_request() -> CanonicalRequest<'static> {
        CanonicalRequest::new(
            "post",
            "/coordinator/jobs?b=2&a=1",
            "svc",
            "1700000000",
            "n-1_abc",
            BODY,
        )
    }

    // Expected values computed independently with Python's hashlib/hmac:
    // hmac.new(SECRET, "\n".join([...]).encode(), hashlib.sha256).hexdigest()
    #[test]
    fn known_answer() {
        let req = kat_request();
        let signed = req.to_signed_string();
        assert_eq!(
            signed,
            "v1\nPOST\n/coordinator/jobs?b=2&a=1\nsvc\n1700000000\nn-1_abc\n\
             f0c87716b00b62de428dbfa3bf23f80bcb7b7a5673d2a79e4aa5e496de7a80f0"
        );
        assert_eq!(sign(SECRET, &signed), SIG);
        assert!(verify(SECRET, &signed, SIG));
        assert!(verify(SECRET, &signed, &SIG.to_ascii_uppercase()));
        assert_eq!(
            canonical(
                "post",
                "/coordinator/jobs?b=2&a=1",
                "svc",
                "1700000000",
                "n-1_abc",
                BODY
            ),
            signed
        );
    }

    #[test]
    fn known_answer_without_nonce_or_body() {
        let signed = canonical("GET", "/coordinator/health", "svc", "1700000000", "", b"");
        assert_eq!(
            signed,
            "v1\nGET\n/coordinator/health\nsvc\n1700000000\n\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sign(SECRET, &signed),
            "923b7e0c14532bd4d209c8849ecb428fa104c1a0a135b130ba998971abdcbbb5"
        );
        assert!(!signed.ends_with('\n'));
    }

    #[test]
    fn empty_body_hash() {
        let req = CanonicalRequest::new("GET", "/", "svc", "1", "", b"");
        assert_eq!(
            req.body_sha256_hex,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn components_match_signed_string() {
        let req = kat_request();
        let comps = req.components();
        let names: Vec<_> = comps.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "version",
                "method",
                "target",
                "caller",
                "timestamp",
                "nonce",
                "body_sha256"
            ]
        );
        let joined: Vec<_> = comps.into_iter().map(|(_, v)| v).collect();
        assert_eq!(joined.join("\n"), req.to_signed_string());
    }

    #[test]
    fn every_component_changes_the_signature() {
        let base = sign(SECRET, &kat_request().to_signed_string());
        let mut body = BODY.to_vec();
        body[3] ^= 0x01;
        let variants = [
            CanonicalRequest::new(
                "PUT",
                "/coordinator/jobs?b=2&a=1",
                "svc",
                "1700000000",
                "n-1_abc",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/job?b=2&a=1",
                "svc",
                "1700000000",
                "n-1_abc",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/jobs?a=1&b=2",
                "svc",
                "1700000000",
                "n-1_abc",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/jobs?b=2&a=1",
                "svd",
                "1700000000",
                "n-1_abc",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/jobs?b=2&a=1",
                "svc",
                "1700000001",
                "n-1_abc",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/jobs?b=2&a=1",
                "svc",
                "1700000000",
                "n-1_abd",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/jobs?b=2&a=1",
                "svc",
                "1700000000",
                "",
                BODY,
            ),
            CanonicalRequest::new(
                "post",
                "/coordinator/jobs?b=2&a=1",
                "svc",
                "1700000000",
                "n-1_abc",
                &body,
            ),
        ];
        for v in variants {
            let signed = v.to_signed_string();
            assert_ne!(sign(SECRET, &signed), base, "{signed}");
            assert!(!verify(SECRET, &signed, &base));
        }
        // A different secret changes it too.
        let other = "coh_0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefh1rvF0S";
        assert!(!verify(other, &kat_request().to_signed_string(), &base));
    }

    #[test]
    fn verify_rejects_malformed_signatures() {
        let signed = kat_request().to_signed_string();
        assert!(!verify(SECRET, &signed, &SIG[..63]));
        assert!(!verify(SECRET, &signed, &format!("{SIG}0")));
        assert!(!verify(SECRET, &signed, &format!("{}g", &SIG[..63])));
        assert!(!verify(SECRET, &signed, ""));
    }

    fn parse(caller: &str, ts: &str, sig: &str) -> Result<SignatureHeaders, SignatureHeaderError> {
        parse_headers(Some(caller), Some(ts), Some(sig), None, None)
    }

    #[test]
    fn parse_headers_accepts_valid() {
        let upper = SIG.to_ascii_uppercase();
        let h = parse_headers(
            Some("svc"),
            Some("1700000000"),
            Some(&upper),
            Some("3"),
            Some("n-1_abc"),
        )
        .unwrap();
        assert_eq!(h.caller, "svc");
        assert_eq!(h.timestamp, 1_700_000_000);
        assert_eq!(h.timestamp_raw, "1700000000");
        assert_eq!(h.signature, SIG);
        assert_eq!(h.key_version, Some(3));
        assert_eq!(h.nonce.as_deref(), Some("n-1_abc"));
        let h = parse("a", "0", SIG).unwrap();
        assert_eq!((h.key_version, h.nonce), (None, None));
        assert!(parse(&format!("a{}", "b".repeat(31)), "1", SIG).is_ok());
        assert!(parse("a", "999999999999", SIG).is_ok());
        let max = i32::MAX.to_string();
        let h = parse_headers(
            Some("a"),
            Some("1"),
            Some(SIG),
            Some(&max),
            Some(&"x".repeat(64)),
        );
        assert_eq!(h.unwrap().key_version, Some(i32::MAX));
    }

    #[test]
    fn parse_headers_missing() {
        use SignatureHeaderError::Missing;
        let e = parse_headers(None, Some("1"), Some(SIG), None, None).unwrap_err();
        assert_eq!(e, Missing(HEADER_CALLER));
        let e = parse_headers(Some("svc"), None, Some(SIG), None, None).unwrap_err();
        assert_eq!(e, Missing(HEADER_TIMESTAMP));
        let e = parse_headers(Some("svc"), Some("1"), None, None, None).unwrap_err();
        assert_eq!(e, Missing(HEADER_SIGNATURE));
        assert_eq!(e.reason(), "missing signature headers");
        // Presence is checked before syntax.
        let e = parse_headers(Some("BAD"), Some("x"), None, None, None).unwrap_err();
        assert_eq!(e, Missing(HEADER_SIGNATURE));
    }

    #[test]
    fn parse_headers_rejects_malformed() {
        use SignatureHeaderError::*;
        for caller in [
            "",
            "Svc",
            "1svc",
            "_svc",
            "svc name",
            "svc.x",
            "sv\u{e9}",
            &format!("a{}", "b".repeat(32)),
        ] {
            assert_eq!(
                parse(caller, "1", SIG).unwrap_err(),
                MalformedCaller,
                "{caller:?}"
            );
        }
        for ts in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "0x10",
            "1234567890123",
            "１",
        ] {
            assert_eq!(
                parse("svc", ts, SIG).unwrap_err(),
                MalformedTimestamp,
                "{ts:?}"
            );
        }
        let non_hex = format!("{}z", &SIG[..63]);
        let spaced = format!(" {}", &SIG[..63]);
        for sig in [&SIG[..63], &format!("{SIG}a"), &non_hex, &spaced, ""] {
            assert_eq!(
                parse("svc", "1", sig).unwrap_err(),
                MalformedSignature,
                "{sig:?}"
            );
        }
        for kv in [
            "",
            "0",
            "-1",
            "+1",
            "1.5",
            "2147483648",
            "99999999999",
            " 1",
            "v1",
        ] {
            let e = parse_headers(Some("svc"), Some("1"), Some(SIG), Some(kv), None);
            assert_eq!(e.unwrap_err(), MalformedKeyVersion, "{kv:?}");
        }
        let long = "n".repeat(65);
        for nonce in ["", "a b", "a.b", "a/b", "a=", long.as_str()] {
            let e = parse_headers(Some("svc"), Some("1"), Some(SIG), None, Some(nonce));
            assert_eq!(e.unwrap_err(), MalformedNonce, "{nonce:?}");
        }
    }

    #[test]
    fn reasons() {
        use SignatureHeaderError::*;
        assert_eq!(MalformedCaller.reason(), "malformed caller");
        assert_eq!(MalformedTimestamp.reason(), "malformed timestamp");
        assert_eq!(MalformedSignature.reason(), "malformed signature");
        assert_eq!(MalformedKeyVersion.reason(), "malformed key version");
        assert_eq!(MalformedNonce.reason(), "malformed nonce");
        assert_eq!(MalformedNonce.to_string(), "malformed nonce");
    }

    #[test]
    fn window_boundaries() {
        let now = 1_700_000_000;
        assert!(timestamp_in_window(now, now, 300));
        assert!(timestamp_in_window(now - 300, now, 300));
        assert!(timestamp_in_window(now + 300, now, 300));
        assert!(!timestamp_in_window(now - 301, now, 300));
        assert!(!timestamp_in_window(now + 301, now, 300));
        assert!(!timestamp_in_window(now, now, -1));
        assert!(timestamp_in_window(now, now, 0));
        assert!(!timestamp_in_window(i64::MIN, i64::MAX, i64::MAX));
        assert!(!timestamp_in_window(0, now, 300));
    }
}
