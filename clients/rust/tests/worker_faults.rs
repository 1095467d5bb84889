//! The Worker against a tiny fake server: faults the real server cannot produce (a
//! proxy's 503, a heartbeat that never answers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coordinator_client::{Claim, Client, Credentials, JobError, Worker};
use serde_json::{json, Value};

/// What the fake server answers to (method, path): status, content type and body;
/// `None`: no answer at all (the connection is held open).
type RouteFn = dyn Fn(&str, &str) -> Option<(u16, &'static str, String)> + Send + Sync;
type Route = Arc<RouteFn>;
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A keep-alive HTTP/1.1 server, one thread per connection; `release` ends held requests.
fn serve(route: Route) -> (String, Seen, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let release = Arc::new(AtomicBool::new(false));
    let (record, rel) = (seen.clone(), release.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (route, record, rel) = (route.clone(), record.clone(), rel.clone());
            std::thread::spawn(move || connection(stream, &*route, &record, &rel));
        }
    });
    (url, seen, release)
}

fn connection(
    stream: TcpStream,
    route: &RouteFn,
    seen: &Mutex<Vec<(String, String)>>,
    release: &AtomicBool,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut start = String::new();
        if reader.read_line(&mut start).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = start.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(": ") {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.parse().unwrap();
                }
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push((method.clone(), path.clone()));
        let Some((status, ctype, answer)) = route(&method, &path) else {
            let t0 = Instant::now();
            while !release.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        if out.write_all(head.as_bytes()).is_err() || out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn stamp(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).unwrap().as_millis();
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap())
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A claimed job whose lease is `lease` long (its token lives 10 minutes).
fn claim(lease: Duration) -> Claim {
    let now = SystemTime::now();
    Claim {
        job: json!({
            "id": "j1", "status": "RUNNING", "attempts": 1, "maxAttempts": 3,
            "startedAt": stamp(now), "leaseExpiresAt": stamp(now + lease),
        }),
        token: "tok".into(),
        token_expires_at: stamp(now + Duration::from_secs(600)),
    }
}

fn paths(seen: &Seen, suffix: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| p.ends_with(suffix))
        .map(|(_, p)| p.clone())
        .collect()
}

#[test]
fn a_lost_lease_cancels_the_job_and_a_stuck_heartbeat_blocks_nothing() {
    // Heartbeats never get an answer: the 2 s lease runs out without a renewal.
    let (url, seen, release) = serve(Arc::new(|_, path| {
        (!path.ends_with("/heartbeat")).then(|| (200, "application/json", "{}".to_owned()))
    }));
    let w = Worker::new(Client::new(&url, Credentials::ApiKey("k".into())), "q");
    let saw = Arc::new(Mutex::new(None));
    let s = saw.clone();
    let t0 = Instant::now();
    w.process(
        claim(Duration::from_secs(2)),
        Arc::new(move |job: &coordinator_client::JobContext| {
            let t = Instant::now();
            while !job.is_cancelled() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            *s.lock().unwrap() = Some(job.is_cancelled());
            Ok(json!("too late"))
        }),
    );
    let took = t0.elapsed();
    release.store(true, Ordering::SeqCst);
    assert_eq!(*saw.lock().unwrap(), Some(true), "{:?}", w.events());
    assert!(took < Duration::from_secs(5), "{took:?} {:?}", w.events());
    // Not completed, failed or handed back: the job is no longer ours.
    let others: Vec<(String, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p)| !p.ends_with("/heartbeat"))
        .cloned()
        .collect();
    assert!(others.is_empty(), "{others:?}");
    let beats = paths(&seen, "/heartbeat").len();
    assert!(
        (1..=3).contains(&beats),
        "{beats}: one attempt each, no retries"
    );
    assert!(
        w.events().iter().any(|e| e.contains("lease ran out")),
        "{:?}",
        w.events()
    );
}

