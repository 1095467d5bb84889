//! The job statements of the write path, written out as statement types with a static
//! query id so that diesel keeps them prepared on each connection.
//!
//! Diesel never caches one of its own `UPDATE` statements (a changeset's `None` fields
//! may change its SQL), so every `diesel::update` is parsed and planned again on every
//! call — for the lock with its 28 returned columns, most of the writer's allocations
//! per progress update. The statements here always have the same SQL, so the cache
//! keyed by their type is right:
//!
//! - [`LockJob`]: the version bump that locks a job's row and reads it back;
//! - [`SetChanges`]: the columns of [`JobRow::changes`] (SQLite runs it alone,
//!   PostgreSQL inside [`PgChange`]);
//! - [`PgChange`]: on PostgreSQL the changed columns and the event in one statement
//!   (one round trip instead of two; the writes are data-modifying CTEs, which run
//!   whether or not the final SELECT reads them), with the trim of the job's oldest
//!   events ([`EventBound`]) when the event's `seq` calls for one;
//! - [`Heartbeat`]: a RUNNING job's new lease expiry;
//! - [`PgProgressBatch`]: on PostgreSQL RUNNING jobs' progress reports — version
//!   bump, progress, message, lease and event — in one statement that commits on its
//!   own (one round trip instead of four: `BEGIN`, lock, change, `COMMIT`), for one
//!   report or for the progress log's batch (`jobs::progress`), trims included;
//! - [`LiteProgress`]: on SQLite a RUNNING job's progress report — version bump,
//!   progress, message, lease — as one `UPDATE … RETURNING` instead of a lock and a
//!   write (the event is a second statement, and the trim, on one event in
//!   [`EventBound::step`], a third).
//!
//! The trims bind the bound (`keep`, `step`) as parameters: the SQL text stays one
//! constant, and on PostgreSQL a trim whose condition is false is a `One-Time Filter`
//! (`PgChange`) or a filter on the few rows the statement changed (`PgProgressBatch`),
//! so it costs nothing on the writes that do not trim.

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment};
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, HasSqlType, Integer, Nullable, Text};
use diesel::{QueryResult, Table};

use super::model::{EventBound, EventType};
use super::row::JobRow;
use super::JobStatus;
use crate::db::prepared_statement;
use crate::db::schema::jobs;

/// `UPDATE jobs SET version = version + 1 WHERE id = ? RETURNING <every column>`:
/// the first statement of every change, which takes the row lock (PostgreSQL) or the
/// write lock (SQLite) and reads the row in one round trip.
pub struct LockJob<'a>(pub &'a str);

prepared_statement!(
    LockJob,
    SetChanges,
    Heartbeat,
    PgChange,
    PgProgressBatch,
    LiteProgress
);

impl Query for LockJob<'_> {
    type SqlType = diesel::dsl::SqlTypeOf<<jobs::table as Table>::AllColumns>;
}

impl<DB> QueryFragment<DB> for LockJob<'_>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<Integer> + HasSqlType<BigInt>,
    String: ToSql<Text, DB>,
    str: ToSql<Text, DB>,
    i32: ToSql<Integer, DB>,
    i64: ToSql<BigInt, DB>,
    <jobs::table as Table>::AllColumns: QueryFragment<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("UPDATE jobs SET version = version + 1 WHERE id = ");
        out.push_bind_param::<Text, _>(self.0)?;
        // The columns in the table's order, which `JobRow` (positional) keeps.
        out.push_sql(" RETURNING ");
        jobs::all_columns.walk_ast(out.reborrow())
    }
}

/// `UPDATE jobs SET <the columns of JobRow::changes> WHERE id = ?`.
pub struct SetChanges<'a>(pub &'a JobRow);

impl<DB> QueryFragment<DB> for SetChanges<'_>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<Integer> + HasSqlType<BigInt>,
    String: ToSql<Text, DB>,
    i32: ToSql<Integer, DB>,
    i64: ToSql<BigInt, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        push_set_changes(self.0, &mut out)
    }
}

