//! Logs never carry a secret: a run through every scheme, success and failure, then a
//! scan of everything the app logged (access + audit lines, warnings) and every
//! response for each secret, key, token and signature that was used. Also: one line per
//! request (the audit line, or the access line where no audit line was written).

use std::time::Duration;

use coordinator::auth::credentials::{self, SecretKind};
use coordinator::auth::{webhook, Scope};
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{captured_logs, now_secs, Backend};

backend_tests!(logs_and_responses_never_carry_credentials);

fn logs_and_responses_never_carry_credentials(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let mut secrets: Vec<String> = vec![app.signer.secret.clone()];
    let mut responses = Vec::new();
    let mut sent_signatures = Vec::new();

    // HMAC: valid, tampered, replayed, wrong caller.
    let body = br#"{"kind":"leak-test"}"#;
    let h = app
        .signer
        .headers("POST", "/coordinator/jobs", body, now_secs());
    let sig = h
        .iter()
        .find(|(k, _)| k.ends_with("Signature"))
        .unwrap()
        .1
        .clone();
    sent_signatures.push(sig.clone());
    let hh: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let created = app.raw("POST", "/coordinator/jobs", &hh, body);
    assert_eq!(created.status, 201);
    let job = created.json()["id"].as_str().unwrap().to_owned();
    responses.push(created);
    responses.push(app.raw("POST", "/coordinator/jobs", &hh, body)); // replay
    responses.push(app.raw("POST", "/coordinator/jobs", &hh, b"{}")); // tampered body
    let mut bad = hh.clone();
    let forged = "f".repeat(64);
    sent_signatures.push(forged.clone());
    bad.retain(|(k, _)| !k.ends_with("Signature"));
    bad.push(("X-Coordinator-Signature", &forged));
    responses.push(app.raw("POST", "/coordinator/jobs", &bad, body));

    // API keys: valid, revoked, malformed.
    let key = app.api_key("keyholder", &Scope::ALL);
    secrets.push(key.clone());
    responses.push(app.raw("GET", "/coordinator/health", &[("X-API-Key", &key)], b""));
    let wrong = format!("{}x", &key[..key.len() - 1]);
    secrets.push(wrong.clone());
    responses.push(app.raw("GET", "/coordinator/health", &[("X-API-Key", &wrong)], b""));

    // Job tokens: valid, tampered, revoked.
    app.request(
        "PATCH",
        &format!("/coordinator/jobs/{job}/status"),
        &[],
        br#"{"status":"QUEUED"}"#,
    );
    app.request(
        "PATCH",
        &format!("/coordinator/jobs/{job}/status"),
        &[],
        br#"{"status":"RUNNING"}"#,
    );
    let token = app.job_token(&job, "w", Duration::from_secs(600));
    secrets.push(token.clone());
    responses.push(app.with_token(&token, "GET", &format!("/coordinator/jobs/{job}"), b""));
    let tampered = format!("{token}x");
    responses.push(app.with_token(&tampered, "GET", &format!("/coordinator/jobs/{job}"), b""));

    // Standard Webhooks: valid and forged.
    let _ = credentials::add_caller(&app.state.db, "hook", &[Scope::StitcherWebhook]);
    let ws = credentials::add_secret(
        &app.state.db,
        app.state.auth.store.sealer(),
        "hook",
        SecretKind::Webhook,
        None,
        None,
    )
    .unwrap();
    secrets.push(ws.plaintext.to_string());
    let k = coordinator::crypto::credential::WebhookSecret::parse(&ws.plaintext)
        .unwrap()
        .key_bytes();
    let payload = br#"{"issueNumber":1,"repository":"o/r","action":"mentioned"}"#;
    let ts = now_secs().to_string();
    let wsig = webhook::wire::sign(&k, "msg-leak", &ts, payload);
    sent_signatures.push(wsig.trim_start_matches("v1,").to_owned());
    for sig in [
        wsig.as_str(),
        "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        responses.push(app.raw(
            "POST",
            "/stitcher/webhook",
            &[
                ("webhook-id", "msg-leak"),
                ("webhook-timestamp", &ts),
                ("webhook-signature", sig),
            ],
            payload,
        ));
    }
    let revoke = app.post_json("/admin/tokens/revoke", &json!({"jti": "leak-jti"}));
    assert_eq!(revoke.status, 200);

    // One line per request: an authenticated request's audit line is its only line, an
    // open route's request gets the access line.
    let rid = |what: &str| format!("log-{what}-{}", uuid::Uuid::now_v7().simple());
    let (guarded, open) = (rid("guarded"), rid("open"));
    let keyed = app.raw(
        "GET",
        "/coordinator/health",
        &[("X-API-Key", &key), ("X-Request-Id", &guarded)],
        b"",
    );
    assert_eq!(keyed.status, 200);
    let live = app.raw("GET", "/livez", &[("X-Request-Id", &open)], b"");
    assert_eq!(live.status, 200);

    std::thread::sleep(Duration::from_millis(200));
    let logs = captured_logs();
    // The capture works: audit lines for this run are there.
    assert!(
        logs.contains(r#""event":"auth""#),
        "no audit lines captured"
    );
    assert!(logs.contains(r#""caller":"keyholder""#));
    assert!(logs.contains(r#""reason":"replayed request""#));
    let lines_of = |id: &str| -> Vec<&str> {
        logs.lines()
            .filter(|l| l.contains(&format!(r#""request_id":"{id}""#)))
            .collect()
    };
    let lines = lines_of(&guarded);
    assert_eq!(
        lines.len(),
        1,
        "one line per authenticated request: {lines:?}"
    );
    assert!(lines[0].contains(r#""event":"auth""#) && lines[0].contains(r#""status":200"#));
    let lines = lines_of(&open);
    assert_eq!(lines.len(), 1, "one line per open request: {lines:?}");
    assert!(lines[0].contains(r#""event":"access""#) && lines[0].contains(r#""route":"/livez""#));
    let mut haystacks: Vec<String> = responses
        .iter()
        .map(|r| format!("{:?}\n{}", r.headers, r.body))
        .collect();
    haystacks.push(logs);
    for needle in secrets.iter().chain(&sent_signatures) {
        for hay in &haystacks {
            assert!(
                !hay.contains(needle.as_str()),
                "a credential or signature leaked"
            );
            // Also the secret's body without its prefix, in case something strips it.
            if let Some((_, tail)) = needle.split_once('_') {
                assert!(
                    tail.len() < 16 || !hay.contains(tail),
                    "a credential body leaked"
                );
            }
        }
    }
}
