//! Probes and the health report, including a database that goes away.

use serde_json::json;

use crate::backend_tests;
use crate::helpers::Backend;

backend_tests!(
    probes_answer,
    health_reports_queue_depths,
    metrics_count_depths_without_the_per_queue_snapshot,
    requests_that_find_no_snapshot_share_the_one_being_taken,
    unauthenticated_readiness_probes_cannot_crowd_out_authenticated_reads,
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

/// Third security review (2026-12-07): `/readyz` is open, never refused or counted by
/// the door, and each probe ran three statements on a pool connection (the ping, and
/// diesel's pending-migration check: `CREATE TABLE IF NOT EXISTS` and a `SELECT`).
/// Anyone who could open a few dozen connections kept every connection of the pool
/// busy with probes, and the database queue then refused authenticated requests
/// (503 `overloaded`). Now probes arriving together share one check, and a check that
/// found the database ready answers the probes of the next moment.
fn unauthenticated_readiness_probes_cannot_crowd_out_authenticated_reads(b: Backend) {
    use coordinator::auth::Scope;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let Some(app) = crate::app!(b) else { return };
    let id = app.create_job(&json!({"kind": "k"}));
    let key = app.api_key("reader", &[Scope::JobsRead]);
    let path = format!("/coordinator/jobs/{id}");
    let read = || app.raw("GET", &path, &[("X-API-Key", key.as_str())], b"");
    // The key is cached once the poll has seen its creation.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(read().status, 200, "{}", read().body);
    let stop = AtomicBool::new(false);
    let probes = AtomicUsize::new(0);
    let (refused, answered) = std::thread::scope(|s| {
        for _ in 0..24 {
            let (stop, probes, url) = (&stop, &probes, app.url("/readyz"));
            s.spawn(move || {
                // One keep-alive connection per prober, as a client flooding would.
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                while !stop.load(Ordering::Acquire) {
                    let _ = agent.get(&url).call();
                    probes.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let started = Instant::now();
        let (mut refused, mut answered) = (Vec::new(), 0);
        while started.elapsed() < Duration::from_secs(4) {
            let r = read();
            answered += 1;
            if r.status != 200 {
                refused.push(format!("{} {}", r.status, r.body));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Release);
        (refused, answered)
    });
    assert!(
        probes.load(Ordering::Relaxed) > 1000,
        "the probes did not run: {}",
        probes.load(Ordering::Relaxed)
    );
    assert!(
        refused.is_empty(),
        "{} of {answered} authenticated reads refused under a flood of open readiness probes: {:?}",
        refused.len(),
        refused.iter().take(3).collect::<Vec<_>>()
    );
}