/// The SQL and binds of [`SetChanges`].
fn push_set_changes<'b, DB>(r: &'b JobRow, out: &mut AstPass<'_, 'b, DB>) -> QueryResult<()>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<Integer> + HasSqlType<BigInt>,
    String: ToSql<Text, DB>,
    i32: ToSql<Integer, DB>,
    i64: ToSql<BigInt, DB>,
{
    out.push_sql("UPDATE jobs SET status = ");
    out.push_bind_param::<Text, _>(&r.status)?;
    out.push_sql(", progress = ");
    out.push_bind_param::<Integer, _>(&r.progress)?;
    out.push_sql(", message = ");
    out.push_bind_param::<Nullable<Text>, _>(&r.message)?;
    out.push_sql(", result = ");
    out.push_bind_param::<Nullable<Text>, _>(&r.result)?;
    out.push_sql(", error = ");
    out.push_bind_param::<Nullable<Text>, _>(&r.error)?;
    out.push_sql(", gate_results = ");
    out.push_bind_param::<Nullable<Text>, _>(&r.gate_results)?;
    out.push_sql(", attempts = ");
    out.push_bind_param::<Integer, _>(&r.attempts)?;
    out.push_sql(", max_attempts = ");
    out.push_bind_param::<Integer, _>(&r.max_attempts)?;
    out.push_sql(", worker = ");
    out.push_bind_param::<Nullable<Text>, _>(&r.worker)?;
    out.push_sql(", lease_expires_at = ");
    out.push_bind_param::<Nullable<BigInt>, _>(&r.lease_expires_at)?;
    out.push_sql(", updated_at = ");
    out.push_bind_param::<BigInt, _>(&r.updated_at)?;
    out.push_sql(", started_at = ");
    out.push_bind_param::<Nullable<BigInt>, _>(&r.started_at)?;
    out.push_sql(", finished_at = ");
    out.push_bind_param::<Nullable<BigInt>, _>(&r.finished_at)?;
    out.push_sql(", run_at = ");
    out.push_bind_param::<BigInt, _>(&r.run_at)?;
    out.push_sql(" WHERE id = ");
    out.push_bind_param::<Text, _>(&r.id)?;
    Ok(())
}

/// A job token's attempt, as the statements take it: the write applies only while the
/// job is still on that attempt ([`ANY_ATTEMPT`] for a caller credential, which is not
/// tied to one). A token checked at authentication can be a moment old by the time its
/// write runs: the job may have been handed back and claimed again since.
pub fn attempt_fence(attempt: Option<i32>) -> i32 {
    attempt.unwrap_or(ANY_ATTEMPT)
}

/// No attempt to match (attempts are never negative).
pub const ANY_ATTEMPT: i32 = -1;

/// `UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND status = ? AND <attempt>`:
/// renew the lease of a job in the given (RUNNING) state and, for a job token, still on
/// the token's attempt ([`attempt_fence`]); 0 rows otherwise.
pub struct Heartbeat<'a> {
    pub id: &'a str,
    pub status: &'a str,
    pub until: i64,
    pub attempt: i32,
}

impl<DB> QueryFragment<DB> for Heartbeat<'_>
where
    DB: Backend + HasSqlType<Text> + HasSqlType<BigInt> + HasSqlType<Integer>,
    str: ToSql<Text, DB>,
    i64: ToSql<BigInt, DB>,
    i32: ToSql<Integer, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        out.push_sql("UPDATE jobs SET lease_expires_at = ");
        out.push_bind_param::<BigInt, _>(&self.until)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Text, _>(self.id)?;
        out.push_sql(" AND status = ");
        out.push_bind_param::<Text, _>(self.status)?;
        out.push_sql(" AND (");
        out.push_bind_param::<Integer, _>(&self.attempt)?;
        out.push_sql(" < 0 OR attempts = ");
        out.push_bind_param::<Integer, _>(&self.attempt)?;
        out.push_sql(")");
        Ok(())
    }
}

/// PostgreSQL: [`SetChanges`] and the job's event in one statement; when the event's
/// `seq` (the row's version) is a trimming one ([`EventBound::trim_upto`]), the same
/// statement deletes the job's events `keep` and more behind it. The condition reads
/// only parameters, so PostgreSQL plans it as a `One-Time Filter` and the delete does
/// not run at all on the other writes.
pub struct PgChange<'a> {
    pub row: &'a JobRow,
    pub event_type: &'a str,
    pub data: String,
    pub now: i64,
    pub events: EventBound,
}

