//! Retries, Retry-After and typed errors against a scripted local HTTP server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coordinator_client::{Client, Credentials, Error, ProblemKind};
use serde_json::json;

type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;
type Answer = (u16, Vec<(&'static str, &'static str)>, &'static str);

/// Serves `answers` in order, one per connection, recording each request's headers.
fn serve(answers: Vec<Answer>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for (status, headers, body) in answers {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut req_headers = Vec::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end().to_owned();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(": ") {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.parse().unwrap();
                    }
                    req_headers.push((k.to_owned(), v.to_owned()));
                }
            }
            let mut body_in = vec![0; len];
            reader.read_exact(&mut body_in).unwrap();
            record.lock().unwrap().push(req_headers);
            let mut out = stream;
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            out.write_all(head.as_bytes()).unwrap();
            out.write_all(body.as_bytes()).unwrap();
        }
    });
    (url, seen)
}

const PJ: (&str, &str) = ("Content-Type", "application/problem+json");

#[test]
fn retries_503_and_429_honouring_retry_after_and_signs_afresh() {
    let (url, seen) = serve(vec![
        (503, vec![PJ, ("Retry-After", "2")], r#"{"status":503}"#),
        (429, vec![PJ, ("Retry-After", "1")], r#"{"status":429}"#),
        (
            200,
            vec![("Content-Type", "application/json")],
            r#"{"ok":true}"#,
        ),
    ]);
    let slept: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let s = slept.clone();
    let c =
        Client::v1(&url, "svc", "coh_secret", None).with_sleep(move |d| s.lock().unwrap().push(d));
    assert_eq!(c.health().unwrap(), json!({"ok": true}));
    assert_eq!(
        *slept.lock().unwrap(),
        [Duration::from_secs(2), Duration::from_secs(1)]
    );
    let sigs: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|h| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("x-coordinator-signature"))
                .unwrap()
                .1
                .clone()
        })
        .collect();
    assert_eq!(sigs.len(), 3);
    assert!(sigs[0] != sigs[1] && sigs[1] != sigs[2]);
}

#[test]
fn problems_are_typed_after_retries_run_out() {
    let (url, _) = serve(vec![
        (503, vec![PJ], r#"{"status":503,"detail":"db"}"#),
        (503, vec![PJ], r#"{"status":503,"detail":"db"}"#),
        (
            400,
            vec![PJ],
            r#"{"status":400,"field":"kind","detail":"kind: bad"}"#,
        ),
        (500, vec![("Content-Type", "text/plain")], "boom"),
    ]);
    let mut c = Client::new(&url, Credentials::ApiKey("cok_x".into())).with_sleep(|_| {});
    c.retries = 1;
    let e = c.create_job(&json!({"kind": "b"}), None).unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unavailable));
    assert_eq!(e.problem().unwrap().detail(), "db");
    let e = c.create_job(&json!({"kind": "b b"}), None).unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::BadRequest));
    assert_eq!(e.problem().unwrap().field(), Some("kind"));
    let e = c.health().unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Server));
    assert_eq!(e.problem().unwrap().detail(), "boom");
}

#[test]
fn a_problem_keeps_the_whole_document_and_the_headers() {
    let page = "<html>bad gateway</html>".repeat(100);
    let page: &'static str = Box::leak(page.into_boxed_str());
    let (url, _) = serve(vec![
        (
            409,
            vec![PJ, ("X-Request-Id", "r1")],
            r#"{"type":"urn:coordinator:problem:conflict","title":"Conflict","detail":"job is COMPLETED","jobStatus":"COMPLETED"}"#,
        ),
        (502, vec![("Content-Type", "text/html")], page),
        (302, vec![("Location", "http://elsewhere/x")], ""),
    ]);
    let c = Client::new(&url, Credentials::ApiKey("cok_x".into())).with_sleep(|_| {});
    let e = c.complete_job("j1", None).unwrap_err();
    let p = e.problem().unwrap();
    assert_eq!(p.problem_type(), "urn:coordinator:problem:conflict");
    assert_eq!((p.title(), p.detail()), ("Conflict", "job is COMPLETED"));
    // Every member is kept, and `status` added when the document left it out.
    assert_eq!(p.member("jobStatus"), Some(&json!("COMPLETED")));
    assert_eq!(p.body["status"], json!(409));
    assert_eq!(p.header("x-request-id"), Some("r1"));
    assert_eq!(e.to_string(), "409 Conflict: job is COMPLETED");
    // Not a problem document: the reason phrase and the body's first 500 characters.
    let e = c.health().unwrap_err();
    let p = e.problem().unwrap();
    assert_eq!(p.kind, ProblemKind::Server);
    assert_eq!(p.title(), "X");
    assert_eq!(p.detail(), &page[..500]);
    assert_eq!(p.body["status"], json!(502));
    let e = c.health().unwrap_err();
    assert_eq!(
        e.problem().unwrap().header("location"),
        Some("http://elsewhere/x")
    );
}

