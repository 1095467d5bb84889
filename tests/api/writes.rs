//! Concurrent writes through the storage layer. On SQLite every write goes through one
//! group-commit writer (many requests, one transaction, one savepoint each); on
//! PostgreSQL each runs in its own transaction. Either way each request's write stands
//! or falls on its own, and nothing is answered before it is committed.

use coordinator::db::replay::{insert_replays, ReplayRow};
use coordinator::db::schema::replay_records;
use coordinator::error::StoreError;
use coordinator::jobs::model::Terms;
use coordinator::jobs::repo::progress_batch;
use coordinator::jobs::repo::{create_group, Idempotency, Made, NewCreate, ProgressReport};
use coordinator::jobs::JobId;
use diesel::prelude::*;
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{Backend, TestDb};

crate::postgres_tests!(
    housekeeping_vacuums_the_replay_table_after_large_purges,
    a_progress_batch_writes_each_report_once_in_order,
    one_bad_report_does_not_sink_its_progress_batch,
    a_progress_batch_writes_its_replay_records_in_the_same_commit,
);

backend_tests!(
    a_create_group_writes_its_replay_records_in_the_same_commit,
    a_delivery_group_answers_each_delivery_as_alone,
    a_failing_write_never_sinks_the_writes_committed_with_it,
    housekeeping_purges_every_expired_replay_record,
    a_replay_recorded_before_the_by_time_migration_is_still_refused,
    a_replay_batch_answers_each_record_in_order,
);

const CALLER: &str = "group-commit-test";

/// The signatures stored for `caller`, in order.
async fn stored_signatures(db: &coordinator::db::Db, caller: &'static str) -> Vec<String> {
    db.read(move |conn| {
        Ok(replay_records::table
            .filter(replay_records::caller.eq(caller))
            .select(replay_records::signature_hash)
            .order(replay_records::signature_hash)
            .load(conn)?)
    })
    .await
    .expect("read back")
}

/// 60 writes at once (within the write queue's bound), each inserting a row and every
/// third failing after its insert: exactly the others' rows are stored, each failed one
/// is answered with its own error, and every success was answered after its commit (its
/// row is there to read once all answers are in).
fn a_failing_write_never_sinks_the_writes_committed_with_it(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let db = app.state.db.clone();
    let sqlite = db.backend() == coordinator::db::Backend::Sqlite;
    let n: usize = 60;
    let answers = actix_web::rt::System::new().block_on(async move {
        let writes = (0..n).map(|i| {
            let db = db.clone();
            async move {
                let answer = db
                    .write(move |conn| {
                        let work = |conn: &mut coordinator::db::DbConnection| {
                            let row = ReplayRow::new(CALLER, format!("sig-{i:03}"), 0, i64::MAX);
                            insert_replays(conn, std::slice::from_ref(&row))?;
                            if i % 3 == 0 {
                                return Err(StoreError::Conflict(format!("write {i} fails")));
                            }
                            Ok(i)
                        };
                        // Repositories open their own transaction (PostgreSQL runs the
                        // closure on an autocommit connection; on SQLite it nests). On
                        // SQLite the odd ones do not: only the writer's savepoint undoes
                        // their insert.
                        if i % 2 == 0 || !sqlite {
                            conn.transaction(work)
                        } else {
                            work(conn)
                        }
                    })
                    .await;
                (i, answer)
            }
        });
        futures_util::future::join_all(writes).await
    });
    let mut expected = Vec::new();
    for (i, answer) in answers {
        match answer {
            Ok(v) => {
                assert_ne!(i % 3, 0, "write {i} should have failed");
                assert_eq!(v, i);
                expected.push(format!("sig-{i:03}"));
            }
            Err(StoreError::Conflict(m)) => {
                assert_eq!(i % 3, 0, "write {i} failed: {m}");
                assert_eq!(m, format!("write {i} fails"), "another write's error");
            }
            Err(e) => panic!("write {i}: unexpected error {e}"),
        }
    }
    assert_eq!(expected.len(), n - n.div_ceil(3));
    let db = app.state.db.clone();
    let stored = actix_web::rt::System::new().block_on(stored_signatures(&db, CALLER));
    assert_eq!(stored, expected);
}