impl QueryFragment<diesel::pg::Pg> for PgChange<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        let r = self.row;
        out.push_sql("WITH changed AS (");
        push_set_changes(r, &mut out)?;
        out.push_sql(
            " RETURNING id), event AS (INSERT INTO job_events \
             (job_id, seq, event_type, data, created_at) VALUES (",
        );
        out.push_bind_param::<Text, _>(&r.id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&r.version)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.event_type)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.data)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(")), trim AS (DELETE FROM job_events WHERE job_id = ");
        out.push_bind_param::<Text, _>(&r.id)?;
        out.push_sql(" AND seq <= ");
        out.push_bind_param::<BigInt, _>(&r.version)?;
        out.push_sql(" - ");
        out.push_bind_param::<BigInt, _>(&self.events.keep)?;
        out.push_sql(" AND ");
        out.push_bind_param::<BigInt, _>(&r.version)?;
        out.push_sql(" > ");
        out.push_bind_param::<BigInt, _>(&self.events.keep)?;
        out.push_sql(" AND ");
        out.push_bind_param::<BigInt, _>(&r.version)?;
        out.push_sql(" % ");
        out.push_bind_param::<BigInt, _>(&self.events.step)?;
        // At most `MAX_TRIM` rows, the job's oldest first (its oldest: one probe of the
        // primary key), so a backlog drains over later trims.
        out.push_sql(" = 0 AND seq < (SELECT min(seq) FROM job_events WHERE job_id = ");
        out.push_bind_param::<Text, _>(&r.id)?;
        out.push_sql(") + ");
        out.push_bind_param::<BigInt, _>(&EventBound::MAX_TRIM)?;
        out.push_sql(") SELECT 1 FROM changed");
        Ok(())
    }
}

/// PostgreSQL: progress reports on RUNNING jobs as one statement that commits on its
/// own, returning each changed row (every column, as [`LockJob`]) — one report for a
/// request alone, several for the progress log's batch (`jobs::progress`), each job at
/// most once, in the order the rows are to be locked. No row for a job that is not
/// RUNNING, does not exist, is no longer on a job token's attempt, or whose report would
/// revoke tokens (see
/// `repo::token_revocation`: the first attempt's report in the millisecond of its
/// claim); the caller then takes the general path (lock,
/// [`super::repo::apply_locked`]), which gives the exact answer. What it writes is what
/// that path writes for `Change::Progress`: version + 1, `progress`, `message` when one
/// is given, `updated_at`, the renewed lease and the `progress` event with `seq` = the
/// new version — and the trim of a job's oldest events when that `seq` calls for one
/// ([`EventBound::trim_upto`], with each report's own `keep` and `step`): the
/// delete joins only the rows the statement changed whose new version trims, and
/// reads the job's events by their primary key range, so it touches no row of
/// `job_events` when no report of the batch trims. (The notification goes after the
/// commit, `db::outbox`.) The arrays are the reports' columns, index by index.
pub struct PgProgressBatch<'a> {
    pub ids: Vec<&'a str>,
    pub percents: Vec<i32>,
    pub messages: Vec<Option<&'a str>>,
    pub lease_until: Vec<i64>,
    /// The events' `data`.
    pub data: Vec<String>,
    /// Each report's [`attempt_fence`].
    pub attempts: Vec<i32>,
    /// Each report's [`EventBound::keep`] and [`EventBound::step`].
    pub keeps: Vec<i64>,
    pub steps: Vec<i64>,
    pub now: i64,
}

impl Query for PgProgressBatch<'_> {
    type SqlType = diesel::dsl::SqlTypeOf<<jobs::table as Table>::AllColumns>;
}

