//! Request authentication (docs/design.md §3–§4), black-box over HTTP on both backends:
//! HMAC signatures and every way to tamper with one, the timestamp window, replays
//! (also across instances), secret rotation and revocation, API keys, the kill switch,
//! scheme choice, scopes, throttling, the body reaching the handler unchanged, and no
//! credential ever showing up in a response or in the database.
//!
//! Log capture (audit/access lines) is not checked here: they go through the global
//! `log` logger of this test process; the binary-level tests check the log output.

use std::time::{Duration, Instant};

use coordinator::auth::credentials::{self, SecretKind};
use coordinator::auth::{hmac, Scope};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{now_secs, send, spawn_app_with, Backend, Resp, Signer, TestApp};

backend_tests!(
    every_tamper_is_a_signature_mismatch,
    malformed_signatures_are_refused_before_lookup,
    timestamp_window,
    replay_is_refused,
    replay_is_refused_by_a_sibling_instance,
    concurrent_replays_let_exactly_one_through,
    a_replayed_write_changes_nothing_and_a_failed_request_burns_its_signature,
    concurrent_replays_of_a_write_create_one_job,
    a_replayed_long_claim_takes_no_job,
    rotation_with_grace,
    at_most_eight_versions_are_tried,
    revoked_secret_is_refused_within_a_second,
    disabled_caller_is_refused,
    kill_switch_refuses_api_keys,
    scheme_choice_has_no_fallback,
    api_keys,
    revoked_api_key_is_refused_within_a_second,
    bootstrap_api_key,
    scopes_are_enforced,
    unknown_routes_need_credentials_first,
    failures_are_throttled_per_peer,
    body_reaches_the_handler_unchanged,
    no_credential_leaks_into_responses_or_the_database,
);

// ---- helpers ------------------------------------------------------------------------

/// Owned request headers.
type Headers = Vec<(String, String)>;

const JSON_CT: (&str, &str) = ("content-type", "application/json");

/// An app whose failure throttle never gets in the way of a test that fails on purpose.
fn lenient_app(b: Backend) -> Option<TestApp> {
    spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
}

/// Send a request with exactly these (owned) headers plus `extra`.
fn send_with(
    app: &TestApp,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    extra: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut all: Vec<(&str, &str)> = extra.to_vec();
    all.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    send(&app.url(target), method, &all, body)
}

/// `headers` with `name` (any case) set to `value` (added when absent).
fn with_header(headers: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(name))
        .cloned()
        .collect();
    out.push((name.to_owned(), value.to_owned()));
    out
}

fn without_header(headers: &[(String, String)], name: &str) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(name))
        .cloned()
        .collect()
}

