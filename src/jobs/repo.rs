//! Job storage. Plain functions over `&mut DbConnection` so they compose inside a
//! transaction. Every change and its `job_events` row are written in one transaction.
//!
//! Serialization of concurrent updates: each change starts with
//! `UPDATE jobs SET version = version + 1 WHERE id = ?`, a write as the transaction's
//! first statement. On PostgreSQL it takes the row lock, on SQLite the write lock, so
//! concurrent changes to one job queue up behind each other and none is lost; the new
//! version is the event's sequence number.

use diesel::prelude::*;
use serde_json::{json, Value};

use super::model::{Change, EventRow, JobId, JobRow, NewJob};
use super::state::{transition_error, JobStatus};
use crate::db::schema::{job_events, jobs};
use crate::db::{now_millis, DbConnection};
use crate::error::{is_unique_violation, StoreError};

/// Events returned with a job: the newest this many, oldest first.
pub const EVENTS_PER_READ: i64 = 1000;

/// An idempotent create: the caller's key and a hash of the request body.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

/// Outcome of a create: the job, and whether this call created it (false when an
/// `Idempotency-Key` matched an earlier request).
pub struct Created {
    pub job: JobRow,
    pub created: bool,
}

fn to_text(v: &Value) -> String {
    v.to_string()
}

/// The row for a new job (not yet written).
pub fn new_row(job: &NewJob, created_by: &str, idem: Option<&Idempotency>, now: i64) -> JobRow {
    JobRow {
        id: JobId::generate().into_string(),
        kind: job.kind.clone(),
        queue: job.queue.clone(),
        priority: job.priority,
        status: job.status.as_str().to_owned(),
        progress: 0,
        message: None,
        payload: to_text(&job.payload),
        result: None,
        error: None,
        gate_results: None,
        created_by: created_by.to_owned(),
        idempotency_key: idem.map(|i| i.key.clone()),
        request_hash: idem.map(|i| i.request_hash.clone()),
        attempts: 0,
        max_attempts: job.max_attempts,
        version: 1,
        worker: None,
        lease_expires_at: None,
        created_at: now,
        updated_at: now,
        started_at: None,
        finished_at: None,
        tokens_until: None,
    }
}

/// Insert a job row and its `created` event (inside the caller's transaction).
pub fn insert(conn: &mut DbConnection, row: &JobRow) -> Result<(), StoreError> {
    diesel::insert_into(jobs::table).values(row).execute(conn)?;
    let event = EventRow {
        job_id: row.id.clone(),
        seq: 1,
        event_type: "created".into(),
        data: json!({"status": row.status, "queue": row.queue}).to_string(),
        created_at: row.created_at,
    };
    diesel::insert_into(job_events::table)
        .values(&event)
        .execute(conn)?;
    Ok(())
}

/// Create a job. With an idempotency key, a repeat returns the first job; the same
/// key with a different body is a conflict. Races are settled by the unique index.
pub fn create(
    conn: &mut DbConnection,
    job: &NewJob,
    created_by: &str,
    idem: Option<&Idempotency>,
) -> Result<Created, StoreError> {
    let row = new_row(job, created_by, idem, now_millis());
    let inserted = conn.transaction(|conn| insert(conn, &row));
    match (inserted, idem) {
        (Ok(()), _) => Ok(Created {
            job: row,
            created: true,
        }),
        (Err(StoreError::Db(e)), Some(idem)) if is_unique_violation(&e) => {
            let first: JobRow = jobs::table
                .filter(jobs::created_by.eq(created_by))
                .filter(jobs::idempotency_key.eq(&idem.key))
                .select(JobRow::as_select())
                .first(conn)?;
            if first.request_hash.as_deref() != Some(idem.request_hash.as_str()) {
                return Err(StoreError::Conflict(
                    "Idempotency-Key was already used with a different request".into(),
                ));
            }
            Ok(Created {
                job: first,
                created: false,
            })
        }
        (Err(e), _) => Err(e),
    }
}

pub fn find(conn: &mut DbConnection, id: &JobId) -> Result<JobRow, StoreError> {
    jobs::table
        .find(id.as_str())
        .select(JobRow::as_select())
        .first(conn)
        .optional()?
        .ok_or(StoreError::NotFound)
}