#[test]
fn a_renewed_lease_is_kept() {
    let (url, seen, _) = serve(Arc::new(|_, _| {
        Some((
            200,
            "application/json",
            r#"{"cancelRequested":false}"#.to_owned(),
        ))
    }));
    let w = Worker::new(Client::new(&url, Credentials::ApiKey("k".into())), "q");
    w.process(
        claim(Duration::from_millis(1500)),
        Arc::new(|job: &coordinator_client::JobContext| {
            // Longer than the lease: only the heartbeats keep it.
            std::thread::sleep(Duration::from_millis(2500));
            if job.is_cancelled() {
                Err(JobError::Cancelled)
            } else {
                Ok(Value::Null)
            }
        }),
    );
    assert!(paths(&seen, "/heartbeat").len() >= 3, "{:?}", w.events());
    assert_eq!(
        paths(&seen, "/complete"),
        ["/coordinator/jobs/j1/complete"],
        "{:?}",
        w.events()
    );
}

#[test]
fn a_claim_refused_with_a_client_error_stops_the_worker() {
    for status in [400u16, 404, 422] {
        let (url, seen, _) = serve(Arc::new(move |_, _| {
            Some((
                status,
                "application/problem+json",
                format!(r#"{{"status":{status},"detail":"queue: bad"}}"#),
            ))
        }));
        let mut w = Worker::new(Client::new(&url, Credentials::ApiKey("k".into())), "q");
        w.long_poll = Duration::ZERO;
        w.poll_min = Duration::from_millis(10);
        w.poll_max = Duration::from_millis(10);
        let stop = w.stop_flag();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(w.run(|_| Ok(Value::Null), None, false));
        });
        let got = rx.recv_timeout(Duration::from_secs(5));
        stop.store(true, Ordering::SeqCst);
        let e = got
            .unwrap_or_else(|_| panic!("{status}: the worker kept claiming"))
            .unwrap_err();
        assert_eq!(e.status(), Some(status));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}

#[test]
fn stopping_the_worker_ends_its_pause_between_retries() {
    // (The content type carries one more header line: `Retry-After`.)
    let (url, seen, _) = serve(Arc::new(|_, _| {
        Some((
            503,
            "application/problem+json\r\nRetry-After: 30",
            r#"{"status":503}"#.to_owned(),
        ))
    }));
    let mut w = Worker::new(Client::new(&url, Credentials::ApiKey("k".into())), "q");
    w.long_poll = Duration::from_secs(1);
    let stop = w.stop_flag();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            w.run(|_| Ok(Value::Null), None, false)
                .map_err(|e| e.to_string()),
        );
    });
    // The claim was refused: the client waits 30 s to ask again.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let got = rx.recv_timeout(Duration::from_secs(10));
    assert!(got.is_ok(), "the worker did not stop");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn a_job_claimed_as_the_worker_stops_is_handed_back() {
    let c = claim(Duration::from_secs(30));
    let mut answer = c.job.clone();
    answer["token"] = json!("tok_j1");
    answer["tokenExpiresAt"] = json!(c.token_expires_at);
    let answer = answer.to_string();
    let stop_slot: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::default();
    let slot = stop_slot.clone();
    let (url, seen, _) = serve(Arc::new(move |_, path| {
        if path.ends_with("/claim") {
            // The stop comes while the claim that gets the job is in flight.
            if let Some(stop) = slot.lock().unwrap().as_ref() {
                stop.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(200));
            return Some((200, "application/json", answer.clone()));
        }
        Some((
            200,
            "application/json",
            r#"{"id":"j1","status":"QUEUED"}"#.into(),
        ))
    }));
    let mut w = Worker::new(Client::new(&url, Credentials::ApiKey("k".into())), "q");
    w.long_poll = Duration::from_secs(20);
    *stop_slot.lock().unwrap() = Some(w.stop_flag());
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let done = w.run(
        move |_| {
            r.store(true, Ordering::SeqCst);
            Ok(Value::Null)
        },
        None,
        false,
    );
    assert_eq!(done.unwrap(), 0);
    assert!(
        !ran.load(Ordering::SeqCst),
        "not run: the worker is stopping ..."
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().unwrap(),
        &("PATCH".to_owned(), "/coordinator/jobs/j1/status".to_owned()),
        "... but handed back: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
}
