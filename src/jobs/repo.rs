//! Job storage. Plain functions over `&mut DbConnection` so they compose inside a
//! transaction. Every change and its `job_events` row are written in one transaction.
//!
//! Serialization of concurrent updates: each change starts with
//! `UPDATE jobs SET version = version + 1 WHERE id = ?`, a write as the transaction's
//! first statement. On PostgreSQL it takes the row lock, on SQLite the write lock, so
//! concurrent changes to one job queue up behind each other and none is lost; the new
//! version is the event's sequence number.
//!
//! A job keeps only its newest events ([`EventBound`], `COORDINATOR_EVENTS_PER_JOB`):
//! every write of an event whose `seq` is a trimming one deletes the older ones in the
//! same transaction (on PostgreSQL in the same statement). A `created` event
//! (`seq` 1) never trims, so the inserts of new jobs have none.

use diesel::prelude::*;
use serde_json::{json, Value};

use super::model::{Change, EventBound, EventType, JobId, NewJob, Terms};
use super::queues::queue_admits;
use super::request::{Cursor, ListFilter};
use super::row::{EventRow, JobRow};
use super::state::{backoff_delay_ms, transition_error, JobStatus};
use super::statements::{
    attempt_fence, Heartbeat, LiteProgress, LockJob, PgChange, PgProgressBatch, SetChanges,
};
use crate::db::outbox::after_commit;
use crate::db::replay::{insert_replays_pg, Placed, ReplayRow};
use crate::db::schema::{job_events, jobs};
use crate::db::{now_millis, on_backend, DbConnection};
use crate::error::{is_connection_loss, is_unique_violation, StoreError};

/// Insert a row, or nothing when a unique key already holds one; `true` when
/// inserted. (Each backend's own spelling of the same statement.)
macro_rules! insert_or_ignore {
    ($conn:expr, $table:expr, $values:expr) => {
        match $conn {
            DbConnection::Postgresql(pg) => diesel::insert_into($table)
                .values($values)
                .on_conflict_do_nothing()
                .execute(pg),
            DbConnection::Sqlite(lite) => diesel::insert_or_ignore_into($table)
                .values($values)
                .execute(lite),
        }
    };
}
pub(super) use insert_or_ignore;

/// Events returned with a job: the newest this many, oldest first.
pub const EVENTS_PER_READ: i64 = 1000;

/// An idempotent create: the caller's key and a hash of the request body.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    pub request_hash: String,
}

impl Idempotency {
    /// The caller's `key` for a create sent with `body`: the body is kept as its SHA-256
    /// (hex), so the same key with another body is told apart (409).
    pub fn for_body(key: String, body: &[u8]) -> Self {
        Idempotency {
            key,
            request_hash: crate::crypto::sha256_hex(body),
        }
    }
}

/// Outcome of a create: the job, and whether this call created it (false when an
/// `Idempotency-Key` matched an earlier request).
#[derive(Debug)]
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
        run_at: job.run_at.unwrap_or(now),
        retry_base_ms: job.backoff.base_ms,
        retry_cap_ms: job.backoff.cap_ms,
        attempt_budget: job.max_attempts,
    }
}

fn created_event(row: &JobRow) -> EventRow {
    EventRow {
        job_id: row.id.clone(),
        seq: 1,
        event_type: EventType::Created.as_str().into(),
        data: json!({
            "from": null,
            "to": row.status,
            "status": row.status,
            "queue": row.queue,
            "runAt": super::model::rfc3339(row.run_at),
        })
        .to_string(),
        created_at: row.created_at,
    }
}

/// Insert a job row and its `created` event (inside the caller's transaction).
pub fn insert(conn: &mut DbConnection, row: &JobRow) -> Result<(), StoreError> {
    let event = created_event(row);
    on_backend!(conn, |c| diesel::insert_into(jobs::table)
        .values(row)
        .execute(c))?;
    on_backend!(conn, |c| diesel::insert_into(job_events::table)
        .values(&event)
        .execute(c))?;
    notify_change(conn, &row.queue, &row.id, row.version, &row.status)
}

/// On PostgreSQL, tell every instance's listener about a change once it has committed
/// (`db::outbox`, `jobs::notify`); SQLite instances find it in `job_events` instead.
pub fn notify_change(
    conn: &mut DbConnection,
    queue: &str,
    id: &str,
    seq: i64,
    status: &str,
) -> Result<(), StoreError> {
    if let DbConnection::Postgresql(_) = conn {
        after_commit(super::notify::payload(queue, id, seq, status, now_millis()));
    }
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

/// Create many jobs in one transaction (all or none), answered in input order. Jobs
/// without a key are written with multi-row inserts; a keyed job is inserted unless
/// its key is taken (by an earlier request or an earlier item), and then the job
/// holding the key is returned, or the batch refused when its contents differ.
pub fn create_batch(
    conn: &mut DbConnection,
    jobs: &[(NewJob, Option<Idempotency>)],
    created_by: &str,
) -> Result<Vec<Created>, StoreError> {
    let now = now_millis();
    // Keyed items in key order (stable: a key repeated in the batch keeps its order), so
    // two batches sharing keys take their unique-index locks in the same order: in
    // request order, `[a, b]` and `[b, a]` deadlock on PostgreSQL. Answers keep the
    // request's order.
    let mut keyed: Vec<(usize, &NewJob, &Idempotency)> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, (job, idem))| idem.as_ref().map(|k| (i, job, k)))
        .collect();
    keyed.sort_by(|a, b| a.2.key.cmp(&b.2.key));
    conn.transaction(|conn| {
        let mut out: Vec<(usize, Created)> = Vec::with_capacity(jobs.len());
        let mut plain: Vec<JobRow> = Vec::new();
        for (i, (job, idem)) in jobs.iter().enumerate() {
            if idem.is_none() {
                let row = new_row(job, created_by, None, now);
                plain.push(row.clone());
                out.push((
                    i,
                    Created {
                        job: row,
                        created: true,
                    },
                ));
            }
        }
        for &(i, job, idem) in &keyed {
            let row = new_row(job, created_by, Some(idem), now);
            if insert_or_ignore!(conn, jobs::table, &row)? == 1 {
                diesel::insert_into(job_events::table)
                    .values(&created_event(&row))
                    .execute(conn)?;
                notify_change(conn, &row.queue, &row.id, row.version, &row.status)?;
                out.push((
                    i,
                    Created {
                        job: row,
                        created: true,
                    },
                ));
                continue;
            }
            let first: JobRow = jobs::table
                .filter(jobs::created_by.eq(created_by))
                .filter(jobs::idempotency_key.eq(&idem.key))
                .select(JobRow::as_select())
                .first(conn)?;
            if first.request_hash.as_deref() != Some(idem.request_hash.as_str()) {
                return Err(StoreError::Conflict(format!(
                    "jobs[{i}]: idempotencyKey was already used with different contents"
                )));
            }
            out.push((
                i,
                Created {
                    job: first,
                    created: false,
                },
            ));
        }
        out.sort_unstable_by_key(|&(i, _)| i);
        let out: Vec<Created> = out.into_iter().map(|(_, c)| c).collect();
        // One notification per queue for the plain rows (nobody watches a new job yet).
        let mut queues: Vec<&str> = plain.iter().map(|r| r.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        for q in queues {
            notify_change(conn, q, "", 0, "")?;
        }
        insert_rows(conn, &plain)?;
        let events: Vec<EventRow> = plain.iter().map(created_event).collect();
        insert_events(conn, &events)?;
        Ok(out)
    })
}

