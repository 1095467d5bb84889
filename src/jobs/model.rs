//! Job domain types: ids, rows, request bodies (parsed and validated at the edge) and
//! the JSON view.

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::state::JobStatus;
use crate::db::schema::{job_events, jobs};
use crate::error::ApiError;

/// A job id: a UUID (v7 when we mint it), stored as its hyphenated lower-case string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(String);

impl JobId {
    pub fn generate() -> Self {
        JobId(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// Parse a path or claim value; anything but a UUID is a 400 naming `field`.
    pub fn parse(raw: &str, field: &str) -> Result<Self, ApiError> {
        uuid::Uuid::try_parse(raw)
            .map(|u| JobId(u.hyphenated().to_string()))
            .map_err(|_| ApiError::bad_request(field, "must be a UUID"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `jobs` row.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = jobs)]
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
    pub worker: Option<&'a str>,
    pub lease_expires_at: Option<i64>,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
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
            worker: self.worker.as_deref(),
            lease_expires_at: self.lease_expires_at,
            updated_at: self.updated_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
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

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

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
    /// `created`, `status`, `progress`, `claimed`, `completed`, `failed` or
    /// `lease_expired`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// What changed (event-specific JSON).
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
    pub max_attempts: i32,
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
            events: None,
            events_truncated: false,
        }
    }
}

// ---- request bodies -------------------------------------------------------------

pub const MAX_MESSAGE_CHARS: usize = 4096;
pub const MAX_PRIORITY: i32 = 1000;
pub const MAX_ATTEMPTS: i32 = 100;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
pub const DEFAULT_QUEUE: &str = "default";

/// Queue names appear in URLs: 1–64 of `[A-Za-z0-9_.-]`.
pub fn validate_queue(q: &str, field: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&q.len())
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            field,
            "must be 1-64 characters of letters, digits, '_', '.' or '-'",
        ))
    }
}

pub fn validate_priority(p: i32, field: &str) -> Result<(), ApiError> {
    if (-MAX_PRIORITY..=MAX_PRIORITY).contains(&p) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            field,
            "must be between -1000 and 1000",
        ))
    }
}

pub fn validate_message(m: Option<&str>) -> Result<(), ApiError> {
    match m {
        Some(m) if m.chars().count() > MAX_MESSAGE_CHARS => Err(ApiError::bad_request(
            "message",
            "must be at most 4096 characters",
        )),
        Some(m) => validate_text(m, "message"),
        None => Ok(()),
    }
}

/// Text stored in a column as it is (not inside JSON) may not hold U+0000, which
/// PostgreSQL's text type cannot store.
pub fn validate_text(text: &str, field: &str) -> Result<(), ApiError> {
    if text.contains('\0') {
        Err(ApiError::bad_request(
            field,
            "must not contain NUL (U+0000) characters",
        ))
    } else {
        Ok(())
    }
}

/// `POST /coordinator/jobs`: a new job (PENDING).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateJob {
    /// 1–100 printable ASCII characters, no space, `"` or `\`.
    #[schema(min_length = 1, max_length = 100, pattern = r#"^[!#-\[\]-~]+$"#)]
    pub kind: String,
    /// Default `default`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$")]
    pub queue: Option<String>,
    /// Default 0; higher runs first.
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i32>,
    /// A JSON object; default `{}`.
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    /// Default 3.
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<i32>,
}

/// A validated job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: String,
    pub queue: String,
    pub priority: i32,
    pub payload: Value,
    pub max_attempts: i32,
    pub status: JobStatus,
}

impl CreateJob {
    pub fn validate(self) -> Result<NewJob, ApiError> {
        let kind_ok = (1..=100).contains(&self.kind.len())
            && self
                .kind
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !kind_ok {
            return Err(ApiError::bad_request(
                "kind",
                "must be 1-100 printable ASCII characters without spaces",
            ));
        }
        let queue = self.queue.unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
        validate_queue(&queue, "queue")?;
        let priority = self.priority.unwrap_or(0);
        validate_priority(priority, "priority")?;
        let payload = match self.payload {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v @ Value::Object(_)) => v,
            Some(_) => return Err(ApiError::bad_request("payload", "must be a JSON object")),
        };
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(ApiError::bad_request(
                "maxAttempts",
                "must be between 1 and 100",
            ));
        }
        Ok(NewJob {
            kind: self.kind,
            queue,
            priority,
            payload,
            max_attempts,
            status: JobStatus::Pending,
        })
    }
}

/// `PATCH /coordinator/jobs/{id}/status`: move the job along the state machine.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusUpdate {
    pub status: JobStatus,
    #[schema(max_length = 4096)]
    pub message: Option<String>,
}