/// The job with its newest events (oldest first); `true` when older ones were left out.
pub fn find_with_events(
    conn: &mut DbConnection,
    id: &JobId,
) -> Result<(JobRow, Vec<EventRow>, bool), StoreError> {
    let job = find(conn, id)?;
    let mut events: Vec<EventRow> = job_events::table
        .filter(job_events::job_id.eq(id.as_str()))
        .order(job_events::seq.desc())
        .limit(EVENTS_PER_READ + 1)
        .select(EventRow::as_select())
        .load(conn)?;
    let truncated = events.len() > usize::try_from(EVENTS_PER_READ).unwrap_or(usize::MAX);
    events.truncate(usize::try_from(EVENTS_PER_READ).unwrap_or(usize::MAX));
    events.reverse();
    Ok((job, events, truncated))
}

/// Apply a change to a job in one transaction: lock (version bump), read, check the
/// state machine, write the row and its event.
pub fn apply(
    conn: &mut DbConnection,
    id: &JobId,
    change: &Change,
    lease_ms: i64,
) -> Result<JobRow, StoreError> {
    conn.transaction(|conn| {
        let locked = diesel::update(jobs::table.find(id.as_str()))
            .set(jobs::version.eq(jobs::version + 1))
            .execute(conn)?;
        if locked == 0 {
            return Err(StoreError::NotFound);
        }
        let row = find(conn, id)?;
        apply_locked(conn, row, change, lease_ms)
    })
}

/// Apply a change to a row this transaction has locked (version already bumped).
pub fn apply_locked(
    conn: &mut DbConnection,
    mut row: JobRow,
    change: &Change,
    lease_ms: i64,
) -> Result<JobRow, StoreError> {
    let now = now_millis();
    let (event_type, data) = apply_to_row(&mut row, change, now)?;
    if row.status() == JobStatus::Running && !matches!(change, Change::LeaseExpired) {
        // Any word from the worker renews its lease.
        row.lease_expires_at = Some(now.saturating_add(lease_ms));
    }
    write_change(conn, &row, event_type, &data, now)?;
    Ok(row)
}

