//! No credential in an error: a request that got no answer (refused, reset, closed)
//! is an `Error::Transport` whose `Display` and `Debug` hold neither the API key, the
//! job token, the HMAC secret nor the signature sent; a credential that cannot be
//! sent as a header is refused without being shown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator_client::{Client, ClientOptions, Credentials, Error};
use serde_json::json;

const CANARY: &str = "LEAKCANARY7";

/// Accepts connections and ends each one: `reset` after reading the request's first
/// bytes only (closing with unread data sends an RST), else after reading (and
/// recording) the request, with a plain close.
fn dead_server(reset: bool) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = vec![0; if reset { 8 } else { 65536 }];
            let n = stream.read(&mut buf).unwrap_or(0);
            if !reset {
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            drop(stream);
        }
    });
    (url, seen)
}

fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l); // nothing listens there now
    url
}

/// The signature header values of the requests the server saw.
fn signatures(seen: &Mutex<Vec<String>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|req| req.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let (k, v) = line.split_once(": ")?;
            let k = k.to_ascii_lowercase();
            (k == "x-coordinator-signature" || k == "signature").then(|| v.to_owned())
        })
        .collect()
}

fn check(e: &Error, secrets: &[&str]) {
    let shown = format!("{e} {e:?} {e:#?}");
    for s in secrets {
        assert!(!shown.contains(s), "{s:?} in {shown}");
    }
}

fn client(url: &str, credentials: Credentials) -> Client {
    let options = ClientOptions {
        timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let mut c = Client::with_options(url, credentials, &options).unwrap();
    c.retries = 0;
    c
}

fn calls(c: &Client) -> Vec<Error> {
    vec![
        c.health().unwrap_err(),
        c.create_job(&json!({"kind": "build", "payload": {"x": 1}}), None)
            .unwrap_err(),
        c.claim_wait("ci", "w1", Duration::from_secs(1))
            .unwrap_err(),
    ]
}

#[test]
fn a_transport_failure_never_shows_a_credential() {
    let (reset, _) = dead_server(true);
    let (closed, closed_seen) = dead_server(false);
    let mut errors = Vec::new();
    for url in [refused_url(), reset, closed] {
        let key = format!("cok_{CANARY}");
        let token = format!("tok_{CANARY}");
        let secret = format!("coh_{CANARY}");
        for (credentials, shown) in [
            (Credentials::ApiKey(key.clone()), key.as_str()),
            (Credentials::Bearer(token.clone()), token.as_str()),
            (
                Credentials::V1 {
                    caller: "svc".into(),
                    secret: secret.clone(),
                    key_version: None,
                },
                secret.as_str(),
            ),
        ] {
            for e in calls(&client(&url, credentials)) {
                assert!(matches!(e, Error::Transport(_)), "{e:?}");
                check(&e, &[shown, CANARY]);
                errors.push(e);
            }
        }
    }
    // Nor did any show a signature (each unused: the server never answered).
    let sigs = signatures(&closed_seen);
    assert!(sigs.len() >= 3, "{sigs:?}");
    assert!(closed_seen
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.contains(CANARY)));
    for e in errors {
        for sig in &sigs {
            check(&e, &[sig]);
        }
    }
}

#[test]
fn a_credential_that_is_no_header_value_is_refused_unshown() {
    let (url, seen) = dead_server(false);
    for credentials in [
        Credentials::ApiKey(format!("cok_{CANARY}\n")),
        Credentials::Bearer(format!("tok_{CANARY}\r\nX: y")),
        Credentials::ApiKey(format!("cok_{CANARY}\u{e9}")),
        Credentials::ApiKey(format!(" cok_{CANARY}")),
    ] {
        for e in calls(&client(&url, credentials)) {
            check(&e, &[CANARY]);
            assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        }
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing is sent");
}

/// The signer's own types hold the secret too: their `Debug` (a `{:?}` in a caller's
/// log line, a `dbg!`) shows the caller and the rest, never the secret.
#[test]
fn the_signing_parameters_debug_never_shows_the_secret() {
    use coordinator_client::signing::V1Params;
    let secret = format!("coh_{CANARY}");
    let p = V1Params {
        caller: "svc",
        secret: &secret,
        key_version: Some(2),
        timestamp: "1700000000",
        nonce: "n1",
    };
    for shown in [
        format!("{p:?}"),
        format!("{p:#?}"),
        format!("{:?}", Some(&p)),
    ] {
        assert!(!shown.contains(CANARY), "{shown}");
        assert!(
            shown.contains("\"svc\"") && shown.contains("1700000000"),
            "{shown}"
        );
    }
}

/// Answers every request with 200 and `body` (JSON), closing after each.
fn answering_server(body: &'static str) -> String {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = stream.read(&mut [0; 65536]);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// A heartbeat that renewed the job token hands the successor over as a field of its
/// own; neither the answer's `Debug` nor the rest of the answer shows it.
#[test]
fn a_renewed_token_never_shows_in_a_heartbeats_debug() {
    let url = answering_server(
        r#"{"leaseExpiresAt":"2026-12-06T16:00:00.000Z","cancelRequested":false,"token":"coj_LEAKCANARY7","tokenExpiresAt":"2026-12-06T17:00:00.000Z"}"#,
    );
    let c = client(&url, Credentials::Bearer("coj_old".into()));
    let beat = c.heartbeat("0190a6e2-0000-7000-8000-000000000000").unwrap();
    assert_eq!(beat.token.as_deref(), Some("coj_LEAKCANARY7"));
    assert_eq!(
        beat.token_expires_at.as_deref(),
        Some("2026-12-06T17:00:00.000Z")
    );
    assert_eq!(beat.answer["leaseExpiresAt"], "2026-12-06T16:00:00.000Z");
    for shown in [
        format!("{beat:?}"),
        format!("{beat:#?}"),
        beat.answer.to_string(),
    ] {
        assert!(!shown.contains(CANARY), "{shown}");
    }
    assert!(format!("{beat:?}").contains("token: Some(..)"));
}