/// One create of a group ([`create_group`]): what [`create`] takes, and the request's
/// deferred replay record (`db::replay::Deferred`) to write in the group's
/// transaction before it.
#[derive(Debug, Clone)]
pub struct NewCreate {
    pub job: NewJob,
    pub created_by: String,
    pub idem: Option<Idempotency>,
    pub record: Option<ReplayRow>,
}

/// A create's answer in a group: the job, or this create's own error (`Replayed` for a
/// create whose replay record was stored already, `Conflict` for a reused key).
pub type Made = Result<Created, StoreError>;

/// Several creates with one commit, the create log's batch (`jobs::creates`); per
/// create, in order, what [`create`] would answer for it alone.
///
/// - The creates' replay records go first, with one statement in the same
///   transaction; a create whose record was already stored (or repeated within the
///   group) is answered `Replayed` and writes nothing. A create whose record is new
///   keeps it even when the create itself fails (the signature is burned).
/// - The jobs without a key are written with one multi-row insert, their `created`
///   events with another. A keyed job is inserted unless its key is taken (by an
///   earlier request or an earlier create of the group): then the job holding the key
///   is the answer, or a conflict when its body differs — which wrote nothing. Keyed
///   creates go in key order, so two groups inserting the same keys wait for each
///   other instead of deadlocking.
/// - If a statement fails for any reason but a lost connection, the transaction runs
///   again with each create in a savepoint of its own ([`create`]), so one bad create
///   cannot sink the others.
pub fn create_group(
    conn: &mut DbConnection,
    group: Vec<NewCreate>,
) -> Result<Vec<Made>, StoreError> {
    crate::db::replay::write_group(
        conn,
        &group,
        |c| c.record.as_ref(),
        write_creates,
        |conn, c| create(conn, &c.job, &c.created_by, c.idem.as_ref()),
    )
}

/// [`create_group`]'s creates (group index, create) in few statements: (group index,
/// answer) for each. Fails as a whole on any statement's error, and queues the
/// notifications only once every statement has run, so the attempt that failed
/// leaves none behind.
fn write_creates(
    conn: &mut DbConnection,
    todo: Vec<(usize, &NewCreate)>,
) -> Result<Placed<Created>, StoreError> {
    let now = now_millis();
    let (mut keyed, mut plain) = (Vec::new(), Vec::new());
    for (i, c) in todo {
        match &c.idem {
            Some(idem) => keyed.push((i, c, idem)),
            None => plain.push((i, c)),
        }
    }
    keyed.sort_by(|a, b| {
        (a.1.created_by.as_str(), a.2.key.as_str())
            .cmp(&(b.1.created_by.as_str(), b.2.key.as_str()))
    });
    let mut answers = Vec::with_capacity(keyed.len() + plain.len());
    let mut written: Vec<JobRow> = Vec::with_capacity(keyed.len() + plain.len());
    for (i, c, idem) in keyed {
        let row = new_row(&c.job, &c.created_by, Some(idem), now);
        if insert_or_ignore!(&mut *conn, jobs::table, &row)? == 1 {
            written.push(row.clone());
            answers.push((
                i,
                Ok(Created {
                    job: row,
                    created: true,
                }),
            ));
            continue;
        }
        let first: JobRow = jobs::table
            .filter(jobs::created_by.eq(&c.created_by))
            .filter(jobs::idempotency_key.eq(&idem.key))
            .select(JobRow::as_select())
            .first(conn)?;
        answers.push((
            i,
            if first.request_hash.as_deref() == Some(idem.request_hash.as_str()) {
                Ok(Created {
                    job: first,
                    created: false,
                })
            } else {
                Err(StoreError::Conflict(
                    "Idempotency-Key was already used with a different request".into(),
                ))
            },
        ));
    }
    let rows: Vec<JobRow> = plain
        .iter()
        .map(|(_, c)| new_row(&c.job, &c.created_by, None, now))
        .collect();
    insert_rows(conn, &rows)?;
    for ((i, _), row) in plain.iter().zip(&rows) {
        answers.push((
            *i,
            Ok(Created {
                job: row.clone(),
                created: true,
            }),
        ));
    }
    written.extend(rows);
    announce(conn, &written)?;
    Ok(answers)
}

/// New jobs (none of them stored yet) with multi-row inserts, their `created` events
/// with more, and their notifications for after the commit: the write of a group of
/// new jobs (`stitcher::repo::ingest_group`).
pub fn insert_many(conn: &mut DbConnection, rows: &[JobRow]) -> Result<(), StoreError> {
    insert_rows(conn, rows)?;
    announce(conn, rows)
}

/// The `created` events of jobs just inserted, and their notifications for after the
/// commit.
fn announce(conn: &mut DbConnection, rows: &[JobRow]) -> Result<(), StoreError> {
    let events: Vec<EventRow> = rows.iter().map(created_event).collect();
    insert_events(conn, &events)?;
    for row in rows {
        notify_change(conn, &row.queue, &row.id, row.version, &row.status)?;
    }
    Ok(())
}

/// Rows per multi-row insert (jobs have ~30 columns; both backends allow 32766 bind
/// parameters per statement).
const INSERT_CHUNK: usize = 500;

/// Job rows with multi-row inserts (typed per backend, not through
/// `MultiConnection`).
fn insert_rows(conn: &mut DbConnection, rows: &[JobRow]) -> Result<(), StoreError> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        match &mut *conn {
            DbConnection::Postgresql(pg) => {
                diesel::insert_into(jobs::table).values(chunk).execute(pg)?
            }
            DbConnection::Sqlite(lite) => diesel::insert_into(jobs::table)
                .values(chunk)
                .execute(lite)?,
        };
    }
    Ok(())
}