/// Lock a job's row for the rest of the transaction without changing it (no version,
/// no event), so its state cannot move while a token is minted for it.
pub fn lock_for_token(conn: &mut DbConnection, id: &JobId) -> Result<(), StoreError> {
    let n = diesel::update(jobs::table.find(id.as_str()))
        .set(jobs::tokens_until.eq(jobs::tokens_until))
        .execute(conn)?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// Remember the latest expiry of a token issued for this job.
pub fn extend_tokens_until(
    conn: &mut DbConnection,
    id: &JobId,
    until: i64,
) -> Result<(), StoreError> {
    diesel::update(jobs::table.find(id.as_str()))
        .filter(
            jobs::tokens_until
                .is_null()
                .or(jobs::tokens_until.lt(until)),
        )
        .set(jobs::tokens_until.eq(Some(until)))
        .execute(conn)?;
    Ok(())
}

/// Tokens to revoke after this change, and until when: all of a job's tokens when it
/// has ended; the tokens of the attempt that just ended when it went back to QUEUED;
/// the tokens issued before any claim (attempt 0) when the first attempt has just
/// started (its start time is this change's time).
pub fn token_revocation(row: &JobRow, now: i64) -> Option<(String, i64)> {
    use crate::db::revoked::{attempt_key, job_key};
    let until = row.tokens_until.filter(|u| *u > now)?;
    match row.status() {
        s if s.is_terminal() => Some((job_key(&row.id), until)),
        JobStatus::Queued if row.attempts > 0 => Some((attempt_key(&row.id, row.attempts), until)),
        JobStatus::Running if row.attempts == 1 && row.started_at == Some(row.updated_at) => {
            Some((attempt_key(&row.id, 0), until))
        }
        _ => None,
    }
}

/// Write the changed columns of `row` and append its event (seq = row.version). A
/// job that ends has its tokens revoked in the same transaction.
pub fn write_change(
    conn: &mut DbConnection,
    row: &JobRow,
    event_type: &str,
    data: &Value,
    now: i64,
) -> Result<(), StoreError> {
    diesel::update(jobs::table.find(&row.id))
        .set(row.changes())
        .execute(conn)?;
    diesel::insert_into(job_events::table)
        .values(&EventRow {
            job_id: row.id.clone(),
            seq: row.version,
            event_type: event_type.to_owned(),
            data: data.to_string(),
            created_at: now,
        })
        .execute(conn)?;
    if let Some((key, until)) = token_revocation(row, now) {
        crate::db::revoked::revoke_token(conn, &key, until, now)?;
    }
    Ok(())
}

/// Move `row` to `to`, keeping the timestamps and attempt counter right.
pub fn set_status(row: &mut JobRow, to: JobStatus, now: i64) -> Result<(), StoreError> {
    let from = row.status();
    if !from.can_move_to(to) {
        return Err(StoreError::Conflict(transition_error(from, to)));
    }
    row.status = to.as_str().to_owned();
    row.updated_at = now;
    match to {
        JobStatus::Running => {
            row.attempts = row.attempts.saturating_add(1);
            row.started_at.get_or_insert(now);
        }
        JobStatus::Queued => {
            row.worker = None;
            row.lease_expires_at = None;
        }
        t if t.is_terminal() => {
            row.finished_at = Some(now);
            row.lease_expires_at = None;
        }
        _ => {}
    }
    Ok(())
}

/// The pure part of a change: mutate the row, return the event to append.
fn apply_to_row(
    row: &mut JobRow,
    change: &Change,
    now: i64,
) -> Result<(&'static str, Value), StoreError> {
    let from = row.status();
    match change {
        Change::Status { to, message } => {
            set_status(row, *to, now)?;
            if message.is_some() {
                row.message.clone_from(message);
            }
            Ok((
                "status",
                json!({"from": from, "to": to, "message": message}),
            ))
        }
        Change::Progress { percent, message } => {
            if from != JobStatus::Running {
                return Err(StoreError::Conflict(format!(
                    "progress can only be reported while RUNNING (job is {from})"
                )));
            }
            row.progress = *percent;
            row.updated_at = now;
            if message.is_some() {
                row.message.clone_from(message);
            }
            Ok(("progress", json!({"percent": percent, "message": message})))
        }
        Change::Complete { result } => {
            set_status(row, JobStatus::Completed, now)?;
            row.progress = 100;
            row.result = result.as_ref().map(to_text);
            Ok(("completed", json!({"from": from, "result": result})))
        }
        Change::LeaseExpired => {
            let expired =
                from == JobStatus::Running && row.lease_expires_at.is_some_and(|t| t <= now);
            if !expired {
                return Err(StoreError::Conflict("lease is not expired".into()));
            }
            let worker = row.worker.clone();
            if row.attempts >= row.max_attempts {
                set_status(row, JobStatus::Failed, now)?;
                row.error = Some("lease expired after the last attempt".into());
            } else {
                set_status(row, JobStatus::Queued, now)?;
            }
            Ok((
                "lease_expired",
                json!({"worker": worker, "to": row.status, "attempts": row.attempts}),
            ))
        }
        Change::Claim { worker } => {
            set_status(row, JobStatus::Running, now)?;
            row.worker = Some(worker.clone());
            Ok((
                "claimed",
                json!({"worker": worker, "attempt": row.attempts}),
            ))
        }
        Change::Fail {
            error,
            gate_results,
        } => {
            set_status(row, JobStatus::Failed, now)?;
            row.error = Some(error.clone());
            row.gate_results = gate_results.as_ref().map(to_text);
            Ok((
                "failed",
                json!({"from": from, "error": error, "gateResults": gate_results}),
            ))
        }
    }
}

/// Number of jobs per (queue, status) for the non-terminal statuses.
pub fn queue_depths(conn: &mut DbConnection) -> Result<Vec<(String, String, i64)>, StoreError> {
    let open = [
        JobStatus::Pending.as_str(),
        JobStatus::Queued.as_str(),
        JobStatus::Running.as_str(),
    ];
    let rows = jobs::table
        .filter(jobs::status.eq_any(open))
        .group_by((jobs::queue, jobs::status))
        .select((jobs::queue, jobs::status, diesel::dsl::count_star()))
        .load::<(String, String, i64)>(conn)?;
    Ok(rows)
}

/// Age in milliseconds of the oldest QUEUED job, if any.
pub fn oldest_queued_created_at(conn: &mut DbConnection) -> Result<Option<i64>, StoreError> {
    Ok(jobs::table
        .filter(jobs::status.eq(JobStatus::Queued.as_str()))
        .select(diesel::dsl::min(jobs::created_at))
        .first::<Option<i64>>(conn)?)
}

/// A cheap round trip to check the database answers.
pub fn ping(conn: &mut DbConnection) -> Result<(), StoreError> {
    use diesel::connection::SimpleConnection;
    conn.batch_execute("SELECT 1")?;
    Ok(())
}

/// Claim the best QUEUED job of `queue` for `worker`: RUNNING with a lease; `None`
/// when the queue is empty. Storage only: the token is minted by `auth::token::claim`,
/// in the same transaction.
pub fn claim(
    conn: &mut DbConnection,
    queue: &str,
    worker: &str,
    lease_ms: i64,
) -> Result<Option<JobRow>, StoreError> {
    conn.transaction(|conn| {
        let Some(id) = crate::db::queue::lock_next_queued(conn, queue, JobStatus::Queued.as_str())?
        else {
            return Ok(None);
        };
        let id = JobId::parse(&id, "id")
            .map_err(|_| StoreError::Internal("bad job id in database".into()))?;
        let row = find(conn, &id)?;
        let row = apply_locked(
            conn,
            row,
            &Change::Claim {
                worker: worker.to_owned(),
            },
            lease_ms,
        )?;
        Ok(Some(row))
    })
}

/// Requeue (or fail, after the last attempt) at most `limit` RUNNING jobs whose lease
/// has run out. Safe with several instances: each job is re-checked under its lock.
pub fn expire_leases(
    conn: &mut DbConnection,
    now: i64,
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<JobRow>, StoreError> {
    let ids: Vec<String> = jobs::table
        .filter(jobs::status.eq(JobStatus::Running.as_str()))
        .filter(jobs::lease_expires_at.lt(now))
        .order(jobs::lease_expires_at)
        .select(jobs::id)
        .limit(limit)
        .load(conn)?;
    let mut out = Vec::new();
    for id in ids {
        let Ok(id) = JobId::parse(&id, "id") else {
            continue;
        };
        match apply(conn, &id, &Change::LeaseExpired, lease_ms) {
            Ok(row) => out.push(row),
            Err(StoreError::Conflict(_) | StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Inputs of a start-time estimate for a queued job.
#[derive(Debug, Clone, Copy)]
pub struct QueueStats {
    pub ahead: i64,
    pub running: i64,
    pub avg_run_ms: Option<i64>,
}

/// Jobs queued ahead of a job with this priority, jobs running, and the mean run time
/// of the queue's last 20 completed jobs.
pub fn queue_stats(
    conn: &mut DbConnection,
    queue: &str,
    priority: i32,
    job_id: &str,
) -> Result<QueueStats, StoreError> {
    let ahead: i64 = jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Queued.as_str()))
        .filter(jobs::priority.ge(priority))
        .filter(jobs::id.ne(job_id))
        .count()
        .get_result(conn)?;
    let running: i64 = jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Running.as_str()))
        .count()
        .get_result(conn)?;
    let runs: Vec<(Option<i64>, Option<i64>)> = jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Completed.as_str()))
        .order(jobs::finished_at.desc())
        .select((jobs::started_at, jobs::finished_at))
        .limit(20)
        .load(conn)?;
    let durations: Vec<i64> = runs
        .into_iter()
        .filter_map(|(s, f)| Some(f? - s?))
        .filter(|d| *d >= 0)
        .collect();
    let avg_run_ms = (!durations.is_empty())
        .then(|| durations.iter().sum::<i64>() / i64::try_from(durations.len()).unwrap_or(1));
    Ok(QueueStats {
        ahead,
        running,
        avg_run_ms,
    })
}