#[test]
fn connection_errors_retry_only_when_safe() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let count = Arc::new(Mutex::new(0));
    let n = count.clone();
    let c = Client::new(
        &format!("http://127.0.0.1:{port}"),
        Credentials::ApiKey("k".into()),
    )
    .with_sleep(move |_| *n.lock().unwrap() += 1);
    assert!(matches!(c.health(), Err(Error::Transport(_))));
    assert_eq!(*count.lock().unwrap(), 4);
    *count.lock().unwrap() = 0;
    assert!(matches!(
        c.create_job(&json!({"kind": "b"}), None),
        Err(Error::Transport(_))
    ));
    assert_eq!(*count.lock().unwrap(), 0);
}

#[test]
fn a_redirect_is_never_followed_and_is_an_error() {
    // Where the redirects point: it must see nothing, neither credential nor body.
    let (elsewhere, seen_elsewhere) = serve(vec![(200, vec![], "{}")]);
    let to = |path: &str| -> &'static str { format!("{elsewhere}{path}").leak() };
    let (url, seen) = serve(vec![
        (307, vec![("Location", to("/coordinator/jobs"))], ""),
        (308, vec![("Location", to("/coordinator/jobs"))], ""),
        (302, vec![("Location", to("/coordinator/health"))], ""),
        (301, vec![("Location", to("/coordinator/health"))], ""),
    ]);
    let v1 = Credentials::V1 {
        caller: "svc".into(),
        secret: "coh_secret".into(),
        key_version: None,
    };
    let key = Credentials::ApiKey("cok_secret".into());
    // (credentials, status answered, a POST with a signed body or a GET)
    let cases = [
        (v1.clone(), 307, true),
        (key.clone(), 308, true),
        (v1, 302, false),
        (key, 301, false),
    ];
    for (credentials, status, post) in cases {
        let c = Client::new(&url, credentials).with_sleep(|_| {});
        let e = if post {
            c.create_job(&json!({"kind": "b"}), None)
        } else {
            c.health()
        }
        .unwrap_err();
        assert_eq!(e.status(), Some(status), "{e}");
        assert_eq!(e.kind(), Some(ProblemKind::Other));
    }
    assert_eq!(seen.lock().unwrap().len(), 4);
    assert!(seen_elsewhere.lock().unwrap().is_empty());
}

#[test]
fn a_proxys_503_is_retried_only_when_resending_is_safe() {
    let page: Answer = (503, vec![("Content-Type", "text/html")], "<html>503</html>");
    let ok: Answer = (
        201,
        vec![("Content-Type", "application/json")],
        r#"{"id":"j"}"#,
    );
    let (url, seen) = serve(vec![
        page.clone(),
        page.clone(),
        page.clone(),
        ok.clone(),
        page,
        ok.clone(),
        (503, vec![PJ, ("Retry-After", "0")], r#"{"status":503}"#),
        ok,
    ]);
    let c = Client::new(&url, Credentials::ApiKey("k".into())).with_sleep(|_| {});
    // Not the server's refusal: the job may have been created, or claimed, already.
    let e = c.create_job(&json!({"kind": "b"}), None).unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unavailable));
    assert_eq!(seen.lock().unwrap().len(), 1);
    let e = c.claim("q", "w1").unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unavailable));
    assert_eq!(seen.lock().unwrap().len(), 2);
    // With an Idempotency-Key it is sent again; a GET too.
    let job = c.create_job(&json!({"kind": "b"}), Some("k1")).unwrap();
    assert_eq!(job["id"], "j");
    assert_eq!(seen.lock().unwrap().len(), 4);
    assert_eq!(c.health().unwrap()["id"], "j");
    // The server's own refusal (problem+json) is retried for any request.
    assert_eq!(
        c.create_job(&json!({"kind": "b"}), None).unwrap()["id"],
        "j"
    );
    assert_eq!(seen.lock().unwrap().len(), 8);
}