/// Event rows with multi-row inserts, as [`insert_rows`].
fn insert_events(conn: &mut DbConnection, events: &[EventRow]) -> Result<(), StoreError> {
    for chunk in events.chunks(INSERT_CHUNK) {
        match &mut *conn {
            DbConnection::Postgresql(pg) => diesel::insert_into(job_events::table)
                .values(chunk)
                .execute(pg)?,
            DbConnection::Sqlite(lite) => diesel::insert_into(job_events::table)
                .values(chunk)
                .execute(lite)?,
        };
    }
    Ok(())
}

pub fn find(conn: &mut DbConnection, id: &JobId) -> Result<JobRow, StoreError> {
    on_backend!(conn, |c| jobs::table
        .find(id.as_str())
        .select(JobRow::as_select())
        .first(c)
        .optional())?
    .ok_or(StoreError::NotFound)
}

/// The job with its newest events (oldest first, at most [`EVENTS_PER_READ`]); `true`
/// when the history shown is not whole: older events were left out, or are no longer
/// kept (`seq` starts at 1 and has no holes, so that is a first event past 1). It does
/// not flip back as the event bound trims a long job's events.
pub fn find_with_events(
    conn: &mut DbConnection,
    id: &JobId,
) -> Result<(JobRow, Vec<EventRow>, bool), StoreError> {
    let job = find(conn, id)?;
    let mut events: Vec<EventRow> = on_backend!(conn, |c| job_events::table
        .filter(job_events::job_id.eq(id.as_str()))
        .order(job_events::seq.desc())
        .limit(EVENTS_PER_READ)
        .select(EventRow::as_select())
        .load(c))?;
    events.reverse();
    let truncated = events.first().is_some_and(|e| e.seq > 1);
    Ok((job, events, truncated))
}

/// What [`events_after`] read: the job's status and newest `seq` (its version), both
/// read before the events (so a terminal status means no event after the last one
/// returned), and the events.
#[derive(Debug)]
pub struct EventsAfter {
    pub status: JobStatus,
    /// The job's attempt, read with its status.
    pub attempts: i32,
    pub newest: i64,
    pub events: Vec<EventRow>,
}

/// A job's events after `after` (oldest first, at most `limit`).
pub fn events_after(
    conn: &mut DbConnection,
    id: &JobId,
    after: i64,
    limit: i64,
) -> Result<EventsAfter, StoreError> {
    let (status, attempts, newest): (String, i32, i64) = on_backend!(conn, |c| jobs::table
        .find(id.as_str())
        .select((jobs::status, jobs::attempts, jobs::version))
        .first(c)
        .optional())?
    .ok_or(StoreError::NotFound)?;
    let status = JobStatus::parse(&status)
        .ok_or_else(|| StoreError::Internal("bad job status in database".into()))?;
    let events = on_backend!(conn, |c| job_events::table
        .filter(job_events::job_id.eq(id.as_str()))
        .filter(job_events::seq.gt(after))
        .order(job_events::seq.asc())
        .limit(limit)
        .select(EventRow::as_select())
        .load(c))?;
    Ok(EventsAfter {
        status,
        attempts,
        newest,
        events,
    })
}

/// What a queue stream reads of one job: its events up to `upto`, after `after` when
/// the stream has sent that one, else those written since `since` (ms; the stream's
/// start), oldest first, at most `limit`.
#[derive(Debug, Clone)]
pub struct EventRange {
    pub job_id: String,
    pub after: Option<i64>,
    pub upto: i64,
    pub since: i64,
}

/// The events of each range, in the order given (a purged job has none).
pub fn events_in_ranges(
    conn: &mut DbConnection,
    ranges: &[EventRange],
    limit: i64,
) -> Result<Vec<(String, EventRow)>, StoreError> {
    let mut out = Vec::new();
    for r in ranges {
        let mut q = job_events::table
            .filter(job_events::job_id.eq(&r.job_id))
            .filter(job_events::seq.le(r.upto))
            .into_boxed();
        q = match r.after {
            Some(after) => q.filter(job_events::seq.gt(after)),
            None => q.filter(job_events::created_at.ge(r.since)),
        };
        let events: Vec<EventRow> = q
            .order(job_events::seq.asc())
            .limit(limit)
            .select(EventRow::as_select())
            .load(conn)?;
        out.extend(events.into_iter().map(|e| (r.job_id.clone(), e)));
    }
    Ok(out)
}

/// When the next QUEUED job of `queue` scheduled after `now` becomes due, if any (a
/// time already past when `now` was taken before a claim that missed it).
pub fn next_run_at(
    conn: &mut DbConnection,
    queue: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Queued.as_str()))
        .filter(jobs::run_at.gt(now))
        .select(diesel::dsl::min(jobs::run_at))
        .first::<Option<i64>>(conn)?)
}

/// Apply a change to a job in one transaction: lock (version bump), read, check the
/// state machine, write the row and its event.
///
/// `attempt` is a job token's (`None` for a caller credential): the change applies only
/// while the job is still on that attempt, else [`StoreError::StaleAttempt`]. The token
/// was checked when its request was authenticated, and the job can have been handed
/// back and claimed again since; its worker must not write into the next attempt.
pub fn apply(
    conn: &mut DbConnection,
    id: &JobId,
    change: &Change,
    terms: Terms,
    attempt: Option<i32>,
) -> Result<JobRow, StoreError> {
    if let Change::Progress { percent, message } = change {
        let report = Report {
            id: id.as_str(),
            percent: *percent,
            message: message.as_deref(),
            lease_ms: terms.lease_ms,
            events: terms.events,
            attempt: attempt_fence(attempt),
        };
        let fast = match &mut *conn {
            DbConnection::Postgresql(pg) => progress_pg(pg, report)?,
            DbConnection::Sqlite(lite) => progress_lite(lite, report)?,
        };
        if let Some(row) = fast {
            return Ok(row);
        }
    }
    conn.transaction(|conn| {
        // Lock (version bump) and read in one statement: one round trip fewer.
        // (`all_columns` is positional: `JobRow` keeps the table's column order.)
        let lock = LockJob(id.as_str());
        let row = match conn {
            DbConnection::Sqlite(lite) => lock.get_result::<JobRow>(lite),
            DbConnection::Postgresql(pg) => lock.get_result::<JobRow>(pg),
        }
        .optional()?
        .ok_or(StoreError::NotFound)?;
        on_attempt(&row, attempt)?;
        if attempt.is_some() {
            worker_move(&row, change)?;
        }
        apply_locked(conn, row, change, terms)
    })
}

/// A job token's status change to QUEUED is its worker handing the job back, so it
/// applies to a RUNNING job only: a token issued for a job not yet claimed (`token
/// issue`, attempt 0) must not release a PENDING job, which is an operator's move.
fn worker_move(row: &JobRow, change: &Change) -> Result<(), StoreError> {
    match change {
        Change::Status {
            to: JobStatus::Queued,
            ..
        } if row.status() != JobStatus::Running => Err(StoreError::Conflict(format!(
            "a job token hands back only a RUNNING job (job is {}); releasing it is an \
             operator's move",
            row.status()
        ))),
        _ => Ok(()),
    }
}

