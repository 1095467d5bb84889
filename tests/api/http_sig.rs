//! RFC 9421 HTTP Message Signatures as an encoding of the HMAC scheme, black-box on both
//! backends. The signature base is written out by hand here (not built with the
//! server's code), so a change in the server's base construction fails these tests.
//! Interop with off-the-shelf libraries: scripts/rfc9421-interop.sh (in .ci/run).

use base64::Engine;
use coordinator::auth::hmac::rfc9421;
use serde_json::Value;
use sha2::Digest;

use crate::backend_tests;
use crate::helpers::{now_secs, send, Backend, Resp, TestApp};

backend_tests!(
    signed_requests_pass_and_tampered_ones_fail,
    refusals_name_the_rule_and_show_the_base,
    expires_and_replay_are_honoured,
    no_fallback_to_another_scheme,
    a_host_that_is_no_authority_is_refused,
    every_signature_of_a_request_is_used_once,
);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

struct Sig {
    components: Vec<&'static str>,
    created: i64,
    expires: Option<i64>,
    keyid: String,
    nonce: String,
}

impl Sig {
    fn new(app: &TestApp, components: &[&'static str]) -> Sig {
        Sig {
            components: components.to_vec(),
            created: now_secs(),
            expires: None,
            keyid: app.signer.caller.clone(),
            nonce: uuid::Uuid::now_v7().simple().to_string(),
        }
    }

    fn params(&self) -> String {
        let list: Vec<String> = self.components.iter().map(|c| format!("\"{c}\"")).collect();
        let mut p = format!("({});created={}", list.join(" "), self.created);
        if let Some(e) = self.expires {
            p.push_str(&format!(";expires={e}"));
        }
        p.push_str(&format!(
            ";keyid=\"{}\";alg=\"hmac-sha256\";nonce=\"{}\"",
            self.keyid, self.nonce
        ));
        p
    }
}

fn digest_of(body: &[u8]) -> String {
    format!("sha-256=:{}:", b64(&sha2::Sha256::digest(body)))
}

/// `sig`'s MAC under `secret` over `method target` with `body`, in base64.
fn mac_of(
    app: &TestApp,
    secret: &str,
    sig: &Sig,
    method: &str,
    target: &str,
    body: &[u8],
) -> String {
    let authority = app.address.trim_start_matches("http://").to_owned();
    let digest_value = digest_of(body);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), format!("?{q}")),
        None => (target.to_owned(), "?".to_owned()),
    };
    let mut base = String::new();
    for c in &sig.components {
        let v = match *c {
            "@method" => method.to_owned(),
            "@target-uri" => format!("http://{authority}{target}"),
            "@authority" => authority.clone(),
            "@path" => path.clone(),
            "@query" => query.clone(),
            "content-digest" => digest_value.clone(),
            "content-type" => "application/json".to_owned(),
            other => panic!("no value for {other}"),
        };
        base.push_str(&format!("\"{c}\": {v}\n"));
    }
    base.push_str(&format!("\"@signature-params\": {}", sig.params()));
    b64(&rfc9421::sign(secret, &base))
}

/// Send `method target` signed with `sig`; `digest` adds a Content-Digest of `body`.
fn signed(app: &TestApp, sig: &Sig, method: &str, target: &str, body: &[u8], digest: bool) -> Resp {
    let digest_value = digest_of(body);
    let mac = mac_of(app, &app.signer.secret, sig, method, target, body);
    let input = format!("sig1={}", sig.params());
    let signature = format!("sig1=:{mac}:");
    let mut headers = vec![
        ("signature-input", input.as_str()),
        ("signature", signature.as_str()),
        ("content-type", "application/json"),
    ];
    if digest {
        headers.push(("content-digest", digest_value.as_str()));
    }
    send(&app.url(target), method, &headers, body)
}

const JOB: &[u8] = br#"{"kind":"rfc9421"}"#;
const FULL: [&str; 3] = ["@method", "@target-uri", "content-digest"];

