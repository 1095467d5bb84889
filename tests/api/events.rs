//! A job keeps only its newest events (`COORDINATOR_EVENTS_PER_JOB`): every write path
//! that adds an event trims the older ones in its own transaction, and a stream resumed
//! from an event no longer kept starts at the oldest one kept. On PostgreSQL,
//! housekeeping vacuums the rows the trims (and the jobs' own changes) leave dead.

use std::time::Duration;

use coordinator::jobs::model::{EventBound, Terms};
use coordinator::jobs::repo::{progress_batch, ProgressReport};
use coordinator::jobs::upkeep::Vacuumed;
use coordinator::jobs::JobId;
use diesel::prelude::*;
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{now_secs, Backend, TestApp};

backend_tests!(
    progress_reports_and_state_changes_keep_only_the_newest_events,
    a_stream_resumed_before_the_oldest_kept_event_starts_there,
    lease_expiries_trim_as_every_other_change,
    a_backlog_drains_at_most_max_trim_events_a_trim,
);
crate::postgres_tests!(
    a_progress_batch_trims_each_job_by_its_own_version_and_bound,
    a_progress_batch_with_several_reports_of_one_job_trims_each_version,
    many_writers_of_one_job_never_push_it_past_the_bound,
    housekeeping_vacuums_the_events_the_trims_left_dead,
    housekeeping_vacuums_the_job_versions_changes_left_dead,
    a_trim_of_a_backlog_reads_one_primary_key_range_per_job,
);

/// The seqs a job keeps after `version` events (every version is an event), written
/// one by one under `bound`: the last trim was at the greatest multiple of the step
/// not above `version`, if that is past `keep`.
fn kept(version: i64, bound: EventBound) -> Vec<i64> {
    let t = version / bound.step() * bound.step();
    let lo = if t > bound.keep() {
        t - bound.keep() + 1
    } else {
        1
    };
    (lo..=version).collect()
}

/// The seqs of a job's events as stored, oldest first.
fn stored(app: &TestApp, id: &str) -> Vec<i64> {
    use coordinator::db::schema::job_events;
    let (db, id) = (app.state.db.clone(), id.to_owned());
    actix_web::rt::System::new()
        .block_on(db.read(move |conn| {
            Ok(job_events::table
                .filter(job_events::job_id.eq(id))
                .order(job_events::seq)
                .select(job_events::seq)
                .load::<i64>(conn)?)
        }))
        .expect("events")
}