impl QueryFragment<diesel::pg::Pg> for PgProgressBatch<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        use diesel::sql_types::Array;
        out.push_sql("WITH input AS (SELECT u.*, s.version AS seen FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Integer>, _>(&self.percents)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.messages)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.lease_until)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.data)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Integer>, _>(&self.attempts)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.keeps)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.steps)?;
        // `seen`: the job's version in the statement's snapshot. The trim's delete reads
        // `job_events` with that snapshot, so it cannot see the events of the writers
        // this statement waited behind for the row lock (versions above `seen`); a
        // report whose new version would trim one of them (the job moved `keep` or
        // more while it waited) is not written here, and the general path, which
        // locks before it reads, writes it instead. The self-join is not locked, so
        // the re-check after the wait compares the current version with `seen`.
        out.push_sql(
            ") AS u(id, percent, message, lease_until, data, attempt, keep, step) \
             JOIN jobs AS s ON s.id = u.id), \
             changed AS (UPDATE jobs SET version = jobs.version + 1, progress = i.percent, \
             message = COALESCE(i.message, jobs.message), updated_at = ",
        );
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(
            ", lease_expires_at = i.lease_until FROM input AS i \
             WHERE jobs.id = i.id AND (i.attempt < 0 OR jobs.attempts = i.attempt) \
             AND jobs.version - i.seen < i.keep AND jobs.status = ",
        );
        out.push_bind_param::<Text, _>(JobStatus::Running.as_str())?;
        out.push_sql(" AND (jobs.attempts <> 1 OR jobs.started_at IS DISTINCT FROM ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(
            ") RETURNING jobs.*, i.data AS event_data, i.keep AS event_keep, \
             i.step AS event_step), event AS (INSERT INTO job_events \
             (job_id, seq, event_type, data, created_at) SELECT id, version, ",
        );
        out.push_bind_param::<Text, _>(EventType::Progress.as_str())?;
        out.push_sql(", event_data, ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(
            " FROM changed), trim AS (DELETE FROM job_events USING changed AS c \
             WHERE c.version > c.event_keep AND c.version % c.event_step = 0 \
             AND job_events.job_id = c.id AND job_events.seq <= c.version - c.event_keep \
             AND job_events.seq < (SELECT min(o.seq) FROM job_events AS o \
             WHERE o.job_id = c.id) + ",
        );
        // At most `MAX_TRIM` rows per job, its oldest first. The oldest is read with
        // the statement's snapshot, which may still hold rows a trim it waited behind
        // deleted: then this one deletes fewer, never more, and never a row above its
        // own `version - keep` (the `seen` rule above is unchanged).
        out.push_bind_param::<BigInt, _>(&EventBound::MAX_TRIM)?;
        out.push_sql(")");
        // The CTE is named `jobs` in the final SELECT, so the table's qualified column
        // names (the same list as `LockJob`'s) read it.
        out.push_sql(" SELECT ");
        jobs::all_columns.walk_ast(out.reborrow())?;
        out.push_sql(" FROM changed AS jobs");
        Ok(())
    }
}

/// SQLite: a progress report on a RUNNING job as one statement, returning the changed
/// row (every column, as [`LockJob`]); no row under the same conditions as
/// [`PgProgressBatch`] (not RUNNING, missing, past the token's attempt, or a report that
/// would revoke tokens),
/// and the caller then takes the general path. It writes what that path writes for
/// `Change::Progress` but the event, which the caller inserts next in the same
/// transaction.
pub struct LiteProgress<'a> {
    pub id: &'a str,
    pub percent: i32,
    pub message: Option<&'a str>,
    pub lease_until: i64,
    /// [`attempt_fence`].
    pub attempt: i32,
    pub now: i64,
}

impl Query for LiteProgress<'_> {
    type SqlType = diesel::dsl::SqlTypeOf<<jobs::table as Table>::AllColumns>;
}

impl QueryFragment<diesel::sqlite::Sqlite> for LiteProgress<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, diesel::sqlite::Sqlite>) -> QueryResult<()> {
        out.push_sql("UPDATE jobs SET version = version + 1, progress = ");
        out.push_bind_param::<Integer, _>(&self.percent)?;
        out.push_sql(", message = COALESCE(");
        out.push_bind_param::<Nullable<Text>, _>(&self.message)?;
        out.push_sql(", message), updated_at = ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(", lease_expires_at = ");
        out.push_bind_param::<BigInt, _>(&self.lease_until)?;
        out.push_sql(" WHERE id = ");
        out.push_bind_param::<Text, _>(self.id)?;
        out.push_sql(" AND status = ");
        out.push_bind_param::<Text, _>(JobStatus::Running.as_str())?;
        out.push_sql(" AND (");
        out.push_bind_param::<Integer, _>(&self.attempt)?;
        out.push_sql(" < 0 OR attempts = ");
        out.push_bind_param::<Integer, _>(&self.attempt)?;
        out.push_sql(") AND (attempts <> 1 OR started_at IS NOT ");
        out.push_bind_param::<BigInt, _>(&self.now)?;
        out.push_sql(") RETURNING ");
        jobs::all_columns.walk_ast(out.reborrow())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use diesel::connection::{Instrumentation, InstrumentationEvent};
    use diesel::prelude::*;
    use diesel::sqlite::{Sqlite, SqliteConnection};
    use diesel_migrations::MigrationHarness;
    use serde_json::json;

    use super::*;
    use crate::jobs::model::NewJob;
    use crate::jobs::repo::new_row;
    use crate::jobs::JobStatus;

    fn row() -> JobRow {
        let job = NewJob {
            kind: "k".into(),
            queue: "q".into(),
            priority: 0,
            payload: json!({}),
            max_attempts: 3,
            status: JobStatus::Queued,
            run_at: None,
            backoff: Default::default(),
        };
        new_row(&job, "c", None, 1)
    }

    /// The column names of a comma-separated list, unquoted and unqualified.
    fn names<'a>(list: impl Iterator<Item = &'a str>) -> Vec<String> {
        list.map(|c| {
            let c = c.split(" = ").next().unwrap_or("").trim();
            let c = c.rsplit('.').next().unwrap_or("");
            c.trim_matches(|q| q == '"' || q == '`').to_owned()
        })
        .collect()
    }

