//! Picking the next job of a queue, with different SQL on each backend (the other
//! backend-specific statements are listed in `db`'s module documentation).

use diesel::deserialize::FromSqlRow;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment};
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::Sqlite;
use diesel::Table;

use super::schema::jobs;
use super::DbConnection;
use crate::error::StoreError;

/// The stored form of the QUEUED status, written into the claim's SQL as a literal (not
/// a parameter) so that PostgreSQL and SQLite can use the partial index `jobs_queued`
/// (`… WHERE status = 'QUEUED'`), whose predicate a bound parameter does not imply. The
/// job model owns the status names; `jobs::repo`'s tests check this is its QUEUED.
pub const QUEUED: &str = "QUEUED";

/// The SQL types of a `jobs` row, every column in the table's order.
pub type JobColumns = diesel::dsl::SqlTypeOf<<jobs::table as Table>::AllColumns>;

/// Lock the best QUEUED job of `queue` (priority, then age, then id) that is due
/// (`run_at` not in the future) inside the caller's transaction and bump its version;
/// `None` when the queue has no due job.
///
/// The pick reads the partial index `jobs_queued` (queue, priority DESC, created_at, id)
/// of the QUEUED jobs only, whose order is the claim's: the first due entry it finds is
/// the job, however many jobs wait and however many finished ones the queue has had.
/// Without it, PostgreSQL (with no column statistics, as with autovacuum off, or stale
/// ones) chose any index on (queue, status) and sorted every QUEUED job of the queue
/// for each claim: a backlog made every claim slower (docs/decisions.md, "The claim
/// reads an index of the QUEUED jobs only").
///
/// Having the index is not enough on PostgreSQL: with no column statistics (autovacuum
/// off: nothing runs `ANALYZE`) the planner estimates a row or two for any queue and
/// status, and once housekeeping's `VACUUM` has told it the table's size it may find a
/// bitmap scan of all the queue's QUEUED jobs plus a sort of them as cheap as reading the
/// index in order, and keep that plan (`coordinator-bench --life --soak 3 --backend
/// postgres`, 2026-12-07: the fastest claim from 1.5 ms to 25 ms
/// within two minutes, the backlog of jobs whose claims the door refused growing). So
/// the claim's transaction forbids sorts first ([`PICK_BY_INDEX_ORDER`]); the one plan
/// left is the index read in order, whatever the statistics say.
///
/// PostgreSQL: the pick is a subquery `FOR UPDATE SKIP LOCKED`, so concurrent claimers
/// take different rows. SQLite: the statement is an `UPDATE`, which takes the database
/// write lock, so the choice cannot change under us until commit. On both the version
/// bump and the read of the whole row are the same statement as the pick: one round trip
/// instead of three (pick, bump, read; docs/decisions.md, "The claim picks, locks and
/// reads its job in one statement").
///
/// `R` is the job's row type (`jobs::row::JobRow`, which reads the columns by position
/// in the table's order).
pub fn lock_next_queued<R>(conn: &mut DbConnection, queue: &str) -> Result<Option<R>, StoreError>
where
    R: FromSqlRow<JobColumns, Pg> + FromSqlRow<JobColumns, Sqlite> + 'static,
{
    let now = super::now_millis();
    let next = BumpNextQueued { queue, now };
    match conn {
        DbConnection::Postgresql(pg) => {
            use diesel::connection::SimpleConnection;
            pg.batch_execute(PICK_BY_INDEX_ORDER)?;
            Ok(next.get_result::<R>(pg).optional()?)
        }
        DbConnection::Sqlite(lite) => Ok(next.get_result::<R>(lite).optional()?),
    }
}

/// PostgreSQL: run before the pick, inside the claim's transaction (`LOCAL`: it ends with
/// it): no sort, so the only plan for the pick's `ORDER BY … LIMIT 1` is a read of
/// `jobs_queued` in its order. The claim's other statements read rows by key and sort
/// nothing.
const PICK_BY_INDEX_ORDER: &str =
    "SET LOCAL enable_sort = off; SET LOCAL enable_incremental_sort = off";

// The claim's statement as a type with a static query id, so that diesel keeps it
// prepared on each connection (it never caches its own UPDATE or a `sql_query`).
prepared_statement!(BumpNextQueued);

/// `UPDATE jobs SET version = version + 1 WHERE id = (<the pick>) RETURNING <every
/// column>`: bump the version of the best due QUEUED job of `queue` and read it. On
/// PostgreSQL the pick locks its row `FOR UPDATE SKIP LOCKED` (an `InitPlan`, run
/// once); on SQLite the `UPDATE` is the transaction's first statement and takes the
/// write lock.
struct BumpNextQueued<'a> {
    queue: &'a str,
    now: i64,
}

impl Query for BumpNextQueued<'_> {
    type SqlType = JobColumns;
}

impl QueryFragment<Pg> for BumpNextQueued<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.push(" FOR UPDATE SKIP LOCKED", &mut out)
    }
}

impl QueryFragment<Sqlite> for BumpNextQueued<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        self.push("", &mut out)
    }
}

impl BumpNextQueued<'_> {
    /// The statement, with `lock` after the pick (binds: the queue, then the time).
    fn push<'b, DB>(&'b self, lock: &'static str, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>
    where
        DB: diesel::backend::Backend
            + diesel::sql_types::HasSqlType<Text>
            + diesel::sql_types::HasSqlType<BigInt>,
        str: diesel::serialize::ToSql<Text, DB>,
        i64: diesel::serialize::ToSql<BigInt, DB>,
        <jobs::table as Table>::AllColumns: QueryFragment<DB>,
    {
        out.push_sql(
            "UPDATE jobs SET version = version + 1 WHERE id = (SELECT id FROM jobs WHERE queue = ",
        );
        out.push_bind_param::<Text, _>(self.queue)?;
        out.push_sql(" AND status = '");
        out.push_sql(QUEUED);
        out.push_sql("' AND run_at <= ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(" ORDER BY priority DESC, created_at, id LIMIT 1");
        out.push_sql(lock);
        // The columns in the table's order, which the row type reads by position.
        out.push_sql(") RETURNING ");
        jobs::all_columns.walk_ast(out.reborrow())
    }
}

#[cfg(test)]
mod tests {
    use crate::db::plan_tests::{migrated_sqlite, Step};
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Text};

    use super::BumpNextQueued;

    /// SQLite's claim finds its job with one search of the partial index of QUEUED jobs,
    /// whose order is the claim's: no sort of the queue's jobs (`USE TEMP B-TREE`), which
    /// the index on (queue, status, priority, created_at) left for the id.
    #[test]
    fn the_sqlite_claim_reads_the_queued_index_in_its_order() {
        let mut c = migrated_sqlite();
        let stmt = BumpNextQueued { queue: "q", now: 0 };
        let sql = diesel::debug_query::<diesel::sqlite::Sqlite, _>(&stmt).to_string();
        let sql = sql.split(" -- binds").next().expect("the statement");
        let plan: Vec<String> = diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}"))
            .bind::<Text, _>("q")
            .bind::<BigInt, _>(0)
            .load::<Step>(&mut c)
            .expect("plan")
            .into_iter()
            .map(|s| s.detail)
            .collect();
        let text = plan.join("\n");
        assert!(text.contains("USING INDEX jobs_queued (queue=?)"), "{text}");
        assert!(!text.contains("TEMP B-TREE"), "{text}");
    }
}
