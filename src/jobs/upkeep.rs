//! Housekeeping's job storage: expired leases back to QUEUED (or FAILED), the
//! retention purge of finished jobs, and on PostgreSQL the vacuum of the rows the
//! jobs' changes and the events' trims left dead. Run by `housekeeping`; each job's own
//! change goes through `repo::apply`, as every other change does.

use diesel::prelude::*;

use super::model::{Change, JobId, Terms};
use super::repo::apply;
use super::row::JobRow;
use super::state::JobStatus;
use crate::db::schema::{job_events, jobs};
use crate::db::DbConnection;
use crate::error::StoreError;

/// What one lease sweep did.
#[derive(Debug, Default)]
pub struct LeaseSweep {
    /// The jobs it moved, each committed: announce every one of them.
    pub expired: Vec<JobRow>,
    /// The error that stopped the sweep before its last job, if one did.
    pub stopped_by: Option<StoreError>,
}

/// Requeue (or fail, after the last attempt) at most `limit` RUNNING jobs whose lease
/// has run out. Safe with several instances: each job is re-checked under its lock.
///
/// Each job is its own transaction (a savepoint of the writer's batch on SQLite), so a
/// failure part-way leaves the jobs before it moved. The sweep then stops and still
/// returns them with the error: on PostgreSQL they are committed, and their wake-ups,
/// counts and revocations must not be lost with the error (review, 2026-12-06).
pub fn expire_leases(
    conn: &mut DbConnection,
    now: i64,
    limit: i64,
    terms: Terms,
) -> Result<LeaseSweep, StoreError> {
    let ids: Vec<String> = jobs::table
        .filter(jobs::status.eq(JobStatus::Running.as_str()))
        .filter(jobs::lease_expires_at.lt(now))
        .order(jobs::lease_expires_at)
        .select(jobs::id)
        .limit(limit)
        .load(conn)?;
    let mut sweep = LeaseSweep::default();
    for id in ids {
        let Ok(id) = JobId::parse(&id, "id") else {
            continue;
        };
        match apply(conn, &id, &Change::LeaseExpired, terms, None) {
            Ok(row) => sweep.expired.push(row),
            Err(StoreError::Conflict(_) | StoreError::JobCancelled | StoreError::NotFound) => {}
            Err(e) => {
                sweep.stopped_by = Some(e);
                break;
            }
        }
    }
    Ok(sweep)
}

/// Delete at most `limit` jobs that finished before `before` (ms), with their events
/// and webhook deliveries; returns how many jobs went.
///
/// On PostgreSQL the jobs picked are locked as they are picked (`FOR UPDATE SKIP
/// LOCKED`, which re-checks the condition on a row changed since the statement's
/// snapshot): a job redriven between the pick and the delete is no longer old and
/// finished, and must not go with them, and one being changed right now is left for a
/// later pass. On SQLite the pick and the deletes are one write of the one writer.
pub fn purge_finished(
    conn: &mut DbConnection,
    before: i64,
    limit: i64,
) -> Result<usize, StoreError> {
    use crate::db::schema::webhook_deliveries;
    let terminal = [
        JobStatus::Completed.as_str(),
        JobStatus::Failed.as_str(),
        JobStatus::Cancelled.as_str(),
    ];
    conn.transaction(|conn| {
        let old = jobs::table
            .filter(jobs::status.eq_any(terminal))
            .filter(jobs::finished_at.lt(before))
            .select(jobs::id)
            .limit(limit);
        let ids: Vec<String> = match conn {
            DbConnection::Postgresql(pg) => old.for_update().skip_locked().load(pg)?,
            DbConnection::Sqlite(lite) => old.load(lite)?,
        };
        if ids.is_empty() {
            return Ok(0);
        }
        diesel::delete(job_events::table.filter(job_events::job_id.eq_any(&ids))).execute(conn)?;
        diesel::delete(webhook_deliveries::table.filter(webhook_deliveries::job_id.eq_any(&ids)))
            .execute(conn)?;
        Ok(diesel::delete(jobs::table.filter(jobs::id.eq_any(&ids))).execute(conn)?)
    })
}

/// PostgreSQL: dead tuples at which housekeeping vacuums a table of jobs
/// ([`vacuum_if_due`]), at the least; and at least this share of its live rows.
pub const VACUUM_DEAD: i64 = 10_000;
const VACUUM_SHARE: i64 = 5;

/// The tables housekeeping vacuums on PostgreSQL when their dead tuples pile up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vacuumed {
    /// Every change of a job leaves its row's old versions dead (a life of create,
    /// queue, claim and completion about seven): without a vacuum they pile up in the
    /// table and in the claim's index, whose every claim walks through them. A
    /// 10-minute soak of whole lives with autovacuum off (`coordinator-bench --life
    /// --soak 10 --backend postgres`, 2026-12-07) had 141 000 dead rows for 48 000 live
    /// ones after two minutes while its rate fell from 425 to ~190 jobs/s.
    Jobs,
    /// The event trims' and the retention's deletes: without a vacuum every later trim
    /// of the job walks through them. A 10-minute soak at ~6 000 updates/s grew the
    /// table past 400 MiB for ~35 000 live events while its rate fell from 6 600 to
    /// 4 200/s.
    JobEvents,
}

impl Vacuumed {
    pub const ALL: [Vacuumed; 2] = [Vacuumed::Jobs, Vacuumed::JobEvents];

    pub fn table(self) -> &'static str {
        match self {
            Vacuumed::Jobs => "jobs",
            Vacuumed::JobEvents => "job_events",
        }
    }
}

/// PostgreSQL: `VACUUM` the table when its dead tuples (`pg_stat_user_tables`) reach
/// [`VACUUM_DEAD`] and a fifth of its live rows; `true` when it ran. Autovacuum may be
/// off or slow to start (it is off on some servers), and nothing else
/// reclaims them. Gives up at once when another instance (or autovacuum) holds the
/// table. No `ANALYZE`, as for `replay_records` (`db::replay::vacuum_replays`).
pub fn vacuum_if_due(conn: &mut DbConnection, what: Vacuumed) -> Result<bool, StoreError> {
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{BigInt, Text};
    #[derive(QueryableByName)]
    struct Counts {
        #[diesel(sql_type = BigInt)]
        dead: i64,
        #[diesel(sql_type = BigInt)]
        live: i64,
    }
    let DbConnection::Postgresql(pg) = conn else {
        return Ok(false);
    };
    let counts: Option<Counts> = diesel::sql_query(
        "SELECT n_dead_tup AS dead, n_live_tup AS live FROM pg_stat_user_tables \
         WHERE relid = $1::regclass",
    )
    .bind::<Text, _>(what.table())
    .get_result(pg)
    .optional()?;
    let Some(c) = counts else { return Ok(false) };
    if c.dead < VACUUM_DEAD || c.dead.saturating_mul(VACUUM_SHARE) < c.live {
        return Ok(false);
    }
    pg.batch_execute("SET lock_timeout = '100ms'")?;
    // The name is one of two constants, never input.
    let r = pg.batch_execute(&format!("VACUUM {}", what.table()));
    pg.batch_execute("RESET lock_timeout")?;
    r?;
    Ok(true)
}
