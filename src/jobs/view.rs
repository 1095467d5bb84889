//! How jobs, events and queues read over the API: the JSON views (with their OpenAPI
//! schemas) and their conversions from the storage rows.

use serde::Serialize;
use serde_json::Value;

use super::model::{rfc3339, EventType};
use super::row::{EventRow, JobRow};
use super::state::JobStatus;

fn json_or_null(s: Option<&str>) -> Value {
    s.and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

/// One entry of a job's history.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    /// 1, 2, 3, ... per job, in the order the changes happened.
    pub seq: i64,
    #[serde(rename = "type")]
    #[schema(value_type = EventType)]
    pub event_type: String,
    /// What changed (event-specific JSON; see `EventType`).
    pub data: Value,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl From<EventRow> for EventView {
    fn from(e: EventRow) -> Self {
        EventView {
            seq: e.seq,
            event_type: e.event_type,
            data: json_or_null(Some(&e.data)),
            created_at: rfc3339(e.created_at),
        }
    }
}

/// How a job reads over the API. Timestamps are RFC 3339 UTC.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// UUIDv7.
    #[schema(format = "uuid")]
    pub id: String,
    pub kind: String,
    pub queue: String,
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: i32,
    pub status: JobStatus,
    /// Percent, 0–100.
    #[schema(minimum = 0, maximum = 100)]
    pub progress: i32,
    /// The last status or progress message.
    #[schema(required = true)]
    pub message: Option<String>,
    /// A JSON object.
    pub payload: Value,
    /// The result given on completion, else `null`.
    pub result: Value,
    /// The error given on failure, else `null`.
    #[schema(required = true)]
    pub error: Option<String>,
    /// The gate results given on failure, else `null`.
    pub gate_results: Value,
    pub attempts: i32,
    /// Attempts allowed in all; a redrive raises it by the job's attempt budget.
    pub max_attempts: i32,
    /// Not claimable before this: the creation time, the scheduled `runAt`, or the next
    /// retry after a backoff.
    #[schema(format = DateTime)]
    pub run_at: String,
    /// While RUNNING: when the worker's lease runs out unless renewed.
    #[schema(format = DateTime, required = true)]
    pub lease_expires_at: Option<String>,
    pub retry_backoff: RetryBackoffView,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    #[schema(format = DateTime, required = true)]
    pub started_at: Option<String>,
    #[schema(format = DateTime, required = true)]
    pub finished_at: Option<String>,
    /// `GET` only: the newest events, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub events: Option<Vec<EventView>>,
    /// Present (and `true`) only when older events were left out of `events`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub events_truncated: bool,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
        JobView {
            status: r.status(),
            payload: json_or_null(Some(&r.payload)),
            result: json_or_null(r.result.as_deref()),
            gate_results: json_or_null(r.gate_results.as_deref()),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
            started_at: r.started_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
            id: r.id,
            kind: r.kind,
            queue: r.queue,
            priority: r.priority,
            progress: r.progress,
            message: r.message,
            error: r.error,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            run_at: rfc3339(r.run_at),
            lease_expires_at: r.lease_expires_at.map(rfc3339),
            retry_backoff: RetryBackoffView {
                base_ms: r.retry_base_ms,
                cap_ms: r.retry_cap_ms,
            },
            events: None,
            events_truncated: false,
        }
    }
}

impl JobView {
    /// The job without what was written into it after its creation (the message,
    /// result, error and gate results): what an idempotent replay shows a principal
    /// that may create jobs but not read them. A replay answers with the job as it is
    /// now, and `jobs:create` alone must not read what `GET` refuses it (fifth
    /// security review, 2026-12-07).
    #[must_use]
    pub fn without_outcome(mut self) -> Self {
        self.message = None;
        self.result = Value::Null;
        self.error = None;
        self.gate_results = Value::Null;
        self
    }
}

/// The backoff between retries: the delay before retry `n` is a uniform random
/// duration between 0 and `min(capMs, baseMs × 2^(n-1))`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBackoffView {
    pub base_ms: i64,
    pub cap_ms: i64,
}

/// The answer to a heartbeat. Its `Debug` never shows the token.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatView {
    #[schema(format = DateTime)]
    pub lease_expires_at: String,
    /// Always `false` in a 200: a cancel takes effect at once, and a heartbeat for a
    /// cancelled job is a 409 of type `urn:coordinator:problem:job-cancelled`.
    pub cancel_requested: bool,
    /// Only to a heartbeat sent with a job token in the second half of its life: the
    /// token's successor (same id, job, attempt and scopes; a new expiry). Use it from
    /// now on; the old one stays valid until it expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// With `token`: when the new token expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub token_expires_at: Option<String>,
}

impl std::fmt::Debug for HeartbeatView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatView")
            .field("lease_expires_at", &self.lease_expires_at)
            .field("cancel_requested", &self.cancel_requested)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("token_expires_at", &self.token_expires_at)
            .finish()
    }
}

/// One page of jobs, newest first (no events).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

// ---- queues ---------------------------------------------------------------------

/// Jobs of a queue that have not ended, per status.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct QueueDepth {
    pub pending: i64,
    pub queued: i64,
    pub running: i64,
}

/// A queue: its depth, its oldest due job and its controls.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub queue: String,
    pub depth: QueueDepth,
    /// How long the longest-waiting due QUEUED job has been claimable (ms); `null`
    /// when none is due.
    #[schema(required = true)]
    pub oldest_queued_age_ms: Option<i64>,
    /// A paused queue hands out no job.
    pub paused: bool,
    /// At most this many jobs of the queue RUNNING at once; `null`: no limit.
    #[schema(required = true)]
    pub max_running: Option<i32>,
}

/// `GET /coordinator/queues`
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

// ---- batch ----------------------------------------------------------------------

/// One job of a batch answer, in request order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchItem {
    /// `false` when an earlier request (or an earlier item) with the same
    /// idempotency key made it.
    pub created: bool,
    pub job: JobView,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCreated {
    pub jobs: Vec<BatchItem>,
}
