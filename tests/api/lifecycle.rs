//! Job lifecycle: list and pagination, scheduled jobs, retries with backoff, redrive,
//! cancel, heartbeat, one event shape, queue controls, batch create.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coordinator::auth::Scope;
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{jti_of, Backend, TestApp};

backend_tests!(
    list_filters_and_pages_newest_first,
    pagination_while_the_table_grows_returns_every_job_once,
    a_page_reads_every_status_at_one_moment,
    a_scheduled_job_is_not_claimed_early_and_is_claimed_once_due,
    a_retryable_failure_comes_back_after_its_backoff_and_the_old_token_is_refused,
    exhausted_attempts_fail_for_good,
    an_expired_lease_follows_the_retry_rule,
    a_lease_sweep_stopped_part_way_announces_the_jobs_it_moved,
    redrive_puts_a_dead_job_back_with_a_fresh_budget,
    cancel_while_running_stops_the_worker_and_revokes_its_token,
    heartbeat_renews_the_lease_without_an_event,
    every_status_event_has_from_and_to,
    a_paused_queue_hands_out_nothing,
    concurrent_queue_lists_share_one_build,
    max_running_holds_with_concurrent_claimers_on_two_instances,
    batch_of_1000_with_duplicates,
    a_token_writes_only_into_its_own_attempt,
    an_earlier_attempts_token_is_refused_on_every_instance,
    overlapping_keyed_batches_never_deadlock,
    a_claim_from_a_long_queue_reads_its_first_job_only,
);

fn rfc3339_in(ms_from_now: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(ms_from_now);
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn ms(ts: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(ts.as_str().expect("timestamp"))
        .expect("RFC 3339")
        .timestamp_millis()
}

/// Create a job and move it to QUEUED.
fn queued_job(app: &TestApp, body: Value) -> String {
    let id = app.create_job(&body);
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    id
}

/// Claim from `queue`: the claimed job (with `token`), or `None` on 204.
fn claim(app: &TestApp, queue: &str) -> Option<Value> {
    let r = app.post_json(
        &format!("/coordinator/queues/{queue}/claim"),
        &json!({"worker": "w1"}),
    );
    match r.status {
        200 => Some(r.json()),
        204 => None,
        s => panic!("claim answered {s}: {}", r.body),
    }
}

/// Claim until a job comes (each answer is checked; the deadline only stops a hung test).
fn claim_when_due(app: &TestApp, queue: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(j) = claim(app, queue) {
            return j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never became claimable"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn events(app: &TestApp, id: &str) -> Vec<Value> {
    app.get(&format!("/coordinator/jobs/{id}")).json()["events"]
        .as_array()
        .expect("events")
        .clone()
}

fn list(app: &TestApp, query: &str) -> Value {
    let r = app.get(&format!("/coordinator/jobs{query}"));
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    r.json()
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect()
}

fn list_filters_and_pages_newest_first(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let a1 = app.create_job(&json!({"kind": "build", "queue": "la"}));
    let a2 = queued_job(&app, json!({"kind": "test", "queue": "la"}));
    let b1 = queued_job(&app, json!({"kind": "build", "queue": "lb"}));
    let b2 = app.create_job(&json!({"kind": "build", "queue": "lb"}));

    // Newest first, no events in items.
    let all = list(&app, "");
    assert_eq!(
        ids(&all),
        [b2.as_str(), b1.as_str(), a2.as_str(), a1.as_str()]
    );
    assert!(all["items"][0].get("events").is_none());
    assert!(all["nextCursor"].is_null());

    assert_eq!(ids(&list(&app, "?queue=la")), [a2.as_str(), a1.as_str()]);
    assert_eq!(
        ids(&list(&app, "?status=QUEUED")),
        [b1.as_str(), a2.as_str()]
    );
    assert_eq!(
        ids(&list(&app, "?status=QUEUED&status=PENDING&queue=lb")),
        [b2.as_str(), b1.as_str()]
    );
    assert_eq!(ids(&list(&app, "?kind=build&queue=la")), [a1.as_str()]);
    assert!(ids(&list(&app, "?status=FAILED")).is_empty());

    // Creation-time bounds are exclusive.
    let created =
        |id: &str| app.get(&format!("/coordinator/jobs/{id}")).json()["createdAt"].clone();
    let t_a1 = created(&a1);
    let after = list(
        &app,
        &format!(
            "?createdAfter={}",
            t_a1.as_str().unwrap().replace('+', "%2B")
        ),
    );
    assert!(!ids(&after).contains(&a1));
    let before = list(&app, &format!("?createdBefore={}", rfc3339_in(3_600_000)));
    assert_eq!(ids(&before).len(), 4);

    // Pages of one.
    let p1 = list(&app, "?limit=1");
    assert_eq!(ids(&p1), [b2.as_str()]);
    let c = p1["nextCursor"].as_str().expect("cursor");
    let p2 = list(&app, &format!("?limit=1&cursor={c}"));
    assert_eq!(ids(&p2), [b1.as_str()]);

    // Bad input names the parameter; a job token cannot list.
    for (q, field) in [
        ("?limit=501", "limit"),
        ("?limit=0", "limit"),
        ("?limit=%2B5", "limit"),
        ("?limit=5%20", "limit"),
        ("?status=running", "status"),
        ("?cursor=xyz", "cursor"),
        ("?createdAfter=yesterday", "createdAfter"),
        ("?queue=a%20b", "queue"),
        ("?order=asc", "order"),
        // One value each, except `status` (review, 2026-12-06: the last one won).
        ("?limit=1&limit=2", "limit"),
        ("?queue=a&queue=b", "queue"),
        ("?kind=a&kind=a", "kind"),
        ("?=x", "query"),
    ] {
        let p = app.get(&format!("/coordinator/jobs{q}")).problem(400);
        assert_eq!(p["field"], field, "{q}");
    }
    let running = app.running_job();
    let token = app.job_token(&running, "w", Duration::from_secs(600));
    app.with_token(&token, "GET", "/coordinator/jobs", b"")
        .problem(403);
    // A caller without jobs:read is refused; POST on the same path still creates.
    let key = app.api_key("creator", &[Scope::JobsCreate]);
    let r = app.raw("GET", "/coordinator/jobs", &[("X-API-Key", &key)], b"");
    r.problem(403);
    let r = app.raw(
        "POST",
        "/coordinator/jobs",
        &[("X-API-Key", &key), ("content-type", "application/json")],
        br#"{"kind":"k"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = app.request("DELETE", "/coordinator/jobs", &[], b"");
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("POST, GET"));
}

fn pagination_while_the_table_grows_returns_every_job_once(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let jobs: Vec<Value> = (0..60)
        .map(|i| json!({"kind": "k", "queue": "pg", "payload": {"i": i}}))
        .collect();
    let r = app.post_json("/coordinator/jobs/batch", &json!({"jobs": jobs}));
    assert_eq!(r.status, 200, "{}", r.body);
    let mut before: HashSet<String> = HashSet::new();
    for j in r.json()["jobs"].as_array().expect("jobs") {
        before.insert(j["job"]["id"].as_str().expect("id").to_owned());
    }
    // Jobs made in one batch share a creation time: the cursor must break ties by id.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut cursor: Option<String> = None;
    let mut added = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?queue=pg&limit=7&cursor={c}"),
            None => "?queue=pg&limit=7".to_owned(),
        };
        let page = list(&app, &q);
        for id in ids(&page) {
            *seen.entry(id).or_default() += 1;
        }
        // The table grows during the walk.
        for _ in 0..3 {
            app.create_job(&json!({"kind": "k", "queue": "pg"}));
            added += 1;
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert!(added > 20);
    for id in &before {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "job {id} seen {:?} times",
            seen.get(id)
        );
    }
    assert!(seen.values().all(|n| *n == 1), "a job came twice");
}

/// Review finding (2026-12-05): a page read each status's range at its own moment, so
/// while workers claimed and handed back jobs, a page listed a job twice (QUEUED, then
/// RUNNING) or left one out (RUNNING, then QUEUED again). Now every page is read from
/// one snapshot: each job is on it exactly once, whatever moves meanwhile.
fn a_page_reads_every_status_at_one_moment(b: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(app) = crate::app!(b) else { return };
    let all: HashSet<String> = (0..80)
        .map(|_| queued_job(&app, json!({"kind": "k", "queue": "churn"})))
        .collect();
    let stop = AtomicBool::new(false);
    let problems = std::thread::scope(|s| {
        for _ in 0..3 {
            let (app, stop) = (&app, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let Some(job) = claim(app, "churn") else {
                        continue;
                    };
                    let id = job["job"]["id"]
                        .as_str()
                        .or(job["id"].as_str())
                        .expect("id");
                    let token = job["token"].as_str().expect("token");
                    let bearer = format!("Bearer {token}");
                    let r = app.raw(
                        "PATCH",
                        &format!("/coordinator/jobs/{id}/status"),
                        &[
                            ("Authorization", bearer.as_str()),
                            ("content-type", "application/json"),
                        ],
                        br#"{"status":"QUEUED"}"#,
                    );
                    assert_eq!(r.status, 200, "hand back: {}", r.body);
                }
            });
        }
        let mut problems = Vec::new();
        for _ in 0..60 {
            let listed = ids(&list(&app, "?queue=churn&limit=500"));
            let distinct: HashSet<String> = listed.iter().cloned().collect();
            if listed.len() != distinct.len() || distinct != all {
                problems.push(format!(
                    "{} listed, {} distinct, {} missing",
                    listed.len(),
                    distinct.len(),
                    all.difference(&distinct).count()
                ));
            }
        }
        stop.store(true, Ordering::Release);
        problems
    });
    assert!(problems.is_empty(), "{problems:?}");
}