/// 25,000 expired replay records (many purge chunks, signed long enough ago to be out of
/// the window), 10 live ones (signed now) and 10 signed as long ago but expiring in the
/// future (as an instance with a wider window writes them): one housekeeping pass
/// deletes every expired record, in several writes, and keeps the other 20 — the table
/// stays bounded by the window however fast records arrive. The expired records are
/// spread over several seconds, so the SQLite purge's chunks (by signed time) end
/// inside and between them.
fn housekeeping_purges_every_expired_replay_record(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let now = coordinator::db::now_millis();
    let old = now / 1000 - 2_000;
    let rows: Vec<_> = (0..25_020)
        .map(|i| {
            let sig = format!("sig-{i:05}");
            match i {
                // 5,000 a second over five seconds.
                0..25_000 => ReplayRow::new("purge-test", sig, old + i / 5_000, now - 1_000),
                // Interleaved with the expired ones, in the same seconds.
                25_000..25_010 => ReplayRow::new("purge-test", sig, old + (i % 5), now + 600_000),
                _ => ReplayRow::new("purge-test", sig, now / 1000, now + 360_000),
            }
        })
        .collect();
    let db = app.state.db.clone();
    let state = app.state.clone();
    let (report, left) = actix_web::rt::System::new().block_on(async move {
        // In slices: one PostgreSQL statement takes at most 65,535 parameters.
        db.write(move |conn| {
            conn.transaction(|conn| {
                for slice in rows.chunks(1_000) {
                    insert_replays(conn, slice)?;
                }
                Ok(())
            })
        })
        .await
        .expect("insert");
        let report = coordinator::housekeeping::pass(&state).await;
        let left = stored_signatures(&db, "purge-test").await;
        (report, left)
    });
    // The app's own housekeeping task (every 5 s) may have run the same pass first.
    assert!(
        report.replays_purged <= 25_000,
        "purged {}",
        report.replays_purged
    );
    let kept: Vec<String> = (25_000..25_020).map(|i| format!("sig-{i:05}")).collect();
    assert_eq!(left, kept, "the live records stay, every expired one went");
}

/// PostgreSQL: once a purge has deleted `VACUUM_AFTER_PURGED` replay records,
/// housekeeping vacuums the table itself (autovacuum may be off, as it is on this
/// machine's server, or late on a busy table): its dead tuples do not pile up.
fn housekeeping_vacuums_the_replay_table_after_large_purges(b: Backend) {
    #[derive(QueryableByName)]
    struct Stats {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        vacuums: i64,
    }
    let Some(app) = crate::app!(b) else { return };
    let n = usize::try_from(coordinator::db::replay::VACUUM_AFTER_PURGED).expect("small") + 1_000;
    let now = coordinator::db::now_millis();
    let rows: Vec<_> = (0..n)
        .map(|i| {
            let signed = now / 1000 - 2_000;
            ReplayRow::new("vacuum-test", format!("sig-{i:06}"), signed, now - 1_000)
        })
        .collect();
    let db = app.state.db.clone();
    let state = app.state.clone();
    let vacuums = actix_web::rt::System::new().block_on(async move {
        db.write(move |conn| {
            conn.transaction(|conn| {
                for slice in rows.chunks(1_000) {
                    insert_replays(conn, slice)?;
                }
                Ok(())
            })
        })
        .await
        .expect("insert");
        coordinator::housekeeping::pass(&state).await;
        db.read(|conn| {
            Ok(diesel::sql_query(
                "SELECT coalesce(vacuum_count, 0) AS vacuums FROM pg_stat_user_tables \
                 WHERE relname = 'replay_records'",
            )
            .get_result::<Stats>(conn)?
            .vacuums)
        })
        .await
        .expect("stats")
    });
    assert!(vacuums >= 1, "the replay table was not vacuumed");
}

