//! Batched insert of replay records (group commit): one statement per batch on
//! PostgreSQL (`ON CONFLICT DO NOTHING RETURNING`), `INSERT OR IGNORE` per row inside
//! one transaction on SQLite. Either way one commit covers the whole batch.

use std::collections::HashSet;

use diesel::prelude::*;

use super::schema::replay_records;
use super::DbConnection;
use crate::error::StoreError;

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