/// [`StoreError::StaleAttempt`] when a job token's `attempt` is not the job's current
/// one (see [`apply`]).
fn on_attempt(row: &JobRow, attempt: Option<i32>) -> Result<(), StoreError> {
    match attempt {
        Some(a) if a != row.attempts => Err(StoreError::StaleAttempt),
        // A job that completed or failed has revoked its tokens (its attempts' keys); an
        // instance that has not seen that revocation yet (within a second) answers as
        // it will then, 401 `revoked`, not a 409 (a review saw the two instances
        // disagree). A cancelled job's token keeps its 409 `job-cancelled`.
        Some(_) if row.status().is_terminal() && row.status() != JobStatus::Cancelled => {
            Err(StoreError::StaleAttempt)
        }
        // Likewise an attempt that went back to QUEUED (handed back, failed with
        // `retryable`, its lease run out) before the next claim: it has ended and its
        // tokens are revoked, so 401 here as by the revocation, not a 409 (review,
        // 2026-12-06). A QUEUED job's attempt 0 is the one not yet claimed, whose
        // tokens (`token issue`) stay valid until the first claim.
        Some(a) if a > 0 && row.status() == JobStatus::Queued => Err(StoreError::StaleAttempt),
        _ => Ok(()),
    }
}

/// PostgreSQL's progress report in one statement, the worker's most frequent write;
/// `None` when it does not apply (the job is not RUNNING, the report would revoke
/// tokens, or the job moved `keep` or more while the statement waited for its lock,
/// `PgProgressBatch`), and the general path answers instead.
fn progress_pg(
    pg: &mut diesel::PgConnection,
    report: Report<'_>,
) -> Result<Option<JobRow>, StoreError> {
    let rows = write_progress(pg, &[report])?;
    Ok(rows.into_iter().next())
}

/// SQLite's progress report in two statements, the row's change and its event
/// ([`LiteProgress`]), where the general path locks, reads and writes the row in three;
/// `None` when it does not apply, as [`progress_pg`].
fn progress_lite(
    lite: &mut diesel::SqliteConnection,
    report: Report<'_>,
) -> Result<Option<JobRow>, StoreError> {
    let Report {
        id,
        percent,
        message,
        lease_ms,
        events,
        attempt,
    } = report;
    lite.transaction(|lite| {
        let now = now_millis();
        let row = LiteProgress {
            id,
            percent,
            message,
            lease_until: now.saturating_add(lease_ms),
            attempt,
            now,
        }
        .get_result::<JobRow>(lite)
        .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        diesel::insert_into(job_events::table)
            .values(&EventRow {
                job_id: row.id.clone(),
                seq: row.version,
                event_type: EventType::Progress.as_str().to_owned(),
                data: json!({"percent": percent, "message": message}).to_string(),
                created_at: now,
            })
            .execute(lite)?;
        trim_lite(lite, &row.id, events, row.version)?;
        Ok(Some(row))
    })
}

/// SQLite: after the write of event `seq` of job `id`, delete the job's events that
/// `events` no longer keeps, when `seq` is a trimming one (one write in
/// [`EventBound::step`]); one range of the primary key, at most
/// [`EventBound::MAX_TRIM`] rows from the job's oldest event on
/// ([`EventBound::trim_bounded`]). (PostgreSQL's statements trim themselves:
/// `PgChange`, `PgProgressBatch`.)
fn trim_lite(
    lite: &mut diesel::SqliteConnection,
    id: &str,
    events: EventBound,
    seq: i64,
) -> diesel::QueryResult<()> {
    use diesel::sql_types::{BigInt, Text};
    if let Some(upto) = events.trim_upto(seq) {
        diesel::sql_query(SQLITE_TRIM)
            .bind::<Text, _>(id)
            .bind::<BigInt, _>(upto)
            .bind::<Text, _>(id)
            .bind::<BigInt, _>(EventBound::MAX_TRIM - 1)
            .execute(lite)?;
    }
    Ok(())
}

/// [`trim_lite`]'s delete: the job's events up to the trim's `seq`, and below its
/// oldest one plus [`EventBound::MAX_TRIM`] (the oldest: one probe of the primary
/// key; `EXPLAIN QUERY PLAN` in the tests). Binds: job, `upto`, job, `MAX_TRIM - 1`.
///
/// One upper bound, `min(upto, oldest + MAX_TRIM - 1)`: with two (`seq <= upto AND seq
/// < oldest + MAX_TRIM`) SQLite ranged the index by `upto` and read the whole backlog
/// (89 ms of a million events, against 1 ms or so when ranged by the bound).
const SQLITE_TRIM: &str = "DELETE FROM job_events WHERE job_id = ? \
     AND seq <= min(?, (SELECT min(seq) FROM job_events WHERE job_id = ?) + ?)";

/// One report for [`write_progress`] and [`progress_lite`].
#[derive(Clone, Copy)]
struct Report<'a> {
    id: &'a str,
    percent: i32,
    message: Option<&'a str>,
    lease_ms: i64,
    events: EventBound,
    /// [`attempt_fence`].
    attempt: i32,
}

/// [`PgProgressBatch`] for `reports` (each job at most once, in locking order): the rows
/// it changed, their notifications queued for after the commit.
fn write_progress(
    pg: &mut diesel::PgConnection,
    reports: &[Report<'_>],
) -> diesel::QueryResult<Vec<JobRow>> {
    let now = now_millis();
    let rows = PgProgressBatch {
        ids: reports.iter().map(|r| r.id).collect(),
        percents: reports.iter().map(|r| r.percent).collect(),
        messages: reports.iter().map(|r| r.message).collect(),
        lease_until: reports
            .iter()
            .map(|r| now.saturating_add(r.lease_ms))
            .collect(),
        data: reports
            .iter()
            .map(|r| json!({"percent": r.percent, "message": r.message}).to_string())
            .collect(),
        attempts: reports.iter().map(|r| r.attempt).collect(),
        keeps: reports.iter().map(|r| r.events.keep()).collect(),
        steps: reports.iter().map(|r| r.events.step()).collect(),
        now,
    }
    .load::<JobRow>(pg)?;
    for r in &rows {
        after_commit(super::notify::payload(
            &r.queue, &r.id, r.version, &r.status, now,
        ));
    }
    Ok(rows)
}

/// One progress report of a batch ([`progress_batch`]).
#[derive(Debug, Clone)]
pub struct ProgressReport {
    pub id: JobId,
    pub percent: i32,
    pub message: Option<String>,
    /// The lease it renews and the events its job keeps.
    pub terms: Terms,
    /// A job token's attempt: the report is written only while the job is on it (see
    /// [`apply`]); `None` for a caller credential.
    pub attempt: Option<i32>,
    /// The request's deferred replay record (`db::replay::Deferred`), written in the
    /// batch's transaction before the report; a replay is answered
    /// `Err(StoreError::Replayed)` and its report is not written.
    pub record: Option<ReplayRow>,
}

impl ProgressReport {
    fn statement(&self) -> Report<'_> {
        Report {
            id: self.id.as_str(),
            percent: self.percent,
            message: self.message.as_deref(),
            lease_ms: self.terms.lease_ms,
            events: self.terms.events,
            attempt: attempt_fence(self.attempt),
        }
    }
}