/// The migration keying replay records by signed time keeps what was recorded before
/// it: a record written in the old shape (caller, signature hash, expiry: the release
/// before) still refuses the same signed request afterwards. SQLite rebuilds the table
/// and derives the signed time from the expiry with the default window; PostgreSQL
/// keeps the row (no signed time) and its key. A new signature is still accepted.
fn a_replay_recorded_before_the_by_time_migration_is_still_refused(b: Backend) {
    use coordinator::db::migrate::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use coordinator::db::DbConnection;
    use diesel::backend::Backend as DieselBackend;
    use diesel::migration::MigrationSource;
    use diesel_migrations::{EmbeddedMigrations, MigrationHarness};

    const BY_TIME: &str = "2026-12-04-000002_replay_records_by_time";
    let Some(db) = TestDb::create(b) else { return };
    // A request signed now with the default skew (300 s) and margin (60 s).
    let signed = coordinator::db::now_millis() / 1000;
    let expires = (signed + 300 + 60) * 1000;
    let legacy = format!(
        "INSERT INTO replay_records (caller, signature_hash, expires_at) \
         VALUES ('legacy', 'sig-legacy', {expires})"
    );

    fn migrate_around<DB, C>(c: &mut C, source: EmbeddedMigrations, between: &str)
    where
        DB: DieselBackend,
        C: MigrationHarness<DB> + diesel::connection::SimpleConnection,
        EmbeddedMigrations: MigrationSource<DB>,
    {
        let all = MigrationSource::<DB>::migrations(&source).expect("migrations");
        // Creates diesel's bookkeeping table (run_migration expects it).
        c.applied_migrations().expect("bookkeeping table");
        let mut before = 0;
        for m in all
            .iter()
            .filter(|m| m.name().to_string().as_str() < BY_TIME)
        {
            c.run_migration(m.as_ref()).expect("older migration");
            before += 1;
        }
        assert!(before > 0 && before < all.len(), "{BY_TIME} not found");
        c.batch_execute(between).expect("legacy row");
        let rest = c.run_pending_migrations(source).expect("newer migrations");
        assert_eq!(
            rest.first().map(ToString::to_string),
            Some(
                BY_TIME
                    .replace(['-', '_'], "")
                    .chars()
                    .take(14)
                    .collect::<String>()
            ),
        );
    }

    let mut conn = match b {
        Backend::Sqlite => {
            let path = db.url.strip_prefix("sqlite://").expect("sqlite url");
            let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
            migrate_around(&mut c, SQLITE_MIGRATIONS, &legacy);
            DbConnection::Sqlite(c)
        }
        Backend::Postgres => {
            let mut c = diesel::PgConnection::establish(&db.url).expect("open postgres");
            migrate_around(&mut c, POSTGRES_MIGRATIONS, &legacy);
            DbConnection::Postgresql(c)
        }
    };
    let replay = ReplayRow::new("legacy", "sig-legacy", signed, expires);
    let fresh = ReplayRow::new("legacy", "sig-fresh", signed, expires);
    let answers = insert_replays(&mut conn, &[replay, fresh]).expect("insert");
    assert_eq!(answers, [false, true], "(replay, new signature)");
    let kept: Vec<(String, i64, Option<i64>)> = replay_records::table
        .filter(replay_records::caller.eq("legacy"))
        .select((
            replay_records::signature_hash,
            replay_records::expires_at,
            replay_records::signed_at,
        ))
        .order(replay_records::signature_hash)
        .load(&mut conn)
        .expect("read back");
    let legacy_signed = match b {
        Backend::Sqlite => Some(signed),
        Backend::Postgres => None,
    };
    assert_eq!(
        kept,
        [
            ("sig-fresh".to_owned(), expires, Some(signed)),
            ("sig-legacy".to_owned(), expires, legacy_signed),
        ]
    );
}