/// The seqs `GET /coordinator/jobs/{id}` shows, oldest first.
fn shown(app: &TestApp, id: &str) -> Vec<i64> {
    let r = app.get(&format!("/coordinator/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let seqs: Vec<i64> = j["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    // The history shown is whole exactly when it starts at the first event; a trimmed
    // job says so every time it is read, not only while it holds past the page.
    let whole = seqs.first() == Some(&1);
    assert_eq!(j["eventsTruncated"] == true, !whole, "{}", r.body);
    seqs
}

/// The job has exactly the events `kept` says after `version` changes: the newest
/// included, never more than the bound's most, in the database and over HTTP.
fn assert_kept(app: &TestApp, id: &str, version: i64, bound: EventBound, what: &str) {
    let want = kept(version, bound);
    assert!(i64::try_from(want.len()).expect("len") <= bound.most());
    assert_eq!(stored(app, id), want, "{what}: stored");
    assert_eq!(shown(app, id), want, "{what}: shown");
}

/// Queue a PENDING job of `queue` and claim it: its job token.
fn claim(app: &TestApp, id: &str, queue: &str) -> String {
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    claim_again(app, id, queue)
}

/// Claim the QUEUED job `id`, alone on `queue`: its job token.
fn claim_again(app: &TestApp, id: &str, queue: &str) -> String {
    let r = app.post_json(
        &format!("/coordinator/queues/{queue}/claim"),
        &json!({"worker": "w"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], id);
    r.json()["token"].as_str().expect("token").to_owned()
}

fn with_token_ok(app: &TestApp, token: &str, method: &str, path: &str, body: &Value) {
    let r = app.with_token(token, method, path, body.to_string().as_bytes());
    assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
}

/// Far more progress reports than the bound (from job tokens, several jobs at once so
/// PostgreSQL's progress log batches them), then claims and hand-backs, a retryable
/// failure, cancels and redrives: each job keeps exactly its newest events, trimmed
/// every `step` events. Heartbeats write no event and change nothing here.
fn progress_reports_and_state_changes_keep_only_the_newest_events(b: Backend) {
    let bound = EventBound::new(64);
    assert_eq!(bound.step(), 4);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
        return;
    };
    let jobs: Vec<(String, String, String)> = (0..3)
        .map(|i| {
            let queue = format!("trim-{i}");
            let id = app.create_job(&json!({"kind": "k", "queue": queue, "maxAttempts": 100}));
            let token = claim(&app, &id, &queue); // created, status, claimed: 3
            (id, queue, token)
        })
        .collect();
    const REPORTS: i64 = 150;
    std::thread::scope(|s| {
        for (id, _, token) in &jobs {
            let app = &app;
            s.spawn(move || {
                let path = format!("/coordinator/jobs/{id}/progress");
                for p in 0..REPORTS {
                    with_token_ok(app, token, "PATCH", &path, &json!({"percent": p % 100}));
                    if p % 50 == 0 {
                        let beat = format!("/coordinator/jobs/{id}/heartbeat");
                        with_token_ok(app, token, "POST", &beat, &json!({}));
                    }
                }
            });
        }
    });
    let mut version = 3 + REPORTS;
    for (id, _, _) in &jobs {
        assert_kept(&app, id, version, bound, "after progress reports");
    }

    // Claims and hand-backs (the general path: lock, change, event).
    let (id, queue, mut token) = jobs.into_iter().next().expect("a job");
    for _ in 0..25 {
        let path = format!("/coordinator/jobs/{id}/status");
        with_token_ok(&app, &token, "PATCH", &path, &json!({"status": "QUEUED"}));
        token = claim_again(&app, &id, &queue);
        version += 2;
    }
    assert_kept(&app, &id, version, bound, "after hand-backs");
    let path = format!("/coordinator/jobs/{id}/fail");
    with_token_ok(
        &app,
        &token,
        "POST",
        &path,
        &json!({"error": "again", "retryable": true}),
    );
    version += 1; // retry_scheduled
    for _ in 0..40 {
        let r = app.post_json(&format!("/coordinator/jobs/{id}/cancel"), &json!({}));
        assert_eq!(r.status, 200, "{}", r.body);
        let r = app.post_json(&format!("/coordinator/jobs/{id}/retry"), &json!({}));
        assert_eq!(r.status, 200, "{}", r.body);
        version += 2;
    }
    assert_kept(&app, &id, version, bound, "after cancels and redrives");
}

/// A stream (and a page) asked for the events after one the job no longer keeps starts
/// at the oldest one kept; the stream says first, in a comment, which were not kept.
fn a_stream_resumed_before_the_oldest_kept_event_starts_there(b: Backend) {
    let bound = EventBound::new(32);
    assert_eq!(bound.step(), 2);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
        return;
    };
    let id = app.create_job(&json!({"kind": "k", "queue": "gap"}));
    let token = claim(&app, &id, "gap"); // 3 events
    let path = format!("/coordinator/jobs/{id}/progress");
    for p in 0..60 {
        with_token_ok(&app, &token, "PATCH", &path, &json!({"percent": p}));
    }
    let done = format!("/coordinator/jobs/{id}/complete");
    with_token_ok(&app, &token, "POST", &done, &json!({})); // 64
    assert_kept(&app, &id, 64, bound, "before reading");
    assert_eq!(kept(64, bound).first(), Some(&33));

    // The job is COMPLETED: a stream sends what is kept after its start, then ends.
    let read = |last_event_id: &str| -> String {
        let events = format!("/coordinator/jobs/{id}/events");
        let mut req = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build()
            .get(&app.url(&events))
            .set("accept", "text/event-stream")
            .set("last-event-id", last_event_id);
        for (k, v) in &app.signer.headers("GET", &events, b"", now_secs()) {
            req = req.set(k, v);
        }
        let r = req.call().expect("stream opens");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        r.into_string().expect("the stream, to its end")
    };
    let ids = |body: &str| -> Vec<i64> {
        body.lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|i| i.parse().expect("id"))
            .collect()
    };
    let body = read("5");
    assert!(
        body.starts_with(": gap: events 6 to 32 are no longer kept\n\nid: 33\n"),
        "{body}"
    );
    assert_eq!(ids(&body), (33..=64).collect::<Vec<_>>(), "{body}");
    assert!(body.contains("event: completed"), "{body}");
    // From a kept event: no gap, nothing said.
    let body = read("40");
    assert!(body.starts_with("id: 41\n"), "{body}");
    assert_eq!(ids(&body), (41..=64).collect::<Vec<_>>());
    // The JSON page starts at the oldest kept one too.
    let page = app
        .get(&format!("/coordinator/jobs/{id}/events?after=0"))
        .json();
    let seqs: Vec<i64> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, (33..=64).collect::<Vec<_>>());
    assert_eq!(page["hasMore"], false);
}