    /// The columns a SET clause assigns, in order.
    fn set_columns(sql: &str) -> Vec<String> {
        let set = sql.split(" SET ").nth(1).unwrap_or("");
        names(set.split(" WHERE ").next().unwrap_or("").split(", "))
    }

    /// The columns a RETURNING clause returns, in order.
    fn returned_columns(sql: &str) -> Vec<String> {
        let ret = sql.split(" RETURNING ").nth(1).unwrap_or("");
        names(ret.split(" -- ").next().unwrap_or("").split(", "))
    }

    #[test]
    fn set_changes_writes_the_columns_of_job_changes_on_both_backends() {
        let row = row();
        let builder = diesel::debug_query::<Sqlite, _>(
            &diesel::update(jobs::table.find(&row.id)).set(row.changes()),
        )
        .to_string();
        let want = set_columns(&builder);
        assert_eq!(want.len(), 14, "{builder}");
        let lite = diesel::debug_query::<Sqlite, _>(&SetChanges(&row)).to_string();
        assert_eq!(set_columns(&lite), want, "{lite}");
        let pg = diesel::debug_query::<diesel::pg::Pg, _>(&PgChange {
            row: &row,
            event_type: "progress",
            data: "{}".into(),
            now: 1,
            events: EventBound::default(),
        })
        .to_string();
        assert_eq!(set_columns(&pg), want, "{pg}");
        assert!(!pg.contains("pg_notify"), "{pg}");
    }

    #[test]
    fn lock_job_returns_every_column_in_the_order_job_row_reads_them() {
        let builder = diesel::debug_query::<diesel::pg::Pg, _>(
            &diesel::update(jobs::table.find("j"))
                .set(jobs::version.eq(jobs::version + 1))
                .returning(jobs::all_columns),
        )
        .to_string();
        let want = returned_columns(&builder);
        assert_eq!(want.len(), 28, "{builder}");
        assert_eq!(want.first().map(String::as_str), Some("id"));
        let lite = diesel::debug_query::<Sqlite, _>(&LockJob("j")).to_string();
        assert_eq!(returned_columns(&lite), want, "{lite}");
        let pg = diesel::debug_query::<diesel::pg::Pg, _>(&LockJob("j")).to_string();
        assert_eq!(returned_columns(&pg), want, "{pg}");
        // PostgreSQL's one-statement progress report reads the row back the same way,
        // and notifies nobody before its commit (`db::outbox`).
        let progress = diesel::debug_query::<diesel::pg::Pg, _>(&PgProgressBatch {
            ids: vec!["j"],
            percents: vec![1],
            messages: vec![None],
            lease_until: vec![2],
            data: vec!["{}".into()],
            attempts: vec![ANY_ATTEMPT],
            keeps: vec![1000],
            steps: vec![62],
            now: 1,
        })
        .to_string();
        let selected = progress.rsplit(") SELECT ").next().unwrap_or("");
        let selected = selected.split(" FROM changed AS jobs").next().unwrap_or("");
        assert_eq!(names(selected.split(", ")), want, "{progress}");
        assert!(!progress.contains("pg_notify"), "{progress}");
    }

