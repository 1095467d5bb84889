//! Queue storage: a queue's controls (`PATCH`, and whether it may hand out a job now,
//! inside the claim's transaction), the queues page, depths by queue and status, and
//! the figures behind a dispatch's start-time estimate. Jobs themselves are in `repo`.

use diesel::prelude::*;

use super::repo::{insert_or_ignore, notify_change};
use super::row::QueueRow;
use super::state::JobStatus;
use super::view::{QueueDepth, QueueView};
use crate::db::schema::{jobs, queues};
use crate::db::{now_millis, on_backend, DbConnection};
use crate::error::StoreError;

/// May `queue` hand out a job now (not paused, under its `maxRunning`)? Called inside
/// the claim's transaction, before a job is picked.
///
/// Exactness with concurrent claimers: on SQLite the claim holds the database write
/// lock (`BEGIN IMMEDIATE`), so the count cannot change before commit. On PostgreSQL a
/// limited queue's row is locked `FOR UPDATE`, so its claimers run one at a time and
/// each counts (in a fresh READ COMMITTED snapshot) the RUNNING jobs committed by the
/// ones before. An unlimited queue's row is locked `FOR SHARE` (claimers run side by
/// side), which makes a `PATCH` that sets a limit wait for the claims in flight; a
/// claimer that finds a limit under its share lock hands out nothing this time instead
/// of upgrading the lock (two upgrades would deadlock).
pub fn queue_admits(conn: &mut DbConnection, queue: &str) -> Result<bool, StoreError> {
    let seen: Option<QueueRow> = on_backend!(conn, |c| queues::table
        .find(queue)
        .select(QueueRow::as_select())
        .first(c)
        .optional())?;
    let Some(seen) = seen else {
        return Ok(true);
    };
    let row = match conn {
        DbConnection::Postgresql(pg) => {
            let q = queues::table.find(queue).select(QueueRow::as_select());
            let locked = if seen.max_running.is_some() {
                q.for_update().first(pg)
            } else {
                q.for_share().first(pg)
            };
            let locked = locked.optional()?;
            match locked {
                Some(r) if seen.max_running.is_none() && r.max_running.is_some() => {
                    return Ok(false)
                }
                Some(r) => r,
                None => return Ok(true),
            }
        }
        DbConnection::Sqlite(_) => seen,
    };
    if row.paused {
        return Ok(false);
    }
    let Some(max) = row.max_running else {
        return Ok(true);
    };
    let running: i64 = on_backend!(conn, |c| jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Running.as_str()))
        .count()
        .get_result(c))?;
    Ok(running < i64::from(max))
}

/// Every queue that has jobs not yet ended or controls: depth per open status, the
/// wait of its longest-waiting due job, and its controls.
pub fn list_queues(conn: &mut DbConnection, now: i64) -> Result<Vec<QueueView>, StoreError> {
    use std::collections::BTreeMap;
    let mut out: BTreeMap<String, QueueView> = BTreeMap::new();
    let blank = |q: &str| QueueView {
        queue: q.to_owned(),
        depth: QueueDepth::default(),
        oldest_queued_age_ms: None,
        paused: false,
        max_running: None,
    };
    for (queue, status, n) in queue_depths(conn)? {
        let v = out.entry(queue.clone()).or_insert_with(|| blank(&queue));
        match JobStatus::parse(&status) {
            Some(JobStatus::Pending) => v.depth.pending = n,
            Some(JobStatus::Queued) => v.depth.queued = n,
            Some(JobStatus::Running) => v.depth.running = n,
            _ => {}
        }
    }
    let due: Vec<(String, Option<i64>)> = jobs::table
        .filter(jobs::status.eq(JobStatus::Queued.as_str()))
        .filter(jobs::run_at.le(now))
        .group_by(jobs::queue)
        .select((jobs::queue, diesel::dsl::min(jobs::run_at)))
        .load(conn)?;
    for (queue, oldest) in due {
        if let (Some(v), Some(t)) = (out.get_mut(&queue), oldest) {
            v.oldest_queued_age_ms = Some(now.saturating_sub(t).max(0));
        }
    }
    let controls: Vec<QueueRow> = queues::table.select(QueueRow::as_select()).load(conn)?;
    for c in controls {
        let v = out
            .entry(c.queue.clone())
            .or_insert_with(|| blank(&c.queue));
        v.paused = c.paused;
        v.max_running = c.max_running;
    }
    Ok(out.into_values().collect())
}

/// The members of a queue `PATCH` (a member left out is not written).
#[derive(AsChangeset)]
#[diesel(table_name = queues)]
struct QueueChanges {
    paused: Option<bool>,
    max_running: Option<Option<i32>>,
    updated_at: i64,
}