/// `PATCH /coordinator/jobs/{id}/progress`: only while RUNNING.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProgressUpdate {
    #[schema(minimum = 0, maximum = 100)]
    pub percent: i64,
    #[schema(max_length = 4096)]
    pub message: Option<String>,
}

impl ProgressUpdate {
    pub fn validate(&self) -> Result<i32, ApiError> {
        validate_message(self.message.as_deref())?;
        i32::try_from(self.percent)
            .ok()
            .filter(|p| (0..=100).contains(p))
            .ok_or_else(|| ApiError::bad_request("percent", "must be between 0 and 100"))
    }
}

/// `POST /coordinator/jobs/{id}/complete`: RUNNING → COMPLETED (an empty body is `{}`).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteJob {
    /// Any JSON value.
    pub result: Option<Value>,
}

/// `POST /coordinator/jobs/{id}/fail`: RUNNING → FAILED.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailJob {
    /// Not blank; at most 65536 characters.
    #[schema(min_length = 1, max_length = 65536)]
    pub error: String,
    /// Any JSON value.
    pub gate_results: Option<Value>,
}

impl FailJob {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.error.trim().is_empty() {
            return Err(ApiError::bad_request("error", "must not be empty"));
        }
        if self.error.chars().count() > 65_536 {
            return Err(ApiError::bad_request(
                "error",
                "must be at most 65536 characters",
            ));
        }
        validate_text(&self.error, "error")
    }
}

/// The change a route asks for, applied by the repository inside one transaction.
#[derive(Debug, Clone)]
pub enum Change {
    Status {
        to: JobStatus,
        message: Option<String>,
    },
    Progress {
        percent: i32,
        message: Option<String>,
    },
    Complete {
        result: Option<Value>,
    },
    Fail {
        error: String,
        gate_results: Option<Value>,
    },
    /// A worker claimed the job from its queue (QUEUED → RUNNING).
    Claim {
        worker: String,
    },
    /// The worker's lease ran out: back to QUEUED, or FAILED after the last attempt.
    LeaseExpired,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_accepts_uuids_only() {
        assert!(JobId::parse("0192f0c1-7c1e-7aaa-8bbb-123456789abc", "id").is_ok());
        assert!(JobId::parse("not-a-uuid", "id").is_err());
        assert!(JobId::parse("", "id").is_err());
        let upper = JobId::parse("0192F0C1-7C1E-7AAA-8BBB-123456789ABC", "id").expect("uuid");
        assert_eq!(upper.as_str(), "0192f0c1-7c1e-7aaa-8bbb-123456789abc");
    }

    #[test]
    fn generated_ids_are_v7_and_ordered() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert!(a.as_str() < b.as_str() || a.as_str()[..13] == b.as_str()[..13]);
        assert_eq!(&a.as_str()[14..15], "7");
    }

    #[test]
    fn create_defaults_and_limits() {
        let j = CreateJob {
            kind: "build".into(),
            queue: None,
            priority: None,
            payload: None,
            max_attempts: None,
        }
        .validate()
        .expect("valid");
        assert_eq!(j.queue, "default");
        assert_eq!(j.priority, 0);
        assert_eq!(j.payload, serde_json::json!({}));
        let bad = |c: CreateJob| match c.validate() {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected 400, got {other:?}"),
        };
        let base = || CreateJob {
            kind: "k".into(),
            queue: None,
            priority: None,
            payload: None,
            max_attempts: None,
        };
        assert_eq!(
            bad(CreateJob {
                kind: "".into(),
                ..base()
            }),
            "kind"
        );
        assert_eq!(
            bad(CreateJob {
                queue: Some("a b".into()),
                ..base()
            }),
            "queue"
        );
        assert_eq!(
            bad(CreateJob {
                priority: Some(1001),
                ..base()
            }),
            "priority"
        );
        assert_eq!(
            bad(CreateJob {
                payload: Some(serde_json::json!([1])),
                ..base()
            }),
            "payload"
        );
        assert_eq!(
            bad(CreateJob {
                max_attempts: Some(0),
                ..base()
            }),
            "maxAttempts"
        );
    }

    #[test]
    fn progress_bounds() {
        let p = |n| {
            ProgressUpdate {
                percent: n,
                message: None,
            }
            .validate()
        };
        assert_eq!(p(0).ok(), Some(0));
        assert_eq!(p(100).ok(), Some(100));
        assert!(p(-1).is_err());
        assert!(p(101).is_err());
        assert!(p(i64::MAX).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
