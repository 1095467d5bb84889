//! `Client::watch`: a job's event stream followed across reconnects — against a
//! scripted local SSE server (a cut connection, a server-ended stream, a gap,
//! Retry-After, error answers, stop), and against a real `serve --dev` (ignored by a
//! plain `cargo test`; scripts/client-tests.sh runs them, with 16 events kept per job).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator_client::{Client, Credentials, JobEvent, ProblemKind};
use serde_json::json;

type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// One connection's answer: the raw bytes written after the request was read; the
/// connection is closed after them.
fn serve(answers: Vec<Vec<u8>>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for answer in answers {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut target = String::new();
            reader.read_line(&mut target).unwrap();
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end().to_owned();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(": ") {
                    headers.push((k.to_ascii_lowercase(), v.to_owned()));
                }
            }
            record
                .lock()
                .unwrap()
                .push((target.trim_end().to_owned(), headers));
            let mut out = stream;
            let _ = out.write_all(&answer);
            let _ = out.flush();
        }
    });
    (url, seen)
}

fn ev(seq: i64, kind: &str, data: serde_json::Value) -> String {
    let doc =
        json!({"seq": seq, "type": kind, "data": data, "createdAt": "2026-12-06T00:00:00.000Z"});
    format!("id: {seq}\nevent: {kind}\ndata: {doc}\n\n")
}

fn progress(seq: i64) -> String {
    ev(seq, "progress", json!({"percent": seq}))
}

fn done(seq: i64) -> String {
    ev(
        seq,
        "completed",
        json!({"from": "RUNNING", "to": "COMPLETED"}),
    )
}

/// An SSE answer in chunks; `end`: the last chunk, else the connection is cut.
fn sse(parts: &[String], end: bool) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for p in parts {
        out.extend_from_slice(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes());
    }
    if end {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    out
}