type Written = Result<Option<JobRow>, StoreError>;

/// PostgreSQL: several progress reports with one statement and one commit
/// ([`PgProgressBatch`]), the progress log's batch (`jobs::progress`). Per report, in
/// order: the changed row, or `None` where [`apply`]'s general path must answer (the
/// job is not RUNNING, or the report would revoke tokens), or the error of a report
/// written on its own, or `Replayed` for a report whose replay record was already
/// stored.
///
/// - Reports that carry a replay record: the records go first, with one statement in
///   the same transaction, so a signed report costs one commit, not two. A report
///   whose record is new is written, and its record stays even when the report then
///   fails (the signature is burned, as on every path).
/// - A job's first report of the batch goes into the statement, which locks the jobs'
///   rows in id order, so two batches lock theirs in the same order; a later report of
///   the same job is written on its own after it, in arrival order.
/// - If the statement fails for any reason but a lost connection (a deadlock with
///   another instance's change, say), each of its reports is written on its own
///   instead, so one bad report cannot sink the others. In a transaction that means
///   starting it again, with each report in a savepoint of its own.
///
/// On SQLite every report is `None`: its writes go through the group-commit writer.
pub fn progress_batch(
    conn: &mut DbConnection,
    reports: Vec<ProgressReport>,
) -> Result<Vec<Written>, StoreError> {
    let DbConnection::Postgresql(pg) = conn else {
        return Ok(reports.iter().map(|_| Ok(None)).collect());
    };
    let records: Vec<ReplayRow> = reports.iter().filter_map(|r| r.record.clone()).collect();
    let mut answers = if records.is_empty() {
        write_reports(pg, reports.iter().enumerate().collect(), Alone::Plain)?
    } else {
        let attempt = |pg: &mut diesel::PgConnection, alone: Alone| {
            pg.transaction(|pg| {
                let mut fresh = insert_replays_pg(pg, &records)?.into_iter();
                let mut replayed = Vec::new();
                let mut todo = Vec::with_capacity(reports.len());
                for (i, r) in reports.iter().enumerate() {
                    if r.record.is_none() || fresh.next() == Some(true) {
                        todo.push((i, r));
                    } else {
                        replayed.push((i, Err(StoreError::Replayed)));
                    }
                }
                let mut answers = write_reports(pg, todo, alone)?;
                answers.append(&mut replayed);
                Ok::<_, StoreError>(answers)
            })
        };
        match attempt(pg, Alone::FirstTry) {
            Err(e) if !e.is_connection_loss() => {
                log::warn!(
                    "progress batch of {} written one by one: {e}",
                    reports.len()
                );
                attempt(pg, Alone::Savepoint)?
            }
            r => r?,
        }
    };
    // A lost connection: the pool discards the connection and the health state trips,
    // as for any write. In a transaction nothing of the batch committed, so it is the
    // whole batch's failure. Without one, each report before the loss committed on its
    // own: it is answered as committed (a 503 would have its client send it again and
    // double its event), and each report from the loss on gets the loss (503).
    if let Some((_, Err(e))) = answers
        .iter()
        .find(|(_, r)| r.as_ref().is_err_and(StoreError::is_connection_loss))
    {
        if !records.is_empty() {
            return Err(e.shared());
        }
        crate::db::connection_lost(e);
    }
    answers.sort_unstable_by_key(|&(i, _)| i);
    Ok(answers.into_iter().map(|(_, r)| r).collect())
}

/// How [`write_reports`] runs a report on its own, and whether it tries the batch's
/// statement first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alone {
    /// No transaction: the statement, and if it fails each report as a statement
    /// that commits on its own.
    Plain,
    /// In a transaction: the statement, whose failure fails the transaction (to be
    /// tried again with [`Alone::Savepoint`]); a later report of a job in a savepoint.
    FirstTry,
    /// In a transaction: every report in a savepoint of its own, no batch statement.
    Savepoint,
}

/// The reports (arrival index, report) by [`PgProgressBatch`], as [`progress_batch`]
/// says: (arrival index, answer) for every report exactly once.
fn write_reports(
    pg: &mut diesel::PgConnection,
    todo: Vec<(usize, &ProgressReport)>,
    mode: Alone,
) -> Result<Vec<(usize, Written)>, StoreError> {
    // By job id; stable, so a job's reports keep their order.
    let mut sorted = todo;
    sorted.sort_by(|a, b| a.1.id.as_str().cmp(b.1.id.as_str()));
    let (mut firsts, mut later) = (Vec::with_capacity(sorted.len()), Vec::new());
    let mut last: Option<&JobId> = None;
    for (i, r) in sorted {
        if last == Some(&r.id) {
            later.push((i, r));
        } else {
            last = Some(&r.id);
            firsts.push((i, r));
        }
    }
    later.sort_unstable_by_key(|&(i, _)| i);
    let alone = |pg: &mut diesel::PgConnection, r: &ProgressReport| {
        let one = |pg: &mut diesel::PgConnection| progress_pg(pg, r.statement());
        match mode {
            Alone::Plain => one(pg),
            Alone::FirstTry | Alone::Savepoint => pg.transaction(one),
        }
    };
    let mut answers: Vec<(usize, Written)> = Vec::with_capacity(firsts.len() + later.len());
    let statement: Vec<Report<'_>> = firsts.iter().map(|(_, r)| r.statement()).collect();
    let written = match mode {
        Alone::Savepoint => None,
        Alone::Plain | Alone::FirstTry => Some(write_progress(pg, &statement)),
    };
    let rows = match written {
        Some(Ok(rows)) => Some(rows),
        Some(Err(e)) if mode == Alone::FirstTry || is_connection_loss(&e) => return Err(e.into()),
        Some(Err(e)) => {
            log::warn!("progress batch of {} written one by one: {e}", firsts.len());
            None
        }
        None => None,
    };
    match rows {
        Some(rows) => {
            let mut changed: std::collections::HashMap<String, JobRow> =
                rows.into_iter().map(|r| (r.id.clone(), r)).collect();
            for (i, r) in &firsts {
                answers.push((*i, Ok(changed.remove(r.id.as_str()))));
            }
        }
        None => {
            for (i, r) in &firsts {
                answers.push((*i, alone(pg, r)));
            }
        }
    }
    for (i, r) in &later {
        answers.push((*i, alone(pg, r)));
    }
    Ok(answers)
}