fn a_scheduled_job_is_not_claimed_early_and_is_claimed_once_due(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let far = queued_job(
        &app,
        json!({"kind": "k", "queue": "sq", "runAt": rfc3339_in(3_600_000), "priority": 9}),
    );
    let j = app.get(&format!("/coordinator/jobs/{far}")).json();
    assert!(ms(&j["runAt"]) > ms(&j["createdAt"]) + 3_000_000);
    // Not claimable early, even with a higher priority than anything else.
    assert!(claim(&app, "sq").is_none());
    let soon_at = rfc3339_in(300);
    let soon = queued_job(&app, json!({"kind": "k", "queue": "sq", "runAt": soon_at}));
    let got = claim_when_due(&app, "sq");
    assert_eq!(got["id"], soon.as_str());
    assert!(ms(&got["startedAt"]) >= ms(&got["runAt"]), "{got}");
    assert!(claim(&app, "sq").is_none());
    assert_eq!(
        app.get(&format!("/coordinator/jobs/{far}")).json()["status"],
        "QUEUED"
    );

    // Dispatch takes runAt too, and the estimate is not before it.
    let at = rfc3339_in(7_200_000);
    let r = app.post_json(
        "/stitcher/dispatch",
        &json!({"issueNumber": 1, "repository": "o/r", "queue": "sq2", "runAt": at}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let est = r.json()["estimatedStartTime"].clone();
    assert!(ms(&est) >= ms(&json!(at)), "{est} before {at}");
    assert!(claim(&app, "sq2").is_none());
    let p = app
        .post_json("/coordinator/jobs", &json!({"kind": "k", "runAt": "soon"}))
        .problem(400);
    assert_eq!(p["field"], "runAt");
}

fn a_retryable_failure_comes_back_after_its_backoff_and_the_old_token_is_refused(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = queued_job(
        &app,
        json!({"kind": "k", "queue": "rt", "maxAttempts": 3,
               "retryBackoff": {"baseMs": 300, "capMs": 300}}),
    );
    let first = claim(&app, "rt").expect("claimed");
    let t1 = first["token"].as_str().expect("token").to_owned();
    let path = format!("/coordinator/jobs/{id}");
    let r = app.with_token(
        &t1,
        "POST",
        &format!("{path}/fail"),
        br#"{"error":"flaky network","retryable":true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["status"], "QUEUED");
    assert_eq!(j["attempts"], 1);
    assert_eq!(j["maxAttempts"], 3);
    assert_eq!(j["error"], "flaky network");
    assert_eq!(j["retryBackoff"], json!({"baseMs": 300, "capMs": 300}));
    let run_at = ms(&j["runAt"]);
    let failed_at = ms(&j["updatedAt"]);
    assert!((failed_at..=failed_at + 300).contains(&run_at), "{j}");
    let last = events(&app, &id).pop().expect("event");
    assert_eq!(last["type"], "retry_scheduled");
    assert_eq!(last["data"]["runAt"], j["runAt"]);
    // The old attempt's token is refused at once.
    assert_eq!(
        app.with_token(&t1, "GET", &path, b"").problem(401)["reason"],
        "revoked"
    );
    // It comes back, not before its runAt.
    let second = claim_when_due(&app, "rt");
    assert_eq!(second["id"], id.as_str());
    assert_eq!(second["attempts"], 2);
    assert!(ms(&second["updatedAt"]) >= run_at);
    let t2 = second["token"].as_str().expect("token");
    assert_eq!(app.with_token(t2, "GET", &path, b"").status, 200);
    assert_eq!(
        app.with_token(&t1, "GET", &path, b"").problem(401)["reason"],
        "revoked"
    );

    // A long backoff keeps it out of reach; a non-retryable failure is final.
    let slow = queued_job(
        &app,
        json!({"kind": "k", "queue": "rt2", "retryBackoff": {"baseMs": 3600000, "capMs": 3600000}}),
    );
    claim(&app, "rt2").expect("claimed");
    let r = app.post_json(
        &format!("/coordinator/jobs/{slow}/fail"),
        &json!({"error": "x", "retryable": true}),
    );
    assert_eq!(r.json()["status"], "QUEUED");
    // (Full jitter may pick a delay near 0; the run time says which.)
    if ms(&r.json()["runAt"]) > crate::helpers::now_secs() * 1000 + 60_000 {
        assert!(claim(&app, "rt2").is_none());
    }
    let other = queued_job(&app, json!({"kind": "k", "queue": "rt3"}));
    claim(&app, "rt3").expect("claimed");
    let r = app.post_json(
        &format!("/coordinator/jobs/{other}/fail"),
        &json!({"error": "bad input"}),
    );
    assert_eq!(r.json()["status"], "FAILED");
}

fn exhausted_attempts_fail_for_good(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = queued_job(
        &app,
        json!({"kind": "k", "queue": "ex", "maxAttempts": 2, "retryBackoff": {"baseMs": 1, "capMs": 1}}),
    );
    for attempt in 1..=2 {
        let c = claim_when_due(&app, "ex");
        assert_eq!(c["attempts"], attempt);
        let r = app.post_json(
            &format!("/coordinator/jobs/{id}/fail"),
            &json!({"error": format!("try {attempt}"), "retryable": true}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let want = if attempt == 1 { "QUEUED" } else { "FAILED" };
        assert_eq!(r.json()["status"], want);
    }
    let last = events(&app, &id).pop().expect("event");
    assert_eq!(last["type"], "failed");
    assert_eq!(last["data"]["retryable"], true);
    assert!(claim(&app, "ex").is_none());
}

fn an_expired_lease_follows_the_retry_rule(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| {
        c.lease = Duration::from_millis(1);
        c.housekeeping_interval = Duration::from_millis(50);
    }) else {
        return;
    };
    let id = queued_job(
        &app,
        json!({"kind": "k", "queue": "le", "maxAttempts": 2,
               "retryBackoff": {"baseMs": 3600000, "capMs": 3600000}}),
    );
    claim(&app, "le").expect("claimed");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let j = loop {
        let j = app.get(&format!("/coordinator/jobs/{id}")).json();
        if j["status"] != "RUNNING" {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "lease never expired");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(j["status"], "QUEUED");
    let ev = j["events"]
        .as_array()
        .expect("events")
        .last()
        .cloned()
        .expect("event");
    assert_eq!(ev["type"], "lease_expired");
    assert_eq!(ev["data"]["from"], "RUNNING");
    assert_eq!(ev["data"]["to"], "QUEUED");
    assert_eq!(ev["data"]["runAt"], j["runAt"]);
    assert!(ms(&j["runAt"]) >= ms(&ev["createdAt"]));
}

/// `job_transitions_total{to="QUEUED"}` as `/metrics` shows it.
fn queued_transitions(app: &TestApp) -> f64 {
    let text = app.get("/metrics").body;
    text.lines()
        .find_map(|l| l.strip_prefix("coordinator_job_transitions_total{to=\"QUEUED\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A sweep that fails on its second job keeps the first one moved, and announces it:
/// on PostgreSQL each job is its own transaction, so the first was committed, and its
/// wake-up, count and revocation were lost with the error (review, 2026-12-06). The
/// second job's update is refused by a trigger, so the sweep fails there every pass.
fn a_lease_sweep_stopped_part_way_announces_the_jobs_it_moved(b: Backend) {
    use diesel::{Connection, RunQueryDsl};
    let Some(app) = crate::helpers::spawn_app_with(b, |c| {
        c.housekeeping_interval = Duration::from_millis(50);
    }) else {
        return;
    };
    let first = queued_job(&app, json!({"kind": "k", "queue": "sw", "maxAttempts": 3}));
    let second = queued_job(&app, json!({"kind": "k", "queue": "sw", "maxAttempts": 3}));
    let c1 = claim(&app, "sw").expect("first claimed");
    let c2 = claim(&app, "sw").expect("second claimed");
    let mut ids = [c1["id"].as_str(), c2["id"].as_str()];
    ids.sort_unstable();
    let mut want = [Some(first.as_str()), Some(second.as_str())];
    want.sort_unstable();
    assert_eq!(ids, want);
    let before = queued_transitions(&app);
    // Both leases run out at once, the first job's earlier (the sweep's order), and
    // from then on the second job cannot leave RUNNING.
    let sql = |trigger: &str| {
        vec![
            format!("UPDATE jobs SET lease_expires_at = 1 WHERE id = '{first}'"),
            format!("UPDATE jobs SET lease_expires_at = 2 WHERE id = '{second}'"),
            trigger.to_owned(),
        ]
    };
    match b {
        Backend::Sqlite => {
            let path = app.db.sqlite_path().expect("sqlite path");
            let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
            diesel::sql_query("PRAGMA busy_timeout = 10000")
                .execute(&mut c)
                .expect("busy timeout");
            let trigger = format!(
                "CREATE TRIGGER refuse_second BEFORE UPDATE ON jobs \
                 WHEN OLD.id = '{second}' AND OLD.status = 'RUNNING' \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            );
            c.transaction(|c| {
                for q in sql(&trigger) {
                    diesel::sql_query(q).execute(c)?;
                }
                Ok::<_, diesel::result::Error>(())
            })
            .expect("set up the sweep");
        }
        Backend::Postgres => {
            let mut c = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
            let trigger = format!(
                "CREATE TRIGGER refuse_second BEFORE UPDATE ON jobs FOR EACH ROW \
                 WHEN (OLD.id = '{second}' AND OLD.status = 'RUNNING') \
                 EXECUTE FUNCTION refuse_by_test()"
            );
            c.transaction(|c| {
                diesel::sql_query(
                    "CREATE FUNCTION refuse_by_test() RETURNS trigger LANGUAGE plpgsql \
                     AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                )
                .execute(c)?;
                for q in sql(&trigger) {
                    diesel::sql_query(q).execute(c)?;
                }
                Ok::<_, diesel::result::Error>(())
            })
            .expect("set up the sweep");
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let j = app.get(&format!("/coordinator/jobs/{first}")).json();
        if j["status"] == "QUEUED" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first job never left RUNNING: {}",
            j["status"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Counted once it is committed, by the same pass.
    loop {
        if queued_transitions(&app) >= before + 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first job's move was never counted ({before} before)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let j = app.get(&format!("/coordinator/jobs/{second}")).json();
    assert_eq!(j["status"], "RUNNING", "the trigger held the second job");
    // The first attempt's token is refused at once on this instance.
    let t1 = if c1["id"].as_str() == Some(first.as_str()) {
        &c1
    } else {
        &c2
    };
    let token = t1["token"].as_str().expect("token");
    app.with_token(token, "GET", &format!("/coordinator/jobs/{first}"), b"")
        .problem(401);
}

fn redrive_puts_a_dead_job_back_with_a_fresh_budget(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = queued_job(&app, json!({"kind": "k", "queue": "rd", "maxAttempts": 1}));
    let c = claim(&app, "rd").expect("claimed");
    let t1 = c["token"].as_str().expect("token").to_owned();
    let path = format!("/coordinator/jobs/{id}");
    let r = app.with_token(
        &t1,
        "POST",
        &format!("{path}/fail"),
        br#"{"error":"boom","retryable":true}"#,
    );
    assert_eq!(r.json()["status"], "FAILED", "no attempts left");
    // Terminal: every other route refuses to change it.
    app.post_json(&format!("{path}/complete"), &json!({}))
        .problem(409);
    app.patch_json(&format!("{path}/status"), &json!({"status": "QUEUED"}))
        .problem(409);
    // A job token cannot redrive, even its own job's.
    app.with_token(&t1, "POST", &format!("{path}/retry"), b"")
        .problem(401);
    let live = app.running_job();
    let lt = app.job_token(&live, "w", Duration::from_secs(600));
    app.with_token(&lt, "POST", &format!("/coordinator/jobs/{live}/retry"), b"")
        .problem(403);
    app.post_json(&format!("/coordinator/jobs/{live}/retry"), &json!({}))
        .problem(409);

    let r = app.post_json(&format!("{path}/retry"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["status"], "QUEUED");
    assert_eq!(j["attempts"], 1);
    assert_eq!(j["maxAttempts"], 2);
    assert!(j["error"].is_null() && j["finishedAt"].is_null());
    let ev = events(&app, &id).pop().expect("event");
    assert_eq!(ev["type"], "redriven");
    assert_eq!(ev["data"]["from"], "FAILED");
    assert_eq!(ev["data"]["to"], "QUEUED");
    // The next worker's token works; the dead attempt's stays refused.
    let c2 = claim(&app, "rd").expect("claimed again");
    assert_eq!(c2["attempts"], 2);
    let t2 = c2["token"].as_str().expect("token");
    let r = app.with_token(t2, "POST", &format!("{path}/complete"), b"{}");
    assert_eq!(r.status, 200, "{}", r.body);
    app.with_token(&t1, "GET", &path, b"").problem(401);
    // COMPLETED is not redriven; CANCELLED is.
    app.post_json(&format!("{path}/retry"), &json!({}))
        .problem(409);
    let cancelled = app.create_job(&json!({"kind": "k"}));
    app.post_json(&format!("/coordinator/jobs/{cancelled}/cancel"), &json!({}));
    let r = app.post_json(&format!("/coordinator/jobs/{cancelled}/retry"), &json!({}));
    assert_eq!(r.json()["status"], "QUEUED");
}

fn cancel_while_running_stops_the_worker_and_revokes_its_token(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = queued_job(&app, json!({"kind": "k", "queue": "cx"}));
    let c = claim(&app, "cx").expect("claimed");
    let token = c["token"].as_str().expect("token").to_owned();
    let path = format!("/coordinator/jobs/{id}");
    // The worker's own token cannot cancel, on `/cancel` nor through the status route
    // (where it may hand the job back, complete or fail it).
    app.with_token(&token, "POST", &format!("{path}/cancel"), b"{}")
        .problem(403);
    let p = app
        .with_token(
            &token,
            "PATCH",
            &format!("{path}/status"),
            br#"{"status":"CANCELLED","message":"by token"}"#,
        )
        .problem(403);
    assert!(
        p["detail"].as_str().unwrap_or("").contains("cannot cancel"),
        "{p}"
    );
    // Nor release a job not yet claimed: a token issued for a PENDING job (attempt 0)
    // cannot move it to QUEUED (an operator's move; for a RUNNING job it is a hand back).
    let held = app.create_job(&json!({"kind": "k", "queue": "cx"}));
    let early = app.job_token(&held, "w0", Duration::from_secs(600));
    let r = app.with_token(
        &early,
        "PATCH",
        &format!("/coordinator/jobs/{held}/status"),
        br#"{"status":"QUEUED"}"#,
    );
    r.problem(409);
    let r = app.get(&format!("/coordinator/jobs/{held}"));
    assert_eq!(r.json()["status"], "PENDING", "{}", r.body);
    // Nor make a claim's or an operator's moves.
    for to in ["RUNNING", "PENDING"] {
        app.with_token(
            &token,
            "PATCH",
            &format!("{path}/status"),
            format!(r#"{{"status":"{to}"}}"#).as_bytes(),
        )
        .problem(403);
    }
    let r = app.get(&path);
    assert_eq!(r.json()["status"], "RUNNING", "{}", r.body);
    // A bad reason is a 400 naming `reason` (it said `message`, a field the body lacks).
    for bad in ["x".repeat(4097), "a\u{0}b".to_owned()] {
        let r = app.post_json(&format!("{path}/cancel"), &json!({"reason": bad}));
        assert_eq!(r.problem(400)["field"], "reason");
    }
    let r = app.post_json(&format!("{path}/cancel"), &json!({"reason": "superseded"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "CANCELLED");
    assert_eq!(r.json()["message"], "superseded");
    // The worker's next call says cancelled, not a generic conflict.
    for (method, route, body) in [
        ("POST", "heartbeat", json!({})),
        ("PATCH", "progress", json!({"percent": 50})),
        ("POST", "complete", json!({})),
    ] {
        let r = app.request(
            method,
            &format!("{path}/{route}"),
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        let p = r.problem(409);
        assert_eq!(
            p["type"], "urn:coordinator:problem:job-cancelled",
            "{route}"
        );
    }
    // Its token is revoked at once, and the worker holding it is told why: every call
    // it makes with it (progress, heartbeat, complete, fail, read) is the cancelled
    // problem, not a 401 that would look like a credential fault.
    for (method, route, body) in [
        ("PATCH", "/progress", r#"{"percent":60}"#),
        ("POST", "/heartbeat", "{}"),
        ("POST", "/complete", r#"{"result":1}"#),
        ("POST", "/fail", r#"{"error":"x"}"#),
        ("GET", "", ""),
    ] {
        let r = app.with_token(&token, method, &format!("{path}{route}"), body.as_bytes());
        let p = r.problem(409);
        assert_eq!(
            p["type"], "urn:coordinator:problem:job-cancelled",
            "{route}"
        );
        assert!(p.get("reason").is_none(), "{route}: {p}");
    }
    // Anywhere else it is a revoked token like any other: a 409 there would say that
    // other job, or the list, was cancelled (review, 2026-12-06).
    let other = app.create_job(&json!({"kind": "k", "queue": "cz"}));
    for (method, target, body) in [
        (
            "PATCH",
            format!("/coordinator/jobs/{other}/progress"),
            r#"{"percent":1}"#,
        ),
        ("GET", format!("/coordinator/jobs/{other}"), ""),
        ("GET", "/coordinator/jobs".to_owned(), ""),
        ("GET", "/coordinator/health".to_owned(), ""),
        (
            "POST",
            "/coordinator/queues/cz/claim".to_owned(),
            r#"{"worker":"w"}"#,
        ),
    ] {
        let r = app.with_token(&token, method, &target, body.as_bytes());
        let p = r.problem(401);
        assert_eq!(p["reason"], "revoked", "{target}: {p}");
    }
    let j = app.get(&path).json();
    assert_eq!(j["status"], "CANCELLED");
    assert!(j["result"].is_null() && j["progress"] != 60, "{j}");
    // Revocation is not weakened: a revoked token of a job still RUNNING stays a 401.
    let live = queued_job(&app, json!({"kind": "k", "queue": "cy"}));
    let c = claim(&app, "cy").expect("claimed");
    let live_token = c["token"].as_str().expect("token").to_owned();
    let live_path = format!("/coordinator/jobs/{live}");
    assert_eq!(
        app.with_token(&live_token, "GET", &live_path, b"").status,
        200
    );
    let r = app.post_json("/admin/tokens/revoke", &json!({"jti": jti_of(&live_token)}));
    assert_eq!(r.status, 200, "{}", r.body);
    for (method, route, body) in [
        ("PATCH", "/progress", r#"{"percent":60}"#),
        ("POST", "/heartbeat", "{}"),
        ("POST", "/complete", "{}"),
    ] {
        let r = app.with_token(
            &live_token,
            method,
            &format!("{live_path}{route}"),
            body.as_bytes(),
        );
        assert_eq!(r.problem(401)["reason"], "revoked", "{route}");
    }
    assert_eq!(app.get(&live_path).json()["status"], "RUNNING");
    let ev = events(&app, &id).pop().expect("event");
    assert_eq!(ev["type"], "cancelled");
    assert_eq!(ev["data"]["from"], "RUNNING");
    assert_eq!(ev["data"]["reason"], "superseded");
    // Cancelling again, or a finished job, is a conflict; an unknown job a 404.
    app.post_json(&format!("{path}/cancel"), &json!({}))
        .problem(409);
    let done = app.running_job();
    app.post_json(&format!("/coordinator/jobs/{done}/complete"), &json!({}));
    let p = app
        .post_json(&format!("/coordinator/jobs/{done}/cancel"), &json!({}))
        .problem(409);
    assert_eq!(p["type"], "urn:coordinator:problem:conflict");
    let unknown = uuid::Uuid::now_v7();
    app.post_json(&format!("/coordinator/jobs/{unknown}/cancel"), &json!({}))
        .problem(404);
    // PENDING and QUEUED jobs cancel too.
    let pending = app.create_job(&json!({"kind": "k"}));
    let r = app.request(
        "POST",
        &format!("/coordinator/jobs/{pending}/cancel"),
        &[],
        b"",
    );
    assert_eq!(r.json()["status"], "CANCELLED");
}

fn heartbeat_renews_the_lease_without_an_event(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = queued_job(&app, json!({"kind": "k", "queue": "hb"}));
    let c = claim(&app, "hb").expect("claimed");
    let token = c["token"].as_str().expect("token").to_owned();
    let lease0 = ms(&c["leaseExpiresAt"]);
    let path = format!("/coordinator/jobs/{id}");
    let n = events(&app, &id).len();
    let mut last = lease0;
    for _ in 0..5 {
        let r = app.with_token(&token, "POST", &format!("{path}/heartbeat"), b"");
        assert_eq!(r.status, 200, "{}", r.body);
        let h = r.json();
        assert_eq!(h["cancelRequested"], false);
        let lease = ms(&h["leaseExpiresAt"]);
        assert!(lease >= last);
        last = lease;
    }
    let j = app.get(&path).json();
    assert_eq!(ms(&j["leaseExpiresAt"]), last);
    assert_eq!(j["events"].as_array().expect("events").len(), n, "no event");
    // Progress still renews the lease (and is an event).
    let r = app.with_token(
        &token,
        "PATCH",
        &format!("{path}/progress"),
        br#"{"percent":5}"#,
    );
    assert!(ms(&r.json()["leaseExpiresAt"]) >= last);
    // Only while RUNNING; a token for another job is refused.
    let queued = queued_job(&app, json!({"kind": "k", "queue": "hb2"}));
    let p = app
        .post_json(&format!("/coordinator/jobs/{queued}/heartbeat"), &json!({}))
        .problem(409);
    assert_eq!(p["type"], "urn:coordinator:problem:conflict");
    app.with_token(
        &token,
        "POST",
        &format!("/coordinator/jobs/{queued}/heartbeat"),
        b"",
    )
    .problem(403);
}

fn every_status_event_has_from_and_to(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = queued_job(
        &app,
        json!({"kind": "k", "queue": "ev", "retryBackoff": {"baseMs": 1, "capMs": 1}}),
    );
    let path = format!("/coordinator/jobs/{id}");
    claim(&app, "ev").expect("claimed");
    app.patch_json(&format!("{path}/progress"), &json!({"percent": 10}));
    app.post_json(
        &format!("{path}/fail"),
        &json!({"error": "e", "retryable": true}),
    );
    claim_when_due(&app, "ev");
    app.post_json(&format!("{path}/complete"), &json!({"result": 1}));
    let other = app.running_job();
    app.post_json(&format!("/coordinator/jobs/{other}/cancel"), &json!({}));
    app.post_json(&format!("/coordinator/jobs/{other}/retry"), &json!({}));

    let mut types = Vec::new();
    for job in [&id, &other] {
        let j = app.get(&format!("/coordinator/jobs/{job}")).json();
        // Replaying from/to alone reconstructs the status, with no special case.
        let mut status = Value::Null;
        for e in j["events"].as_array().expect("events") {
            types.push(e["type"].as_str().unwrap_or("").to_owned());
            if e["type"] == "progress" {
                assert!(e["data"].get("to").is_none());
                continue;
            }
            assert_eq!(e["data"]["from"], status, "{e}");
            assert!(e["data"]["to"].is_string(), "{e}");
            status = e["data"]["to"].clone();
        }
        assert_eq!(status, j["status"], "{job}");
    }
    for t in [
        "created",
        "status",
        "claimed",
        "progress",
        "retry_scheduled",
        "completed",
        "cancelled",
        "redriven",
    ] {
        assert!(types.iter().any(|x| x == t), "no {t} event in {types:?}");
    }
}

/// Review finding (2026-12-06): every `GET /coordinator/queues` built the whole list
/// (one entry per queue with a job not yet ended; the names are the callers' own). With
/// 100,000 queues a build took ~270 ms and ~12 MB of JSON, and eight `health:read`
/// callers asking in a loop took the instance from 95 to 420 MB RSS and their answers
/// to 1.5 s. Now requests waiting at once share one build, and none gets a list built
/// before it arrived.
fn concurrent_queue_lists_share_one_build(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    for chunk in 0..5 {
        let jobs: Vec<Value> = (0..1000)
            .map(|i| json!({"kind": "k", "queue": format!("lq{chunk}x{i}")}))
            .collect();
        let r = app.post_json("/coordinator/jobs/batch", &json!({"jobs": jobs}));
        assert!(r.status < 300, "batch: {}", r.status);
    }
    const ASKERS: usize = 16;
    let before = app.state.queue_list.builds();
    let start = std::sync::Barrier::new(ASKERS);
    let sizes: Vec<usize> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..ASKERS)
            .map(|_| {
                let (app, start) = (&app, &start);
                sc.spawn(move || {
                    start.wait();
                    let r = app.get("/coordinator/queues");
                    assert_eq!(r.status, 200, "{}", r.body.get(..300).unwrap_or(""));
                    r.json()["queues"].as_array().map_or(0, Vec::len)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("asker"))
            .collect()
    });
    assert!(sizes.iter().all(|n| *n >= 5000), "{sizes:?}");
    let builds = app.state.queue_list.builds() - before;
    assert!(
        builds <= 4,
        "{ASKERS} lists asked for at once took {builds} builds"
    );
    // A change is in the next list: nothing older than the request is served.
    let r = app.patch_json("/coordinator/queues/lq0x0", &json!({"paused": true}));
    assert_eq!(r.status, 200, "{}", r.body);
    let q = app.get("/coordinator/queues").json();
    let paused = q["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "lq0x0")
        .map(|q| q["paused"].clone());
    assert_eq!(paused, Some(json!(true)));
}

fn a_paused_queue_hands_out_nothing(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    for _ in 0..3 {
        queued_job(&app, json!({"kind": "k", "queue": "pq"}));
    }
    let r = app.patch_json("/coordinator/queues/pq", &json!({"paused": true}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["paused"], true);
    assert!(claim(&app, "pq").is_none());
    let q = app.get("/coordinator/queues").json();
    let pq = q["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "pq")
        .cloned()
        .expect("pq listed");
    assert_eq!(pq["paused"], true);
    assert_eq!(
        pq["depth"],
        json!({"PENDING": 0, "QUEUED": 3, "RUNNING": 0})
    );
    assert!(pq["oldestQueuedAgeMs"].as_i64().expect("age") >= 0);
    assert!(pq["maxRunning"].is_null());
    // A limit set later leaves the pause alone; resuming hands jobs out again.
    let r = app.patch_json("/coordinator/queues/pq", &json!({"maxRunning": 2}));
    assert_eq!(r.json()["paused"], true);
    assert!(claim(&app, "pq").is_none());
    let r = app.patch_json("/coordinator/queues/pq", &json!({"paused": false}));
    assert_eq!(r.json()["maxRunning"], 2);
    assert!(claim(&app, "pq").is_some());
    // Admin only, and validated.
    let ops = app.caller("ops", &[Scope::HealthRead, Scope::JobsUpdate]);
    let r = app.signed_by(
        &ops,
        "PATCH",
        "/coordinator/queues/pq",
        &[("content-type", "application/json")],
        br#"{"paused":true}"#,
    );
    r.problem(403);
    let r = app.signed_by(&ops, "GET", "/coordinator/queues", &[], b"");
    assert_eq!(r.status, 200);
    for (body, field) in [
        (json!({"maxRunning": 0}), "maxRunning"),
        (json!({"paused": "yes"}), "paused"),
        (json!({"speed": 1}), "body"),
    ] {
        let p = app.patch_json("/coordinator/queues/pq", &body).problem(400);
        if field != "body" {
            assert_eq!(p["field"], field);
        }
    }
    app.patch_json("/coordinator/queues/a%20b", &json!({}))
        .problem(400);
}

fn max_running_holds_with_concurrent_claimers_on_two_instances(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let second = app.sibling();
    for _ in 0..40 {
        queued_job(&app, json!({"kind": "k", "queue": "mr"}));
    }
    let r = app.patch_json("/coordinator/queues/mr", &json!({"maxRunning": 3}));
    assert_eq!(r.status, 200, "{}", r.body);
    let apps = [Arc::new(app), Arc::new(second)];

    // Phase 1: nothing finishes, so exactly three claims may succeed of all 16 × 3.
    let won = Arc::new(AtomicI64::new(0));
    std::thread::scope(|s| {
        for t in 0..16 {
            let app = apps[t % 2].clone();
            let won = won.clone();
            s.spawn(move || {
                for _ in 0..3 {
                    if claim(&app, "mr").is_some() {
                        won.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(won.load(Ordering::SeqCst), 3);
    let running = |app: &TestApp| ids(&list(app, "?queue=mr&status=RUNNING")).len();
    assert_eq!(running(&apps[0]), 3);

    // Phase 2: claimers finish their jobs and claim again. `holding` counts jobs a
    // claimer holds; it rises after the claim committed and falls before the complete
    // is sent, so it never exceeds the server's RUNNING count.
    let holding = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let claims = Arc::new(AtomicI64::new(0));
    for id in ids(&list(&apps[0], "?queue=mr&status=RUNNING")) {
        apps[0].post_json(&format!("/coordinator/jobs/{id}/complete"), &json!({}));
    }
    std::thread::scope(|s| {
        for t in 0..16 {
            let app = apps[t % 2].clone();
            let (holding, peak, claims) = (holding.clone(), peak.clone(), claims.clone());
            s.spawn(move || {
                for _ in 0..6 {
                    let Some(job) = claim(&app, "mr") else {
                        continue;
                    };
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    claims.fetch_add(1, Ordering::SeqCst);
                    holding.fetch_sub(1, Ordering::SeqCst);
                    let r = app.post_json(
                        &format!("/coordinator/jobs/{}/complete", job["id"].as_str().unwrap()),
                        &json!({}),
                    );
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            });
        }
    });
    assert!(
        peak.load(Ordering::SeqCst) <= 3,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(claims.load(Ordering::SeqCst) > 3, "the queue kept moving");
    assert!(running(&apps[0]) <= 3);
}

fn batch_of_1000_with_duplicates(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let item = |i: usize| {
        let mut j = json!({"kind": "bulk", "queue": "bt", "payload": {"i": i}});
        if i < 10 {
            j["idempotencyKey"] = json!(format!("key-{i}"));
        }
        j
    };
    // 990 distinct jobs, then the first ten again (same keys, same contents).
    let mut jobs: Vec<Value> = (0..990).map(item).collect();
    jobs.extend((0..10).map(item));
    let r = app.post_json("/coordinator/jobs/batch", &json!({"jobs": jobs}));
    assert_eq!(r.status, 200, "{}", r.body);
    let out = r.json()["jobs"].as_array().expect("jobs").clone();
    assert_eq!(out.len(), 1000);
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o["created"], i < 990, "item {i}");
        assert_eq!(o["job"]["payload"]["i"], json!(i % 990));
        assert_eq!(o["job"]["status"], "PENDING");
    }
    for i in 0..10 {
        assert_eq!(out[990 + i]["job"]["id"], out[i]["job"]["id"]);
    }
    let distinct: HashSet<&str> = out.iter().filter_map(|o| o["job"]["id"].as_str()).collect();
    assert_eq!(distinct.len(), 990);
    let count = |app: &TestApp| {
        let mut n = 0;
        let mut cursor = String::new();
        loop {
            let page = list(app, &format!("?queue=bt&limit=500{cursor}"));
            n += ids(&page).len();
            match page["nextCursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return n,
            }
        }
    };
    assert_eq!(count(&app), 990);

    // Sent again: nothing new for the keyed jobs.
    let again: Vec<Value> = (0..10).map(item).collect();
    let r = app.post_json("/coordinator/jobs/batch", &json!({"jobs": again}));
    assert!(r.json()["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .all(|o| o["created"] == false));
    // A key reused with other contents refuses the whole batch: nothing is created.
    let mut clash = vec![json!({"kind": "bulk", "queue": "bt"})];
    clash.push(json!({"kind": "other", "queue": "bt", "idempotencyKey": "key-3"}));
    let p = app
        .post_json("/coordinator/jobs/batch", &json!({"jobs": clash}))
        .problem(409);
    assert!(p["detail"].as_str().unwrap().contains("jobs[1]"), "{p}");
    assert_eq!(count(&app), 990);
    // Limits and per-item validation.
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"kind": "k"})).collect();
    app.post_json("/coordinator/jobs/batch", &json!({"jobs": too_many}))
        .problem(400);
    app.post_json("/coordinator/jobs/batch", &json!({"jobs": []}))
        .problem(400);
    let p = app
        .post_json(
            "/coordinator/jobs/batch",
            &json!({"jobs": [{"kind": "k"}, {"kind": "k", "priority": 5000}]}),
        )
        .problem(400);
    assert_eq!(p["field"], "jobs[1].priority");
}

// Not a check: prints list-page latency at 100 and 10,000 jobs (run with
// `cargo test --release --test api measure_list -- --ignored --nocapture`).
inventory::submit! {
    crate::helpers::Test::new(module_path!(), "sqlite", "measure_list_latency", || {
        measure_list_latency(Backend::Sqlite)
    })
    .measurement()
}
inventory::submit! {
    crate::helpers::Test::new(module_path!(), "postgres", "measure_list_latency", || {
        measure_list_latency(Backend::Postgres)
    })
    .on_postgres()
    .measurement()
}

fn measure_list_latency(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let mut total = 0;
    for target in [100, 10_000] {
        while total < target {
            let n = (target - total).min(1000);
            let jobs: Vec<Value> = (0..n)
                .map(|i| json!({"kind": format!("k{}", i % 5), "queue": format!("q{}", i % 4)}))
                .collect();
            let r = app.post_json("/coordinator/jobs/batch", &json!({"jobs": jobs}));
            assert_eq!(r.status, 200, "{}", r.body);
            total += n;
        }
        // A cursor from the middle of the walk, for a deep page.
        let mut cursor = String::new();
        for _ in 0..(total / 2 / 50) {
            let page = list(&app, &format!("?limit=50{cursor}"));
            match page["nextCursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        for (name, q) in [
            ("first page, no filter", "?limit=50".to_owned()),
            ("deep page, no filter", format!("?limit=50{cursor}")),
            (
                "queue + status",
                "?limit=50&queue=q1&status=PENDING".to_owned(),
            ),
            (
                "kind, 2 statuses",
                "?limit=50&kind=k2&status=PENDING&status=QUEUED".to_owned(),
            ),
        ] {
            let mut ms: Vec<f64> = (0..100)
                .map(|_| {
                    let t = std::time::Instant::now();
                    let r = app.get(&format!("/coordinator/jobs{q}"));
                    assert_eq!(r.status, 200);
                    t.elapsed().as_secs_f64() * 1000.0
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            eprintln!(
                "{b:?} {total} jobs, {name}: median {:.2} ms, p95 {:.2} ms",
                ms[50], ms[95]
            );
        }
    }
}

/// Claim `queue` on `app`, then hand the job back and claim it again: (job id, the first
/// attempt's token, the second's).
fn two_attempts(app: &TestApp, queue: &str) -> (String, String, String) {
    let id = queued_job(app, json!({"kind": "k", "queue": queue}));
    let first = claim(app, queue).expect("claimed");
    assert_eq!(first["attempts"], 1, "{first}");
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let second = claim(app, queue).expect("claimed again");
    assert_eq!(second["attempts"], 2, "{second}");
    let token = |v: &Value| v["token"].as_str().expect("token").to_owned();
    (id, token(&first), token(&second))
}

/// A job token is checked when its request is authenticated, and its write runs a
/// moment later: by then the job may have been handed back and claimed again. Each
/// write a token makes (progress, alone and in a batch; heartbeat; status, complete,
/// fail) applies only while the job is still on the token's attempt, else the store
/// answers `StaleAttempt` (401 `revoked`) and writes nothing. Driven at the store, as a
/// write whose authentication came just before the hand-back.
fn a_token_writes_only_into_its_own_attempt(b: Backend) {
    use coordinator::error::StoreError;
    use coordinator::jobs::model::{Change, JobId, Terms};
    use coordinator::jobs::repo::{self, ProgressReport};
    let Some(app) = crate::app!(b) else { return };
    let (id, _, _) = two_attempts(&app, "fence");
    let job = JobId::parse(&id, "id").expect("id");
    let db = app.state.db.clone();
    let state = app.state.clone();
    let changes = [
        Change::Progress {
            percent: 10,
            message: Some("from attempt 1".into()),
        },
        Change::Status {
            to: coordinator::jobs::JobStatus::Queued,
            message: None,
        },
        Change::Complete {
            result: Some(json!({"by": "attempt 1"})),
        },
        Change::Fail {
            error: "attempt 1".into(),
            gate_results: None,
            retryable: false,
        },
    ];
    actix_web::rt::System::new().block_on(async move {
        for change in changes {
            let (j, what) = (job.clone(), format!("{change:?}"));
            let r = db
                .write(move |conn| {
                    repo::apply(conn, &j, &change, Terms::with_lease_ms(60_000), Some(1))
                })
                .await;
            assert!(matches!(r, Err(StoreError::StaleAttempt)), "{what}: {r:?}");
        }
        let j = job.clone();
        let r = db
            .write(move |conn| repo::heartbeat(conn, &j, 60_000, Some(1)))
            .await;
        assert!(
            matches!(r, Err(StoreError::StaleAttempt)),
            "heartbeat: {r:?}"
        );
        // A progress report through the progress log (PostgreSQL's batch, SQLite's
        // writer): refused for attempt 1, written for attempt 2.
        let report = |attempt: i32, percent: i32| ProgressReport {
            id: job.clone(),
            percent,
            message: None,
            terms: Terms::with_lease_ms(60_000),
            attempt: Some(attempt),
            record: None,
        };
        let r = state.progress.report(report(1, 20)).await;
        assert!(
            matches!(r, Err(StoreError::StaleAttempt)),
            "progress log: {r:?}"
        );
        let row = state
            .progress
            .report(report(2, 30))
            .await
            .expect("attempt 2");
        assert_eq!(row.progress, 30);
        let j = job.clone();
        db.write(move |conn| repo::heartbeat(conn, &j, 60_000, Some(2)))
            .await
            .expect("attempt 2's heartbeat");
    });
    // Nothing of attempt 1 was written: the job runs attempt 2, whose report is the
    // only progress event.
    let j = app.get(&format!("/coordinator/jobs/{id}")).json();
    assert_eq!(
        (j["status"].as_str(), j["attempts"].as_i64()),
        (Some("RUNNING"), Some(2)),
        "{j}"
    );
    let progress: Vec<&Value> = j["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "progress")
        .collect();
    assert_eq!(progress.len(), 1, "{progress:?}");
    assert_eq!(progress[0]["data"]["percent"], 30);
}

/// The same race over HTTP, across two instances: the instance that did not write the
/// hand-back learns of the old token's revocation only at its next poll, so it lets the
/// token through authentication; the write must still refuse it (401 `revoked`), and
/// the new worker's token completes the job.
fn an_earlier_attempts_token_is_refused_on_every_instance(b: Backend) {
    let Some(a) = crate::app!(b) else { return };
    let other = a.sibling();
    for round in 0..3 {
        let (id, old, new) = two_attempts(&a, &format!("fence-x{round}"));
        let path = format!("/coordinator/jobs/{id}");
        for (method, route, body) in [
            ("PATCH", "/progress", r#"{"percent":60}"#),
            ("POST", "/heartbeat", "{}"),
            ("POST", "/complete", r#"{"result":{"by":"old"}}"#),
            ("PATCH", "/status", r#"{"status":"QUEUED"}"#),
        ] {
            for app in [&other, &a] {
                let r = app.with_token(&old, method, &format!("{path}{route}"), body.as_bytes());
                assert_eq!(r.problem(401)["reason"], "revoked", "{route}: {}", r.body);
            }
        }
        let r = other.with_token(
            &new,
            "POST",
            &format!("{path}/complete"),
            br#"{"result":{"by":"new"}}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        // At once on the instance that did not see the job end (its revocation arrives
        // within a second): 401 `revoked`, as on the one that did, not a 409.
        for (method, route, body) in [
            ("PATCH", "/progress", r#"{"percent":99}"#),
            ("POST", "/heartbeat", "{}"),
            ("POST", "/complete", r#"{"result":{"by":"again"}}"#),
        ] {
            let r = a.with_token(&new, method, &format!("{path}{route}"), body.as_bytes());
            assert_eq!(r.problem(401)["reason"], "revoked", "{route}: {}", r.body);
        }
        let j = a.get(&path).json();
        assert_eq!(j["result"], json!({"by": "new"}), "{j}");
    }
}

/// Two batches that share idempotency keys, in opposite orders, at once: both are
/// answered (no deadlock, no 500), and each key names one job.
fn overlapping_keyed_batches_never_deadlock(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    for round in 0..10 {
        let keys: Vec<String> = (0..4).map(|k| format!("dl-{round}-{k}")).collect();
        let batch = |order: Vec<&String>| {
            let jobs: Vec<Value> = order
                .into_iter()
                .map(|k| json!({"kind": "k", "queue": "dl", "idempotencyKey": k}))
                .collect();
            json!({ "jobs": jobs })
        };
        let forward = batch(keys.iter().collect());
        let backward = batch(keys.iter().rev().collect());
        let answers: Vec<crate::helpers::Resp> = std::thread::scope(|s| {
            let f = s.spawn(|| app.post_json("/coordinator/jobs/batch", &forward));
            let r = s.spawn(|| app.post_json("/coordinator/jobs/batch", &backward));
            vec![f.join().expect("forward"), r.join().expect("backward")]
        });
        // Answers come in request order: the second batch's keys are reversed.
        let mut ids: HashMap<String, String> = HashMap::new();
        for (r, order) in answers
            .iter()
            .zip([keys.clone(), keys.iter().rev().cloned().collect()])
        {
            assert_eq!(r.status, 200, "{}", r.body);
            let items = r.json()["jobs"].as_array().expect("jobs").clone();
            assert_eq!(items.len(), order.len());
            for (item, key) in items.iter().zip(order) {
                let id = item["job"]["id"].as_str().expect("id").to_owned();
                let known = ids.entry(key.clone()).or_insert_with(|| id.clone());
                assert_eq!(*known, id, "key {key} names two jobs");
            }
        }
        assert_eq!(ids.len(), keys.len());
    }
}

/// A claim from a queue with a long backlog (3 000 QUEUED jobs of one priority and one
/// creation time, beside 3 000 finished ones) takes the job its order says (priority,
/// then age, then id: the smallest id here), and the next claim the next one. On
/// PostgreSQL the claim's pick fetches a handful of rows of `jobs`
/// (`pg_stat_xact_user_tables`, inside the pick's transaction), not the backlog: before
/// the partial index `jobs_queued` no index had the claim's whole order, and the planner
/// (with no column statistics, as with autovacuum off) fetched and sorted every QUEUED
/// job of the queue on every claim (a 3-minute soak of whole lives: 2 400 of them,
/// 18 ms a claim); with the index alone it could still prefer a bitmap scan of all of
/// them and a sort. SQLite's plan is checked in `db::queue`'s unit tests.
fn a_claim_from_a_long_queue_reads_its_first_job_only(b: Backend) {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, RunQueryDsl};
    let Some(app) = crate::app!(b) else { return };
    const N: usize = 3_000;
    let id_of = |n: usize| format!("00000000-0000-4000-8000-{n:012}");
    // The QUEUED ones in descending id order, so that the table's order is not the
    // claim's; then as many COMPLETED ones in the same queue.
    let rows: Vec<String> = (1..=N)
        .rev()
        .map(|n| (id_of(n), "QUEUED"))
        .chain((1..=N).map(|n| (format!("10000000-0000-4000-8000-{n:012}"), "COMPLETED")))
        .map(|(id, status)| {
            format!("('{id}', 'k', 'deep', '{status}', '{{}}', 'tester', 1000, 1000, 1000)")
        })
        .collect();
    for chunk in rows.chunks(500) {
        let sql = format!(
            "INSERT INTO jobs (id, kind, queue, status, payload, created_by, created_at, \
             updated_at, run_at) VALUES {}",
            chunk.join(", ")
        );
        actix_web::rt::System::new()
            .block_on(app.state.db.write(move |c| {
                diesel::sql_query(sql).execute(c)?;
                Ok(())
            }))
            .expect("backlog");
    }
    if b == Backend::Postgres {
        #[derive(diesel::QueryableByName)]
        struct Read {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            fetched: i64,
        }
        let mut c = coordinator::db::DbConnection::establish(&app.db.url).expect("open postgres");
        // As housekeeping's vacuum does: the planner learns the table's size (and still
        // has no column statistics).
        c.batch_execute("VACUUM jobs").expect("vacuum");
        c.batch_execute("BEGIN").expect("begin");
        let picked: coordinator::jobs::row::JobRow =
            coordinator::db::queue::lock_next_queued(&mut c, "deep")
                .expect("pick")
                .expect("a job");
        let read: Read = diesel::sql_query(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS fetched \
             FROM pg_stat_xact_user_tables WHERE relname = 'jobs'",
        )
        .get_result(&mut c)
        .expect("reads");
        // Not kept: the claims below take it over HTTP.
        c.batch_execute("ROLLBACK").expect("rollback");
        assert_eq!(picked.id, id_of(1));
        assert!(
            read.fetched <= 10,
            "the pick fetched {} rows of jobs for one",
            read.fetched
        );
    }
    let first = claim(&app, "deep").expect("a job");
    assert_eq!(first["id"], id_of(1).as_str());
    let second = claim(&app, "deep").expect("a job");
    assert_eq!(second["id"], id_of(2).as_str());
}
