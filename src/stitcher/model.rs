//! Stitcher request bodies, validated at the edge; the answer to a webhook or dispatch
//! (`DispatchResult`); and the `webhook_deliveries` row (`DeliveryRow`).

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::db::schema::webhook_deliveries;
use crate::error::ApiError;
use crate::jobs::model::{Backoff, NewJob};
use crate::jobs::request::{parse_time, validate_priority, validate_queue, DEFAULT_MAX_ATTEMPTS};
use crate::jobs::JobStatus;

/// What happened on the issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Assigned,
    Mentioned,
    Commented,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Assigned => "assigned",
            Action::Mentioned => "mentioned",
            Action::Commented => "commented",
        }
    }
}

/// `owner/name`, each 1–100 of `[A-Za-z0-9_.-]`, not only dots.
pub fn validate_repository(r: &str) -> Result<(), ApiError> {
    // Not only dots: `..` would be a path segment to a worker that builds a path or a
    // URL from it (GitHub allows no such name either).
    let part = |p: &str| {
        (1..=100).contains(&p.len())
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && !p.bytes().all(|b| b == b'.')
    };
    match r.split_once('/') {
        Some((owner, name)) if part(owner) && part(name) => Ok(()),
        _ => Err(ApiError::bad_request(
            "repository",
            "must be \"owner/name\" (letters, digits, '_', '.' or '-'; not only dots)",
        )),
    }
}

fn validate_issue(n: i64) -> Result<(), ApiError> {
    if n > 0 {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "issueNumber",
            "must be a positive integer",
        ))
    }
}

/// `POST /stitcher/webhook`: one delivery from the bot.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookPayload {
    #[schema(minimum = 1)]
    pub issue_number: i64,
    /// `owner/name`, each 1–100 of `[A-Za-z0-9_.-]`, not only dots.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")]
    pub repository: String,
    pub action: Action,
    #[schema(max_length = 65536)]
    pub comment: Option<String>,
    /// A JSON object.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

impl WebhookPayload {
    /// Validate and turn into the job to dispatch on `queue`.
    pub fn into_job(self, queue: &str, delivery_id: &str) -> Result<NewJob, ApiError> {
        validate_issue(self.issue_number)?;
        validate_repository(&self.repository)?;
        if self
            .comment
            .as_ref()
            .is_some_and(|c| c.chars().count() > 65_536)
        {
            return Err(ApiError::bad_request(
                "comment",
                "must be at most 65536 characters",
            ));
        }
        if !matches!(self.metadata, None | Some(Value::Object(_))) {
            return Err(ApiError::bad_request("metadata", "must be a JSON object"));
        }
        Ok(NewJob {
            kind: format!("stitcher.{}", self.action.as_str()),
            queue: queue.to_owned(),
            priority: 0,
            payload: json!({
                "issueNumber": self.issue_number,
                "repository": self.repository,
                "action": self.action,
                "comment": self.comment,
                "metadata": self.metadata,
                "deliveryId": delivery_id,
            }),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            status: JobStatus::Queued,
            run_at: None,
            backoff: Backoff::default(),
        })
    }
}

/// `POST /stitcher/dispatch`: a manual dispatch.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DispatchRequest {
    #[schema(minimum = 1)]
    pub issue_number: i64,
    /// `owner/name`, each 1–100 of `[A-Za-z0-9_.-]`, not only dots.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}$")]
    pub repository: String,
    /// Default: the configured webhook queue.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$")]
    pub queue: Option<String>,
    /// Default 0; higher runs first.
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i32>,
    /// A JSON object, stored as the job payload's `data`.
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    /// RFC 3339; the job is not claimable before it. Default: at once.
    #[schema(format = DateTime)]
    pub run_at: Option<String>,
}

impl DispatchRequest {
    pub fn into_job(self, default_queue: &str) -> Result<NewJob, ApiError> {
        validate_issue(self.issue_number)?;
        validate_repository(&self.repository)?;
        let queue = self.queue.unwrap_or_else(|| default_queue.to_owned());
        validate_queue(&queue, "queue")?;
        let priority = self.priority.unwrap_or(0);
        validate_priority(priority, "priority")?;
        if !matches!(self.payload, None | Some(Value::Object(_))) {
            return Err(ApiError::bad_request("payload", "must be a JSON object"));
        }
        let run_at = self
            .run_at
            .as_deref()
            .map(|t| parse_time(t, "runAt"))
            .transpose()?;
        Ok(NewJob {
            kind: "stitcher.dispatch".to_owned(),
            queue,
            priority,
            payload: json!({
                "issueNumber": self.issue_number,
                "repository": self.repository,
                "data": self.payload.unwrap_or_else(|| json!({})),
            }),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            status: JobStatus::Queued,
            run_at,
            backoff: Backoff::default(),
        })
    }
}

/// A stored delivery.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = webhook_deliveries)]
pub struct DeliveryRow {
    pub caller: String,
    pub delivery_id: String,
    pub received_at: i64,
    pub payload: String,
    pub job_id: String,
}

/// The answer to a webhook or dispatch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DispatchResult {
    #[schema(format = "uuid")]
    pub job_id: String,
    pub queue_name: String,
    pub status: JobStatus,
    /// While QUEUED, when the job is expected to start (from the queue's recent
    /// throughput); absent when there is no estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime, nullable = false)]
    pub estimated_start_time: Option<String>,
    /// `true` when this answers a delivery or dispatch seen before (same job).
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_shape() {
        assert!(validate_repository("octo/widgets").is_ok());
        assert!(validate_repository("octo").is_err());
        assert!(validate_repository("a/b/c").is_err());
        assert!(validate_repository("/b").is_err());
        assert!(validate_repository("a b/c").is_err());
        for dots in ["../..", "./x", "x/..", "x/."] {
            assert!(validate_repository(dots).is_err(), "{dots}");
        }
        assert!(validate_repository("x/.github").is_ok());
        assert!(validate_repository("x/a..b").is_ok());
    }

    #[test]
    fn issue_number_must_be_positive() {
        assert!(validate_issue(1).is_ok());
        assert!(validate_issue(0).is_err());
        assert!(validate_issue(-3).is_err());
    }
}