fn signed_requests_pass_and_tampered_ones_fail(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let r = signed(
        &app,
        &Sig::new(&app, &FULL),
        "POST",
        "/coordinator/jobs",
        JOB,
        true,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = signed(
        &app,
        &Sig::new(&app, &["@method", "@path", "@query"]),
        "GET",
        "/coordinator/jobs?limit=1",
        b"",
        false,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = signed(
        &app,
        &Sig::new(&app, &["@authority", "@method", "@path"]),
        "GET",
        "/coordinator/health",
        b"",
        false,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // With a key version in keyid.
    let mut s = Sig::new(&app, &["@method", "@target-uri"]);
    s.keyid = format!("{}:1", app.signer.caller);
    assert_eq!(
        signed(&app, &s, "GET", "/coordinator/health", b"", false).status,
        200
    );
    s.keyid = format!("{}:9", app.signer.caller);
    s.nonce.push('x');
    assert_eq!(
        signed(&app, &s, "GET", "/coordinator/health", b"", false).problem(401)["reason"],
        "unknown key version"
    );
    // A digest that does not match the body.
    let sig = Sig::new(&app, &FULL);
    let mut tampered = JOB.to_vec();
    tampered[2] = b'K';
    let good_digest = format!("sha-256=:{}:", b64(&sha2::Sha256::digest(JOB)));
    let r = send(
        &app.url("/coordinator/jobs"),
        "POST",
        &[
            ("signature-input", &format!("sig1={}", sig.params())),
            (
                "signature",
                "sig1=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:",
            ),
            ("content-digest", &good_digest),
        ],
        &tampered,
    );
    assert_eq!(
        r.problem(401)["reason"],
        "content-digest does not match the body"
    );
}

fn refusals_name_the_rule_and_show_the_base(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let reason = |r: Resp| -> Value { r.problem(401) };
    // A body without content-digest covered.
    let p = reason(signed(
        &app,
        &Sig::new(&app, &["@method", "@target-uri"]),
        "POST",
        "/coordinator/jobs",
        JOB,
        true,
    ));
    assert_eq!(
        p["reason"],
        "content-digest must be covered when there is a body"
    );
    // A query not covered by @path alone.
    let p = reason(signed(
        &app,
        &Sig::new(&app, &["@method", "@path"]),
        "GET",
        "/coordinator/health?x=1",
        b"",
        false,
    ));
    assert_eq!(
        p["reason"],
        "@target-uri, or @path with @query, must be covered"
    );
    // @method missing.
    let p = reason(signed(
        &app,
        &Sig::new(&app, &["@target-uri"]),
        "GET",
        "/coordinator/health",
        b"",
        false,
    ));
    assert_eq!(p["reason"], "@method must be covered");
    // A mismatch shows the base the server built, which names no secret.
    let mut s = Sig::new(&app, &["@method", "@target-uri"]);
    s.created -= 1; // signed with one created, sent with another
    let params = s.params();
    s.created += 1;
    let r = send(
        &app.url("/coordinator/health"),
        "GET",
        &[
            ("signature-input", &format!("sig1={params}")),
            (
                "signature",
                "sig1=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:",
            ),
        ],
        b"",
    );
    let p = reason(r);
    assert_eq!(p["reason"], "signature mismatch");
    let base = p["signature_base"].as_str().expect("signature_base");
    assert!(
        base.starts_with("\"@method\": GET\n\"@target-uri\": http://"),
        "{base}"
    );
    assert!(base.contains("\"@signature-params\": (\"@method\" \"@target-uri\");created="));
    assert!(!base.contains(&app.signer.secret));
}

fn expires_and_replay_are_honoured(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let mut s = Sig::new(&app, &["@method", "@target-uri"]);
    s.expires = Some(now_secs() - 1);
    assert_eq!(
        signed(&app, &s, "GET", "/coordinator/health", b"", false).problem(401)["reason"],
        "signature expired"
    );
    let mut s = Sig::new(&app, &["@method", "@target-uri"]);
    s.created = now_secs() - 400;
    assert_eq!(
        signed(&app, &s, "GET", "/coordinator/health", b"", false).problem(401)["reason"],
        "timestamp out of range"
    );
    // The same signature twice: the second is a replay (on a sibling instance too).
    let s = Sig::new(&app, &["@method", "@target-uri"]);
    assert_eq!(
        signed(&app, &s, "GET", "/coordinator/health", b"", false).status,
        200
    );
    let sibling = app.sibling();
    let authority = app.address.trim_start_matches("http://").to_owned();
    let base = format!(
        "\"@method\": GET\n\"@target-uri\": http://{authority}/coordinator/health\n\"@signature-params\": {}",
        s.params()
    );
    let mac = rfc9421::sign(&app.signer.secret, &base);
    // Sent to the sibling with the Host of the first instance, so the base is the same.
    let r = send(
        &sibling.url("/coordinator/health"),
        "GET",
        &[
            ("host", &authority),
            ("signature-input", &format!("sig1={}", s.params())),
            ("signature", &format!("sig1=:{}:", b64(&mac))),
        ],
        b"",
    );
    assert_eq!(r.problem(401)["reason"], "replayed request");
}

fn no_fallback_to_another_scheme(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let key = app.api_key("both", &coordinator::auth::Scope::ALL);
    let r = send(
        &app.url("/coordinator/health"),
        "GET",
        &[("signature-input", "sig1=()"), ("x-api-key", &key)],
        b"",
    );
    assert_eq!(r.problem(401)["reason"], "more than one credential scheme");
    // A broken RFC 9421 header never falls back to nothing: it is refused.
    let r = send(
        &app.url("/coordinator/health"),
        "GET",
        &[("signature", "garbage")],
        b"",
    );
    assert_eq!(r.status, 401);
}

/// `@target-uri` is the scheme, the `Host` and the target run together, so a `Host`
/// holding a path moved the split between them: a signature over
/// `http://HOST/coordinator/health` verified for `GET /health` sent with
/// `Host: HOST/coordinator`, a request to another path than the one signed (review,
/// 2026-12-06). A `Host` (or `@authority`) that is no `host[:port]` is refused.
fn a_host_that_is_no_authority_is_refused(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let authority = app.address.trim_start_matches("http://").to_owned();
    for (components, header) in [
        (&["@method", "@target-uri"][..], "@target-uri"),
        (&["@method", "@authority", "@path"][..], "@authority"),
    ] {
        let sig = Sig::new(&app, components);
        let base = if header == "@target-uri" {
            format!(
                "\"@method\": GET\n\"@target-uri\": http://{authority}/coordinator/health\n\"@signature-params\": {}",
                sig.params()
            )
        } else {
            format!(
                "\"@method\": GET\n\"@authority\": {authority}/coordinator\n\"@path\": /health\n\"@signature-params\": {}",
                sig.params()
            )
        };
        let mac = rfc9421::sign(&app.signer.secret, &base);
        let r = send(
            &app.url("/health"),
            "GET",
            &[
                ("host", &format!("{authority}/coordinator")),
                ("signature-input", &format!("sig1={}", sig.params())),
                ("signature", &format!("sig1=:{}:", b64(&mac))),
            ],
            b"",
        );
        assert_eq!(r.problem(401)["reason"], "malformed host", "{header}");
    }
    // Other spellings that are no authority either.
    let user = format!("user@{authority}");
    for host in [user.as_str(), "a b", "h?x", "h#x", ""] {
        let sig = Sig::new(&app, &["@method", "@target-uri"]);
        let r = send(
            &app.url("/coordinator/health"),
            "GET",
            &[
                ("host", host),
                ("signature-input", &format!("sig1={}", sig.params())),
                (
                    "signature",
                    "sig1=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:",
                ),
            ],
            b"",
        );
        assert_eq!(r.problem(401)["reason"], "malformed host", "{host:?}");
    }
    // A real authority (any case, an IP literal, a port) still verifies.
    let r = signed(
        &app,
        &Sig::new(&app, &["@method", "@target-uri"]),
        "GET",
        "/coordinator/health",
        b"",
        false,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A request carrying two valid signatures (two callers here; two secret versions of one
/// caller are the same case) runs once: sent again with the labels swapped, or with
/// either signature alone, it is a replay. Before, the replay record held only the
/// chosen signature, so each of these ran the create again.
fn every_signature_of_a_request_is_used_once(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let second = app.caller("second", &[coordinator::auth::Scope::JobsCreate]);
    let body = br#"{"kind":"two-signatures"}"#;
    let target = "/coordinator/jobs";
    let mine = Sig::new(&app, &FULL);
    let mut theirs = Sig::new(&app, &FULL);
    theirs.keyid = second.caller.clone();
    let mac_mine = mac_of(&app, &app.signer.secret, &mine, "POST", target, body);
    let mac_theirs = mac_of(&app, &second.secret, &theirs, "POST", target, body);
    let digest = digest_of(body);
    let send_with = |labels: &[(&str, &Sig, &str)]| {
        let input: Vec<String> = labels
            .iter()
            .map(|(l, sig, _)| format!("{l}={}", sig.params()))
            .collect();
        let signature: Vec<String> = labels
            .iter()
            .map(|(l, _, m)| format!("{l}=:{m}:"))
            .collect();
        send(
            &app.url(target),
            "POST",
            &[
                ("signature-input", &input.join(", ")),
                ("signature", &signature.join(", ")),
                ("content-type", "application/json"),
                ("content-digest", &digest),
            ],
            body,
        )
    };
    let r = send_with(&[
        ("coordinator", &mine, &mac_mine),
        ("other", &theirs, &mac_theirs),
    ]);
    assert_eq!(r.status, 201, "{}", r.body);
    let attempts: [&[(&str, &Sig, &str)]; 3] = [
        &[
            ("other", &mine, &mac_mine),
            ("coordinator", &theirs, &mac_theirs),
        ],
        &[("coordinator", &theirs, &mac_theirs)],
        &[("sig1", &mine, &mac_mine)],
    ];
    for (i, labels) in attempts.into_iter().enumerate() {
        let r = send_with(labels);
        assert_eq!(r.problem(401)["reason"], "replayed request", "attempt {i}");
    }
    let jobs = app.get("/coordinator/jobs?limit=100");
    let made = jobs.json()["items"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["kind"] == "two-signatures")
        .count();
    assert_eq!(made, 1, "{}", jobs.body);
    // A fresh pair of signatures runs (the first one's records do not spill over).
    let mine = Sig::new(&app, &FULL);
    let mut theirs = Sig::new(&app, &FULL);
    theirs.keyid = second.caller.clone();
    let mac_mine = mac_of(&app, &app.signer.secret, &mine, "POST", target, body);
    let mac_theirs = mac_of(&app, &second.secret, &theirs, "POST", target, body);
    let r = send_with(&[
        ("other", &theirs, &mac_theirs),
        ("coordinator", &mine, &mac_mine),
    ]);
    assert_eq!(r.status, 201, "{}", r.body);
}
