//! The server's own `v1` signer and the client crate's (the one Rust signer, which
//! `sign` and `call` use) against the known answers in docs/signing-vectors.json, which
//! the Python and Rust clients are checked against too: one set of answers for
//! every signer, computed by an implementation none of them shares
//! (scripts/signing_vectors.py).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic on a missing value or an out-of-range index is the failed assertion"
)]

use coordinator::auth::hmac::{self, wire::CanonicalRequest};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/signing-vectors.json");
    let text = std::fs::read_to_string(path).expect("docs/signing-vectors.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn v1_vectors_match_the_server_signer() {
    let all = vectors();
    let list = all["v1"].as_array().expect("a v1 list");
    assert!(list.len() >= 5, "too few v1 vectors: {}", list.len());
    for v in list {
        let name = s(v, "name");
        let req = CanonicalRequest::new(
            s(v, "method"),
            s(v, "target"),
            s(v, "caller"),
            s(v, "timestamp"),
            s(v, "nonce"),
            s(v, "body").as_bytes(),
        );
        assert_eq!(req.body_sha256_hex, s(v, "body_sha256"), "{name}");
        let canonical = req.to_signed_string();
        assert_eq!(canonical, s(v, "canonical"), "{name}");
        let signature = hmac::wire::sign(s(v, "secret"), &canonical);
        assert_eq!(signature, s(v, "signature"), "{name}");
        assert!(
            hmac::wire::verify(s(v, "secret"), &canonical, s(v, "signature")),
            "{name}"
        );

        // The headers a client sends parse back to the signed values.
        let h = &v["headers"];
        let header = |n: &str| h.get(n).and_then(Value::as_str);
        let parsed = hmac::wire::parse_headers(
            header("X-Coordinator-Caller"),
            header("X-Coordinator-Timestamp"),
            header("X-Coordinator-Signature"),
            header("X-Coordinator-Key-Version"),
            header("X-Coordinator-Nonce"),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.caller, s(v, "caller"), "{name}");
        assert_eq!(parsed.timestamp_raw, s(v, "timestamp"), "{name}");
        assert_eq!(
            parsed.nonce.as_deref().unwrap_or(""),
            s(v, "nonce"),
            "{name}"
        );
        assert_eq!(parsed.signature, signature, "{name}");
        assert_eq!(
            parsed.key_version.map(i64::from),
            v["key_version"].as_i64(),
            "{name}"
        );

        // One flipped bit of the body no longer verifies.
        let mut body = s(v, "body").as_bytes().to_vec();
        body.push(b' ');
        let changed = hmac::wire::canonical(
            s(v, "method"),
            s(v, "target"),
            s(v, "caller"),
            s(v, "timestamp"),
            s(v, "nonce"),
            &body,
        );
        assert!(
            !hmac::wire::verify(s(v, "secret"), &changed, &signature),
            "{name}"
        );
    }
}

/// The signer `coordinator sign` and `call` use (the coordinator-client crate, the one
/// Rust signer) gives the known answers, header for header, and the server verifies them.
fn v1_vectors_match_the_client_signer_the_cli_uses() {
    use coordinator_client::signing::{v1_sign, V1Params};
    let all = vectors();
    for v in all["v1"].as_array().expect("a v1 list") {
        let name = s(v, "name");
        let key_version = v["key_version"]
            .as_u64()
            .map(|n| u32::try_from(n).expect("a small version"));
        let p = V1Params {
            caller: s(v, "caller"),
            secret: s(v, "secret"),
            key_version,
            timestamp: s(v, "timestamp"),
            nonce: s(v, "nonce"),
        };
        let signed = v1_sign(s(v, "method"), s(v, "target"), s(v, "body").as_bytes(), &p);
        assert_eq!(signed.canonical, s(v, "canonical"), "{name}");
        let expected: Vec<(String, String)> = v["headers"]
            .as_object()
            .expect("headers")
            .iter()
            .map(|(k, x)| {
                (
                    k.to_ascii_lowercase(),
                    x.as_str().expect("a string").to_owned(),
                )
            })
            .collect();
        let mut got: Vec<(String, String)> = signed
            .headers
            .iter()
            .map(|(k, x)| (k.to_ascii_lowercase(), x.clone()))
            .collect();
        let mut want = expected.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{name}");
        let sig = &signed.headers.last().expect("a signature").1;
        assert_eq!(sig, s(v, "signature"), "{name}");
        assert!(
            hmac::wire::verify(s(v, "secret"), &signed.canonical, sig),
            "{name}"
        );
    }
}

fn vectors_cover_bodies_queries_and_non_ascii_paths() {
    let all = vectors();
    for scheme in ["v1", "rfc9421"] {
        let list = all[scheme].as_array().expect("a list");
        let target = |v: &Value| {
            v.get("target")
                .or_else(|| v.get("url"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            list.iter().any(|v| !s(v, "body").is_empty()),
            "{scheme}: body"
        );
        assert!(
            list.iter().any(|v| !s(v, "body").is_ascii()),
            "{scheme}: UTF-8 body"
        );
        assert!(
            list.iter().any(|v| target(v).contains('?')),
            "{scheme}: query"
        );
        assert!(
            list.iter().any(|v| target(v).contains("%C3%A9")),
            "{scheme}: path"
        );
    }
}

crate::plain_tests!(
    v1_vectors_match_the_server_signer,
    v1_vectors_match_the_client_signer_the_cli_uses,
    vectors_cover_bodies_queries_and_non_ascii_paths,
);
