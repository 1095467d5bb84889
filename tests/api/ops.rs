//! Operability: metrics move, request ids round-trip, the probe listener, retention.

use std::time::Duration;

use serde_json::json;

use crate::backend_tests;
use crate::helpers::{send, Backend};

backend_tests!(
    metrics_move_when_requests_happen,
    request_id_round_trips,
    probes_can_move_to_their_own_listener,
    retention_deletes_only_old_finished_jobs,
    instances_starting_together_on_an_empty_database,
);

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn metrics_move_when_requests_happen(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let before = app.get("/metrics");
    assert_eq!(before.status, 200);
    assert!(before
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let key =
        r#"coordinator_http_requests_total{method="POST",route="/coordinator/jobs",status="201"}"#;
    let n0 = metric(&before.body, key);
    let id = app.running_job();
    app.raw("GET", "/coordinator/health", &[], b""); // an auth failure
    std::thread::sleep(Duration::from_millis(1100)); // the depth snapshot is at most 1 s old
    let after = app.get("/metrics").body;
    assert_eq!(metric(&after, key), n0 + 1.0);
    assert!(metric(&after, r#"coordinator_job_transitions_total{to="RUNNING"}"#) >= 1.0);
    assert!(
        metric(
            &after,
            r#"coordinator_auth_outcomes_total{outcome="deny",reason="missing credentials",scheme="none"}"#
        ) >= 1.0,
        "{after}"
    );
    assert!(
        metric(
            &after,
            r#"coordinator_auth_outcomes_total{outcome="allow",reason="ok",scheme="hmac"}"#
        ) >= 3.0
    );
    assert!(
        after.contains(r#"coordinator_queue_depth{status="RUNNING"} 1"#),
        "{after}"
    );
    assert!(after.contains("coordinator_http_request_duration_seconds_bucket"));
    assert!(after.contains("coordinator_db_pool_connections"));
    assert!(after.contains("coordinator_revoked_tokens"));
    // Every reason of the revocation set's full reads is there from the first scrape,
    // and no repair ran: nothing stalled.
    for reason in ["first", "repair", "outgrown", "periodic", "shrunk"] {
        let name = format!(r#"coordinator_revocation_reloads_total{{reason="{reason}"}}"#);
        assert!(after.contains(&name), "{name}: {after}");
    }
    let reloads = |reason: &str| {
        metric(
            &after,
            &format!(r#"coordinator_revocation_reloads_total{{reason="{reason}"}}"#),
        )
    };
    assert!(reloads("first") <= 1.0);
    assert_eq!(reloads("repair"), 0.0);
    // No caller-supplied strings: the raw path with the job id never appears.
    assert!(!after.contains(&id));
}

fn request_id_round_trips(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let r = app.raw("GET", "/livez", &[("X-Request-Id", "trace-abc.123")], b"");
    assert_eq!(r.header("x-request-id"), Some("trace-abc.123"));
    let r = app.request(
        "GET",
        "/coordinator/health",
        &[("X-Request-Id", "req-7")],
        b"",
    );
    assert_eq!(r.header("x-request-id"), Some("req-7"));
    // A malformed id is replaced, not echoed.
    let r = app.raw(
        "GET",
        "/livez",
        &[("X-Request-Id", "bad id with spaces")],
        b"",
    );
    let minted = r.header("x-request-id").unwrap();
    assert_ne!(minted, "bad id with spaces");
    assert!(uuid::Uuid::parse_str(minted).is_ok());
    // Errors carry one too.
    assert!(app
        .raw("GET", "/coordinator/health", &[], b"")
        .header("x-request-id")
        .is_some());
}

fn probes_can_move_to_their_own_listener(b: Backend) {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| {
        c.metrics_bind = Some(format!("127.0.0.1:{port}").parse().unwrap());
    }) else {
        return;
    };
    let probe_url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    assert_eq!(send(&probe_url("/livez"), "GET", &[], b"").status, 200);
    assert_eq!(send(&probe_url("/metrics"), "GET", &[], b"").status, 200);
    // Not on the service port any more (unknown route there: needs auth, then 404).
    assert_eq!(app.raw("GET", "/metrics", &[], b"").status, 401);
    let r = app.get("/livez");
    assert_eq!(r.status, 404, "{}", r.body);
    // And the API is not on the probe port: a plain 404 there, whatever credential
    // comes with it. Nothing on that port takes one, so a credential sent to it by
    // mistake is neither verified nor counted: more bad keys than the failure budget
    // (30 a minute) get no 401 and no 429, and this address is not blocked on the API
    // port afterwards.
    assert_eq!(
        send(&probe_url("/coordinator/health"), "GET", &[], b"").status,
        404
    );
    for i in 0..40 {
        let key = format!("cok_not-a-key-{i}");
        let r = send(
            &probe_url("/coordinator/health"),
            "GET",
            &[("X-API-Key", key.as_str())],
            b"",
        );
        assert_eq!(r.status, 404, "attempt {i}: {}", r.body);
        let r = send(
            &probe_url("/coordinator/jobs"),
            "POST",
            &[("Authorization", "Bearer not.a.token")],
            b"{}",
        );
        assert_eq!(r.status, 404, "attempt {i}: {}", r.body);
    }
    assert_eq!(app.get("/coordinator/health").status, 200);
    // The dashboard stays with the API it calls (same origin), not on the probe port.
    let page = app.raw("GET", "/ui/", &[], b"");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.header("content-security-policy").is_some());
    assert_eq!(app.raw("GET", "/ui/app.js", &[], b"").status, 200);
    assert_eq!(send(&probe_url("/ui/"), "GET", &[], b"").status, 404);
}

fn retention_deletes_only_old_finished_jobs(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let done = app.running_job();
    app.post_json(&format!("/coordinator/jobs/{done}/complete"), &json!({}));
    let open = app.running_job();
    std::thread::sleep(Duration::from_millis(20));
    let now = coordinator::db::now_millis();
    let gone = app
        .state
        .db
        .write_sync(|c| coordinator::jobs::upkeep::purge_finished(c, now, 100))
        .unwrap();
    assert_eq!(gone, 1);
    app.get(&format!("/coordinator/jobs/{done}")).problem(404);
    assert_eq!(app.get(&format!("/coordinator/jobs/{open}")).status, 200);
}

/// Three instances starting at once on an empty database: migrations and the first
/// token-signing key are created exactly once, and every instance comes up.
fn instances_starting_together_on_an_empty_database(b: Backend) {
    let Some(db) = crate::helpers::TestDb::create(b) else {
        return;
    };
    // Instances of one deployment share the master key.
    let cfg = crate::helpers::test_config(&db);
    let apps: Vec<crate::helpers::TestApp> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (db, cfg) = (db.clone(), cfg.clone());
                s.spawn(move || crate::helpers::start(b, db, cfg))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for app in &apps {
        assert_eq!(app.get("/readyz").status, 200);
        assert_eq!(app.get("/coordinator/health").status, 200);
    }
    let id = apps[0].running_job();
    let token = apps[0].job_token(&id, "w", Duration::from_secs(60));
    for app in &apps {
        let r = app.with_token(&token, "GET", &format!("/coordinator/jobs/{id}"), b"");
        assert_eq!(r.status, 200, "{}", r.body);
    }
}