/// One PostgreSQL progress batch straight through the store: a report of `percent` for
/// each (job, bound), in order; the new version of each, every report written.
fn run_batch<'a>(
    app: &TestApp,
    jobs: impl Iterator<Item = (&'a str, EventBound)>,
    percent: i32,
) -> Vec<i64> {
    let reports: Vec<ProgressReport> = jobs
        .map(|(id, events)| ProgressReport {
            id: JobId::parse(id, "id").expect("job id"),
            percent,
            message: None,
            terms: Terms {
                lease_ms: 60_000,
                events,
            },
            attempt: None,
            record: None,
        })
        .collect();
    let db = app.state.db.clone();
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| progress_batch(conn, reports)))
        .expect("batch")
        .iter()
        .map(|w| {
            w.as_ref()
                .expect("written")
                .as_ref()
                .expect("a row")
                .version
        })
        .collect()
}

/// PostgreSQL's progress batch: several jobs in one statement, some of whose new
/// versions trim and some not, each trimmed by its own report's bound.
fn a_progress_batch_trims_each_job_by_its_own_version_and_bound(b: Backend) {
    let bound = EventBound::new(32);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
        return;
    };
    // Three RUNNING jobs (3 events each), moved apart: versions 3, 4 and 5.
    let ids: Vec<String> = (0..3).map(|_| app.running_job()).collect();
    let mut versions = [3, 3, 3];
    for (i, id) in ids.iter().enumerate() {
        for _ in 0..i {
            let r = app.patch_json(
                &format!("/coordinator/jobs/{id}/progress"),
                &json!({"percent": 1}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
            versions[i] += 1;
        }
    }
    // The third job's reports keep more (64) than the app's bound (32).
    let wide = EventBound::new(64);
    let bounds = [bound, bound, wide];
    for round in 0..50 {
        let written = run_batch(&app, ids.iter().map(String::as_str).zip(bounds), round);
        for (version, v) in written.into_iter().zip(versions.iter_mut()) {
            *v += 1;
            assert_eq!(version, *v);
        }
    }
    assert_kept(&app, &ids[0], versions[0], bound, "first job");
    assert_kept(&app, &ids[1], versions[1], bound, "second job");
    // Its earlier events were written under the app's bound (32) before version 32:
    // none trimmed; its batch reports keep 64, so none since.
    assert_eq!(versions[2], 55);
    assert_kept(&app, &ids[2], versions[2], wide, "third job");
}

/// Housekeeping's lease expiry is a change like any other: RUNNING (an operator's
/// move) and expired again and again, the job keeps exactly its newest events.
fn lease_expiries_trim_as_every_other_change(b: Backend) {
    let bound = EventBound::new(16);
    // Leases of a millisecond, expired by this test's calls, not by housekeeping.
    let Some(app) = crate::helpers::spawn_app_with(b, |c| {
        c.events = bound;
        c.lease = Duration::from_millis(1);
        c.housekeeping_interval = Duration::from_secs(3600);
    }) else {
        return;
    };
    let id = app.create_job(&json!({"kind": "k", "queue": "lease", "maxAttempts": 100}));
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut version = 2;
    for round in 0..30 {
        let r = app.patch_json(
            &format!("/coordinator/jobs/{id}/status"),
            &json!({"status": "RUNNING"}),
        );
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
        let db = app.state.db.clone();
        let terms = Terms {
            lease_ms: 1,
            events: bound,
        };
        std::thread::sleep(Duration::from_millis(5));
        let now = coordinator::db::now_millis();
        let expired = actix_web::rt::System::new()
            .block_on(
                db.write(move |c| coordinator::jobs::upkeep::expire_leases(c, now, 100, terms)),
            )
            .expect("expire")
            .expired;
        assert_eq!(expired.len(), 1, "round {round}");
        version += 2;
        assert_eq!(expired[0].version, version, "round {round}");
    }
    assert_kept(&app, &id, version, bound, "after lease expiries");
}

/// PostgreSQL's progress batch with several reports of one job: the first goes into
/// the statement, the later ones are written on their own after it, and each trims by
/// its own new version, none skipped.
fn a_progress_batch_with_several_reports_of_one_job_trims_each_version(b: Backend) {
    let bound = EventBound::new(16);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
        return;
    };
    let ids: Vec<String> = (0..2).map(|_| app.running_job()).collect();
    let mut versions = [3_i64, 3];
    for round in 0..20 {
        // Three reports of the first job around one of the second.
        let order = [0, 1, 0, 0];
        let jobs = order.iter().map(|&i| (ids[i].as_str(), bound));
        let written = run_batch(&app, jobs, round);
        for (version, &i) in written.into_iter().zip(order.iter()) {
            versions[i] += 1;
            assert_eq!(version, versions[i], "round {round}");
        }
    }
    assert_kept(&app, &ids[0], versions[0], bound, "three reports a batch");
    assert_kept(&app, &ids[1], versions[1], bound, "one report a batch");
}

