//! Picking the next job of a queue: the one place where the two backends need
//! different SQL for the same thing.

use diesel::prelude::*;

use super::schema::jobs;
use super::DbConnection;
use crate::error::StoreError;

/// Lock the best QUEUED job of `queue` (priority, then age) that is due (`run_at` not
/// in the future) inside the caller's transaction and bump its version; `None` when
/// the queue has no due job.
///
/// PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED`, so concurrent claimers take different
/// rows. SQLite: the first statement is the `UPDATE`, which takes the database write
/// lock, so the choice cannot change under us until commit.
/// `queued` is the stored form of the QUEUED status (the job model owns it).
pub fn lock_next_queued(
    conn: &mut DbConnection,
    queue: &str,
    queued: &str,
) -> Result<Option<String>, StoreError> {
    let now = super::now_millis();
    match conn {
        DbConnection::Postgresql(pg) => {
            let id: Option<String> = jobs::table
                .filter(jobs::queue.eq(queue))
                .filter(jobs::status.eq(queued))
                .filter(jobs::run_at.le(now))
                .order((
                    jobs::priority.desc(),
                    jobs::created_at.asc(),
                    jobs::id.asc(),
                ))
                .select(jobs::id)
                .limit(1)
                .for_update()
                .skip_locked()
                .first(pg)
                .optional()?;
            if let Some(id) = &id {
                diesel::update(jobs::table.find(id))
                    .set(jobs::version.eq(jobs::version + 1))
                    .execute(pg)?;
            }
            Ok(id)
        }
        DbConnection::Sqlite(lite) => {
            let best = || {
                jobs::table
                    .filter(jobs::queue.eq(queue))
                    .filter(jobs::status.eq(queued))
                    .filter(jobs::run_at.le(now))
                    .order((
                        jobs::priority.desc(),
                        jobs::created_at.asc(),
                        jobs::id.asc(),
                    ))
                    .select(jobs::id)
                    .limit(1)
            };
            let n = diesel::sql_query(
                "UPDATE jobs SET version = version + 1 WHERE id = (SELECT id FROM jobs \
                 WHERE queue = ? AND status = ? AND run_at <= ? \
                 ORDER BY priority DESC, created_at, id LIMIT 1)",
            )
            .bind::<diesel::sql_types::Text, _>(queue)
            .bind::<diesel::sql_types::Text, _>(queued)
            .bind::<diesel::sql_types::BigInt, _>(now)
            .execute(lite)?;
            if n == 0 {
                return Ok(None);
            }
            Ok(best().first(lite).optional()?)
        }
    }
}