#[test]
fn a_get_refused_as_a_replay_is_signed_afresh_once() {
    let replayed: Answer = (
        401,
        vec![PJ],
        r#"{"status":401,"title":"Unauthorized","reason":"replayed request"}"#,
    );
    let ok: Answer = (200, vec![("Content-Type", "application/json")], "{}");
    let (url, seen) = serve(vec![
        replayed.clone(),
        ok,
        replayed.clone(),
        replayed.clone(),
        replayed,
    ]);
    let c = Client::v1(&url, "svc", "coh_secret", None).with_sleep(|_| {});
    assert_eq!(c.health().unwrap(), json!({}));
    let nonce = |i: usize| {
        seen.lock().unwrap()[i]
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-coordinator-nonce"))
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_ne!(nonce(0), nonce(1));
    // Only once: a second refusal is the answer.
    let e = c.health().unwrap_err();
    assert_eq!(e.problem().unwrap().reason(), Some("replayed request"));
    assert_eq!(seen.lock().unwrap().len(), 4);
    // A POST is never resent by ureq: its refusal is the answer at once.
    let e = c.create_job(&json!({"kind": "b"}), None).unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unauthorized));
    assert_eq!(seen.lock().unwrap().len(), 5);
}

#[test]
fn a_stop_ends_the_pause_between_retries_and_starts_no_retry() {
    let busy: Answer = (503, vec![PJ, ("Retry-After", "30")], r#"{"status":503}"#);
    let (url, seen) = serve(vec![busy.clone(), busy.clone(), busy]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = Client::new(&url, Credentials::ApiKey("k".into())).with_stop(stop.clone());
    let s = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t0 = std::time::Instant::now();
    let e = c.health().unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unavailable));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(seen.lock().unwrap().len(), 1);
    // Once stopping, no retry is started, by a token client of it too.
    let e = c.with_token("t").health().unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::Unavailable));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// Answers every connection with a 200 of `len` bytes (after reading the request head).
fn serve_body(len: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
                    break;
                }
            }
            let mut out = stream;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\
                 Connection: close\r\n\r\n"
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&vec![b'a'; len]);
        }
    });
    url
}

/// An answer past the 16 MiB cap is an error, never its first 16 MiB passed off as the
/// whole answer (`call` printed the cut body and exited 0; `/metrics` read short).
#[test]
fn an_answer_past_the_cap_is_an_error_not_a_cut_body() {
    const CAP: usize = 16 * 1024 * 1024;
    let url = serve_body(CAP + 1);
    let c = Client::new(&url, Credentials::None);
    match c.open("/metrics") {
        Err(Error::Transport(why)) => assert!(why.contains("16 MiB"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(r) => panic!("a cut body of {} bytes taken as the answer", r.body.len()),
    }
    match c.send_once("GET", "/metrics", b"", &[], |_, _| Ok(Vec::new())) {
        Err(Error::Transport(why)) => assert!(why.contains("16 MiB"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(r) => panic!("a cut body of {} bytes taken as the answer", r.body.len()),
    }
    // The cap itself is read whole.
    let url = serve_body(CAP);
    let r = Client::new(&url, Credentials::None)
        .open("/metrics")
        .unwrap();
    assert_eq!(r.body.len(), CAP);
}