/// PostgreSQL: 40 connections report progress to one job at once, so most progress
/// statements wait for its row lock, some behind many others (row-lock waiters are not
/// served in order). A statement's trim reads `job_events` with the snapshot it began
/// with, blind to the events of the writers it waited behind; without the guard in
/// `PgProgressBatch` (`seen`) the job held up to 26 events under a bound of 16, and up
/// to 83 under one of 67. A reader watching throughout never sees more than the bound.
fn many_writers_of_one_job_never_push_it_past_the_bound(b: Backend) {
    use coordinator::db::schema::job_events;
    use coordinator::db::DbConnection;
    use coordinator::jobs::model::Change;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    for keep in [16, 64] {
        let bound = EventBound::new(keep);
        let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
            return;
        };
        let id = app.running_job();
        const WRITERS: usize = 40;
        const EACH: usize = 25;
        let url = app.db.url.clone();
        let start = std::sync::Barrier::new(WRITERS);
        let (most_seen, stop) = (AtomicI64::new(0), AtomicBool::new(false));
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut conn = diesel::PgConnection::establish(&url).expect("connect");
                while !stop.load(Ordering::Relaxed) {
                    let n: i64 = job_events::table
                        .filter(job_events::job_id.eq(&id))
                        .count()
                        .get_result(&mut conn)
                        .expect("count");
                    most_seen.fetch_max(n, Ordering::Relaxed);
                }
            });
            let writers: Vec<_> = (0..WRITERS)
                .map(|_| {
                    s.spawn(|| {
                        let mut conn = DbConnection::establish(&url).expect("connect");
                        let job = JobId::parse(&id, "id").expect("id");
                        let terms = Terms {
                            lease_ms: 60_000,
                            events: bound,
                        };
                        start.wait();
                        for p in 0..EACH {
                            let change = Change::Progress {
                                percent: i32::try_from(p).expect("percent"),
                                message: None,
                            };
                            coordinator::jobs::repo::apply(&mut conn, &job, &change, terms, None)
                                .expect("progress");
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().expect("writer");
            }
            stop.store(true, Ordering::Relaxed);
            watcher.join().expect("watcher");
        });
        let most = most_seen.load(Ordering::Relaxed);
        assert!(
            most <= bound.most(),
            "keep {keep}: {most} events held at once"
        );
        let version = 3 + i64::try_from(WRITERS * EACH).expect("version");
        assert_kept(&app, &id, version, bound, "after the writers");
    }
}

