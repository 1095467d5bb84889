//! Picking the next job of a queue, with different SQL on each backend (the other
//! backend-specific statements are listed in `db`'s module documentation).

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::Sqlite;

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
                BumpVersion(id).execute(pg)?;
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
            let n = BumpNextQueued { queue, queued, now }.execute(lite)?;
            if n == 0 {
                return Ok(None);
            }
            Ok(best().first(lite).optional()?)
        }
    }
}

// The two version bumps as statement types with a static query id, so that diesel keeps
// them prepared on each connection (it never caches its own UPDATE or a `sql_query`).

/// PostgreSQL: `UPDATE jobs SET version = version + 1 WHERE id = ?` (the row is locked).
struct BumpVersion<'a>(&'a str);

prepared_statement!(BumpVersion, BumpNextQueued);

impl QueryFragment<Pg> for BumpVersion<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("UPDATE jobs SET version = version + 1 WHERE id = ");
        out.push_bind_param::<Text, _>(self.0)
    }
}

/// SQLite: bump the version of the best due job of `queue` in state `queued`, as its
/// first statement (which takes the write lock).
struct BumpNextQueued<'a> {
    queue: &'a str,
    queued: &'a str,
    now: i64,
}

impl QueryFragment<Sqlite> for BumpNextQueued<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        out.push_sql(
            "UPDATE jobs SET version = version + 1 WHERE id = (SELECT id FROM jobs WHERE queue = ",
        );
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND status = ");
        out.push_bind_param::<Text, _>(self.queued)?;
        out.push_sql(" AND run_at <= ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(" ORDER BY priority DESC, created_at, id LIMIT 1)");
        Ok(())
    }
}
