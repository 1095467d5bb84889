//! Probes and the health report, including a database that goes away.

use serde_json::json;

use crate::backend_tests;
use crate::helpers::Backend;

backend_tests!(
    probes_answer,
    health_reports_queue_depths,
    metrics_count_depths_without_the_per_queue_snapshot,
    requests_that_find_no_snapshot_share_the_one_being_taken,
);

fn probes_answer(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let r = app.get("/livez");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    let r = app.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("x-request-id").is_some());
    // Load balancers probe with HEAD: the GET's status and head, no body.
    for path in ["/livez", "/readyz"] {
        let r = app.raw("HEAD", path, &[], b"");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{path}");
        assert!(r.body.is_empty(), "{path}: {}", r.body);
    }
    // Only the open routes take HEAD: on an authenticated one the credential is
    // checked first, then the method is refused.
    assert_eq!(app.raw("HEAD", "/coordinator/health", &[], b"").status, 401);
    let r = app.request("HEAD", "/coordinator/health", &[], b"");
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET"));
}

fn health_reports_queue_depths(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    app.create_job(&json!({"kind": "a", "queue": "q1"}));
    app.create_job(&json!({"kind": "a", "queue": "q1"}));
    app.running_job();
    // A job scheduled for later is queued but not waiting: it is no queue's oldest
    // (review, 2026-12-06: a future runAt read as waiting since its creation, so any
    // creator could set off the alert on this figure).
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let queue = |body: serde_json::Value| {
        let id = app.create_job(&body);
        let r = app.patch_json(
            &format!("/coordinator/jobs/{id}/status"),
            &json!({"status": "QUEUED"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    };
    queue(json!({"kind": "a", "queue": "q2", "runAt": later.to_rfc3339()}));
    let h = app.get("/coordinator/health");
    assert_eq!(h.status, 200);
    let h = h.json();
    assert_eq!(h["database"]["status"], "up");
    assert_eq!(h["queues"]["q1"]["PENDING"], 2);
    assert_eq!(h["queues"]["q2"]["QUEUED"], 1);
    assert_eq!(h["queues"]["default"]["RUNNING"], 1);
    assert!(h["version"].is_string());
    assert!(h["oldestQueuedAgeSecs"].is_null(), "{h}");
    queue(json!({"kind": "a", "queue": "q2"}));
    std::thread::sleep(std::time::Duration::from_millis(1100)); // the snapshot's age
    let h = app.get("/coordinator/health").json();
    let age = h["oldestQueuedAgeSecs"].as_f64().expect("a due job waits");
    assert!((0.0..60.0).contains(&age), "{h}");
}

/// PostgreSQL disappears under a running app: handlers and /readyz answer 503,
/// /livez stays 200.
fn database_unreachable_is_503(b: Backend) {
    let Some(app) = crate::app!(b) else {
        return;
    };
    let id = app.running_job();
    let admin = std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let name = app
            .db
            .url
            .rsplit('/')
            .next()
            .expect("name")
            .split('?')
            .next()
            .expect("name")
            .to_owned();
        let mut c = diesel::PgConnection::establish(&admin).expect("admin");
        c.batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
            .expect("drop");
    }
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/progress"),
        &json!({"percent": 5}),
    );
    r.problem(503);
    assert!(
        !r.body.contains("postgres") && !r.body.contains("coord_test"),
        "{}",
        r.body
    );
    assert_eq!(app.get("/readyz").status, 503);
    assert_eq!(app.get("/livez").status, 200);
    app.get(&format!("/coordinator/jobs/{id}")).problem(503);
}

crate::postgres_tests!(database_unreachable_is_503);

/// Review finding (2026-12-06): `/metrics` (open, no credential) refreshed the health
/// snapshot, which has an entry per queue. With 100,000 queues (names are the creators'
/// own) a scrape took 100-270 ms, ~100 ms of it a `GROUP BY` of every queue, and built
/// 2.4 MB of JSON, once a second for anyone who asked. Now the depth series come from
/// one row per status, and a scrape takes no health snapshot.
fn metrics_count_depths_without_the_per_queue_snapshot(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    for i in 0..5 {
        app.create_job(&json!({"kind": "a", "queue": format!("mq{i}")}));
    }
    app.running_job();
    let before = app.state.health.snapshots_taken();
    let text = app.raw("GET", "/metrics", &[], b"").body;
    assert!(
        text.contains(r#"coordinator_queue_depth{status="PENDING"} 5"#),
        "{text}"
    );
    assert!(
        text.contains(r#"coordinator_queue_depth{status="RUNNING"} 1"#),
        "{text}"
    );
    assert!(!text.contains("mq0"), "no queue name: {text}");
    assert_eq!(app.state.health.snapshots_taken(), before);
    // The health report still has every queue.
    let h = app.get("/coordinator/health").json();
    assert_eq!(h["queues"]["mq4"]["PENDING"], 1, "{h}");
    assert_eq!(app.state.health.snapshots_taken(), before + 1);
}

/// Review note (2026-12-06), fixed: while one request took the health snapshot, every
/// other that found none recent (the first after a start, or after a snapshot slower
/// than 5 s: 100,000 queues) took its own, one `GROUP BY` of every queue each. Now they
/// wait for the one being taken and share it. Sixteen at once on a fresh cache (each
/// polled before any read returns): one snapshot, the same for all.
fn requests_that_find_no_snapshot_share_the_one_being_taken(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    for i in 0..20 {
        app.create_job(&json!({"kind": "a", "queue": format!("sq{i}")}));
    }
    let cache = coordinator::health::HealthCache::default();
    let db = app.state.db.clone();
    let snapshots = actix_web::rt::System::new().block_on(futures_util::future::join_all(
        (0..16).map(|_| coordinator::health::snapshot(&db, &cache)),
    ));
    assert_eq!(cache.snapshots_taken(), 1);
    let first = snapshots[0].as_ref().expect("a snapshot");
    for s in &snapshots {
        let s = s.as_ref().expect("a snapshot");
        assert!(std::sync::Arc::ptr_eq(s, first));
    }
    assert_eq!(first.report.queues["sq19"]["PENDING"], 1);
}
