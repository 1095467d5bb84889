//! The signers against docs/signing-vectors.json, and the Standard Webhooks vector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use coordinator_client::signing::{
    self, canonical_v1, rfc9421_headers, sign_rfc9421, sign_v1, signature_base, v1_headers,
    DigestAlg, Rfc9421Options, SignatureParams, V1Params,
};
use coordinator_client::webhooks::{sign_webhook, verify_webhook, WebhookError};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/signing-vectors.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn v1_vectors() {
    let all = vectors();
    let list = all["v1"].as_array().unwrap();
    assert!(list.len() >= 5);
    for v in list {
        let name = s(v, "name");
        let body = s(v, "body").as_bytes();
        let canonical = canonical_v1(
            s(v, "method"),
            s(v, "target"),
            s(v, "caller"),
            s(v, "timestamp"),
            s(v, "nonce"),
            body,
        );
        assert_eq!(canonical, s(v, "canonical"), "{name}");
        assert_eq!(
            sign_v1(s(v, "secret"), &canonical),
            s(v, "signature"),
            "{name}"
        );
        let p = V1Params {
            caller: s(v, "caller"),
            secret: s(v, "secret"),
            key_version: v["key_version"].as_u64().map(|k| k as u32),
            timestamp: s(v, "timestamp"),
            nonce: s(v, "nonce"),
        };
        let mut got = v1_headers(s(v, "method"), s(v, "target"), body, &p);
        let mut want = pairs(&v["headers"]);
        got.sort();
        want.sort();
        assert_eq!(got, want, "{name}");
        let mut changed = body.to_vec();
        changed.push(b' ');
        let other = canonical_v1(
            s(v, "method"),
            s(v, "target"),
            s(v, "caller"),
            s(v, "timestamp"),
            s(v, "nonce"),
            &changed,
        );
        assert_ne!(sign_v1(s(v, "secret"), &other), s(v, "signature"));
    }
}

#[test]
fn rfc9421_vectors() {
    let all = vectors();
    let list = all["rfc9421"].as_array().unwrap();
    assert!(list.len() >= 5);
    for v in list {
        let name = s(v, "name");
        let components: Vec<&str> = v["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let opts = Rfc9421Options {
            label: s(v, "label").to_owned(),
            use_path: components.contains(&"@path"),
            authority: components.contains(&"@authority"),
            digest: v["digest"]
                .as_str()
                .and_then(DigestAlg::parse)
                .unwrap_or_default(),
        };
        let params = SignatureParams {
            created: v["created"].as_i64().unwrap(),
            keyid: s(v, "keyid"),
            alg: Some("hmac-sha256"),
            expires: v["expires"].as_i64(),
            nonce: v["nonce"].as_str(),
        };
        let body = s(v, "body").as_bytes();
        let got = rfc9421_headers(
            s(v, "method"),
            s(v, "url"),
            body,
            s(v, "secret").as_bytes(),
            &params,
            &opts,
        )
        .unwrap();
        let (mut sorted, mut want) = (got.clone(), pairs(&v["headers"]));
        sorted.sort();
        want.sort();
        assert_eq!(sorted, want, "{name}");
        let fields: Vec<(&str, &str)> = got
            .iter()
            .filter(|(k, _)| k == "Content-Digest")
            .map(|(_, v)| ("content-digest", v.as_str()))
            .collect();
        let base = signature_base(
            s(v, "method"),
            s(v, "url"),
            &fields,
            &components,
            s(v, "signature_params"),
        )
        .unwrap();
        assert_eq!(base, s(v, "signature_base"), "{name}");
        assert_eq!(
            sign_rfc9421(s(v, "secret").as_bytes(), &base),
            s(v, "signature"),
            "{name}"
        );
    }
}

#[test]
fn rfc9421_appendix_b25() {
    let all = vectors();
    let r = &all["rfc9421_reference"][0];
    let comps: Vec<(&str, &str)> = r["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_str().unwrap(), c[1].as_str().unwrap()))
        .collect();
    let names: Vec<&str> = comps.iter().map(|(n, _)| *n).collect();
    let base = signature_base(
        "POST",
        "http://example.com/foo?param=Value&Pet=dog",
        &comps,
        &names,
        s(r, "signature_params"),
    )
    .unwrap();
    assert_eq!(base, s(r, "signature_base"));
    let key = base64::engine::general_purpose::STANDARD
        .decode(s(r, "key_base64"))
        .unwrap();
    assert_eq!(sign_rfc9421(&key, &base), s(r, "signature"));
}

#[test]
fn credentials_sign_afresh_each_time() {
    let c = signing::Credentials::V1 {
        caller: "svc".into(),
        secret: "coh_x".into(),
        key_version: Some(2),
    };
    let a = c.headers("GET", "http://h/p", "/p", b"").unwrap();
    let b = c.headers("GET", "http://h/p", "/p", b"").unwrap();
    assert_ne!(a, b, "a fresh nonce each time");
    assert!(a
        .iter()
        .any(|(k, v)| k == "X-Coordinator-Key-Version" && v == "2"));
    assert!(!format!("{c:?}").contains("coh_x"));
}

const WH_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WH_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const WH_TS: &str = "1614265330";
const WH_BODY: &[u8] = br#"{"test": 2432232314}"#;
const WH_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

#[test]
fn standard_webhooks_vector() {
    let h = sign_webhook(WH_SECRET, WH_ID, WH_TS, WH_BODY).unwrap();
    assert_eq!(h[2].1, WH_SIG);
    let now = 1_614_265_330;
    let hdrs = |sig: &'static str| {
        vec![
            ("Webhook-Id", WH_ID),
            ("webhook-timestamp", WH_TS),
            ("webhook-signature", sig),
        ]
    };
    assert_eq!(
        verify_webhook(&hdrs(WH_SIG), WH_BODY, WH_SECRET, 300, now),
        Ok(())
    );
    let several = "v2,abc v1,AAAA v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    assert_eq!(
        verify_webhook(&hdrs(several), WH_BODY, WH_SECRET, 300, now),
        Ok(())
    );
    assert_eq!(
        verify_webhook(&hdrs(WH_SIG), b"{}", WH_SECRET, 300, now),
        Err(WebhookError::NoMatch)
    );
    assert_eq!(
        verify_webhook(&hdrs(WH_SIG), WH_BODY, WH_SECRET, 300, now + 301),
        Err(WebhookError::OutOfRange)
    );
    assert_eq!(
        verify_webhook(&hdrs(WH_SIG)[..2], WH_BODY, WH_SECRET, 300, now),
        Err(WebhookError::Missing)
    );
}