fn answer(status: u16, ctype: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn header(seen: &Seen, i: usize, name: &str) -> Option<String> {
    seen.lock().unwrap()[i]
        .1
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn seqs(events: &[JobEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

fn quick(url: &str) -> (Client, Arc<Mutex<Vec<Duration>>>) {
    let slept: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let s = slept.clone();
    let c =
        Client::v1(url, "svc", "coh_secret", None).with_sleep(move |d| s.lock().unwrap().push(d));
    (c, slept)
}

#[test]
fn a_cut_stream_resumes_after_the_last_event_signed_afresh() {
    let (url, seen) = serve(vec![
        sse(&[progress(1), progress(2), progress(3)], false),
        // 2 and 3 again: never yielded twice.
        sse(&[progress(2), progress(3), progress(4), done(5)], true),
    ]);
    let (c, _) = quick(&url);
    let got: Vec<JobEvent> = c.watch("j1", None).map(Result::unwrap).collect();
    assert_eq!(seqs(&got), [1, 2, 3, 4, 5]);
    assert!(got.iter().all(|e| e.gap.is_none()));
    assert_eq!(got[4].status(), Some("COMPLETED"));
    assert_eq!(got[0].to_json()["type"], "progress");
    assert_eq!(header(&seen, 0, "last-event-id").as_deref(), Some("0"));
    assert_eq!(header(&seen, 1, "last-event-id").as_deref(), Some("3"));
    assert_eq!(
        header(&seen, 1, "accept").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(
        seen.lock().unwrap()[0].0,
        "GET /coordinator/jobs/j1/events HTTP/1.1"
    );
    let sig = |i| header(&seen, i, "x-coordinator-signature").unwrap();
    assert_ne!(sig(0), sig(1), "each connection is signed afresh");
}

#[test]
fn each_scheme_signs_every_connection_afresh() {
    for creds in [
        Credentials::Rfc9421 {
            caller: "svc".into(),
            secret: "coh_secret".into(),
            key_version: None,
            options: Default::default(),
        },
        Credentials::ApiKey("cok_key".into()),
    ] {
        let (url, seen) = serve(vec![
            sse(&[progress(1)], false),
            sse(&[progress(2), done(3)], true),
        ]);
        let c = Client::new(&url, creds.clone()).with_sleep(|_| {});
        let got: Vec<JobEvent> = c.watch("j1", None).map(Result::unwrap).collect();
        assert_eq!(seqs(&got), [1, 2, 3]);
        match creds {
            Credentials::ApiKey(_) => {
                assert_eq!(header(&seen, 1, "x-api-key").as_deref(), Some("cok_key"))
            }
            _ => assert_ne!(header(&seen, 0, "signature"), header(&seen, 1, "signature")),
        }
    }
}

#[test]
fn a_stream_the_server_ends_is_reopened_until_the_job_is_terminal() {
    let (url, seen) = serve(vec![
        sse(&[progress(1), progress(2)], true),
        answer(
            200,
            "application/json",
            "",
            r#"{"id":"j1","status":"RUNNING"}"#,
        ),
        sse(&[": keep-alive\n\n".into(), progress(3), done(4)], true),
    ]);
    let (c, _) = quick(&url);
    let got: Vec<JobEvent> = c.watch("j1", Some(0)).map(Result::unwrap).collect();
    assert_eq!(seqs(&got), [1, 2, 3, 4]);
    let targets: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        targets,
        [
            "GET /coordinator/jobs/j1/events HTTP/1.1",
            "GET /coordinator/jobs/j1 HTTP/1.1",
            "GET /coordinator/jobs/j1/events HTTP/1.1"
        ]
    );
    assert_eq!(header(&seen, 2, "last-event-id").as_deref(), Some("2"));
}

#[test]
fn a_job_already_terminal_ends_the_watch() {
    let (url, seen) = serve(vec![
        sse(&[], true),
        answer(
            200,
            "application/json",
            "",
            r#"{"id":"j1","status":"CANCELLED"}"#,
        ),
        sse(&[], true),
    ]);
    let (c, slept) = quick(&url);
    assert_eq!(c.watch("j1", Some(9)).count(), 0);
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert!(slept.lock().unwrap().is_empty());
}

#[test]
fn a_gap_is_reported_on_the_first_event_after_it() {
    let (url, _) = serve(vec![sse(
        &[
            ": gap: events 3 to 5 are no longer kept\n\n".into(),
            progress(6),
            progress(7),
            done(8),
        ],
        true,
    )]);
    let (c, _) = quick(&url);
    let got: Vec<JobEvent> = c.watch("j1", Some(2)).map(Result::unwrap).collect();
    assert_eq!(seqs(&got), [6, 7, 8]);
    assert_eq!(got[0].gap, Some((3, 5)));
    assert_eq!(got[1].gap, None);
}

#[test]
fn retry_after_is_honoured_and_reconnects_are_bounded() {
    let pj = "application/problem+json";
    let (url, _) = serve(vec![
        answer(429, pj, "Retry-After: 1\r\n", r#"{"status":429}"#),
        answer(503, pj, "Retry-After: 2\r\n", r#"{"status":503}"#),
        sse(&[progress(1), done(2)], true),
    ]);
    let (c, slept) = quick(&url);
    let got: Vec<JobEvent> = c.watch("j1", None).map(Result::unwrap).collect();
    assert_eq!(seqs(&got), [1, 2]);
    assert_eq!(
        *slept.lock().unwrap(),
        [Duration::from_secs(1), Duration::from_secs(2)]
    );

    let (url, seen) = serve(vec![b"".to_vec(); 6]);
    let (mut c, slept) = quick(&url);
    c.max_backoff = Duration::from_secs(3);
    let out: Vec<_> = c.watch("j1", None).reconnects(3).collect();
    assert_eq!(out.len(), 1);
    let e = out.into_iter().next().unwrap().unwrap_err();
    assert!(
        matches!(e, coordinator_client::Error::Transport(_)),
        "{e:?}"
    );
    assert!(!format!("{e:?}").contains("coh_secret"));
    assert_eq!(seen.lock().unwrap().len(), 4);
    let slept = slept.lock().unwrap();
    assert_eq!(slept.len(), 3);
    assert!(slept.iter().all(|d| *d <= Duration::from_secs(3)));
}

#[test]
fn an_error_answer_ends_the_watch_at_once() {
    for (status, kind) in [
        (401, ProblemKind::Unauthorized),
        (403, ProblemKind::Forbidden),
        (404, ProblemKind::NotFound),
        (400, ProblemKind::BadRequest),
    ] {
        let body = format!(r#"{{"status":{status},"title":"no","field":"Last-Event-ID"}}"#);
        let (url, seen) = serve(vec![answer(status, "application/problem+json", "", &body)]);
        let (c, slept) = quick(&url);
        let out: Vec<_> = c.watch("j1", None).collect();
        assert_eq!(out.len(), 1, "{status}");
        let e = out.into_iter().next().unwrap().unwrap_err();
        assert_eq!(e.kind(), Some(kind));
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert!(slept.lock().unwrap().is_empty());
    }
}

#[test]
fn a_job_id_of_dots_is_refused_before_anything_is_sent() {
    let (c, _) = quick("http://127.0.0.1:9");
    let out: Vec<_> = c.watch("..", None).collect();
    assert_eq!(out.len(), 1);
    assert!(matches!(
        out.into_iter().next().unwrap(),
        Err(coordinator_client::Error::Invalid(_))
    ));
}

#[test]
fn a_stop_ends_the_watch() {
    let (url, _) = serve(vec![sse(&[progress(1), progress(2), done(3)], true)]);
    let stop = Arc::new(AtomicBool::new(false));
    let c = Client::v1(&url, "svc", "coh_secret", None).with_stop(stop.clone());
    let mut got = Vec::new();
    for e in c.watch("j1", None) {
        got.push(e.unwrap().seq);
        stop.store(true, Ordering::SeqCst);
    }
    assert_eq!(got, [1]);
}

// ---- against the dev server ---------------------------------------------------------

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: run scripts/client-tests.sh"))
}

fn live() -> Client {
    Client::v1(
        &env("COORDINATOR_URL"),
        &env("COORDINATOR_CALLER"),
        &env("COORDINATOR_HMAC_SECRET"),
        None,
    )
}

fn queue() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_007;
    format!("rsw-{}-{n}", std::process::id())
}

fn claimed(c: &Client) -> (String, Client) {
    let q = queue();
    let job = c
        .create_job(&json!({"kind": "work", "queue": q}), None)
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    c.set_status(&id, "QUEUED", None).unwrap();
    let claim = c.claim(&q, "w-watch").unwrap().unwrap();
    assert_eq!(claim.id(), id);
    (id, c.with_token(&claim.token))
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn live_watch_follows_a_job_to_its_end_and_reports_a_gap() {
    let c = live();
    let (id, token) = claimed(&c);
    let watcher = {
        let (c, id) = (c.clone(), id.clone());
        std::thread::spawn(move || c.watch(&id, None).collect::<Vec<_>>())
    };
    for p in [10, 50, 90] {
        token.report_progress(&id, p, None).unwrap();
    }
    token.complete_job(&id, Some(&json!({"ok": true}))).unwrap();
    let got: Vec<JobEvent> = watcher
        .join()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(seqs(&got), (1..=7).collect::<Vec<_>>());
    let kinds: Vec<&str> = got.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "status",
            "claimed",
            "progress",
            "progress",
            "progress",
            "completed"
        ]
    );
    assert_eq!(got[6].status(), Some("COMPLETED"));

    // 16 events kept per job here: a watch from seq 1 of a long job has a gap.
    let (id, token) = claimed(&c);
    for p in 1..=30 {
        token.report_progress(&id, p, None).unwrap();
    }
    c.cancel_job(&id, Some("enough")).unwrap();
    let got: Vec<JobEvent> = c.watch(&id, Some(1)).map(Result::unwrap).collect();
    let first = &got[0];
    assert_eq!(first.gap, Some((2, first.seq - 1)));
    assert_eq!(
        seqs(&got),
        (first.seq..=got[got.len() - 1].seq).collect::<Vec<_>>()
    );
    assert_eq!(got[got.len() - 1].status(), Some("CANCELLED"));
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn live_watch_errors_and_a_revoked_token() {
    let c = live();
    let (id, token) = claimed(&c);
    let past = c.watch(&id, Some(99)).next().unwrap().unwrap_err();
    assert_eq!(past.kind(), Some(ProblemKind::BadRequest));
    assert_eq!(past.problem().unwrap().field(), Some("Last-Event-ID"));
    let gone = c
        .watch("00000000-0000-4000-8000-000000000000", None)
        .next()
        .unwrap()
        .unwrap_err();
    assert_eq!(gone.kind(), Some(ProblemKind::NotFound));
    let bad = Client::v1(
        &env("COORDINATOR_URL"),
        &env("COORDINATOR_CALLER"),
        "coh_wrong",
        None,
    );
    let e = bad.watch(&id, None).next().unwrap().unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unauthorized));

    // The job's own token watches its job; revoked, the stream ends and the reconnect
    // is a 401.
    let mut watch = token.watch(&id, None);
    let first: Vec<i64> = (&mut watch).take(3).map(|e| e.unwrap().seq).collect();
    assert_eq!(first, [1, 2, 3]);
    let claim_jti = {
        use base64::Engine as _;
        let Credentials::Bearer(t) = token.credentials() else {
            panic!("a token client")
        };
        let payload = t.split('.').nth(1).unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["jti"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    c.revoke_token(&claim_jti, None).unwrap();
    let rest: Vec<_> = watch.collect();
    assert_eq!(rest.len(), 1, "{rest:?}");
    let e = rest.into_iter().next().unwrap().unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unauthorized));
    c.cancel_job(&id, None).unwrap();
}