fn header_value(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

/// Assert a 401 problem with this `reason`; returns the document.
#[track_caller]
fn assert_401(r: &Resp, reason: &str) -> Value {
    let p = r.problem(401);
    assert_eq!(p["reason"], reason, "body: {}", r.body);
    p
}

/// Assert a 401 "signature mismatch" whose `canonical` is exactly `expected`.
#[track_caller]
fn assert_mismatch(r: &Resp, expected: &str) {
    let p = assert_401(r, "signature mismatch");
    assert_eq!(
        p["canonical"].as_str(),
        Some(expected),
        "canonical differs; body: {}",
        r.body
    );
}

/// A fresh signed request by `signer`, sent now (`key_version` as the signer says).
fn signed(app: &TestApp, signer: &Signer, method: &str, target: &str, body: &[u8]) -> Resp {
    app.signed_by(signer, method, target, &[JSON_CT], body)
}

fn health(app: &TestApp, signer: &Signer) -> Resp {
    signed(app, signer, "GET", "/coordinator/health", b"")
}

fn with_version(signer: &Signer, v: Option<i32>) -> Signer {
    Signer {
        key_version: v,
        ..signer.clone()
    }
}

/// Send fresh requests until `done` holds for the response or `deadline` passes.
/// Returns the last response and how long it took.
fn poll_until(
    deadline: Duration,
    mut request: impl FnMut() -> Resp,
    done: impl Fn(&Resp) -> bool,
) -> (Resp, Duration) {
    let start = Instant::now();
    loop {
        let r = request();
        if done(&r) || start.elapsed() >= deadline {
            return (r, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Jobs in the database (the health report is cached, so it is not used for this).
fn job_count(app: &TestApp) -> i64 {
    use diesel::prelude::*;
    app.state
        .db
        .write_sync(|conn| {
            Ok(coordinator::db::schema::jobs::table
                .count()
                .get_result::<i64>(conn)?)
        })
        .expect("count jobs")
}

/// Sleep until the current second is less than 300 ms old.
fn early_in_a_second() {
    let ms = chrono::Utc::now().timestamp_subsec_millis();
    if ms > 300 {
        std::thread::sleep(Duration::from_millis(u64::from(1000 - ms.min(1000)) + 5));
    }
}

fn rotate(app: &TestApp, caller: &str, grace: Option<Duration>) -> credentials::IssuedSecret {
    credentials::add_secret(
        &app.state.db,
        app.state.auth.store.sealer(),
        caller,
        SecretKind::Hmac,
        grace,
        None,
    )
    .expect("add secret")
}

fn signer_for(issued: &credentials::IssuedSecret) -> Signer {
    Signer {
        caller: issued.caller.clone(),
        secret: issued.plaintext.to_string(),
        key_version: None,
    }
}

// ---- 1. tampering ---------------------------------------------------------------------

fn every_tamper_is_a_signature_mismatch(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    app.caller("other", &Scope::ALL);
    let s = &app.signer;
    let target = "/coordinator/jobs";
    let body = br#"{"kind":"tamper","payload":{"n":1}}"#.to_vec();
    let ts = now_secs();
    let nonce = "tamper-nonce_1";
    let base = s.headers_with("POST", target, &body, ts, Some(nonce));
    let tss = ts.to_string();
    let canon = |method: &str, target: &str, caller: &str, ts: &str, nonce: &str, body: &[u8]| {
        hmac::wire::canonical(method, target, caller, ts, nonce, body)
    };
    let send_base = |method: &str, t: &str, h: &[(String, String)], body: &[u8]| {
        send_with(&app, method, t, h, &[JSON_CT], body)
    };

    // Method.
    let r = send_base("PATCH", target, &base, &body);
    assert_mismatch(&r, &canon("PATCH", target, "tester", &tss, nonce, &body));
    // Path.
    let r = send_base("POST", "/coordinator/jobs/", &base, &body);
    assert_mismatch(
        &r,
        &canon("POST", "/coordinator/jobs/", "tester", &tss, nonce, &body),
    );
    // One body byte.
    let mut tampered = body.clone();
    let at = tampered.iter().position(|&c| c == b'1').expect("digit");
    tampered[at] = b'2';
    let r = send_base("POST", target, &base, &tampered);
    assert_mismatch(&r, &canon("POST", target, "tester", &tss, nonce, &tampered));
    // Caller: another existing caller is a mismatch, an unknown one is unknown.
    let h = with_header(&base, "X-Coordinator-Caller", "other");
    let r = send_base("POST", target, &h, &body);
    assert_mismatch(&r, &canon("POST", target, "other", &tss, nonce, &body));
    let h = with_header(&base, "X-Coordinator-Caller", "nobody");
    let p = assert_401(&send_base("POST", target, &h, &body), "unknown caller");
    assert!(p.get("canonical").is_none(), "{p}");
    // Timestamp, one second later (well inside the window).
    let later = (ts + 1).to_string();
    let h = with_header(&base, "X-Coordinator-Timestamp", &later);
    let r = send_base("POST", target, &h, &body);
    assert_mismatch(&r, &canon("POST", target, "tester", &later, nonce, &body));
    // Nonce changed, and nonce dropped.
    let h = with_header(&base, "X-Coordinator-Nonce", "tamper-nonce_2");
    let r = send_base("POST", target, &h, &body);
    assert_mismatch(
        &r,
        &canon("POST", target, "tester", &tss, "tamper-nonce_2", &body),
    );
    let h = without_header(&base, "X-Coordinator-Nonce");
    let r = send_base("POST", target, &h, &body);
    assert_mismatch(&r, &canon("POST", target, "tester", &tss, "", &body));
    // One hex digit of the signature: the server's string is the client's.
    let sig = header_value(&base, "X-Coordinator-Signature");
    let flipped = format!(
        "{}{}",
        if sig.starts_with('0') { '1' } else { '0' },
        &sig[1..]
    );
    let h = with_header(&base, "X-Coordinator-Signature", &flipped);
    let r = send_base("POST", target, &h, &body);
    assert_mismatch(&r, &canon("POST", target, "tester", &tss, nonce, &body));

    // Query order is signed as sent, not normalized.
    let q_signed = "/coordinator/jobs?limit=1&queue=q";
    let q_sent = "/coordinator/jobs?queue=q&limit=1";
    let qh = s.headers_with("GET", q_signed, b"", ts, Some(nonce));
    let r = send_with(&app, "GET", q_sent, &qh, &[], b"");
    assert_mismatch(&r, &canon("GET", q_sent, "tester", &tss, nonce, b""));
    // ... and an untouched request with an odd query (encoded, unordered) passes.
    let odd = "/coordinator/jobs?kind=%2F%20&queue=q&limit=1";
    let oh = s.headers("GET", odd, b"", now_secs());
    let r = send_with(&app, "GET", odd, &oh, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);

    // None of the tampered requests consumed the signature: the original still passes.
    let r = send_base("POST", target, &base, &body);
    assert_eq!(r.status, 201, "{}", r.body);
    // A request signed without a nonce passes too; adding one afterwards breaks it.
    let nts = now_secs();
    let nh = s.headers_with("GET", "/coordinator/health", b"", nts, None);
    let added = with_header(&nh, "X-Coordinator-Nonce", "late");
    let r = send_with(&app, "GET", "/coordinator/health", &added, &[], b"");
    let expected = canon(
        "GET",
        "/coordinator/health",
        "tester",
        &nts.to_string(),
        "late",
        b"",
    );
    assert_mismatch(&r, &expected);
    let r = send_with(&app, "GET", "/coordinator/health", &nh, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
}

fn malformed_signatures_are_refused_before_lookup(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let base = app
        .signer
        .headers("GET", "/coordinator/health", b"", now_secs());
    let sig = header_value(&base, "X-Coordinator-Signature");
    let short = sig[..63].to_owned();
    let long = format!("{sig}a");
    let non_hex = format!("{}g", &sig[..63]);
    for bad in [short.as_str(), long.as_str(), non_hex.as_str()] {
        let h = with_header(&base, "X-Coordinator-Signature", bad);
        let r = send_with(&app, "GET", "/coordinator/health", &h, &[], b"");
        let p = assert_401(&r, "malformed signature");
        assert!(p.get("canonical").is_none(), "{p}");
    }
    // Also for a caller that does not exist: the length check comes before any lookup.
    let h = with_header(
        &with_header(&base, "X-Coordinator-Caller", "nobody"),
        "X-Coordinator-Signature",
        &short,
    );
    let r = send_with(&app, "GET", "/coordinator/health", &h, &[], b"");
    assert_401(&r, "malformed signature");
    // The untouched request passes.
    let r = send_with(&app, "GET", "/coordinator/health", &base, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---- 2. timestamps ------------------------------------------------------------------

fn timestamp_window(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let s = &app.signer;
    let path = "/coordinator/health";
    for offset in [-301_i64, 301] {
        // The server's clock is the same as ours but read later: start early in a
        // second so "301 s ahead" cannot become 300 s by the time the server looks.
        early_in_a_second();
        let h = s.headers("GET", path, b"", now_secs() + offset);
        let r = send_with(&app, "GET", path, &h, &[], b"");
        let p = assert_401(&r, "timestamp out of range");
        let server_time = p["server_time"]
            .as_i64()
            .unwrap_or_else(|| panic!("server_time is not an integer: {}", r.body));
        assert!(
            (server_time - now_secs()).abs() <= 5,
            "server_time {server_time} vs {}",
            now_secs()
        );
        assert!(p.get("canonical").is_none(), "{p}");
    }
    for offset in [-200_i64, 200] {
        let h = s.headers("GET", path, b"", now_secs() + offset);
        let r = send_with(&app, "GET", path, &h, &[], b"");
        assert_eq!(r.status, 200, "offset {offset}: {}", r.body);
    }
}

// ---- 3. replay ------------------------------------------------------------------------

fn replay_is_refused(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let path = "/coordinator/health";
    let h = app.signer.headers("GET", path, b"", now_secs());
    let first = send_with(&app, "GET", path, &h, &[], b"");
    assert_eq!(first.status, 200, "{}", first.body);
    let again = send_with(&app, "GET", path, &h, &[], b"");
    assert_401(&again, "replayed request");
    // The same signature in upper case is the same signature.
    let sig = header_value(&h, "X-Coordinator-Signature");
    let upper = with_header(&h, "X-Coordinator-Signature", &sig.to_ascii_uppercase());
    let r = send_with(&app, "GET", path, &upper, &[], b"");
    assert_401(&r, "replayed request");
    // A fresh signature of the same request is fine.
    assert_eq!(health(&app, &app.signer).status, 200);

    // A replayed POST creates nothing the second time.
    let body = br#"{"kind":"once"}"#;
    let h = app
        .signer
        .headers("POST", "/coordinator/jobs", body, now_secs());
    let r = send_with(&app, "POST", "/coordinator/jobs", &h, &[JSON_CT], body);
    assert_eq!(r.status, 201, "{}", r.body);
    let r = send_with(&app, "POST", "/coordinator/jobs", &h, &[JSON_CT], body);
    assert_401(&r, "replayed request");
    assert_eq!(job_count(&app), 1, "one job, not two");
}

/// On SQLite a signed request's replay record commits with its first write (or is
/// written before its first read, or after a handler that touched no database): a
/// replay is refused whichever way its record went, and changes nothing.
fn a_replayed_write_changes_nothing_and_a_failed_request_burns_its_signature(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let id = app.running_job();
    let path = format!("/coordinator/jobs/{id}/progress");
    // A write that succeeds: the replay is refused and the job keeps the first change.
    let body = br#"{"percent":40}"#;
    let h = app.signer.headers("PATCH", &path, body, now_secs());
    let r = send_with(&app, "PATCH", &path, &h, &[JSON_CT], body);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.patch_json(&path, &json!({"percent": 60}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send_with(&app, "PATCH", &path, &h, &[JSON_CT], body);
    assert_401(&r, "replayed request");
    let job = app.get(&format!("/coordinator/jobs/{id}"));
    assert_eq!(job.json()["progress"], 60, "the replay changed nothing");

    // A write the job refuses (409) still burns its signature, so the captured request
    // cannot succeed later, once the job would accept it.
    let queued = app.create_job(&json!({"kind": "later"}));
    let later = format!("/coordinator/jobs/{queued}/progress");
    let h = app.signer.headers("PATCH", &later, body, now_secs());
    let r = send_with(&app, "PATCH", &later, &h, &[JSON_CT], body);
    assert_eq!(r.status, 409, "{}", r.body);
    for s in ["QUEUED", "RUNNING"] {
        let path = format!("/coordinator/jobs/{queued}/status");
        let r = app.patch_json(&path, &json!({"status": s}));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = send_with(&app, "PATCH", &later, &h, &[JSON_CT], body);
    assert_401(&r, "replayed request");
    let job = app.get(&format!("/coordinator/jobs/{queued}"));
    assert_eq!(job.json()["progress"], 0, "{}", job.body);

    // A body the handler refuses before any database work (400) burns it too.
    let bad = br#"{"percent":400}"#;
    let h = app.signer.headers("PATCH", &path, bad, now_secs());
    let r = send_with(&app, "PATCH", &path, &h, &[JSON_CT], bad);
    assert_eq!(r.status, 400, "{}", r.body);
    let r = send_with(&app, "PATCH", &path, &h, &[JSON_CT], bad);
    assert_401(&r, "replayed request");

    // A request the guard refuses after its signature verified (a scope the caller
    // lacks, a query the route does not read) burns it too.
    let narrow = app.caller("narrow", &[Scope::HealthRead]);
    let create = br#"{"kind":"refused"}"#;
    let h = narrow.headers("POST", "/coordinator/jobs", create, now_secs());
    let r = send_with(&app, "POST", "/coordinator/jobs", &h, &[JSON_CT], create);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_401(
        &send_with(&app, "POST", "/coordinator/jobs", &h, &[JSON_CT], create),
        "replayed request",
    );
    let odd = "/coordinator/health?x=1";
    let h = app.signer.headers("GET", odd, b"", now_secs());
    let r = send_with(&app, "GET", odd, &h, &[], b"");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_401(
        &send_with(&app, "GET", odd, &h, &[], b""),
        "replayed request",
    );

    // A read: its record is written before the read runs.
    let get = format!("/coordinator/jobs/{id}");
    let h = app.signer.headers("GET", &get, b"", now_secs());
    let r = send_with(&app, "GET", &get, &h, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send_with(&app, "GET", &get, &h, &[], b"");
    assert_401(&r, "replayed request");
    assert!(
        !r.body.contains(&id),
        "a replay sees nothing of the job: {}",
        r.body
    );
}

/// The same signed create sent many times at once, to two instances: one job, one 201,
/// every other answer a 401 replay (on SQLite the copies may share a group commit).
fn concurrent_replays_of_a_write_create_one_job(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let other = app.sibling();
    let body = br#"{"kind":"race"}"#;
    let h = app
        .signer
        .headers("POST", "/coordinator/jobs", body, now_secs());
    let statuses = race(&app, &other, 16, 201, |t| {
        send_with(t, "POST", "/coordinator/jobs", &h, &[JSON_CT], body)
    });
    let created = one_through(&statuses, 201);
    assert_eq!(
        job_count(&app),
        i64::try_from(created).unwrap(),
        "one job, not more"
    );
}

/// A claim with a `wait` runs its attempts in a task of their own (so a client that
/// leaves does not take a job with it): the replay check must reach that task too, or
/// a captured claim would take a job for nobody before its replay is refused.
fn a_replayed_long_claim_takes_no_job(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let mut queued = Vec::new();
    for _ in 0..2 {
        let id = app.create_job(&json!({"kind": "build", "queue": "rq"}));
        let r = app.patch_json(
            &format!("/coordinator/jobs/{id}/status"),
            &json!({"status": "QUEUED"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        queued.push(id);
    }
    let path = "/coordinator/queues/rq/claim";
    let body = br#"{"worker":"w1","wait":1}"#;
    let h = app.signer.headers("POST", path, body, now_secs());
    let r = send_with(&app, "POST", path, &h, &[JSON_CT], body);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send_with(&app, "POST", path, &h, &[JSON_CT], body);
    assert_401(&r, "replayed request");
    let running = queued
        .iter()
        .filter(|id| app.get(&format!("/coordinator/jobs/{id}")).json()["status"] == "RUNNING")
        .count();
    assert_eq!(running, 1, "the replay claimed a job");
}

fn replay_is_refused_by_a_sibling_instance(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let other = app.sibling();
    let path = "/coordinator/health";
    let h = app.signer.headers("GET", path, b"", now_secs());
    let r = send_with(&app, "GET", path, &h, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send_with(&other, "GET", path, &h, &[], b"");
    assert_401(&r, "replayed request");
    // And the other way round.
    let h = app.signer.headers("GET", path, b"", now_secs());
    let r = send_with(&other, "GET", path, &h, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send_with(&app, "GET", path, &h, &[], b"");
    assert_401(&r, "replayed request");
}

fn concurrent_replays_let_exactly_one_through(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let other = app.sibling();
    let path = "/coordinator/health";
    let h = app.signer.headers("GET", path, b"", now_secs());
    let statuses = race(&app, &other, 8, 200, |t| {
        send_with(t, "GET", path, &h, &[], b"")
    });
    one_through(&statuses, 200);
}

/// How many of a race's answers are `ok`: exactly one, or none when the database queue
/// of a loaded test machine shed a racer (503): the one whose record was written and
/// whose work was then shed burns the signature, as any failed request does, and none
/// gets through. Never two.
fn one_through(statuses: &[u16], ok: u16) -> usize {
    let through = statuses.iter().filter(|&&s| s == ok).count();
    let shed = statuses.iter().filter(|&&s| s == 503).count();
    assert!(through == 1 || (through == 0 && shed > 0), "{statuses:?}");
    through
}

/// Send the same signed request (`send`) `n` times at once, alternately to `app` and
/// `other`; every answer but `ok` must be a 401 replay, or a 503 `overloaded` (the
/// database queue of a loaded test machine shedding it). The statuses, in no order.
fn race(
    app: &TestApp,
    other: &TestApp,
    n: usize,
    ok: u16,
    send: impl Fn(&TestApp) -> Resp + Sync,
) -> Vec<u16> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let send = &send;
                sc.spawn(move || {
                    let r = send(if i % 2 == 0 { app } else { other });
                    if r.status == 503 {
                        assert!(r.body.contains("overloaded"), "{}", r.body);
                    } else if r.status != ok {
                        assert_401(&r, "replayed request");
                    }
                    r.status
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    })
}

// ---- 4. rotation ----------------------------------------------------------------------

fn rotation_with_grace(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let v1 = app.caller("rot", &Scope::ALL);
    // Warm the cache with v1 so the rotation must invalidate it.
    assert_eq!(health(&app, &v1).status, 200);

    let before = Instant::now();
    let issued = rotate(&app, "rot", Some(Duration::from_secs(2)));
    let after = Instant::now();
    assert_eq!(issued.version, 2);
    let v2 = signer_for(&issued);

    // During grace: v1 (no version header) passes, v2 passes once the cache has moved.
    let r = health(&app, &v1);
    assert_eq!(r.status, 200, "v1 during grace: {}", r.body);
    let (r, took) = poll_until(
        Duration::from_secs(2),
        || health(&app, &v2),
        |r| r.status == 200,
    );
    assert_eq!(r.status, 200, "v2 not accepted after {took:?}: {}", r.body);
    if before.elapsed() < Duration::from_millis(1500) {
        // The cache now holds both versions; v1 still passes, by name too.
        let r = health(&app, &v1);
        assert_eq!(r.status, 200, "v1 during grace (fresh cache): {}", r.body);
        let r = health(&app, &with_version(&v1, Some(1)));
        assert_eq!(r.status, 200, "v1 by name during grace: {}", r.body);
    }
    let r = health(&app, &with_version(&v2, Some(2)));
    assert_eq!(r.status, 200, "{}", r.body);
    // Naming a version that does not exist.
    let r = health(&app, &with_version(&v2, Some(7)));
    assert_401(&r, "unknown key version");
    // Naming the wrong existing version: v2's signature checked against v1.
    let r = health(&app, &with_version(&v2, Some(1)));
    assert_401(&r, "signature mismatch");

    // After the grace period v1 is refused; v2 still works.
    let wait = (after + Duration::from_millis(2500)).saturating_duration_since(Instant::now());
    std::thread::sleep(wait);
    let r = health(&app, &v1);
    assert_eq!(r.status, 401, "v1 after grace: {}", r.body);
    r.problem(401);
    let r = health(&app, &with_version(&v1, Some(1)));
    assert_401(&r, "expired");
    assert_eq!(health(&app, &v2).status, 200);
    assert_eq!(health(&app, &with_version(&v2, Some(2))).status, 200);
}

fn at_most_eight_versions_are_tried(b: Backend) {
    use diesel::connection::SimpleConnection;
    let Some(app) = lenient_app(b) else { return };
    let v1 = app.caller("many", &Scope::ALL);
    // Versions 2..=8, all active (no grace): v1 is the eighth newest, still tried.
    for _ in 0..7 {
        rotate(&app, "many", None);
    }
    assert_eq!(health(&app, &v1).status, 200, "the eighth newest is tried");
    // A ninth active version is not issued (it would push v1 out unseen).
    let ninth = credentials::add_secret(
        &app.state.db,
        app.state.auth.store.sealer(),
        "many",
        SecretKind::Hmac,
        None,
        None,
    );
    assert!(ninth.is_err(), "a ninth active version was issued");
    // Nine active versions from before that rule (one revoked, a ninth issued, the
    // revocation undone in the table): v1 is the ninth newest and no longer tried.
    credentials::revoke_secret(&app.state.db, "many", SecretKind::Hmac, 5).expect("revoke");
    let v9 = signer_for(&rotate(&app, "many", None));
    app.state
        .db
        .write_sync(|c| {
            c.batch_execute("UPDATE sealed_secrets SET revoked_at = NULL WHERE caller = 'many'")
                .map_err(coordinator::error::StoreError::from)
        })
        .expect("un-revoke");
    let (r, _) = poll_until(
        Duration::from_secs(2),
        || health(&app, &v9),
        |r| r.status == 200,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (r, _) = poll_until(
        Duration::from_secs(2),
        || health(&app, &v1),
        |r| r.status == 401,
    );
    assert_401(&r, "signature mismatch");
    // Named explicitly, the old version is still valid.
    let r = health(&app, &with_version(&v1, Some(1)));
    assert_eq!(r.status, 200, "{}", r.body);
}

// ---- 5. revocation and disabled callers ------------------------------------------------

fn revoked_secret_is_refused_within_a_second(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let v1 = app.caller("revokee", &Scope::ALL);
    let v2 = signer_for(&rotate(&app, "revokee", None));
    assert_eq!(health(&app, &v1).status, 200, "warm the cache");
    assert_eq!(health(&app, &v2).status, 200);

    credentials::revoke_secret(&app.state.db, "revokee", SecretKind::Hmac, 1).expect("revoke");
    let (r, took) = poll_until(
        Duration::from_secs(2),
        || health(&app, &v1),
        |r| r.status == 401,
    );
    assert_eq!(r.status, 401, "still accepted after {took:?}: {}", r.body);
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
    r.problem(401);
    let r = health(&app, &with_version(&v1, Some(1)));
    assert_401(&r, "revoked");
    // The other version is untouched.
    assert_eq!(health(&app, &v2).status, 200);

    // Revoking the last active version leaves nothing to verify with.
    credentials::revoke_secret(&app.state.db, "revokee", SecretKind::Hmac, 2).expect("revoke");
    let (r, took) = poll_until(
        Duration::from_secs(2),
        || health(&app, &v2),
        |r| r.status == 401,
    );
    assert_eq!(r.status, 401, "still accepted after {took:?}: {}", r.body);
    let p = r.problem(401);
    assert!(
        p["reason"] == "revoked" || p["reason"] == "no active secret",
        "{p}"
    );
}

fn disabled_caller_is_refused(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let s = app.caller("soon-off", &Scope::ALL);
    let key = app.api_key("soon-off", &Scope::ALL);
    assert_eq!(health(&app, &s).status, 200, "warm the cache");
    let by_key = || app.raw("GET", "/coordinator/health", &[("X-API-Key", &key)], b"");
    assert_eq!(by_key().status, 200);

    credentials::disable_caller(&app.state.db, "soon-off").expect("disable");
    let (r, took) = poll_until(
        Duration::from_secs(2),
        || health(&app, &s),
        |r| r.status == 401,
    );
    assert_eq!(r.status, 401, "still accepted after {took:?}: {}", r.body);
    assert_401(&r, "caller disabled");
    let (r, _) = poll_until(Duration::from_secs(2), by_key, |r| r.status == 401);
    assert_401(&r, "caller disabled");
    // Other callers are unaffected.
    assert_eq!(health(&app, &app.signer).status, 200);
}

// ---- 6. kill switch -------------------------------------------------------------------

const BOOTSTRAP_KEY: &str = "bootstrap-key-for-tests-0123456789-abcdef";

fn kill_switch_refuses_api_keys(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| {
        c.require_signature = true;
        c.bootstrap_api_key = Some(coordinator::crypto::sha256(BOOTSTRAP_KEY.as_bytes()));
    }) else {
        return;
    };
    let key = app.api_key("keyed", &Scope::ALL);
    let r = app.raw("GET", "/coordinator/health", &[("X-API-Key", &key)], b"");
    assert_401(&r, "signature required");
    let r = app.raw(
        "GET",
        "/coordinator/health",
        &[("X-API-Key", BOOTSTRAP_KEY)],
        b"",
    );
    assert_401(&r, "signature required");
    assert_eq!(app.get("/coordinator/health").status, 200);
    let s = app.caller("keyed", &Scope::ALL);
    assert_eq!(health(&app, &s).status, 200);
}

// ---- 7. scheme choice -----------------------------------------------------------------

fn scheme_choice_has_no_fallback(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let key = app.api_key("both", &Scope::ALL);
    let path = "/coordinator/health";
    assert_eq!(
        app.raw("GET", path, &[("X-API-Key", &key)], b"").status,
        200
    );

    // A valid API key with a junk signature header: HMAC is chosen and fails.
    let junk = "0".repeat(64);
    let r = app.raw(
        "GET",
        path,
        &[("X-API-Key", &key), ("X-Coordinator-Signature", &junk)],
        b"",
    );
    assert_401(&r, "missing signature headers");
    // ... also with a complete but wrong set of signature headers.
    let h = app.signer.headers("GET", path, b"", now_secs());
    let h = with_header(&h, "X-Coordinator-Signature", &junk);
    let r = send_with(&app, "GET", path, &h, &[("X-API-Key", &key)], b"");
    assert_401(&r, "signature mismatch");
    // Only a timestamp header is enough to choose HMAC.
    let ts = now_secs().to_string();
    let r = app.raw(
        "GET",
        path,
        &[("X-API-Key", &key), ("X-Coordinator-Timestamp", &ts)],
        b"",
    );
    assert_401(&r, "missing signature headers");

    // API key and Bearer together: two schemes.
    let r = app.raw(
        "GET",
        path,
        &[("X-API-Key", &key), ("Authorization", "Bearer abc.def.ghi")],
        b"",
    );
    assert_401(&r, "more than one credential scheme");
    // No credentials at all.
    let r = app.raw("GET", path, &[], b"");
    assert_401(&r, "missing credentials");
    assert!(r.header("www-authenticate").is_some(), "{:?}", r.headers);
}

// ---- 8. API keys ----------------------------------------------------------------------

fn api_keys(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let key = app.api_key("keys", &Scope::ALL);
    let path = "/coordinator/health";
    let with_key = |name: &str, value: &str| app.raw("GET", path, &[(name, value)], b"");

    for name in ["X-API-Key", "x-api-key", "X-API-KEY", "x-Api-kEY"] {
        let r = with_key(name, &key);
        assert_eq!(r.status, 200, "{name}: {}", r.body);
    }

    // Malformed: empty, one character changed (checksum), wrong prefix, truncated.
    let mut changed: Vec<char> = key.chars().collect();
    let i = 10;
    changed[i] = if changed[i] == 'a' { 'b' } else { 'a' };
    let changed: String = changed.into_iter().collect();
    let mut last_changed: Vec<char> = key.chars().collect();
    let j = last_changed.len() - 1;
    last_changed[j] = if last_changed[j] == 'a' { 'b' } else { 'a' };
    let last_changed: String = last_changed.into_iter().collect();
    let wrong_prefix = format!("cox_{}", &key[4..]);
    let hmac_prefix = format!("coh_{}", &key[4..]);
    for bad in [
        "",
        changed.as_str(),
        last_changed.as_str(),
        wrong_prefix.as_str(),
        hmac_prefix.as_str(),
        &key[..41],
        &format!("{key}0"),
    ] {
        let r = with_key("X-API-Key", bad);
        assert_401(&r, "malformed api key");
    }

    // Well formed but never issued.
    let unknown = coordinator::crypto::credential::ApiKey::generate();
    let r = with_key("X-API-Key", unknown.expose_secret());
    assert_401(&r, "unknown api key");

    // Expired.
    let issued =
        credentials::issue_key(&app.state.db, "keys", None, Some(Duration::from_millis(1)))
            .expect("issue");
    std::thread::sleep(Duration::from_millis(20));
    let r = with_key("X-API-Key", issued.key.expose_secret());
    assert_401(&r, "expired");

    // The valid key still works after all that.
    assert_eq!(with_key("X-API-Key", &key).status, 200);
}

fn revoked_api_key_is_refused_within_a_second(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let _ = app.api_key("revkey", &Scope::ALL);
    let issued = credentials::issue_key(&app.state.db, "revkey", None, None).expect("issue");
    let key = issued.key.expose_secret().to_owned();
    let other = app.api_key("revkey", &Scope::ALL);
    let path = "/coordinator/health";
    let call = |k: &str| app.raw("GET", path, &[("X-API-Key", k)], b"");
    assert_eq!(call(&key).status, 200, "warm the cache");

    credentials::revoke_key(&app.state.db, &issued.row.id).expect("revoke");
    let (r, took) = poll_until(Duration::from_secs(2), || call(&key), |r| r.status == 401);
    assert_eq!(r.status, 401, "still accepted after {took:?}: {}", r.body);
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
    assert_401(&r, "revoked");
    // The caller's other key is unaffected.
    assert_eq!(call(&other).status, 200);
}

fn bootstrap_api_key(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| {
        c.bootstrap_api_key = Some(coordinator::crypto::sha256(BOOTSTRAP_KEY.as_bytes()));
    }) else {
        return;
    };
    let r = app.raw(
        "GET",
        "/coordinator/health",
        &[("X-API-Key", BOOTSTRAP_KEY)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.raw(
        "POST",
        "/coordinator/jobs",
        &[("X-API-Key", BOOTSTRAP_KEY), JSON_CT],
        br#"{"kind":"boot"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // Almost the bootstrap key is nothing.
    let almost = format!("{}x", &BOOTSTRAP_KEY[..BOOTSTRAP_KEY.len() - 1]);
    let r = app.raw("GET", "/coordinator/health", &[("X-API-Key", &almost)], b"");
    assert_401(&r, "malformed api key");
}

// ---- 9. scopes --------------------------------------------------------------------------

fn scopes_are_enforced(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let id = app.create_job(&json!({"kind": "scoped"}));
    let reader = app.caller("reader", &[Scope::JobsRead]);

    let body = br#"{"kind":"nope"}"#;
    let r = signed(&app, &reader, "POST", "/coordinator/jobs", body);
    let p = r.problem(403);
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("scope")),
        "{p}"
    );
    let r = signed(
        &app,
        &reader,
        "GET",
        &format!("/coordinator/jobs/{id}"),
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], id.as_str());
    let r = health(&app, &reader);
    r.problem(403);
    let r = signed(
        &app,
        &reader,
        "PATCH",
        &format!("/coordinator/jobs/{id}/status"),
        br#"{"status":"QUEUED"}"#,
    );
    r.problem(403);

    // Only health:read: health yes, jobs no.
    let monitor = app.caller("monitor", &[Scope::HealthRead]);
    assert_eq!(health(&app, &monitor).status, 200);
    signed(
        &app,
        &monitor,
        "GET",
        &format!("/coordinator/jobs/{id}"),
        b"",
    )
    .problem(403);

    // An API key carries its caller's scopes.
    let key = app.api_key("keyreader", &[Scope::JobsRead]);
    let r = app.raw("GET", "/coordinator/health", &[("X-API-Key", &key)], b"");
    r.problem(403);
    let r = app.raw(
        "GET",
        &format!("/coordinator/jobs/{id}"),
        &[("X-API-Key", &key)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // The refused create made no job.
    assert_eq!(job_count(&app), 1);
}

fn unknown_routes_need_credentials_first(b: Backend) {
    let Some(app) = lenient_app(b) else { return };
    let r = app.raw("GET", "/no/such/route", &[], b"");
    assert_401(&r, "missing credentials");
    let r = app.raw("DELETE", "/coordinator/jobs", &[], b"");
    assert_401(&r, "missing credentials");
    let h = app.signer.headers("GET", "/elsewhere", b"", now_secs());
    let h = with_header(&h, "X-Coordinator-Signature", &"a".repeat(64));
    let r = send_with(&app, "GET", "/no/such/route", &h, &[], b"");
    assert_401(&r, "signature mismatch");
    // Authenticated, the truth: 404 and 405.
    app.get("/no/such/route").problem(404);
    app.request("DELETE", "/coordinator/jobs", &[], b"")
        .problem(405);
    // Open routes need nothing.
    assert_eq!(app.raw("GET", "/livez", &[], b"").status, 200);
}

// ---- 10. throttling ---------------------------------------------------------------------

fn failures_are_throttled_per_peer(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| c.auth_failures_per_minute = 3) else {
        return;
    };
    // Valid requests never count.
    for _ in 0..6 {
        assert_eq!(health(&app, &app.signer).status, 200);
    }
    let statuses: Vec<u16> = (0..5)
        .map(|_| {
            let r = app.raw("GET", "/coordinator/health", &[], b"");
            if r.status == 401 {
                assert_401(&r, "missing credentials");
            }
            r.status
        })
        .collect();
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert_eq!(statuses[4], 429, "{statuses:?}");
    let r = app.raw("GET", "/coordinator/health", &[], b"");
    r.problem(429);
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {:?}", r.headers))
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Open routes are not throttled.
    assert_eq!(app.raw("GET", "/livez", &[], b"").status, 200);
    // A valid caller behind the same (blocked) address is still served: it is never
    // slowed by someone else's failures.
    assert_eq!(health(&app, &app.signer).status, 200);
    // ... and the failing peer keeps getting 429.
    app.raw("GET", "/coordinator/health", &[], b"").problem(429);
}

// ---- 11. the body ---------------------------------------------------------------------

fn body_reaches_the_handler_unchanged(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let body = "{ \"kind\" :\t\"unicode\",\n  \"payload\" : {\"text\": \"  h\u{e9}llo\\t w\u{f6}rld \\n \u{1f680}  \",\
                \"emoji\":\"\u{1f469}\u{200d}\u{1f4bb}\", \"cjk\" : \"\u{6f22}\u{5b57}\",\r\n\
                \"nested\": { \"arr\" : [1, 2.5 , \"  x  \", null, true] }, \"nul\": \"a\\u0000b\",\
                \"big\": \"\u{e9}\u{1f600}\u{e9}\" } }\n";
    let sent: Value = serde_json::from_str(body).expect("test body is JSON");
    let r = signed(
        &app,
        &app.signer,
        "POST",
        "/coordinator/jobs",
        body.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let j = r.json();
    assert_eq!(j["payload"], sent["payload"]);
    assert_eq!(j["kind"], "unicode");
    let id = j["id"].as_str().expect("id");
    let stored = app.get(&format!("/coordinator/jobs/{id}")).json();
    assert_eq!(stored["payload"], sent["payload"]);

    // A large body (many chunks on the wire) arrives whole.
    let blob: String = "\u{e9}\u{1f680} x\t".repeat(40_000);
    let big = json!({"kind": "big", "payload": {"blob": blob}}).to_string();
    assert!(big.len() > 256 * 1024 && big.len() < 1_048_576);
    let r = signed(
        &app,
        &app.signer,
        "POST",
        "/coordinator/jobs",
        big.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["payload"]["blob"].as_str(), Some(blob.as_str()));
}

// ---- 12. no leaks ---------------------------------------------------------------------

#[derive(diesel::QueryableByName)]
struct NameRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

#[derive(diesel::QueryableByName)]
struct ColRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    ty: String,
}

#[derive(diesel::QueryableByName)]
struct TextCell {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    v: Option<String>,
}

#[derive(diesel::QueryableByName)]
struct BinCell {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
    v: Option<Vec<u8>>,
}

/// Every TEXT value (and, separately, every BLOB value) of every table.
#[derive(Default)]
struct Dump {
    tables: Vec<String>,
    text: Vec<(String, String, String)>,
    binary: Vec<(String, String, Vec<u8>)>,
}

fn dump_with<C>(
    conn: &mut C,
    tables_sql: &str,
    columns_sql: impl Fn(&str) -> String,
    is_text: impl Fn(&str) -> bool,
    is_binary: impl Fn(&str) -> bool,
) -> Dump
where
    C: diesel::Connection,
    for<'a> diesel::query_builder::SqlQuery: diesel::query_dsl::LoadQuery<'a, C, NameRow>
        + diesel::query_dsl::LoadQuery<'a, C, ColRow>
        + diesel::query_dsl::LoadQuery<'a, C, TextCell>
        + diesel::query_dsl::LoadQuery<'a, C, BinCell>,
{
    use diesel::RunQueryDsl;
    let mut d = Dump::default();
    let tables: Vec<NameRow> = diesel::sql_query(tables_sql).load(conn).expect("tables");
    for t in tables {
        let cols: Vec<ColRow> = diesel::sql_query(columns_sql(&t.name))
            .load(conn)
            .expect("columns");
        assert!(!cols.is_empty(), "no columns for {}", t.name);
        for c in cols {
            let ty = c.ty.to_ascii_lowercase();
            if is_text(&ty) {
                let q = format!(
                    "SELECT CAST(\"{}\" AS TEXT) AS v FROM \"{}\"",
                    c.name, t.name
                );
                let rows: Vec<TextCell> = diesel::sql_query(q).load(conn).expect("text column");
                d.text.extend(
                    rows.into_iter()
                        .filter_map(|r| r.v)
                        .map(|v| (t.name.clone(), c.name.clone(), v)),
                );
            } else if is_binary(&ty) {
                let q = format!("SELECT \"{}\" AS v FROM \"{}\"", c.name, t.name);
                let rows: Vec<BinCell> = diesel::sql_query(q).load(conn).expect("blob column");
                d.binary.extend(
                    rows.into_iter()
                        .filter_map(|r| r.v)
                        .map(|v| (t.name.clone(), c.name.clone(), v)),
                );
            }
        }
        d.tables.push(t.name);
    }
    d
}

fn dump_database(app: &TestApp) -> Dump {
    use diesel::Connection;
    match app.backend {
        Backend::Sqlite => {
            let path = app.db.url.strip_prefix("sqlite://").expect("sqlite url");
            let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
            dump_with(
                &mut c,
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                |t| format!("SELECT name, type AS ty FROM pragma_table_info('{t}')"),
                |ty| ty.contains("text") || ty.contains("char") || ty.contains("clob"),
                |ty| ty.contains("blob"),
            )
        }
        Backend::Postgres => {
            let mut c = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
            dump_with(
                &mut c,
                "SELECT table_name::text AS name FROM information_schema.tables \
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                |t| {
                    format!(
                        "SELECT column_name::text AS name, data_type::text AS ty \
                         FROM information_schema.columns \
                         WHERE table_schema = 'public' AND table_name = '{t}'"
                    )
                },
                |ty| ty == "text" || ty.contains("char") || ty == "json" || ty == "jsonb",
                |ty| ty == "bytea",
            )
        }
    }
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The credential and the random part between its prefix and its 6-char checksum.
fn needles(credential: &str) -> Vec<String> {
    let mut out = vec![credential.to_owned()];
    if let Some((_, rest)) = credential.split_once('_') {
        if rest.len() > 12 {
            out.push(rest[..rest.len() - 6].to_owned());
        }
    }
    out
}

fn no_credential_leaks_into_responses_or_the_database(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| {
        c.auth_failures_per_minute = 100_000;
        c.bootstrap_api_key = Some(coordinator::crypto::sha256(BOOTSTRAP_KEY.as_bytes()));
    }) else {
        return;
    };
    let mut secrets: Vec<String> = vec![app.signer.secret.clone(), BOOTSTRAP_KEY.to_owned()];
    let mut signatures: Vec<String> = Vec::new();
    let mut responses: Vec<(String, Resp)> = Vec::new();

    let leaky = app.caller("leaky", &Scope::ALL);
    secrets.push(leaky.secret.clone());
    let rotated = rotate(&app, "leaky", Some(Duration::from_secs(3600)));
    secrets.push(rotated.plaintext.to_string());
    let webhook = credentials::add_secret(
        &app.state.db,
        app.state.auth.store.sealer(),
        "leaky",
        SecretKind::Webhook,
        None,
        None,
    )
    .expect("webhook secret");
    secrets.push(webhook.plaintext.to_string());
    let key = app.api_key("leaky", &Scope::ALL);
    secrets.push(key.clone());
    let revoked = credentials::issue_key(&app.state.db, "leaky", None, None).expect("issue");
    let revoked_key = revoked.key.expose_secret().to_owned();
    secrets.push(revoked_key.clone());
    credentials::revoke_key(&app.state.db, &revoked.row.id).expect("revoke");

    let mut hmac = |label: &str,
                    signer: &Signer,
                    method: &str,
                    target: &str,
                    body: &[u8],
                    tamper: &dyn Fn(Headers) -> Headers,
                    times: usize| {
        let h = tamper(signer.headers(method, target, body, now_secs()));
        signatures.push(header_value(&h, "X-Coordinator-Signature"));
        for _ in 0..times {
            let r = send_with(&app, method, target, &h, &[JSON_CT], body);
            responses.push((label.to_owned(), r));
        }
    };
    let same = |h: Headers| h;
    let job = br#"{"kind":"leak","payload":{"a":"b"}}"#;
    hmac(
        "valid",
        &app.signer,
        "GET",
        "/coordinator/health",
        b"",
        &same,
        1,
    );
    hmac(
        "valid post",
        &leaky,
        "POST",
        "/coordinator/jobs",
        job,
        &same,
        1,
    );
    hmac(
        "replayed",
        &leaky,
        "GET",
        "/coordinator/health",
        b"",
        &same,
        2,
    );
    hmac(
        "tampered caller",
        &leaky,
        "GET",
        "/coordinator/health",
        b"",
        &|h| with_header(&h, "X-Coordinator-Caller", "tester"),
        1,
    );
    hmac(
        "tampered timestamp",
        &leaky,
        "GET",
        "/coordinator/health",
        b"",
        &|h| with_header(&h, "X-Coordinator-Timestamp", &(now_secs() - 2).to_string()),
        1,
    );
    hmac(
        "old timestamp",
        &leaky,
        "GET",
        "/coordinator/health",
        b"",
        &|h| {
            with_header(
                &h,
                "X-Coordinator-Timestamp",
                &(now_secs() - 1000).to_string(),
            )
        },
        1,
    );
    hmac(
        "tampered signature",
        &leaky,
        "GET",
        "/coordinator/health",
        b"",
        &|h| {
            // Change the last hex digit to a different one (never a no-op).
            let s = header_value(&h, "X-Coordinator-Signature");
            let last = if s.ends_with('0') { '1' } else { '0' };
            with_header(
                &h,
                "X-Coordinator-Signature",
                &format!("{}{last}", &s[..63]),
            )
        },
        1,
    );
    hmac(
        "malformed signature",
        &leaky,
        "GET",
        "/coordinator/health",
        b"",
        &|h| {
            let s = header_value(&h, "X-Coordinator-Signature");
            with_header(&h, "X-Coordinator-Signature", &format!("{s}ff"))
        },
        1,
    );
    hmac(
        "expired version named",
        &with_version(&leaky, Some(1)),
        "GET",
        "/coordinator/health",
        b"",
        &same,
        1,
    );
    hmac(
        "forbidden",
        &app.caller("narrow", &[Scope::JobsRead]),
        "GET",
        "/coordinator/health",
        b"",
        &same,
        1,
    );
    let mut bad_key: Vec<char> = key.chars().collect();
    bad_key[12] = if bad_key[12] == 'Z' { 'Y' } else { 'Z' };
    let bad_key: String = bad_key.into_iter().collect();
    for (label, k) in [
        ("api key", key.as_str()),
        ("bad checksum key", bad_key.as_str()),
        ("revoked key", revoked_key.as_str()),
        ("bootstrap key", BOOTSTRAP_KEY),
    ] {
        let r = app.raw("GET", "/coordinator/health", &[("X-API-Key", k)], b"");
        responses.push((label.to_owned(), r));
    }
    let r = app.raw(
        "GET",
        "/coordinator/health",
        &[("X-API-Key", &key), ("Authorization", "Bearer x")],
        b"",
    );
    responses.push(("two schemes".to_owned(), r));

    // The sequence did what it was meant to (so the checks below look at real traffic).
    let statuses: Vec<(String, u16)> = responses
        .iter()
        .map(|(l, r)| (l.clone(), r.status))
        .collect();
    let status_of = |l: &str| {
        statuses
            .iter()
            .filter(|(x, _)| x == l)
            .map(|(_, s)| *s)
            .collect::<Vec<_>>()
    };
    assert_eq!(status_of("valid"), [200], "{statuses:?}");
    assert_eq!(status_of("valid post"), [201], "{statuses:?}");
    assert_eq!(status_of("replayed"), [200, 401], "{statuses:?}");
    assert_eq!(status_of("api key"), [200], "{statuses:?}");
    assert_eq!(status_of("bootstrap key"), [200], "{statuses:?}");
    assert_eq!(status_of("forbidden"), [403], "{statuses:?}");
    for l in ["tampered caller", "tampered signature", "revoked key"] {
        assert_eq!(status_of(l), [401], "{l}: {statuses:?}");
    }

    // No response body or header holds a secret, a key or a signature.
    let mut forbidden: Vec<String> = secrets.iter().flat_map(|s| needles(s)).collect();
    forbidden.extend(signatures.iter().cloned());
    forbidden.extend(signatures.iter().map(|s| s.to_ascii_uppercase()));
    for (label, r) in &responses {
        let mut text = r.body.clone();
        for (k, v) in &r.headers {
            text.push_str(&format!("\n{k}: {v}"));
        }
        for f in &forbidden {
            assert!(
                !text.contains(f.as_str()),
                "{label}: response contains a credential or signature:\n{text}"
            );
        }
    }

    // No TEXT (or BLOB) column anywhere holds an issued secret or key.
    let dump = dump_database(&app);
    for t in [
        "jobs",
        "job_events",
        "callers",
        "sealed_secrets",
        "api_keys",
        "replay_records",
        "revoked_tokens",
    ] {
        assert!(dump.tables.iter().any(|x| x == t), "{t} not dumped");
    }
    // The dump reads real rows: the key's hash and the caller names are there.
    let key_hash = coordinator::crypto::sha256_hex(key.as_bytes());
    assert!(
        dump.text
            .iter()
            .any(|(t, _, v)| t == "api_keys" && *v == key_hash),
        "api key hash not found in the dump"
    );
    assert!(dump
        .text
        .iter()
        .any(|(t, _, v)| t == "callers" && v == "leaky"));
    assert!(dump
        .binary
        .iter()
        .any(|(t, c, _)| t == "sealed_secrets" && c == "ciphertext"));
    let secret_needles: Vec<String> = secrets.iter().flat_map(|s| needles(s)).collect();
    for (t, c, v) in &dump.text {
        for n in &secret_needles {
            assert!(!v.contains(n.as_str()), "{t}.{c} holds a credential");
        }
    }
    for (t, c, v) in &dump.binary {
        for n in &secret_needles {
            assert!(
                !contains_bytes(v, n.as_bytes()),
                "{t}.{c} holds a credential"
            );
        }
    }
}