    /// The trims bind their bound: whatever `keep`, `step` and version, each statement
    /// has one SQL text (so it stays one prepared statement), and the text holds the
    /// trim's delete.
    #[test]
    fn the_trims_keep_one_sql_text_whatever_the_bound() {
        let sql = |q: String| q.split(" -- binds").next().unwrap_or("").to_owned();
        let change = |keep: i64, version: i64| {
            let mut r = row();
            r.version = version;
            sql(diesel::debug_query::<diesel::pg::Pg, _>(&PgChange {
                row: &r,
                event_type: "progress",
                data: "{}".into(),
                now: 1,
                events: EventBound::new(keep),
            })
            .to_string())
        };
        let a = change(16, 17);
        assert_eq!(a, change(100_000, 64_000), "{a}");
        assert!(
            a.contains("trim AS (DELETE FROM job_events WHERE job_id = $"),
            "{a}"
        );
        let batch = |keeps: Vec<i64>| {
            let n = keeps.len();
            sql(diesel::debug_query::<diesel::pg::Pg, _>(&PgProgressBatch {
                ids: vec!["j"; n],
                percents: vec![1; n],
                messages: vec![None; n],
                lease_until: vec![2; n],
                data: vec!["{}".into(); n],
                attempts: vec![ANY_ATTEMPT; n],
                steps: keeps.iter().map(|k| EventBound::new(*k).step()).collect(),
                keeps,
                now: 1,
            })
            .to_string())
        };
        let b = batch(vec![16]);
        assert_eq!(b, batch(vec![1000, 50, 100_000]), "{b}");
        assert!(
            b.contains("trim AS (DELETE FROM job_events USING changed"),
            "{b}"
        );
    }

    /// Counts the statements a connection prepares for its cache and the queries it runs.
    #[derive(Default)]
    struct Prepares {
        cached: usize,
        queries: usize,
    }

    struct Counter(Arc<Mutex<Prepares>>);