/// Set a queue's controls (`None`: leave as is); returns its view. Only the given
/// members are written, so two patches of different members never undo each other.
pub fn patch_queue(
    conn: &mut DbConnection,
    queue: &str,
    paused: Option<bool>,
    max_running: Option<Option<i32>>,
) -> Result<QueueView, StoreError> {
    let now = now_millis();
    conn.transaction(|conn| {
        let blank = QueueRow {
            queue: queue.to_owned(),
            paused: false,
            max_running: None,
            updated_at: now,
        };
        insert_or_ignore!(conn, queues::table, &blank)?;
        diesel::update(queues::table.find(queue))
            .set(&QueueChanges {
                paused,
                max_running,
                updated_at: now,
            })
            .execute(conn)?;
        notify_change(conn, queue, "", 0, "")
    })?;
    let views = list_queues(conn, now)?;
    views
        .into_iter()
        .find(|v| v.queue == queue)
        .ok_or_else(|| StoreError::Internal("queue row vanished".into()))
}

/// The statuses a job has not ended in, as stored.
const OPEN_STATUSES: [&str; 3] = [
    JobStatus::Pending.as_str(),
    JobStatus::Queued.as_str(),
    JobStatus::Running.as_str(),
];

/// Number of jobs per (queue, status) for the non-terminal statuses.
pub fn queue_depths(conn: &mut DbConnection) -> Result<Vec<(String, String, i64)>, StoreError> {
    let rows = jobs::table
        .filter(jobs::status.eq_any(OPEN_STATUSES))
        .group_by((jobs::queue, jobs::status))
        .select((jobs::queue, jobs::status, diesel::dsl::count_star()))
        .load::<(String, String, i64)>(conn)?;
    Ok(rows)
}

/// Jobs per non-terminal status, all queues together (`/metrics`): one row per status,
/// however many queues there are.
pub fn status_depths(conn: &mut DbConnection) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = jobs::table
        .filter(jobs::status.eq_any(OPEN_STATUSES))
        .group_by(jobs::status)
        .select((jobs::status, diesel::dsl::count_star()))
        .load::<(String, i64)>(conn)?;
    Ok(rows)
}

/// The earliest `run_at` of the QUEUED jobs due at `now`, if any: how long the oldest
/// job that could run has waited (one scheduled for later, or waiting out a retry's
/// backoff, is not waiting yet), as `GET /coordinator/queues` counts it per queue.
pub fn oldest_due_run_at(conn: &mut DbConnection, now: i64) -> Result<Option<i64>, StoreError> {
    Ok(jobs::table
        .filter(jobs::status.eq(JobStatus::Queued.as_str()))
        .filter(jobs::run_at.le(now))
        .select(diesel::dsl::min(jobs::run_at))
        .first::<Option<i64>>(conn)?)
}

/// Inputs of a start-time estimate for a queued job.
#[derive(Debug, Clone, Copy)]
pub struct QueueStats {
    pub ahead: i64,
    pub running: i64,
    pub avg_run_ms: Option<i64>,
}

/// A queue's figures for every priority at once: its QUEUED jobs counted by priority
/// (highest first), jobs running, and the mean run time of its last 20 completed jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCounts {
    pub by_priority: Vec<(i32, i64)>,
    pub running: i64,
    pub avg_run_ms: Option<i64>,
}

impl QueueCounts {
    /// The figures for a job of this priority: the jobs queued with the same or a
    /// higher one are ahead of it.
    pub fn for_priority(&self, priority: i32) -> QueueStats {
        QueueStats {
            ahead: self
                .by_priority
                .iter()
                .take_while(|(p, _)| *p >= priority)
                .map(|(_, n)| *n)
                .sum(),
            running: self.running,
            avg_run_ms: self.avg_run_ms,
        }
    }
}

/// [`QueueCounts`] of a queue: one read of its QUEUED jobs grouped by priority (the
/// claim index's order), whatever priority is asked about later.
pub fn queue_counts(conn: &mut DbConnection, queue: &str) -> Result<QueueCounts, StoreError> {
    let by_priority: Vec<(i32, i64)> = jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Queued.as_str()))
        .group_by(jobs::priority)
        .select((jobs::priority, diesel::dsl::count_star()))
        .order(jobs::priority.desc())
        .load(conn)?;
    let stats = queue_stats(conn, queue, i32::MAX, "")?;
    Ok(QueueCounts {
        by_priority,
        running: stats.running,
        avg_run_ms: stats.avg_run_ms,
    })
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
    let running: i64 = on_backend!(conn, |c| jobs::table
        .filter(jobs::queue.eq(queue))
        .filter(jobs::status.eq(JobStatus::Running.as_str()))
        .count()
        .get_result(c))?;
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