fn report(id: &str, percent: i32, message: Option<&str>) -> ProgressReport {
    ProgressReport {
        id: JobId::parse(id, "id").expect("job id"),
        percent,
        message: message.map(str::to_owned),
        terms: Terms::with_lease_ms(60_000),
        attempt: None,
        record: None,
    }
}

/// Run one progress batch as the progress log's threads do.
fn run_batch(
    app: &crate::helpers::TestApp,
    reports: Vec<ProgressReport>,
) -> Vec<Result<Option<coordinator::jobs::row::JobRow>, StoreError>> {
    let db = app.state.db.clone();
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| progress_batch(conn, reports)))
        .expect("batch")
}

/// The `progress` events of a job: (seq, percent, message).
fn progress_events(app: &crate::helpers::TestApp, id: &str) -> Vec<(i64, i64, Option<String>)> {
    let j = app.get(&format!("/coordinator/jobs/{id}")).json();
    j["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "progress")
        .map(|e| {
            (
                e["seq"].as_i64().expect("seq"),
                e["data"]["percent"].as_i64().expect("percent"),
                e["data"]["message"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// PostgreSQL's progress batch (one statement for several jobs): a job reported twice in
/// one batch gets both reports, in arrival order, each its own version and event; a job
/// that is not RUNNING and one that does not exist get `None` (the general path then
/// answers 409 or 404); each answer is that report's own row.
fn a_progress_batch_writes_each_report_once_in_order(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let (a, bj) = (app.running_job(), app.running_job());
    let queued = app.create_job(&json!({"kind": "build"}));
    let missing = "00000000-0000-4000-8000-000000000000";
    // The job's version is its newest event's `seq`.
    let version = |id: &str| {
        let j = app.get(&format!("/coordinator/jobs/{id}")).json();
        j["events"]
            .as_array()
            .and_then(|e| e.last())
            .and_then(|e| e["seq"].as_i64())
    };
    let (va, vb) = (version(&a).expect("a"), version(&bj).expect("b"));
    let out = run_batch(
        &app,
        vec![
            report(&a, 10, Some("a1")),
            report(&bj, 20, None),
            report(&a, 30, Some("a3")),
            report(&queued, 40, None),
            report(missing, 50, None),
            report(&a, 35, None),
        ],
    );
    type Changed = (String, i64, i32, Option<String>);
    let rows: Vec<Option<Changed>> = out
        .into_iter()
        .map(|r| {
            r.expect("no report fails")
                .map(|row| (row.id, row.version, row.progress, row.message))
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            Some((a.clone(), va + 1, 10, Some("a1".into()))),
            Some((bj.clone(), vb + 1, 20, None)),
            Some((a.clone(), va + 2, 30, Some("a3".into()))),
            None,
            None,
            // No message: the last one stays.
            Some((a.clone(), va + 3, 35, Some("a3".into()))),
        ]
    );
    assert_eq!(
        progress_events(&app, &a),
        vec![
            (va + 1, 10, Some("a1".into())),
            (va + 2, 30, Some("a3".into())),
            (va + 3, 35, None),
        ]
    );
    assert_eq!(progress_events(&app, &bj), vec![(vb + 1, 20, None)]);
    assert!(progress_events(&app, &queued).is_empty());
    let j = app.get(&format!("/coordinator/jobs/{a}")).json();
    assert_eq!(
        (j["progress"].as_i64(), j["message"].as_str()),
        (Some(35), Some("a3"))
    );
    // Over HTTP the queued job's report takes the general path: 409, nothing written.
    let r = app.patch_json(
        &format!("/coordinator/jobs/{queued}/progress"),
        &json!({"percent": 40}),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    let metrics = app.get("/metrics").body;
    assert!(
        metrics.contains(r#"coordinator_db_queue_limit{queue="progress_log"} 1024"#),
        "the progress log's queue is exported"
    );
}

/// A report PostgreSQL cannot store (a NUL character in its message) fails the batch's
/// statement; each report is then written on its own, so only that one fails and the
/// others of its batch are stored and answered.
fn one_bad_report_does_not_sink_its_progress_batch(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let (a, bj, c) = (app.running_job(), app.running_job(), app.running_job());
    let out = run_batch(
        &app,
        vec![
            report(&a, 10, None),
            report(&bj, 20, Some("nul \u{0} here")),
            report(&c, 30, None),
        ],
    );
    let [first, bad, third] = <[_; 3]>::try_from(out).expect("three answers");
    assert_eq!(first.expect("a").expect("a changed").progress, 10);
    assert!(bad.is_err(), "the bad report fails: {bad:?}");
    assert_eq!(third.expect("c").expect("c changed").progress, 30);
    let percents = |id: &str| -> Vec<i64> {
        progress_events(&app, id)
            .into_iter()
            .map(|(_, p, _)| p)
            .collect()
    };
    assert_eq!(percents(&a), vec![10]);
    assert!(percents(&bj).is_empty());
    assert_eq!(percents(&c), vec![30]);
}

/// Signed reports carry their replay records into PostgreSQL's progress batch: a report
/// whose record is new is written; one whose record is already stored, or that repeats
/// another record of the batch, is answered `Replayed` and writes nothing; a report that
/// fails on its own (a NUL in its message, so the batch is written again report by
/// report) keeps its record, and its batch's other reports are written. Reports without
/// a record (API key, job token) share the batch.
fn a_progress_batch_writes_its_replay_records_in_the_same_commit(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let now = coordinator::db::now_millis();
    let row = move |sig: &str| ReplayRow::new("progress-batch", sig, now / 1000, now + 60_000);
    let signed = |id: &str, percent: i32, message: Option<&str>, sig: &str| ProgressReport {
        record: Some(row(sig)),
        ..report(id, percent, message)
    };
    let jobs: Vec<String> = (0..5).map(|_| app.running_job()).collect();
    let db = app.state.db.clone();
    let seen = row("seen");
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| insert_replays(conn, &[seen])))
        .expect("stored");
    let percents = |id: &str| -> Vec<i64> {
        progress_events(&app, id)
            .into_iter()
            .map(|(_, p, _)| p)
            .collect()
    };
    // Every statement succeeds: one transaction.
    let out = run_batch(
        &app,
        vec![
            signed(&jobs[0], 10, None, "s1"),
            signed(&jobs[1], 20, None, "seen"),
            report(&jobs[2], 30, None),
            signed(&jobs[3], 40, None, "s1"),
        ],
    );
    let got: Vec<Result<Option<i32>, bool>> = out
        .into_iter()
        .map(|r| {
            r.map(|row| row.map(|row| row.progress))
                .map_err(|e| matches!(e, StoreError::Replayed))
        })
        .collect();
    assert_eq!(got, vec![Ok(Some(10)), Err(true), Ok(Some(30)), Err(true)]);
    assert_eq!(percents(&jobs[0]), vec![10]);
    assert!(percents(&jobs[1]).is_empty(), "a replay writes nothing");
    assert_eq!(percents(&jobs[2]), vec![30]);
    assert!(
        percents(&jobs[3]).is_empty(),
        "a repeated record writes nothing"
    );
    // The batch's statement fails: written again, report by report.
    let out = run_batch(
        &app,
        vec![
            signed(&jobs[0], 11, None, "s2"),
            signed(&jobs[4], 50, Some("nul \u{0} here"), "s3"),
            signed(&jobs[1], 21, None, "seen"),
            report(&jobs[2], 31, None),
        ],
    );
    let [first, bad, replayed, plain] = <[_; 4]>::try_from(out).expect("four answers");
    assert_eq!(first.expect("first").expect("changed").progress, 11);
    assert!(
        bad.as_ref()
            .is_err_and(|e| !matches!(e, StoreError::Replayed)),
        "the bad report fails on its own: {bad:?}"
    );
    assert!(
        matches!(replayed, Err(StoreError::Replayed)),
        "{replayed:?}"
    );
    assert_eq!(plain.expect("plain").expect("changed").progress, 31);
    assert_eq!(percents(&jobs[0]), vec![10, 11]);
    assert!(percents(&jobs[4]).is_empty());
    let db = app.state.db.clone();
    let stored = actix_web::rt::System::new().block_on(stored_signatures(&db, "progress-batch"));
    assert_eq!(
        stored,
        ["s1", "s2", "s3", "seen"],
        "the bad report's record stays"
    );
}

/// Run one create group as the create log's threads do (on SQLite, as a write of the
/// group-commit writer).
fn run_group(app: &crate::helpers::TestApp, group: Vec<NewCreate>) -> Vec<Made> {
    let db = app.state.db.clone();
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| create_group(conn, group)))
        .expect("group")
}

/// A create group: signed creates carry their replay records into its transaction. A
/// create whose record is new is written; one whose record is already stored, or
/// repeats another record of the group, is answered `Replayed` and writes nothing. A
/// keyed create is written once: a repeat (in the group or later) answers the first
/// job, the same key with another body is a conflict that writes nothing. On
/// PostgreSQL a create that fails on its own (a NUL in its kind, so the group is
/// written again create by create) keeps its record and sinks no other create.
fn a_create_group_writes_its_replay_records_in_the_same_commit(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let pg = b == Backend::Postgres;
    const BY: &str = "create-group";
    let now = coordinator::db::now_millis();
    let record = move |sig: &str| ReplayRow::new(BY, sig, now / 1000, now + 60_000);
    let create = |kind: &str, key: Option<(&str, &str)>, sig: Option<&str>| NewCreate {
        job: coordinator::jobs::model::NewJob {
            kind: kind.into(),
            queue: "group".into(),
            priority: 0,
            payload: json!({"kind": kind}),
            max_attempts: 3,
            status: coordinator::jobs::JobStatus::Queued,
            run_at: None,
            backoff: coordinator::jobs::model::Backoff::default(),
        },
        created_by: BY.into(),
        idem: key.map(|(key, hash)| Idempotency {
            key: key.into(),
            request_hash: hash.into(),
        }),
        record: sig.map(record),
    };
    let db = app.state.db.clone();
    let seen = record("seen");
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| insert_replays(conn, &[seen])))
        .expect("stored");
    // Every statement succeeds: one transaction.
    let out = run_group(
        &app,
        vec![
            create("a", None, Some("c1")),
            create("b", None, Some("seen")),
            create("c", None, None),
            create("d", None, Some("c1")),
            create("e", Some(("k1", "h1")), Some("c2")),
            create("e", Some(("k1", "h1")), None),
            create("f", Some(("k1", "h2")), None),
        ],
    );
    let [a, b_, c, d, e, e2, f] = <[_; 7]>::try_from(out).expect("seven answers");
    let made = |m: Made| m.map(|c| (c.job.kind, c.created));
    assert_eq!(made(a).expect("a"), ("a".into(), true));
    assert!(
        matches!(b_, Err(StoreError::Replayed)),
        "a replay: {:?}",
        b_.err()
    );
    assert_eq!(made(c).expect("c"), ("c".into(), true));
    assert!(
        matches!(d, Err(StoreError::Replayed)),
        "a repeat: {:?}",
        d.err()
    );
    let e = e.expect("e");
    let e2 = e2.expect("e again");
    assert!(
        e.created && !e2.created,
        "the key's repeat is not created again"
    );
    assert_eq!(e.job.id, e2.job.id);
    assert!(matches!(f, Err(StoreError::Conflict(_))), "{:?}", f.err());
    // A keyed create of a later group finds the key taken.
    let later = run_group(&app, vec![create("e", Some(("k1", "h1")), None)]);
    let later = later.into_iter().next().expect("one").expect("later");
    assert_eq!(
        (later.job.id.as_str(), later.created),
        (e.job.id.as_str(), false)
    );
    // A create that fails on its own (PostgreSQL refuses a NUL in text).
    let out = run_group(
        &app,
        vec![
            create("g", None, Some("c3")),
            create("nul \u{0} here", None, Some("c4")),
            create("h", Some(("k2", "h1")), None),
            create("i", None, Some("seen")),
        ],
    );
    let [g, bad, h, i] = <[_; 4]>::try_from(out).expect("four answers");
    assert_eq!(made(g).expect("g"), ("g".into(), true));
    if pg {
        assert!(
            bad.as_ref()
                .is_err_and(|e| !matches!(e, StoreError::Replayed)),
            "the bad create fails on its own"
        );
    } else {
        assert!(bad.is_ok(), "SQLite stores a NUL");
    }
    assert_eq!(made(h).expect("h"), ("h".into(), true));
    assert!(matches!(i, Err(StoreError::Replayed)), "{:?}", i.err());
    let db = app.state.db.clone();
    let (mut kinds, events) = actix_web::rt::System::new()
        .block_on(db.read(|conn| {
            use coordinator::db::schema::{job_events, jobs};
            let kinds: Vec<String> = jobs::table
                .filter(jobs::created_by.eq(BY))
                .select(jobs::kind)
                .load(conn)?;
            let events: i64 = job_events::table
                .inner_join(jobs::table)
                .filter(jobs::created_by.eq(BY))
                .filter(job_events::event_type.eq("created"))
                .count()
                .get_result(conn)?;
            Ok((kinds, events))
        }))
        .expect("read back");
    kinds.sort();
    let mut want = vec!["a", "c", "e", "g", "h"];
    if !pg {
        want.push("nul \u{0} here");
    }
    want.sort();
    assert_eq!(kinds, want);
    assert_eq!(
        events,
        i64::try_from(want.len()).expect("small"),
        "one event per job"
    );
    let stored = actix_web::rt::System::new().block_on(stored_signatures(&db, BY));
    assert_eq!(
        stored,
        ["c1", "c2", "c3", "c4", "seen"],
        "the bad create's record stays"
    );
}

/// A group of webhook deliveries in one transaction: a new delivery makes its job; a
/// delivery stored before, or repeated within the group, is a duplicate answering the
/// first's job (a conflict when its id is the caller's own key and the body differs,
/// which writes nothing); a signed delivery whose record was stored is a replay. On
/// PostgreSQL a delivery that fails on its own (a NUL in its body, so the group is
/// written again delivery by delivery) sinks no other.
fn a_delivery_group_answers_each_delivery_as_alone(b: Backend) {
    use coordinator::stitcher::repo::{ingest_group, Ingest, Ingested};
    let Some(app) = crate::app!(b) else { return };
    let pg = b == Backend::Postgres;
    const BY: &str = "delivery-group";
    let now = coordinator::db::now_millis();
    let delivery = |id: &str, body: &str, own_key: bool, sig: Option<&str>| Ingest {
        caller: BY.into(),
        delivery_id: id.into(),
        payload: body.into(),
        job: coordinator::jobs::model::NewJob {
            kind: format!("deliver-{id}"),
            queue: "webhooks".into(),
            priority: 0,
            payload: json!({}),
            max_attempts: 3,
            status: coordinator::jobs::JobStatus::Queued,
            run_at: None,
            backoff: coordinator::jobs::model::Backoff::default(),
        },
        same_body_only: own_key,
        record: sig.map(|s| ReplayRow::new(BY, s, now / 1000, now + 60_000)),
    };
    let run = |group: Vec<Ingest>| -> Vec<Ingested> {
        let db = app.state.db.clone();
        actix_web::rt::System::new()
            .block_on(db.write(move |conn| ingest_group(conn, group)))
            .expect("group")
    };
    let db = app.state.db.clone();
    let seen = ReplayRow::new(BY, "seen", now / 1000, now + 60_000);
    actix_web::rt::System::new()
        .block_on(db.write(move |conn| insert_replays(conn, &[seen])))
        .expect("stored");
    let first = run(vec![delivery("d1", "{}", false, None)]);
    let d1 = first.into_iter().next().expect("one").expect("d1").0;
    let out = run(vec![
        delivery("d2", "{}", false, Some("s1")),
        delivery("d1", "{\"other\":1}", false, None),
        delivery("d2", "{}", false, None),
        delivery("k1", "{}", true, None),
        delivery("k1", "{\"other\":1}", true, None),
        delivery("d3", "{}", false, Some("seen")),
    ]);
    let [d2, again1, again2, k1, k1_other, replayed] = <[_; 6]>::try_from(out).expect("six");
    let (d2, dup) = d2.expect("d2");
    assert!(!dup);
    let (j, dup) = again1.expect("d1 again");
    assert!(
        dup && j.id == d1.id,
        "a delivery stored before answers its first job"
    );
    let (j, dup) = again2.expect("d2 again");
    assert!(
        dup && j.id == d2.id,
        "a repeat within the group answers the first's job"
    );
    assert!(!k1.expect("k1").1);
    assert!(
        matches!(k1_other, Err(StoreError::Conflict(_))),
        "{:?}",
        k1_other.err()
    );
    assert!(
        matches!(replayed, Err(StoreError::Replayed)),
        "{:?}",
        replayed.err()
    );
    let out = run(vec![
        delivery("d4", "{}", false, None),
        delivery("d5", "nul \u{0} here", false, Some("s2")),
        delivery("d6", "{}", false, None),
    ]);
    let [d4, bad, d6] = <[_; 3]>::try_from(out).expect("three");
    assert!(!d4.expect("d4").1 && !d6.expect("d6").1);
    assert_eq!(
        bad.is_err(),
        pg,
        "PostgreSQL refuses a NUL in text, SQLite stores it"
    );
    let (mut kinds, deliveries) = actix_web::rt::System::new()
        .block_on(db.read(|conn| {
            use coordinator::db::schema::{jobs, webhook_deliveries};
            let kinds: Vec<String> = jobs::table
                .filter(jobs::created_by.eq(BY))
                .select(jobs::kind)
                .load(conn)?;
            let n: i64 = webhook_deliveries::table
                .filter(webhook_deliveries::caller.eq(BY))
                .count()
                .get_result(conn)?;
            Ok((kinds, n))
        }))
        .expect("read back");
    kinds.sort();
    let mut want = vec![
        "deliver-d1",
        "deliver-d2",
        "deliver-d4",
        "deliver-d6",
        "deliver-k1",
    ];
    if !pg {
        want.push("deliver-d5");
    }
    want.sort();
    assert_eq!(kinds, want, "one job per new delivery");
    assert_eq!(deliveries, i64::try_from(want.len()).expect("small"));
    let stored = actix_web::rt::System::new().block_on(stored_signatures(&db, BY));
    assert_eq!(stored, ["s1", "s2", "seen"]);
}

/// One batch of replay records as the replay log writes it: a record already stored
/// and the second of a pair within the batch are replays (`false`), every other one is
/// new (`true`), answered in the batch's order; each pair is stored once.
fn a_replay_batch_answers_each_record_in_order(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let now = coordinator::db::now_millis();
    let row = move |sig: &str| ReplayRow::new("batch-test", sig, now / 1000, now + 60_000);
    let db = app.state.db.clone();
    let (first, second, stored) = actix_web::rt::System::new().block_on(async move {
        let first = db
            .write(move |conn| insert_replays(conn, &[row("a")]))
            .await
            .expect("first");
        let batch = vec![row("b"), row("a"), row("c"), row("b"), row("d")];
        let second = db
            .write(move |conn| insert_replays(conn, &batch))
            .await
            .expect("second");
        let stored = stored_signatures(&db, "batch-test").await;
        (first, second, stored)
    });
    assert_eq!(first, [true]);
    assert_eq!(second, [true, false, true, false, true]);
    assert_eq!(stored, ["a", "b", "c", "d"]);
}
