//! Against a real `coordinator serve --dev` whose credentials are in the environment.
//! Ignored by a plain `cargo test`; scripts/client-tests.sh starts the server and runs
//! them with `--include-ignored`, where missing credentials fail them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coordinator_client::{Client, Credentials, JobError, ProblemKind, Worker};
use serde_json::{json, Value};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: run scripts/client-tests.sh"))
}

fn client() -> Client {
    Client::v1(
        &env("COORDINATOR_URL"),
        &env("COORDINATOR_CALLER"),
        &env("COORDINATOR_HMAC_SECRET"),
        None,
    )
}

fn queue() -> String {
    format!("rs-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

fn queued(c: &Client, queue: &str, max_attempts: i64) -> String {
    let job = c
        .create_job(
            &json!({"kind": "work", "queue": queue, "maxAttempts": max_attempts}),
            None,
        )
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    c.set_status(&id, "QUEUED", None).unwrap();
    id
}

fn status(c: &Client, id: &str) -> Value {
    c.get_job(id).unwrap()
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn signed_and_api_key_health() {
    let c = client();
    assert!(c.health().unwrap().is_object());
    let k = Client::new(
        &env("COORDINATOR_URL"),
        Credentials::ApiKey(env("COORDINATOR_CLIENT_API_KEY")),
    );
    assert!(k.health().unwrap().is_object());
    assert!(c.open("/livez").unwrap().status == 200);
    // An empty query is not sent (ureq drops the `?`): nor is it signed.
    let r = c
        .request("GET", "/coordinator/health?", None, &[], None)
        .unwrap();
    assert_eq!(r.status, 200);
    let wrong = Client::v1(
        &env("COORDINATOR_URL"),
        &env("COORDINATOR_CALLER"),
        "coh_0000000000000000000000000000000000000000000000000",
        None,
    );
    let e = wrong.health().unwrap_err();
    let p = e.problem().unwrap();
    assert_eq!(p.kind, ProblemKind::Unauthorized);
    assert_eq!(p.reason(), Some("signature mismatch"));
    assert!(p
        .canonical()
        .unwrap()
        .starts_with("v1\nGET\n/coordinator/health\n"));
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn a_jobs_whole_life_and_typed_errors() {
    let c = client();
    let q = queue();
    assert!(c.claim(&q, "w1").unwrap().is_none());
    let id = queued(&c, &q, 3);
    let claim = c.claim(&q, "w1").unwrap().unwrap();
    assert_eq!(claim.id(), id);
    let t = c.with_token(&claim.token);
    assert_eq!(
        t.report_progress(&id, 40, Some("compiling")).unwrap()["progress"],
        40
    );
    assert_eq!(
        t.claim(&q, "w1").unwrap_err().kind(),
        Some(ProblemKind::Forbidden)
    );
    let done = t
        .complete_job(&id, Some(&json!({"artifact": "x"})))
        .unwrap();
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(
        t.report_progress(&id, 50, None).unwrap_err().kind(),
        Some(ProblemKind::Unauthorized)
    );
    assert_eq!(
        c.complete_job(&id, None).unwrap_err().kind(),
        Some(ProblemKind::Conflict)
    );
    let e = c
        .create_job(&json!({"kind": "has space"}), None)
        .unwrap_err();
    // Why the server refused: the problem document as it came.
    let p = e.problem().unwrap();
    assert_eq!(p.field(), Some("kind"));
    assert_eq!(p.body["status"], json!(400));
    assert!(
        p.problem_type().starts_with("urn:coordinator:problem:"),
        "{p:?}"
    );
    assert!(!p.title().is_empty() && !p.detail().is_empty(), "{p:?}");
    assert!(
        p.header("content-type")
            .is_some_and(|t| t.starts_with("application/problem+json")),
        "{p:?}"
    );
    assert!(e.to_string().contains(p.detail()), "{e}");
    // Percent-encoded UTF-8 in the path is signed as sent: the route answers, not auth.
    let e = c.claim("café", "w1").unwrap_err();
    assert_eq!(e.problem().unwrap().field(), Some("queue"));
    let e = c
        .get_job("0190a0a0-0000-7000-8000-000000000009")
        .unwrap_err();
    assert_eq!(e.kind(), Some(ProblemKind::NotFound));
    let p = e.problem().unwrap();
    assert_eq!(p.body["status"], json!(404));
    assert!(!p.detail().is_empty(), "{p:?}");
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn webhook_and_dispatch() {
    let c = client();
    let r = c
        .stitcher_webhook(
            &env("COORDINATOR_CALLER"),
            &json!({"issueNumber": 9, "repository": "acme/app", "action": "commented"}),
            &env("COORDINATOR_WEBHOOK_SECRET"),
            &format!("msg_rs_{}", rand_suffix()),
        )
        .unwrap();
    assert_eq!(r["duplicate"], false);
    let d = c
        .dispatch(&json!({"issueNumber": 10, "repository": "acme/app"}), None)
        .unwrap();
    assert_eq!(d["status"], "QUEUED");
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn worker_completes_fails_and_retries() {
    let c = client();
    let q = queue();
    let ok = queued(&c, &q, 1);
    let bad = queued(&c, &q, 1);
    let flaky = queued(&c, &q, 2);
    let (ok2, bad2) = (ok.clone(), bad.clone());
    let mut w = Worker::new(c.clone(), &q);
    w.poll_min = Duration::from_millis(10);
    let n = w
        .run(
            move |job| {
                if job.id == ok2 {
                    job.progress(50, None)?;
                    Ok(json!({"seen": job.payload()}))
                } else if job.id == bad2 {
                    Err(JobError::Fail("broken input".into()))
                } else {
                    Err(JobError::Retry(format!("flaky, attempt {}", job.attempt)))
                }
            },
            None,
            true,
        )
        .unwrap();
    assert_eq!(n, 4, "{:?}", w.events());
    assert_eq!(status(&c, &ok)["status"], "COMPLETED");
    assert_eq!(status(&c, &ok)["result"], json!({"seen": {}}));
    assert_eq!(status(&c, &bad)["error"], "broken input");
    let f = status(&c, &flaky);
    assert_eq!(f["status"], "FAILED");
    assert_eq!(f["attempts"], 2);
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn heartbeat_cancellation_and_stop_hand_back() {
    let c = client();
    let q = queue();
    // Heartbeats while the handler runs; the job is cancelled under it.
    let id = queued(&c, &q, 3);
    let mut w = Worker::new(c.clone(), &q);
    w.heartbeat_interval = Duration::from_millis(100);
    let saw = Arc::new(Mutex::new(None));
    let s = saw.clone();
    let c2 = c.clone();
    let id2 = id.clone();
    let canceller = std::thread::spawn(move || {
        let t0 = Instant::now();
        while status(&c2, &id2)["status"] != "RUNNING" {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(400));
        c2.set_status(&id2, "CANCELLED", Some("operator")).unwrap();
    });
    w.run(
        move |job| {
            let t0 = Instant::now();
            while !job.is_cancelled() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            *s.lock().unwrap() = Some(job.is_cancelled());
            Ok(json!("too late"))
        },
        Some(1),
        false,
    )
    .unwrap();
    canceller.join().unwrap();
    assert_eq!(*saw.lock().unwrap(), Some(true));
    assert!(w.heartbeat_route().is_some(), "no heartbeat sent");
    let job = status(&c, &id);
    assert_eq!(job["status"], "CANCELLED");
    if w.heartbeat_route() == Some(false) {
        let beats = job["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "progress")
            .count();
        assert!(beats >= 2, "{job}");
    }

    // The stop flag hands a running job back.
    let id = queued(&c, &q, 3);
    let mut w = Worker::new(c.clone(), &q);
    w.shutdown_grace = Duration::from_millis(200);
    let stop = w.stop_flag();
    let c3 = c.clone();
    let id3 = id.clone();
    std::thread::spawn(move || {
        while status(&c3, &id3)["status"] != "RUNNING" {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
    });
    w.run(
        |_| {
            std::thread::sleep(Duration::from_secs(30));
            Ok(Value::Null)
        },
        None,
        false,
    )
    .unwrap();
    let job = status(&c, &id);
    assert_eq!(job["status"], "QUEUED", "{:?}", w.events());
    assert_eq!(job["message"], "worker shutting down");
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn a_job_outlives_its_first_token() {
    // scripts/client-tests.sh runs the server with 6 s job tokens: the handler runs
    // longer, so it can report its outcome only with a token a heartbeat renewed.
    let c = client();
    let q = queue();
    let id = queued(&c, &q, 1);
    let mut w = Worker::new(c.clone(), &q);
    w.heartbeat_interval = Duration::from_millis(500);
    w.run(
        move |job| {
            std::thread::sleep(Duration::from_secs(8));
            job.progress(90, Some("almost"))
                .map_err(|e| JobError::Fail(format!("{e:?}")))?;
            Ok(json!("ok"))
        },
        Some(1),
        false,
    )
    .unwrap();
    let job = status(&c, &id);
    assert_eq!(job["status"], "COMPLETED", "{:?}", w.events());
    assert_eq!(job["result"], "ok");
    assert_eq!(job["progress"], 100);
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn stop_ends_a_waiting_claim_promptly() {
    let c = client();
    let q = queue();
    let mut w = Worker::new(c.clone(), &q);
    w.long_poll = Duration::from_secs(20);
    let stop = w.stop_flag();
    let ran = Arc::new(Mutex::new(0));
    let r = ran.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let got = w.run(
            move |_| {
                *r.lock().unwrap() += 1;
                Ok(Value::Null)
            },
            None,
            false,
        );
        let _ = tx.send(got.map_err(|e| e.to_string()));
    });
    // The worker waits in its long poll on the empty queue.
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Instant::now();
    stop.store(true, Ordering::SeqCst);
    let got = rx.recv_timeout(Duration::from_secs(10));
    let took = stopped.elapsed();
    assert_eq!(got, Ok(Ok(0)), "the worker did not stop");
    assert!(took < Duration::from_millis(3500), "the stop took {took:?}");
    assert_eq!(*ran.lock().unwrap(), 0);
    // A plain client with a stop flag ends its long poll the same way.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sc = c.clone().with_stop(stop.clone());
    let setter = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        setter.store(true, Ordering::SeqCst);
    });
    let started = Instant::now();
    assert!(sc
        .claim_wait(&q, "w1", Duration::from_secs(20))
        .unwrap()
        .is_none());
    assert!(started.elapsed() < Duration::from_millis(3500));
    // Without one, the wait is the server's (one request).
    let started = Instant::now();
    assert!(c
        .claim_wait(&q, "w1", Duration::from_secs(1))
        .unwrap()
        .is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
#[ignore = "needs a serve --dev: scripts/client-tests.sh"]
fn an_idle_worker_long_polls_and_gets_new_work() {
    let c = client();
    let q = queue();
    let mut w = Worker::new(c.clone(), &q);
    w.long_poll = Duration::from_secs(10);
    // Back-off polling would wait this long between empty answers; the long poll must
    // not.
    w.poll_min = Duration::from_secs(30);
    w.poll_max = Duration::from_secs(30);
    let c2 = c.clone();
    let q2 = q.clone();
    let creator = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        (Instant::now(), queued(&c2, &q2, 1))
    });
    let done = Arc::new(Mutex::new(None));
    let d = done.clone();
    let n = w
        .run(
            move |job| {
                *d.lock().unwrap() = Some((Instant::now(), job.id.clone()));
                Ok(json!("ok"))
            },
            Some(1),
            false,
        )
        .unwrap();
    let (created_at, id) = creator.join().unwrap();
    assert_eq!(n, 1, "{:?}", w.events());
    let (ran_at, ran) = done.lock().unwrap().clone().unwrap();
    assert_eq!(ran, id);
    // Well inside the 30 s a polling worker would have slept.
    assert!(ran_at.duration_since(created_at) < Duration::from_secs(15));
    assert_eq!(status(&c, &id)["status"], "COMPLETED");
}
