//! The `replay_records` table, all of its storage in one place: batched insert (one
//! statement per batch on PostgreSQL, `ON CONFLICT DO NOTHING RETURNING`; `INSERT OR
//! IGNORE` per row inside one transaction on SQLite), the single insert, and the purge
//! of expired records. The replay log that decides when to write lives in
//! `auth/replay.rs`.

use std::collections::HashSet;

use diesel::prelude::*;

use super::schema::replay_records;
use super::DbConnection;
use crate::error::{is_unique_violation, StoreError};

/// One replay record: (caller, signature hash, expires_at ms).
pub type ReplayRow = (String, String, i64);

/// Insert every row; `true` for each row that was new (not a replay). Duplicates
/// within the batch: the first is new, the rest are replays.
pub fn insert_replays(
    conn: &mut DbConnection,
    rows: &[ReplayRow],
) -> Result<Vec<bool>, StoreError> {
    match conn {
        DbConnection::Postgresql(pg) => {
            let values: Vec<_> = rows
                .iter()
                .map(|(c, h, e)| {
                    (
                        replay_records::caller.eq(c),
                        replay_records::signature_hash.eq(h),
                        replay_records::expires_at.eq(*e),
                    )
                })
                .collect();
            let inserted: Vec<(String, String)> = diesel::insert_into(replay_records::table)
                .values(&values)
                .on_conflict_do_nothing()
                .returning((replay_records::caller, replay_records::signature_hash))
                .get_results(pg)?;
            let mut fresh: HashSet<(String, String)> = inserted.into_iter().collect();
            Ok(rows
                .iter()
                .map(|(c, h, _)| fresh.remove(&(c.clone(), h.clone())))
                .collect())
        }
        DbConnection::Sqlite(lite) => lite.transaction(|lite| {
            rows.iter()
                .map(|(c, h, e)| {
                    diesel::insert_or_ignore_into(replay_records::table)
                        .values((
                            replay_records::caller.eq(c),
                            replay_records::signature_hash.eq(h),
                            replay_records::expires_at.eq(*e),
                        ))
                        .execute(lite)
                        .map(|n| n == 1)
                        .map_err(StoreError::from)
                })
                .collect()
        }),
    }
}

/// Record a (caller, signature hash) pair; `false` when it was already there (a replay).
pub fn record_replay(
    conn: &mut DbConnection,
    caller: &str,
    signature_hash: &str,
    expires_at: i64,
) -> Result<bool, StoreError> {
    let r = diesel::insert_into(replay_records::table)
        .values((
            replay_records::caller.eq(caller),
            replay_records::signature_hash.eq(signature_hash),
            replay_records::expires_at.eq(expires_at),
        ))
        .execute(conn);
    match r {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Delete at most about `limit` expired replay records (bounded per pass); returns
/// how many went.
pub fn purge_replays(conn: &mut DbConnection, now: i64, limit: i64) -> Result<usize, StoreError> {
    let cutoff: Option<i64> = replay_records::table
        .filter(replay_records::expires_at.lt(now))
        .order(replay_records::expires_at)
        .select(replay_records::expires_at)
        .offset(limit.saturating_sub(1).max(0))
        .first(conn)
        .optional()?;
    let upto = cutoff.map_or(now, |c| c.saturating_add(1).min(now));
    Ok(
        diesel::delete(replay_records::table.filter(replay_records::expires_at.lt(upto)))
            .execute(conn)?,
    )
}

/// PostgreSQL: the replay table is the one the service deletes from all the time (every
/// record expires), so its dead tuples are reclaimed here instead of being left to
/// autovacuum, which may be off or slow to start on a busy table. Run once at least
/// this many rows were purged since the last run.
pub const VACUUM_AFTER_PURGED: u64 = 50_000;

/// `VACUUM (ANALYZE) replay_records`, giving up at once when another instance is
/// vacuuming it (it will have done the work). Not in a transaction (VACUUM refuses one).
pub fn vacuum_replays(conn: &mut DbConnection) -> Result<(), StoreError> {
    use diesel::connection::SimpleConnection;
    if !matches!(conn, DbConnection::Postgresql(_)) {
        return Ok(());
    }
    conn.batch_execute("SET lock_timeout = '100ms'")?;
    let r = conn.batch_execute("VACUUM (ANALYZE) replay_records");
    conn.batch_execute("RESET lock_timeout")?;
    Ok(r?)
}