impl QueueStats {
    /// Estimated start (unix ms): the jobs ahead are worked through by as many workers
    /// as are busy now (at least one), each taking the mean recent run time. `None`
    /// without run history.
    pub fn estimate_start(&self, now: i64) -> Option<i64> {
        let avg = self.avg_run_ms?;
        let workers = self.running.max(1);
        let rounds = if self.ahead == 0 && self.running == 0 {
            0
        } else {
            (self.ahead + 1 + workers - 1) / workers
        };
        Some(now.saturating_add(rounds.saturating_mul(avg)))
    }
}

/// Delete at most `limit` jobs that finished before `before` (ms), with their events
/// and webhook deliveries; returns how many jobs went.
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
        let ids: Vec<String> = jobs::table
            .filter(jobs::status.eq_any(terminal))
            .filter(jobs::finished_at.lt(before))
            .select(jobs::id)
            .limit(limit)
            .load(conn)?;
        if ids.is_empty() {
            return Ok(0);
        }
        diesel::delete(job_events::table.filter(job_events::job_id.eq_any(&ids))).execute(conn)?;
        diesel::delete(webhook_deliveries::table.filter(webhook_deliveries::job_id.eq_any(&ids)))
            .execute(conn)?;
        Ok(diesel::delete(jobs::table.filter(jobs::id.eq_any(&ids))).execute(conn)?)
    })
}
