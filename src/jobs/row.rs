//! The job tables as Diesel rows: `jobs` (with the columns a change may touch),
//! `job_events` and `queues`. The JSON the API shows is built from them in `view`.

use diesel::prelude::*;

use super::state::JobStatus;
use crate::db::schema::{job_events, jobs, queues};

/// A `jobs` row. Inserted with every column bound (`None` as NULL, which is each
/// nullable column's default anyway): with diesel's default, `None` becomes the SQL
/// keyword `DEFAULT`, so the statement's text depends on the values and diesel
/// prepares it again for every insert.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = jobs, treat_none_as_default_value = false)]
pub struct JobRow {
    pub id: String,
    pub kind: String,
    pub queue: String,
    pub priority: i32,
    pub status: String,
    pub progress: i32,
    pub message: Option<String>,
    pub payload: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub gate_results: Option<String>,
    pub created_by: String,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub version: i64,
    pub worker: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Latest expiry of any job token issued for this job (revoked when it ends).
    pub tokens_until: Option<i64>,
    /// Not claimable before this (unix ms); the creation time unless scheduled.
    pub run_at: i64,
    pub retry_base_ms: i64,
    pub retry_cap_ms: i64,
    /// Attempts granted per run: at creation, and again by each redrive.
    pub attempt_budget: i32,
}

/// The columns a state change may touch.
#[derive(Debug, AsChangeset)]
#[diesel(table_name = jobs, treat_none_as_null = true)]
pub struct JobChanges<'a> {
    pub status: &'a str,
    pub progress: i32,
    pub message: Option<&'a str>,
    pub result: Option<&'a str>,
    pub error: Option<&'a str>,
    pub gate_results: Option<&'a str>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub worker: Option<&'a str>,
    pub lease_expires_at: Option<i64>,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub run_at: i64,
}

impl JobRow {
    pub fn status(&self) -> JobStatus {
        // Rows are only ever written from `JobStatus::as_str`; an unknown value means
        // the row was edited by hand, and it then reads as FAILED (terminal, untouchable).
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn changes(&self) -> JobChanges<'_> {
        JobChanges {
            status: &self.status,
            progress: self.progress,
            message: self.message.as_deref(),
            result: self.result.as_deref(),
            error: self.error.as_deref(),
            gate_results: self.gate_results.as_deref(),
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            worker: self.worker.as_deref(),
            lease_expires_at: self.lease_expires_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            run_at: self.run_at,
        }
    }
}

/// A `job_events` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = job_events)]
pub struct EventRow {
    pub job_id: String,
    pub seq: i64,
    pub event_type: String,
    pub data: String,
    pub created_at: i64,
}

/// A `queues` row: the controls of one queue (queues without a row have none).
#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = queues, treat_none_as_null = true)]
pub struct QueueRow {
    pub queue: String,
    pub paused: bool,
    pub max_running: Option<i32>,
    pub updated_at: i64,
}