/// Apply a change to a row this transaction has locked (version already bumped).
pub fn apply_locked(
    conn: &mut DbConnection,
    mut row: JobRow,
    change: &Change,
    terms: Terms,
) -> Result<JobRow, StoreError> {
    let now = now_millis();
    let jitter = rand::random::<f64>();
    let (event_type, data) = apply_to_row(&mut row, change, now, jitter)?;
    if row.status() == JobStatus::Running && !matches!(change, Change::LeaseExpired) {
        // Any word from the worker renews its lease.
        row.lease_expires_at = Some(now.saturating_add(terms.lease_ms));
    }
    write_change(conn, &row, event_type, &data, now, terms.events)?;
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

/// Tokens to revoke after this change, and until when: the tokens of the job's last
/// attempt when it has ended (attempt 0 for one never claimed); the tokens of the
/// attempt that just ended when it went back to QUEUED; the tokens issued before any
/// claim (attempt 0) when the first attempt has just started (its start time is this
/// change's time).
///
/// An ended job's earlier attempts need nothing more: each was revoked when it ended,
/// until `tokens_until` as it stood then, which no token of that attempt outlives (a
/// token is only minted, or renewed, while its attempt is the job's current one, and
/// the mint moves `tokens_until` in the same transaction). Revoking every attempt's key
/// again (review, 2026-12-06) made one request's work grow with the job's attempts,
/// which claims and hand-backs grow without bound, and a redrive, claim and cancel
/// redid all of it. Keys are per attempt, not job-wide: a redriven job gets new
/// tokens, which a job-wide key would refuse until the old ones expire. Attempt
/// numbers only grow (a redrive raises `maxAttempts` instead of resetting
/// `attempts`), so no new token shares a key with a revoked one.
pub fn token_revocation(row: &JobRow, now: i64) -> Vec<(String, i64)> {
    use crate::db::revoked::attempt_key;
    let Some(until) = row.tokens_until.filter(|u| *u > now) else {
        return Vec::new();
    };
    match row.status() {
        s if s.is_terminal() => vec![(attempt_key(&row.id, row.attempts), until)],
        JobStatus::Queued if row.attempts > 0 => {
            vec![(attempt_key(&row.id, row.attempts), until)]
        }
        JobStatus::Running if row.attempts == 1 && row.started_at == Some(row.updated_at) => {
            vec![(attempt_key(&row.id, 0), until)]
        }
        _ => Vec::new(),
    }
}

/// Write the changed columns of `row` and append its event (seq = row.version),
/// trimming the job's oldest events as `events` says. A job that ends has its tokens
/// revoked in the same transaction.
pub fn write_change(
    conn: &mut DbConnection,
    row: &JobRow,
    event_type: &str,
    data: &Value,
    now: i64,
    events: EventBound,
) -> Result<(), StoreError> {
    match conn {
        DbConnection::Postgresql(pg) => write_change_pg(pg, row, event_type, data, now, events)?,
        DbConnection::Sqlite(lite) => {
            SetChanges(row).execute(lite)?;
            diesel::insert_into(job_events::table)
                .values(&EventRow {
                    job_id: row.id.clone(),
                    seq: row.version,
                    event_type: event_type.to_owned(),
                    data: data.to_string(),
                    created_at: now,
                })
                .execute(lite)?;
            trim_lite(lite, &row.id, events, row.version)?;
        }
    }
    for (key, until) in token_revocation(row, now) {
        crate::db::revoked::revoke_token(conn, &key, until, now)?;
    }
    Ok(())
}

/// PostgreSQL: the row's changed columns and its event in one statement (one round
/// trip instead of two; the writes are data-modifying CTEs, which run whether or not
/// the final SELECT reads them), and the notification queued for after the commit.
/// The same columns as `JobRow::changes`; the trim, when due, in the same statement.
fn write_change_pg(
    pg: &mut diesel::PgConnection,
    row: &JobRow,
    event_type: &str,
    data: &Value,
    now: i64,
    events: EventBound,
) -> Result<(), StoreError> {
    PgChange {
        row,
        event_type,
        data: data.to_string(),
        now,
        events,
    }
    .execute(pg)?;
    after_commit(super::notify::payload(
        &row.queue,
        &row.id,
        row.version,
        &row.status,
        now,
    ));
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

/// Back to QUEUED after a failed attempt: claimable again after the job's backoff.
fn schedule_retry(row: &mut JobRow, now: i64, jitter: f64) -> Result<(), StoreError> {
    set_status(row, JobStatus::Queued, now)?;
    let delay = backoff_delay_ms(row.retry_base_ms, row.retry_cap_ms, row.attempts, jitter);
    row.run_at = now.saturating_add(delay);
    Ok(())
}

/// The pure part of a change: mutate the row, return the event to append. `jitter`
/// is a uniform random number in `[0, 1]` for a retry's backoff.
fn apply_to_row(
    row: &mut JobRow,
    change: &Change,
    now: i64,
    jitter: f64,
) -> Result<(&'static str, Value), StoreError> {
    let from = row.status();
    if from == JobStatus::Cancelled && !matches!(change, Change::Redrive) {
        return Err(StoreError::JobCancelled);
    }
    match change {
        Change::Status { to, message } => {
            set_status(row, *to, now)?;
            // Completing sets progress to 100, by either route (review, 2026-12-06).
            if *to == JobStatus::Completed {
                row.progress = 100;
            }
            if message.is_some() {
                row.message.clone_from(message);
            }
            let kind = if *to == JobStatus::Cancelled {
                EventType::Cancelled
            } else {
                EventType::Status
            };
            Ok((
                kind.as_str(),
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
            Ok((
                EventType::Progress.as_str(),
                json!({"percent": percent, "message": message}),
            ))
        }
        Change::Complete { result } => {
            set_status(row, JobStatus::Completed, now)?;
            row.progress = 100;
            row.result = result.as_ref().map(to_text);
            Ok((
                EventType::Completed.as_str(),
                json!({"from": from, "to": row.status, "result": result}),
            ))
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
                schedule_retry(row, now, jitter)?;
            }
            Ok((
                EventType::LeaseExpired.as_str(),
                json!({
                    "from": from,
                    "to": row.status,
                    "worker": worker,
                    "attempts": row.attempts,
                    "runAt": (row.status() == JobStatus::Queued)
                        .then(|| super::model::rfc3339(row.run_at)),
                }),
            ))
        }
        Change::Claim { worker } => {
            set_status(row, JobStatus::Running, now)?;
            row.worker = Some(worker.clone());
            Ok((
                EventType::Claimed.as_str(),
                json!({"from": from, "to": row.status, "worker": worker, "attempt": row.attempts}),
            ))
        }
        Change::Fail {
            error,
            gate_results,
            retryable,
        } => {
            if from == JobStatus::Running && *retryable && row.attempts < row.max_attempts {
                schedule_retry(row, now, jitter)?;
                row.error = Some(error.clone());
                row.gate_results = gate_results.as_ref().map(to_text);
                return Ok((
                    EventType::RetryScheduled.as_str(),
                    json!({
                        "from": from,
                        "to": row.status,
                        "error": error,
                        "gateResults": gate_results,
                        "attempt": row.attempts,
                        "runAt": super::model::rfc3339(row.run_at),
                    }),
                ));
            }
            set_status(row, JobStatus::Failed, now)?;
            row.error = Some(error.clone());
            row.gate_results = gate_results.as_ref().map(to_text);
            Ok((
                EventType::Failed.as_str(),
                json!({
                    "from": from,
                    "to": row.status,
                    "error": error,
                    "gateResults": gate_results,
                    "retryable": retryable,
                }),
            ))
        }
        Change::Cancel { reason } => {
            set_status(row, JobStatus::Cancelled, now)?;
            if reason.is_some() {
                row.message.clone_from(reason);
            }
            Ok((
                EventType::Cancelled.as_str(),
                json!({"from": from, "to": row.status, "reason": reason}),
            ))
        }
        Change::Redrive => {
            if !from.can_redrive() {
                return Err(StoreError::Conflict(format!(
                    "only a FAILED or CANCELLED job can be retried (job is {from})"
                )));
            }
            row.status = JobStatus::Queued.as_str().to_owned();
            row.max_attempts = row.attempts.saturating_add(row.attempt_budget);
            row.progress = 0;
            row.result = None;
            row.error = None;
            row.gate_results = None;
            row.worker = None;
            row.lease_expires_at = None;
            row.finished_at = None;
            row.run_at = now;
            row.updated_at = now;
            Ok((
                EventType::Redriven.as_str(),
                json!({"from": from, "to": row.status, "maxAttempts": row.max_attempts}),
            ))
        }
    }
}

/// Renew the lease of a RUNNING job without an event (a heartbeat); returns the new
/// expiry. A cancelled job is `JobCancelled`, any other state a conflict.
pub fn heartbeat(
    conn: &mut DbConnection,
    id: &JobId,
    lease_ms: i64,
    attempt: Option<i32>,
) -> Result<i64, StoreError> {
    let until = now_millis().saturating_add(lease_ms);
    let beat = Heartbeat {
        id: id.as_str(),
        status: JobStatus::Running.as_str(),
        until,
        attempt: attempt_fence(attempt),
    };
    let n = match conn {
        DbConnection::Sqlite(lite) => beat.execute(lite)?,
        DbConnection::Postgresql(pg) => beat.execute(pg)?,
    };
    if n == 1 {
        return Ok(until);
    }
    let row = find(conn, id)?;
    on_attempt(&row, attempt)?;
    match row.status() {
        JobStatus::Cancelled => Err(StoreError::JobCancelled),
        s => Err(StoreError::Conflict(format!(
            "a heartbeat is only accepted while RUNNING (job is {s})"
        ))),
    }
}

/// One page of jobs, newest first. Each status is read on its own (an index range of
/// `(status, …, created_at, id)` per status, see the migration), and the per-status
/// pages are merged: a page costs `statuses × limit` rows however many jobs there are.
pub fn list(
    conn: &mut DbConnection,
    f: &ListFilter,
) -> Result<(Vec<JobRow>, Option<Cursor>), StoreError> {
    let statuses = if f.statuses.is_empty() {
        JobStatus::ALL.to_vec()
    } else {
        f.statuses.clone()
    };
    // Every status's range from one snapshot: read at different moments, a job that
    // moved between two statuses meanwhile would be read twice (QUEUED, then RUNNING)
    // or not at all (handed back). PostgreSQL's default READ COMMITTED takes a snapshot
    // per statement, so this one is REPEATABLE READ; a SQLite read transaction keeps
    // the snapshot of its first read.
    let postgres = matches!(conn, DbConnection::Postgresql(_));
    let mut rows = conn.transaction(|conn| {
        if postgres {
            diesel::connection::SimpleConnection::batch_execute(
                conn,
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            )?;
        }
        list_ranges(conn, f, statuses)
    })?;
    rows.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    let limit = usize::try_from(f.limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|r| Cursor {
            created_at: r.created_at,
            id: r.id.clone(),
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// One page's rows of each status (at most `limit + 1` each), unmerged.
fn list_ranges(
    conn: &mut DbConnection,
    f: &ListFilter,
    statuses: Vec<JobStatus>,
) -> Result<Vec<JobRow>, StoreError> {
    let mut rows: Vec<JobRow> = Vec::new();
    for status in statuses {
        let mut q = jobs::table
            .filter(jobs::status.eq(status.as_str()))
            .select(JobRow::as_select())
            .into_boxed();
        if let Some(queue) = &f.queue {
            q = q.filter(jobs::queue.eq(queue.clone()));
        }
        if let Some(kind) = &f.kind {
            q = q.filter(jobs::kind.eq(kind.clone()));
        }
        if let Some(after) = f.created_after {
            q = q.filter(jobs::created_at.gt(after));
        }
        if let Some(before) = f.created_before {
            q = q.filter(jobs::created_at.lt(before));
        }
        if let Some(c) = &f.after {
            // (created_at, id) < cursor, written so the first term bounds the index range.
            q = q.filter(
                jobs::created_at.le(c.created_at).and(
                    jobs::created_at
                        .lt(c.created_at)
                        .or(jobs::id.lt(c.id.clone())),
                ),
            );
        }
        let page: Vec<JobRow> = q
            .order((jobs::created_at.desc(), jobs::id.desc()))
            .limit(f.limit.saturating_add(1))
            .load(conn)?;
        rows.extend(page);
    }
    Ok(rows)
}

/// A cheap round trip to check the database answers.
pub fn ping(conn: &mut DbConnection) -> Result<(), StoreError> {
    use diesel::connection::SimpleConnection;
    conn.batch_execute("SELECT 1")?;
    Ok(())
}

/// Claim the best QUEUED job of `queue` for `worker`: RUNNING with a lease; `None`
/// when the queue is empty. Storage only: the token is minted by `auth::token::claim`,
/// whose transaction this runs in (it opens none of its own: a savepoint inside that
/// transaction would only add two statements, on PostgreSQL two round trips, to every
/// claim).
pub fn claim(
    conn: &mut DbConnection,
    queue: &str,
    worker: &str,
    terms: Terms,
) -> Result<Option<JobRow>, StoreError> {
    if !queue_admits(conn, queue)? {
        return Ok(None);
    }
    let Some(row) = crate::db::queue::lock_next_queued::<JobRow>(conn, queue)? else {
        return Ok(None);
    };
    let row = apply_locked(
        conn,
        row,
        &Change::Claim {
            worker: worker.to_owned(),
        },
        terms,
    )?;
    Ok(Some(row))
}

#[cfg(test)]
mod tests {
    use crate::db::plan_tests::{migrated_sqlite, Step};
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::Text;

    use super::{trim_lite, EventBound, SQLITE_TRIM};

    /// A job's `n` events, `seq` 1 to `n`, written straight into `job_events`.
    fn backlog(n: i64) -> SqliteConnection {
        let mut c = migrated_sqlite();
        c.batch_execute("PRAGMA foreign_keys = OFF")
            .expect("pragma");
        add(&mut c, 1, n);
        c
    }

    /// Events `from` to `to` of the job.
    fn add(c: &mut SqliteConnection, from: i64, to: i64) {
        c.batch_execute(&format!(
            "WITH RECURSIVE s(n) AS (SELECT {from} UNION ALL SELECT n + 1 FROM s WHERE n < {to}) \
             INSERT INTO job_events (job_id, seq, event_type, data, created_at) \
             SELECT 'j', n, 'progress', '{{}}', 0 FROM s"
        ))
        .expect("events");
    }

    fn seqs(c: &mut SqliteConnection) -> (i64, i64, i64) {
        use crate::db::schema::job_events::dsl::*;
        use diesel::dsl::{count_star, max, min};
        let (lo, hi, n) = job_events
            .select((min(seq), max(seq), count_star()))
            .first::<(Option<i64>, Option<i64>, i64)>(c)
            .expect("seqs");
        (lo.unwrap_or(0), hi.unwrap_or(0), n)
    }

    /// The claim's SQL names the QUEUED status as a literal (the predicate of the
    /// partial index it reads): it must be the model's QUEUED, or no claim finds a job.
    #[test]
    fn the_claims_literal_is_the_stored_queued_status() {
        assert_eq!(
            crate::db::queue::QUEUED,
            crate::jobs::state::JobStatus::Queued.as_str()
        );
    }

    /// The bounded trim deletes one range of the primary key, and finds the job's
    /// oldest event with one more probe of it: no scan, no sort.
    #[test]
    fn the_sqlite_trim_searches_the_primary_key() {
        let mut c = backlog(10);
        let plan: Vec<String> = diesel::sql_query(format!("EXPLAIN QUERY PLAN {SQLITE_TRIM}"))
            .bind::<Text, _>("j")
            .bind::<diesel::sql_types::BigInt, _>(5)
            .bind::<Text, _>("j")
            .bind::<diesel::sql_types::BigInt, _>(EventBound::MAX_TRIM)
            .load::<Step>(&mut c)
            .expect("plan")
            .into_iter()
            .map(|s| s.detail)
            .collect();
        assert_eq!(
            plan,
            [
                "SEARCH job_events USING COVERING INDEX sqlite_autoindex_job_events_1 \
                 (job_id=? AND seq<?)",
                "SCALAR SUBQUERY 1",
                "SEARCH job_events USING COVERING INDEX sqlite_autoindex_job_events_1 (job_id=?)",
            ],
        );
    }

    /// A backlog far past `keep`: one trimming write deletes `MAX_TRIM` of its oldest
    /// events, later ones drain it, and the steady state deletes what it always did.
    #[test]
    fn a_sqlite_trim_deletes_at_most_max_trim_oldest_first() {
        let b = EventBound::new(100);
        let mut c = backlog(20_000);
        trim_lite(&mut c, "j", b, 20_000).expect("not a trimming seq"); // 20 000 % 6 != 0
        assert_eq!(seqs(&mut c), (1, 20_000, 20_000));
        add(&mut c, 20_001, 20_004);
        trim_lite(&mut c, "j", b, 20_004).expect("trim");
        let max = EventBound::MAX_TRIM;
        assert_eq!(seqs(&mut c), (max + 1, 20_004, 20_004 - max));
        let mut seq = 20_004;
        for _ in 0..100 {
            if seqs(&mut c).0 >= seq - b.keep() {
                break;
            }
            add(&mut c, seq + 1, seq + b.step());
            seq += b.step();
            trim_lite(&mut c, "j", b, seq).expect("trim");
        }
        assert_eq!(seqs(&mut c), (seq - b.keep() + 1, seq, b.keep()));
        // Steady state: each trim deletes `step` rows, as before the bound.
        for _ in 0..10 {
            add(&mut c, seq + 1, seq + b.step());
            seq += b.step();
            trim_lite(&mut c, "j", b, seq).expect("trim");
            assert_eq!(seqs(&mut c), (seq - b.keep() + 1, seq, b.keep()));
        }
    }

    /// One trim of a million-event backlog, bounded and (as before) not: the time each
    /// took, printed (`cargo test --release --lib -- --ignored --nocapture
    /// measure_a_trim_of_a_million_events`); nothing asserted about time.
    #[test]
    #[ignore = "a measurement: run on its own"]
    fn measure_a_trim_of_a_million_events() {
        let b = EventBound::new(1_000);
        let upto_seq = 1_000_000 + 1_000 + b.step() - (1_001_000 % b.step());
        let mut c = backlog(1_000_000);
        let t = std::time::Instant::now();
        trim_lite(&mut c, "j", b, upto_seq).expect("bounded");
        let bounded = t.elapsed();
        // A second bounded trim on the same connection: its statement is prepared.
        add(&mut c, 1_000_001, upto_seq + b.step());
        let t = std::time::Instant::now();
        trim_lite(&mut c, "j", b, upto_seq + b.step()).expect("bounded");
        let again = t.elapsed();
        let after = seqs(&mut c);
        let mut c = backlog(1_000_000);
        let t = std::time::Instant::now();
        diesel::sql_query("DELETE FROM job_events WHERE job_id = 'j' AND seq <= ?")
            .bind::<diesel::sql_types::BigInt, _>(upto_seq - b.keep())
            .execute(&mut c)
            .expect("unbounded");
        let whole = t.elapsed();
        println!(
            "bounded: {bounded:?}, again {again:?} (left {after:?}); unbounded: {whole:?} (left {:?})",
            seqs(&mut c)
        );
    }
}