/// PostgreSQL: the trims' deletes leave dead tuples, which autovacuum may never reclaim
/// (it is off on some servers; here, for the table); housekeeping vacuums `job_events`
/// once they pass the threshold, and not before.
fn housekeeping_vacuums_the_events_the_trims_left_dead(b: Backend) {
    vacuums_what_piles_up_dead(b, Vacuumed::JobEvents, |id, rows| {
        format!(
            "INSERT INTO job_events (job_id, seq, event_type, data, created_at) \
             SELECT '{id}', 1000000 + i, 'progress', '{{}}', 0 FROM generate_series(1, {rows}) AS i; \
             DELETE FROM job_events WHERE job_id = '{id}' AND seq > 1000000;"
        )
    });
}

/// PostgreSQL: every change of a job leaves its row's old version dead (about seven a
/// job's life), and so do the deletes of the retention purge; housekeeping vacuums
/// `jobs` once they pass the threshold, and not before. Before 2026-12-07 nothing did
/// where autovacuum is off: a soak of whole lives piled up 141 000 dead rows for 48 000
/// live ones in two minutes while claims slowed to less than half.
fn housekeeping_vacuums_the_job_versions_changes_left_dead(b: Backend) {
    vacuums_what_piles_up_dead(b, Vacuumed::Jobs, |id, rows| {
        // Copies of the job under other ids, then gone again: `rows` dead versions.
        format!(
            "INSERT INTO jobs SELECT (jsonb_populate_record(j, \
                 jsonb_build_object('id', j.id || '-' || i))).* \
             FROM jobs j, generate_series(1, {rows}) AS i WHERE j.id = '{id}'; \
             DELETE FROM jobs WHERE id LIKE '{id}-%';"
        )
    });
}