    impl Instrumentation for Counter {
        fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
            let mut p = self.0.lock().expect("counter");
            match event {
                InstrumentationEvent::CacheQuery { .. } => p.cached += 1,
                InstrumentationEvent::StartQuery { .. } => p.queries += 1,
                _ => {}
            }
        }
    }

    /// The point of these statements: each is prepared once per connection, then
    /// reused (diesel's own UPDATE would be prepared again on every call).
    #[test]
    fn the_write_path_statements_are_prepared_once_per_connection() {
        let mut c = SqliteConnection::establish(":memory:").expect("sqlite");
        c.run_pending_migrations(crate::db::migrate::SQLITE_MIGRATIONS)
            .expect("migrations");
        let mut row = row();
        diesel::insert_into(jobs::table)
            .values(&row)
            .execute(&mut c)
            .expect("insert");
        let counts = Arc::new(Mutex::new(Prepares::default()));
        c.set_instrumentation(Counter(counts.clone()));
        for i in 1..=5 {
            let locked: JobRow = LockJob(&row.id).get_result(&mut c).expect("lock");
            assert_eq!(locked.version, row.version + 1);
            row = locked;
            row.progress = i * 10;
            assert_eq!(SetChanges(&row).execute(&mut c).expect("set"), 1);
        }
        let beat = |c: &mut SqliteConnection, status: &str, attempt: i32| {
            Heartbeat {
                id: &row.id,
                status,
                until: 99,
                attempt,
            }
            .execute(c)
            .expect("heartbeat")
        };
        assert_eq!(beat(&mut c, &row.status, ANY_ATTEMPT), 1);
        assert_eq!(
            beat(&mut c, "RUNNING-NOT", ANY_ATTEMPT),
            0,
            "only in the given state"
        );
        assert_eq!(
            beat(&mut c, &row.status, row.attempts),
            1,
            "on the token's attempt"
        );
        assert_eq!(
            beat(&mut c, &row.status, row.attempts + 1),
            0,
            "not on another attempt"
        );
        let p = counts.lock().expect("counter");
        assert_eq!(p.queries, 14);
        assert_eq!(p.cached, 3, "each statement prepared once");
        drop(p);
        let stored: JobRow = jobs::table.find(&row.id).first(&mut c).expect("read");
        assert_eq!((stored.progress, stored.version), (50, row.version));
        assert_eq!(stored.lease_expires_at, Some(99));
        assert!(LockJob("missing")
            .get_result::<JobRow>(&mut c)
            .optional()
            .expect("lock")
            .is_none());
    }

    /// A job's insert is prepared once per connection, whatever its `None` columns.
    #[test]
    fn the_job_insert_is_prepared_once_per_connection() {
        let mut c = SqliteConnection::establish(":memory:").expect("sqlite");
        c.run_pending_migrations(crate::db::migrate::SQLITE_MIGRATIONS)
            .expect("migrations");
        let counts = Arc::new(Mutex::new(Prepares::default()));
        c.set_instrumentation(Counter(counts.clone()));
        for i in 0..3 {
            let mut r = row();
            if i == 1 {
                r.message = Some("set".into());
            }
            diesel::insert_into(jobs::table)
                .values(&r)
                .execute(&mut c)
                .expect("insert");
        }
        let p = counts.lock().expect("counter");
        assert_eq!((p.queries, p.cached), (3, 1));
    }

    /// SQLite's one-statement progress report ([`LiteProgress`], through `repo::apply`)
    /// leaves the row and the event exactly as the general path (lock, then
    /// `apply_locked`) does; a report on a job that is not RUNNING still gets the
    /// general path's 409.
    #[test]
    fn sqlite_progress_in_one_statement_writes_what_the_general_path_writes() {
        use crate::db::DbConnection;
        use crate::error::StoreError;
        use crate::jobs::model::{Change, JobId};
        use crate::jobs::repo::{apply, apply_locked};
        let terms = || crate::jobs::model::Terms::with_lease_ms(60_000);
        let mut lite = SqliteConnection::establish(":memory:").expect("sqlite");
        lite.run_pending_migrations(crate::db::migrate::SQLITE_MIGRATIONS)
            .expect("migrations");
        let mut c = DbConnection::Sqlite(lite);
        let running = |c: &mut DbConnection| {
            let mut r = row();
            r.status = JobStatus::Running.as_str().to_owned();
            r.attempts = 2;
            r.started_at = Some(1);
            r.worker = Some("w".into());
            r.message = Some("before".into());
            diesel::insert_into(jobs::table)
                .values(&r)
                .execute(c)
                .expect("insert");
            r.id
        };
        let (fast, general) = (running(&mut c), running(&mut c));
        let id = |s: &str| JobId::parse(s, "id").expect("id");
        let counts = Arc::new(Mutex::new(Prepares::default()));
        c.set_instrumentation(Counter(counts.clone()));
        let queries = || counts.lock().map(|p| p.queries).unwrap_or(0);
        let (mut fast_queries, mut general_queries) = (0, 0);
        for message in [Some("half".to_owned()), None] {
            let change = Change::Progress {
                percent: 40,
                message,
            };
            let before = queries();
            let a = apply(&mut c, &id(&fast), &change, terms(), None).expect("fast");
            fast_queries += queries() - before;
            let before = queries();
            let b = c
                .transaction(|c| {
                    let locked = match c {
                        DbConnection::Sqlite(l) => LockJob(&general).get_result::<JobRow>(l),
                        DbConnection::Postgresql(p) => LockJob(&general).get_result::<JobRow>(p),
                    }?;
                    apply_locked(c, locked, &change, terms())
                })
                .expect("general");
            general_queries += queries() - before;
            let seen = |r: &JobRow| {
                (
                    r.version,
                    r.progress,
                    r.message.clone(),
                    r.status.clone(),
                    r.lease_expires_at.map(|l| l - r.updated_at),
                )
            };
            assert_eq!(seen(&a), seen(&b));
            let stored = |c: &mut DbConnection, i: &str| -> JobRow {
                jobs::table.find(i).first(c).expect("read")
            };
            assert_eq!(
                seen(&stored(&mut c, &fast)),
                seen(&a),
                "what it returns is stored"
            );
        }
        let events = |c: &mut DbConnection, i: &str| -> Vec<(i64, String, String)> {
            use crate::db::schema::job_events;
            job_events::table
                .filter(job_events::job_id.eq(i))
                .order(job_events::seq)
                .select((job_events::seq, job_events::event_type, job_events::data))
                .load(c)
                .expect("events")
        };
        // Savepoint, change, event, release; the general path has one more statement.
        assert_eq!((fast_queries, general_queries), (8, 10));
        let (ea, eb) = (events(&mut c, &fast), events(&mut c, &general));
        assert_eq!(ea.len(), 2);
        assert_eq!(ea, eb);
        let mut queued = row();
        diesel::insert_into(jobs::table)
            .values(&queued)
            .execute(&mut c)
            .expect("insert");
        let change = Change::Progress {
            percent: 1,
            message: None,
        };
        let r = apply(&mut c, &id(&queued.id), &change, terms(), None);
        assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
        queued = jobs::table.find(&queued.id).first(&mut c).expect("read");
        assert_eq!((queued.version, queued.progress), (row().version, 0));
    }
}
