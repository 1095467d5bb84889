//! Concurrent writes through the storage layer. On SQLite every write goes through one
//! group-commit writer (many requests, one transaction, one savepoint each); on
//! PostgreSQL each runs in its own transaction. Either way each request's write stands
//! or falls on its own, and nothing is answered before it is committed.

use coordinator::db::replay::insert_replays;
use coordinator::db::schema::replay_records;
use coordinator::error::StoreError;
use diesel::prelude::*;

use crate::backend_tests;
use crate::helpers::Backend;

crate::postgres_tests!(housekeeping_vacuums_the_replay_table_after_large_purges);

backend_tests!(
    a_failing_write_never_sinks_the_writes_committed_with_it,
    housekeeping_purges_every_expired_replay_record,
);

const CALLER: &str = "group-commit-test";

/// 60 writes at once (within the write queue's bound), each inserting a row and every
/// third failing after its insert: exactly the others' rows are stored, each failed one
/// is answered with its own error, and every success was answered after its commit (its
/// row is there to read once all answers are in).
fn a_failing_write_never_sinks_the_writes_committed_with_it(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let db = app.state.db.clone();
    let n: usize = 60;
    let answers = actix_web::rt::System::new().block_on(async move {
        let writes = (0..n).map(|i| {
            let db = db.clone();
            async move {
                let answer = db
                    .write(move |conn| {
                        // Repositories open their own transaction (PostgreSQL runs the
                        // closure on an autocommit connection; on SQLite it nests).
                        conn.transaction(|conn| {
                            let row = (CALLER.to_owned(), format!("sig-{i:03}"), i64::MAX);
                            insert_replays(conn, std::slice::from_ref(&row))?;
                            if i % 3 == 0 {
                                return Err(StoreError::Conflict(format!("write {i} fails")));
                            }
                            Ok(i)
                        })
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
    let stored: Vec<String> = actix_web::rt::System::new()
        .block_on(db.read(|conn| {
            Ok(replay_records::table
                .filter(replay_records::caller.eq(CALLER))
                .select(replay_records::signature_hash)
                .order(replay_records::signature_hash)
                .load::<String>(conn)?)
        }))
        .expect("read back");
    assert_eq!(stored, expected);
}

/// 25,000 expired replay records (many purge chunks) and 10 live ones: one
/// housekeeping pass deletes every expired record, in several writes, and keeps the live
/// ones — the table stays bounded by the window however fast records arrive.
fn housekeeping_purges_every_expired_replay_record(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let now = coordinator::db::now_millis();
    let rows: Vec<_> = (0..25_010)
        .map(|i| {
            let expires = if i < 25_000 {
                now - 1_000
            } else {
                now + 600_000
            };
            ("purge-test".to_owned(), format!("sig-{i:05}"), expires)
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
        let left: i64 = db
            .read(|conn| {
                Ok(replay_records::table
                    .filter(replay_records::caller.eq("purge-test"))
                    .count()
                    .get_result(conn)?)
            })
            .await
            .expect("count");
        (report, left)
    });
    // The app's own housekeeping task (every 5 s) may have run the same pass first.
    assert!(
        report.replays_purged <= 25_000,
        "purged {}",
        report.replays_purged
    );
    assert_eq!(left, 10, "the live records stay, every expired one went");
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
        .map(|i| ("vacuum-test".to_owned(), format!("sig-{i:06}"), now - 1_000))
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