/// Churn `what` with the statements `churn(job id, rows)` writes, with autovacuum off
/// for the table: below [`VACUUM_DEAD`] dead tuples it is left alone; past it
/// `vacuum_if_due` and housekeeping's own pass vacuum it, and the dead tuples are gone.
fn vacuums_what_piles_up_dead(b: Backend, what: Vacuumed, churn: impl Fn(&str, i64) -> String) {
    use coordinator::jobs::upkeep::{vacuum_if_due, VACUUM_DEAD};
    use diesel::connection::SimpleConnection;
    let Some(app) = crate::app!(b) else { return };
    let table = what.table();
    // Autovacuum must not reclaim them first, wherever this runs (a throwaway database).
    app.state
        .db
        .write_sync(|c| {
            Ok(c.batch_execute(&format!(
                "ALTER TABLE {table} SET (autovacuum_enabled = false)"
            ))?)
        })
        .unwrap();
    let id = app.running_job();
    let dead = || -> i64 {
        #[derive(QueryableByName)]
        struct Dead {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        app.state
            .db
            .write_sync(|c| {
                Ok(diesel::sql_query(format!(
                    "SELECT n_dead_tup AS n FROM pg_stat_user_tables \
                     WHERE relid = '{table}'::regclass"
                ))
                .get_result::<Dead>(c)?
                .n)
            })
            .unwrap()
    };
    let churn = |rows: i64| {
        let sql = format!("{} SELECT pg_stat_force_next_flush();", churn(&id, rows));
        app.state
            .db
            .write_sync(|c| Ok(c.batch_execute(&sql)?))
            .unwrap();
    };
    let wait_for = |at_least: i64| {
        let started = std::time::Instant::now();
        while dead() < at_least {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the statistics never showed {at_least} dead rows of {table}: {}",
                dead()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let vacuum = || app.state.db.write_sync(|c| vacuum_if_due(c, what)).unwrap();
    // Below the threshold: left alone.
    churn(VACUUM_DEAD / 2);
    wait_for(VACUUM_DEAD / 2);
    assert!(!vacuum(), "{table} vacuumed below the threshold");
    // Past it: vacuumed, and the dead tuples are gone.
    churn(VACUUM_DEAD);
    wait_for(VACUUM_DEAD);
    assert!(vacuum(), "{table} not vacuumed past the threshold");
    let started = std::time::Instant::now();
    while dead() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "dead rows of {table} left after the vacuum: {}",
            dead()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And through housekeeping's own pass.
    churn(VACUUM_DEAD * 2);
    wait_for(VACUUM_DEAD * 2);
    let report = actix_web::rt::System::new().block_on(coordinator::housekeeping::pass(&app.state));
    assert!(report.vacuumed.contains(&what), "{report:?}");
}

/// A job with a backlog far past `keep` (20 000 events, as after an upgrade from a
/// release without the bound or a lowered `COORDINATOR_EVENTS_PER_JOB`): one trimming
/// write deletes at most `EventBound::MAX_TRIM` of its oldest events and keeps every
/// one of the newest `keep`; later writes drain the backlog to the steady state.
fn a_backlog_drains_at_most_max_trim_events_a_trim(b: Backend) {
    let bound = EventBound::new(100);
    assert_eq!(bound.step(), 6);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
        return;
    };
    let id = app.running_job(); // 3 events
    const BACKLOG: i64 = 20_000;
    let db = app.state.db.clone();
    let job = id.clone();
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| {
            diesel::sql_query(format!(
                "WITH RECURSIVE s(n) AS (SELECT 4 UNION ALL SELECT n + 1 FROM s \
                 WHERE n < {BACKLOG}) INSERT INTO job_events \
                 (job_id, seq, event_type, data, created_at) \
                 SELECT '{job}', n, 'progress', '{{}}', 0 FROM s"
            ))
            .execute(conn)?;
            diesel::sql_query(format!(
                "UPDATE jobs SET version = {BACKLOG} WHERE id = '{job}'"
            ))
            .execute(conn)?;
            Ok(())
        }))
        .expect("backlog");
    let report = |version: &mut i64| {
        let r = app.patch_json(
            &format!("/coordinator/jobs/{id}/progress"),
            &json!({"percent": 1}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        *version += 1;
    };
    let mut version = BACKLOG;
    // 20 001 to 20 003 trim nothing; 20 004 trims.
    for _ in 0..4 {
        report(&mut version);
    }
    let after = stored(&app, &id);
    let max = EventBound::MAX_TRIM;
    assert_eq!(after.first(), Some(&(max + 1)), "the oldest {max} only");
    assert_eq!(after.last(), Some(&version));
    assert_eq!(i64::try_from(after.len()).expect("len"), version - max);
    // Enough further writes: 19 900 past keep, 1 018 net a trim, a trim in 6 writes.
    for _ in 0..(6 * 21) {
        report(&mut version);
    }
    assert_kept(&app, &id, version, bound, "after the backlog drained");
}

/// `EXPLAIN (ANALYZE, …)` of a statement: runs it and gives its plan, one line a row.
struct Explain<Q>(Q);

impl<Q: diesel::query_builder::QueryFragment<diesel::pg::Pg>>
    diesel::query_builder::QueryFragment<diesel::pg::Pg> for Explain<Q>
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        out.push_sql("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) ");
        self.0.walk_ast(out.reborrow())
    }
}

impl<Q> diesel::query_builder::QueryId for Explain<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q> diesel::query_builder::Query for Explain<Q> {
    type SqlType = diesel::sql_types::Text;
}

impl<Q> RunQueryDsl<diesel::PgConnection> for Explain<Q> {}

