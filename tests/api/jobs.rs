//! The job API: life cycle, state machine over HTTP, idempotency, concurrency, bad input.

use serde_json::json;

use crate::backend_tests;
use crate::helpers::Backend;

backend_tests!(
    job_life_cycle_records_every_event,
    create_defaults_and_validation,
    idempotency_key_returns_the_first_job,
    a_replay_shows_a_key_without_jobs_read_nothing_a_worker_wrote,
    concurrent_idempotent_creates_make_one_job,
    illegal_transitions_are_conflicts,
    progress_only_while_running,
    a_progress_report_writes_the_row_its_event_and_its_notification,
    concurrent_progress_updates_serialize,
    bad_input_names_the_field,
    unknown_job_and_route_are_404,
    body_over_the_limit_is_413,
    a_job_read_keeps_its_newest_events_and_says_when_older_ones_were_left_out,
);

fn job_life_cycle_records_every_event(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = app.create_job(
        &json!({"kind": "build", "queue": "ci", "priority": 5, "payload": {"sha": "abc"}}),
    );
    let r = app.get(&format!("/coordinator/jobs/{id}"));
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["status"], "PENDING");
    assert_eq!(j["queue"], "ci");
    assert_eq!(j["priority"], 5);
    assert_eq!(j["payload"], json!({"sha": "abc"}));

    for s in ["QUEUED", "RUNNING"] {
        let r = app.patch_json(
            &format!("/coordinator/jobs/{id}/status"),
            &json!({"status": s, "message": format!("to {s}")}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["status"], s);
    }
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/progress"),
        &json!({"percent": 40, "message": "compiling"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["progress"], 40);
    let r = app.post_json(
        &format!("/coordinator/jobs/{id}/complete"),
        &json!({"result": {"artifact": "x.tar"}}),
    );
    assert_eq!(r.status, 200);
    let done = r.json();
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["result"], json!({"artifact": "x.tar"}));
    assert_eq!(done["attempts"], 1);
    assert!(done["finishedAt"].is_string() && done["startedAt"].is_string());

    let j = app.get(&format!("/coordinator/jobs/{id}")).json();
    let events = j["events"].as_array().expect("events");
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        ["created", "status", "status", "progress", "completed"]
    );
    assert_eq!(done["progress"], 100);
    // Completed through the status route: progress is 100 there too (review,
    // 2026-12-06: it stayed where the worker left it).
    let other = app.create_job(&json!({"kind": "build"}));
    for s in ["QUEUED", "RUNNING"] {
        app.patch_json(
            &format!("/coordinator/jobs/{other}/status"),
            &json!({"status": s}),
        );
    }
    app.patch_json(
        &format!("/coordinator/jobs/{other}/progress"),
        &json!({"percent": 40}),
    );
    let r = app.patch_json(
        &format!("/coordinator/jobs/{other}/status"),
        &json!({"status": "COMPLETED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["progress"], 100, "{}", r.body);
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(events[2]["data"]["from"], "QUEUED");

    // A failed job keeps its error and gate results.
    let id2 = app.running_job();
    let r = app.post_json(
        &format!("/coordinator/jobs/{id2}/fail"),
        &json!({"error": "tests failed", "gateResults": {"lint": "ok"}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let f = r.json();
    assert_eq!(f["status"], "FAILED");
    assert_eq!(f["error"], "tests failed");
    assert_eq!(f["gateResults"], json!({"lint": "ok"}));
}

fn create_defaults_and_validation(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let r = app.post_json("/coordinator/jobs", &json!({"kind": "k"}));
    assert_eq!(r.status, 201);
    let j = r.json();
    assert_eq!(j["queue"], "default");
    assert_eq!(j["priority"], 0);
    assert_eq!(j["payload"], json!({}));
    assert_eq!(j["maxAttempts"], 3);
    assert_eq!(j["status"], "PENDING");
    let id = j["id"].as_str().expect("id");
    assert_eq!(
        uuid::Uuid::parse_str(id).expect("uuid").get_version_num(),
        7
    );
    assert!(j["createdAt"].as_str().expect("ts").ends_with('Z'));
}

fn idempotency_key_returns_the_first_job(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let body = json!({"kind": "deploy"}).to_string();
    let h = [
        ("content-type", "application/json"),
        ("Idempotency-Key", "req-1"),
    ];
    let first = app.request("POST", "/coordinator/jobs", &h, body.as_bytes());
    assert_eq!(first.status, 201);
    let again = app.request("POST", "/coordinator/jobs", &h, body.as_bytes());
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.json()["id"], again.json()["id"]);
    // The same key with another body is a conflict, and makes no job.
    let other = app.request(
        "POST",
        "/coordinator/jobs",
        &h,
        json!({"kind": "other"}).to_string().as_bytes(),
    );
    other.problem(409);
    // Another key makes another job.
    let h2 = [
        ("content-type", "application/json"),
        ("Idempotency-Key", "req-2"),
    ];
    let third = app.request("POST", "/coordinator/jobs", &h2, body.as_bytes());
    assert_ne!(third.json()["id"], first.json()["id"]);
}

/// An idempotent replay answers with the job as it is now. A key that may create jobs
/// but not read them (`jobs:create` without `jobs:read`) must not learn through a
/// replay what it could not `GET`: the message, result, error and gate results its
/// caller's workers wrote (fifth security review, 2026-12-07: a create-only key that
/// knew a deterministic key and body, `build-<sha>`, read the finished job's result).
/// A key holding `jobs:read` still gets the whole job; single creates and batches alike.
fn a_replay_shows_a_key_without_jobs_read_nothing_a_worker_wrote(b: Backend) {
    use coordinator::auth::{credentials, Scope};
    let Some(app) = crate::app!(b) else { return };
    let all = [Scope::JobsCreate, Scope::JobsRead, Scope::JobsUpdate];
    let full = app.api_key("producer", &all);
    let create_only =
        credentials::issue_key(&app.state.db, "producer", Some(&[Scope::JobsCreate]), None)
            .expect("key")
            .key
            .expose_secret()
            .to_owned();
    let send = |key: &str, method: &str, path: &str, extra: &[(&str, &str)], body: &str| {
        let mut h = vec![("x-api-key", key), ("content-type", "application/json")];
        h.extend_from_slice(extra);
        app.raw(method, path, &h, body.as_bytes())
    };
    // The create-only key cannot read a job.
    let body = json!({"kind": "build", "queue": "rp", "payload": {"sha": "abc"}}).to_string();
    let idem = [("Idempotency-Key", "build-abc")];
    let first = send(&full, "POST", "/coordinator/jobs", &idem, &body);
    assert_eq!(first.status, 201, "{}", first.body);
    let id = first.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(
        send(
            &create_only,
            "GET",
            &format!("/coordinator/jobs/{id}"),
            &[],
            ""
        )
        .status,
        403
    );
    // Its worker runs it to the end (a message, then a result).
    let finish = |id: &str| {
        for (s, msg) in [("QUEUED", "queued"), ("RUNNING", "token=hunter2")] {
            let r = send(
                &full,
                "PATCH",
                &format!("/coordinator/jobs/{id}/status"),
                &[],
                &json!({"status": s, "message": msg}).to_string(),
            );
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let r = send(
            &full,
            "POST",
            &format!("/coordinator/jobs/{id}/complete"),
            &[],
            &json!({"result": {"artifact": "s3://private/x.tar"}}).to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    };
    finish(&id);
    let outcome = |j: &serde_json::Value| {
        (
            j["message"].clone(),
            j["result"].clone(),
            j["error"].clone(),
            j["gateResults"].clone(),
        )
    };
    let nothing = (json!(null), json!(null), json!(null), json!(null));
    let replay = send(&create_only, "POST", "/coordinator/jobs", &idem, &body);
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let j = replay.json();
    assert_eq!(
        (j["id"].as_str(), j["status"].as_str()),
        (Some(id.as_str()), Some("COMPLETED"))
    );
    assert_eq!(
        outcome(&j),
        nothing,
        "a create-only key read the outcome: {j}"
    );
    // The key that may read gets the job as it is.
    let j = send(&full, "POST", "/coordinator/jobs", &idem, &body).json();
    assert_eq!(
        j["result"],
        json!({"artifact": "s3://private/x.tar"}),
        "{j}"
    );
    // The same through a batch item's key.
    let batch =
        json!({"jobs": [{"kind": "build", "queue": "rp", "idempotencyKey": "b-abc"}]}).to_string();
    let r = send(&full, "POST", "/coordinator/jobs/batch", &[], &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    let bid = r.json()["jobs"][0]["job"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    finish(&bid);
    let r = send(&create_only, "POST", "/coordinator/jobs/batch", &[], &batch);
    assert_eq!(r.status, 200, "{}", r.body);
    let item = &r.json()["jobs"][0];
    assert_eq!(
        (item["created"].as_bool(), item["job"]["id"].as_str()),
        (Some(false), Some(bid.as_str()))
    );
    assert_eq!(
        outcome(&item["job"]),
        nothing,
        "a create-only key read the outcome: {item}"
    );
    let r = send(&full, "POST", "/coordinator/jobs/batch", &[], &batch);
    assert_eq!(
        r.json()["jobs"][0]["job"]["result"],
        json!({"artifact": "s3://private/x.tar"})
    );
}

fn concurrent_idempotent_creates_make_one_job(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let app = &app;
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(move || {
                    let r = app.request(
                        "POST",
                        "/coordinator/jobs",
                        &[("Idempotency-Key", "same")],
                        br#"{"kind":"x"}"#,
                    );
                    assert_eq!(r.status, 201, "{}", r.body);
                    r.json()["id"].as_str().expect("id").to_owned()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert!(ids.iter().all(|i| i == &ids[0]), "{ids:?}");
}

fn illegal_transitions_are_conflicts(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = app.create_job(&json!({"kind": "k"}));
    let status = |s: &str| {
        app.patch_json(
            &format!("/coordinator/jobs/{id}/status"),
            &json!({"status": s}),
        )
    };
    status("RUNNING").problem(409); // PENDING → RUNNING skips QUEUED
    status("COMPLETED").problem(409);
    assert_eq!(status("CANCELLED").status, 200);
    // Terminal: nothing moves it any more.
    for s in [
        "PENDING",
        "QUEUED",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ] {
        status(s).problem(409);
    }
    app.post_json(&format!("/coordinator/jobs/{id}/complete"), &json!({}))
        .problem(409);
    app.post_json(
        &format!("/coordinator/jobs/{id}/fail"),
        &json!({"error": "x"}),
    )
    .problem(409);
    // The refused requests wrote no events.
    let j = app.get(&format!("/coordinator/jobs/{id}")).json();
    assert_eq!(j["events"].as_array().map(Vec::len), Some(2));
}

fn progress_only_while_running(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = app.create_job(&json!({"kind": "k"}));
    app.patch_json(
        &format!("/coordinator/jobs/{id}/progress"),
        &json!({"percent": 10}),
    )
    .problem(409);
}

/// What a progress report writes, the same on both backends (PostgreSQL takes a
/// one-statement path, `statements::PgProgressBatch`, alone or batched; SQLite the
/// general lock-and-change):
/// version + 1, the percent, the message only when one is sent, a renewed lease, one
/// `progress` event with `seq` = the new version, and on PostgreSQL the notification
/// other instances read (`queue|id|seq|status|at`).
fn a_progress_report_writes_the_row_its_event_and_its_notification(b: Backend) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let Some(app) = crate::app!(b) else { return };
    let id = app.running_job();
    let path = format!("/coordinator/jobs/{id}/progress");
    let mut listener = (b == Backend::Postgres).then(|| {
        let mut c = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
        c.batch_execute("LISTEN coordinator_jobs").expect("listen");
        c
    });
    let before = app.get(&format!("/coordinator/jobs/{id}")).json();
    let queue = before["queue"].as_str().expect("queue").to_owned();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let first = app.patch_json(&path, &json!({"percent": 30, "message": "m1"}));
    assert_eq!(first.status, 200, "{}", first.body);
    let second = app.patch_json(&path, &json!({"percent": 40})).json();
    assert_eq!(second["progress"], 40);
    assert_eq!(second["message"], "m1", "no message keeps the last one");
    assert_eq!(second["status"], "RUNNING");
    assert_eq!(second["attempts"], 1);
    assert!(
        second["leaseExpiresAt"].as_str() > before["leaseExpiresAt"].as_str(),
        "the lease is renewed: {before} -> {second}"
    );
    let job = app.get(&format!("/coordinator/jobs/{id}")).json();
    assert_eq!(job["progress"], 40);
    assert_eq!(job["message"], "m1");
    let events = job["events"].as_array().expect("events");
    let tail: Vec<_> = events
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|e| (e["seq"].clone(), e["type"].clone(), e["data"].clone()))
        .collect();
    let n = i64::try_from(events.len()).expect("event count");
    assert_eq!(
        tail,
        [
            (
                json!(n - 1),
                json!("progress"),
                json!({"percent": 30, "message": "m1"})
            ),
            (
                json!(n),
                json!("progress"),
                json!({"percent": 40, "message": null})
            ),
        ]
    );
    let Some(c) = listener.as_mut() else { return };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut payloads = Vec::new();
    while payloads.len() < 2 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
        c.batch_execute("SELECT 1").expect("poll");
        payloads.extend(
            c.notifications_iter()
                .map(|n| n.expect("notification").payload),
        );
    }
    let fields: Vec<Vec<String>> = payloads
        .iter()
        .map(|p| p.split('|').map(str::to_owned).collect())
        .collect();
    assert_eq!(fields.len(), 2, "{payloads:?}");
    for (f, seq) in fields.iter().zip([n - 1, n]) {
        assert_eq!(
            f[..4],
            [queue.clone(), id.clone(), seq.to_string(), "RUNNING".into()],
            "{payloads:?}"
        );
        assert!(f[4].parse::<i64>().is_ok_and(|ms| ms > 0), "{payloads:?}");
    }
}

fn concurrent_progress_updates_serialize(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = app.running_job();
    let path = format!("/coordinator/jobs/{id}/progress");
    std::thread::scope(|s| {
        for i in 1..=50 {
            let (app, path) = (&app, &path);
            s.spawn(move || {
                let body = json!({"percent": i * 2, "message": format!("step {i}")}).to_string();
                let r = app.request(
                    "PATCH",
                    path,
                    &[("content-type", "application/json")],
                    body.as_bytes(),
                );
                assert_eq!(r.status, 200, "{}", r.body);
            });
        }
    });
    let j = app.get(&format!("/coordinator/jobs/{id}")).json();
    let events = j["events"].as_array().expect("events");
    let progress: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["type"] == "progress").collect();
    assert_eq!(progress.len(), 50);
    // The job holds the value of the last event written, and sequence numbers have no gaps.
    let last = progress.last().expect("last");
    assert_eq!(j["progress"], last["data"]["percent"]);
    assert_eq!(j["message"], last["data"]["message"]);
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(seqs, (1..=53).collect::<Vec<i64>>());
    let mut percents: Vec<i64> = progress
        .iter()
        .map(|e| e["data"]["percent"].as_i64().unwrap_or(0))
        .collect();
    percents.sort();
    assert_eq!(percents, (1..=50).map(|i| i * 2).collect::<Vec<i64>>());
}

fn bad_input_names_the_field(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let id = app.running_job();
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("POST", "/coordinator/jobs".into(), "{not json", "body"),
        (
            "POST",
            "/coordinator/jobs".into(),
            r#"{"queue":"q"}"#,
            "kind",
        ),
        (
            "POST",
            "/coordinator/jobs".into(),
            r#"{"kind":"k","priority":"high"}"#,
            "priority",
        ),
        (
            "POST",
            "/coordinator/jobs".into(),
            r#"{"kind":"k","bogus":1}"#,
            "bogus",
        ),
        (
            "PATCH",
            format!("/coordinator/jobs/{id}/status"),
            r#"{"status":"DONE"}"#,
            "status",
        ),
        (
            "PATCH",
            format!("/coordinator/jobs/{id}/progress"),
            r#"{"percent":101}"#,
            "percent",
        ),
        (
            "PATCH",
            format!("/coordinator/jobs/{id}/progress"),
            r#"{"percent":-1}"#,
            "percent",
        ),
        (
            "PATCH",
            format!("/coordinator/jobs/{id}/progress"),
            r#"{"percent":"50"}"#,
            "percent",
        ),
        (
            "PATCH",
            "/coordinator/jobs/not-a-uuid/progress".into(),
            r#"{"percent":5}"#,
            "id",
        ),
        (
            "POST",
            format!("/coordinator/jobs/{id}/fail"),
            r#"{}"#,
            "error",
        ),
        // U+0000 cannot be stored in a PostgreSQL text column: a 400, not a 500.
        (
            "POST",
            format!("/coordinator/jobs/{id}/fail"),
            r#"{"error":"x\u0000"}"#,
            "error",
        ),
        (
            "PATCH",
            format!("/coordinator/jobs/{id}/progress"),
            r#"{"percent":5,"message":"\u0000"}"#,
            "message",
        ),
    ];
    for (method, path, body, field) in cases {
        let r = app.request(
            method,
            &path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        let p = r.problem(400);
        assert_eq!(p["field"], field, "{method} {path} {body}: {}", r.body);
    }
    let r = app.get("/coordinator/jobs/xyz");
    assert_eq!(r.problem(400)["field"], "id");
    // Nothing was changed by the rejected requests.
    let j = app.get(&format!("/coordinator/jobs/{id}")).json();
    assert_eq!(j["progress"], 0);
    assert_eq!(j["status"], "RUNNING");
}

fn unknown_job_and_route_are_404(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let missing = uuid::Uuid::now_v7();
    app.get(&format!("/coordinator/jobs/{missing}"))
        .problem(404);
    app.patch_json(
        &format!("/coordinator/jobs/{missing}/progress"),
        &json!({"percent": 1}),
    )
    .problem(404);
    app.get("/no/such/route").problem(404);
    app.request("DELETE", "/coordinator/jobs", &[], b"")
        .problem(405);
}

fn body_over_the_limit_is_413(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.body_limit = 4096) else {
        return;
    };
    let big = json!({"kind": "k", "payload": {"blob": "x".repeat(8000)}});
    app.post_json("/coordinator/jobs", &big).problem(413);
    let ok = json!({"kind": "k", "payload": {"blob": "x".repeat(1000)}});
    assert_eq!(app.post_json("/coordinator/jobs", &ok).status, 201);
}

/// `GET /coordinator/jobs/{id}` returns at most 1 000 events: the newest, oldest first,
/// with `eventsTruncated` when older ones were left out; each event's data comes back
/// as written (quotes and non-ASCII included), and a job without events has an empty
/// list.
fn a_job_read_keeps_its_newest_events_and_says_when_older_ones_were_left_out(b: Backend) {
    use coordinator::db::schema::job_events;
    use coordinator::db::DbConnection;
    use coordinator::jobs::row::EventRow;
    use diesel::prelude::*;

    let Some(app) = crate::app!(b) else { return };
    let id = app.create_job(&json!({"kind": "build"}));
    let read = || {
        let r = app.get(&format!("/coordinator/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let j = read();
    assert_eq!(j["events"].as_array().map(Vec::len), Some(1), "{j}");
    assert!(j.get("eventsTruncated").is_none(), "{j}");

    let rows: Vec<EventRow> = (2..=1001)
        .map(|seq| EventRow {
            job_id: id.clone(),
            seq,
            event_type: "progress".into(),
            data: json!({"percent": seq % 100, "message": format!("say \"{seq}\" é")}).to_string(),
            created_at: 1_700_000_000_000 + seq,
        })
        .collect();
    let db = &app.state.db;
    db.write_sync(move |conn| {
        // One statement per chunk, on the concrete connection (diesel's multi-backend
        // connection has no multi-row insert).
        for chunk in rows.chunks(200) {
            let insert = diesel::insert_into(job_events::table).values(chunk);
            match conn {
                DbConnection::Postgresql(pg) => insert.execute(pg)?,
                DbConnection::Sqlite(lite) => insert.execute(lite)?,
            };
        }
        Ok(())
    })
    .expect("insert events");
    let j = read();
    let events = j["events"].as_array().expect("events");
    assert_eq!(events.len(), 1000);
    assert_eq!(j["eventsTruncated"], true);
    assert_eq!(events[0]["seq"], 2, "the oldest one, seq 1, was left out");
    assert_eq!(events[999]["seq"], 1001);
    assert_eq!(events[999]["type"], "progress");
    assert_eq!(
        events[999]["data"],
        json!({"percent": 1, "message": "say \"1001\" é"})
    );
    assert!(events
        .windows(2)
        .all(|w| w[0]["seq"].as_i64() < w[1]["seq"].as_i64()));

    let gone = id.clone();
    db.write_sync(move |conn| {
        diesel::delete(job_events::table.filter(job_events::job_id.eq(gone))).execute(conn)?;
        Ok(())
    })
    .expect("delete events");
    let j = read();
    assert_eq!(j["events"], json!([]), "{j}");
    assert!(j.get("eventsTruncated").is_none(), "{j}");
}