/// The trims of PostgreSQL's two statements that add events (a progress batch, and
/// every other change) on jobs with a 200 000-event backlog, as the planner sees them
/// once the table is analyzed: each job's delete is one index range of the primary key
/// with both upper bounds (`version - keep` and the oldest plus `MAX_TRIM`) in the index
/// condition, and the oldest is one probe of it. No sequential scan of `job_events`,
/// and no row read and filtered out: a scan ranged by `version - keep` alone would read
/// the whole backlog. Each job loses exactly its `MAX_TRIM` oldest events.
fn a_trim_of_a_backlog_reads_one_primary_key_range_per_job(b: Backend) {
    use coordinator::db::schema::jobs;
    use coordinator::jobs::row::JobRow;
    use coordinator::jobs::statements::{PgChange, PgProgressBatch, ANY_ATTEMPT};
    let bound = EventBound::new(100);
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.events = bound) else {
        return;
    };
    const BACKLOG: i64 = 200_000;
    // The next version trims: 200 004 % 6 = 0.
    let version = BACKLOG + 3;
    assert_eq!((version + 1) % bound.step(), 0);
    let ids: Vec<String> = (0..3).map(|_| app.running_job()).collect();
    let mut c = diesel::PgConnection::establish(&app.db.url).expect("connect");
    for id in &ids {
        diesel::sql_query(format!(
            "INSERT INTO job_events (job_id, seq, event_type, data, created_at) \
             SELECT '{id}', n, 'progress', '{{}}', 0 FROM generate_series(4, {version}) n"
        ))
        .execute(&mut c)
        .expect("backlog");
        diesel::sql_query(format!(
            "UPDATE jobs SET version = {version} WHERE id = '{id}'"
        ))
        .execute(&mut c)
        .expect("version");
    }
    diesel::sql_query("ANALYZE job_events")
        .execute(&mut c)
        .expect("analyze");
    let oldest = |c: &mut diesel::PgConnection, id: &str| -> i64 {
        use coordinator::db::schema::job_events;
        job_events::table
            .filter(job_events::job_id.eq(id))
            .select(diesel::dsl::min(job_events::seq))
            .first::<Option<i64>>(c)
            .expect("oldest")
            .expect("an event")
    };
    // The delete's index condition (the only one with `seq <=`) holds both bounds,
    // so its scan stops at the oldest plus `MAX_TRIM`; nothing read is filtered out.
    let check = |plan: &[String], what: &str| {
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan on job_events"), "{what}:\n{text}");
        assert!(!text.contains("Rows Removed"), "{what}:\n{text}");
        let conds: Vec<&String> = plan
            .iter()
            .filter(|l| l.contains("Index Cond:") && l.contains("seq <="))
            .collect();
        assert_eq!(conds.len(), 1, "{what}:\n{text}");
        assert!(conds[0].contains("seq < ("), "{what}: both bounds:\n{text}");
        assert!(
            text.contains("using job_events_pkey on job_events"),
            "{what}:\n{text}"
        );
    };
    // A progress batch of two of the jobs.
    let now = coordinator::db::now_millis();
    let batch = PgProgressBatch {
        ids: vec![&ids[0], &ids[1]],
        percents: vec![1, 1],
        messages: vec![None, None],
        lease_until: vec![now + 60_000; 2],
        data: vec!["{}".to_owned(); 2],
        attempts: vec![ANY_ATTEMPT; 2],
        keeps: vec![bound.keep(); 2],
        steps: vec![bound.step(); 2],
        now,
    };
    let plan = Explain(batch)
        .load::<String>(&mut c)
        .expect("explain the batch");
    check(&plan, "progress batch");
    for id in &ids[..2] {
        assert_eq!(oldest(&mut c, id), 1 + EventBound::MAX_TRIM, "{id}");
    }
    // Every other change: the third job, one more version.
    let mut row = jobs::table
        .find(&ids[2])
        .first::<JobRow>(&mut c)
        .expect("row");
    row.version += 1;
    let change = PgChange {
        row: &row,
        event_type: "progress",
        data: "{}".to_owned(),
        now,
        events: bound,
    };
    let plan = Explain(change)
        .load::<String>(&mut c)
        .expect("explain the change");
    check(&plan, "change");
    assert_eq!(oldest(&mut c, &ids[2]), 1 + EventBound::MAX_TRIM);
}
