//! What clients send: request bodies and the list query (with their OpenAPI schemas),
//! the limits they are held to, and the validators that turn them into the job's own
//! types (`NewJob`, `Backoff`, `Change` in `model`) or a 400 naming the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::{Backoff, JobId, NewJob, DEFAULT_RETRY_BASE_MS, DEFAULT_RETRY_CAP_MS};
use super::state::JobStatus;
use crate::error::ApiError;

/// A count or sequence number written as plain decimal digits (at most 18, so it fits
/// any integer type used here). Rust's `parse` also takes a leading `+`; a query value
/// like `+1` or ` 1` is more likely a mangled request than a number, so it is refused.
pub fn digits<T: std::str::FromStr>(v: &str) -> Option<T> {
    if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

// ---- job bodies -----------------------------------------------------------------

pub const MAX_MESSAGE_CHARS: usize = 4096;
pub const MAX_PRIORITY: i32 = 1000;
pub const MAX_ATTEMPTS: i32 = 100;
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
pub const DEFAULT_QUEUE: &str = "default";
/// Bounds of `retryBackoff`: a base up to a day, a cap up to a week.
pub const MAX_RETRY_BASE_MS: i64 = 86_400_000;
pub const MAX_RETRY_CAP_MS: i64 = 604_800_000;

/// The earliest and latest instants a timestamp may name (0001-01-01T00:00:00Z and
/// 9999-12-31T23:59:59.999Z): what RFC 3339 can write in UTC, as every answer does.
const EARLIEST_MS: i64 = -62_135_596_800_000;
const LATEST_MS: i64 = 253_402_300_799_999;

/// Parse an RFC 3339 timestamp (with an offset) into unix milliseconds. The instant must
/// be writable in UTC: `9999-12-31T23:59:59-23:59` parses, but is in the year 10000 in
/// UTC, which no answer could show as RFC 3339.
pub fn parse_time(raw: &str, field: &str) -> Result<i64, ApiError> {
    let ms = chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ApiError::bad_request(
                field,
                format!("must be an RFC 3339 timestamp, e.g. 2026-01-31T12:00:00Z ({e})"),
            )
        })?;
    if !(EARLIEST_MS..=LATEST_MS).contains(&ms) {
        return Err(ApiError::bad_request(
            field,
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z in UTC",
        ));
    }
    Ok(ms)
}

/// `retryBackoff` on create: either member may be left out (then the default).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBackoff {
    /// Default 5000 (5 s); 1 ms to 1 day.
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub base_ms: Option<i64>,
    /// Default 3600000 (1 h); at least `baseMs`, at most 7 days.
    #[schema(minimum = 1, maximum = 604_800_000)]
    pub cap_ms: Option<i64>,
}

impl RetryBackoff {
    pub fn validate(&self) -> Result<Backoff, ApiError> {
        let base_ms = self.base_ms.unwrap_or(DEFAULT_RETRY_BASE_MS);
        if !(1..=MAX_RETRY_BASE_MS).contains(&base_ms) {
            return Err(ApiError::bad_request(
                "retryBackoff.baseMs",
                "must be between 1 and 86400000",
            ));
        }
        let cap_ms = self
            .cap_ms
            .unwrap_or_else(|| DEFAULT_RETRY_CAP_MS.max(base_ms));
        if !(base_ms..=MAX_RETRY_CAP_MS).contains(&cap_ms) {
            return Err(ApiError::bad_request(
                "retryBackoff.capMs",
                "must be between baseMs and 604800000",
            ));
        }
        Ok(Backoff { base_ms, cap_ms })
    }
}

/// Queue names appear in URLs: 1–64 of `[A-Za-z0-9_.-]`, not only dots (`.` and `..`
/// are path segments that clients and browsers normalise away, so a queue named so
/// could be filled but not claimed from, paused or read through them).
pub fn validate_queue(q: &str, field: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&q.len())
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !q.bytes().all(|b| b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            field,
            "must be 1-64 characters of letters, digits, '_', '.' or '-', not only dots",
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

/// A message (or a cancel's `reason`, named by `field`): at most 4096 characters.
pub fn validate_message(m: Option<&str>, field: &str) -> Result<(), ApiError> {
    match m {
        Some(m) if m.chars().count() > MAX_MESSAGE_CHARS => Err(ApiError::bad_request(
            field,
            "must be at most 4096 characters",
        )),
        Some(m) => validate_text(m, field),
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
    /// RFC 3339; the job is not claimable before it. Default: at once.
    #[schema(format = DateTime)]
    pub run_at: Option<String>,
    /// The backoff between retries; default base 5 s, cap 1 h.
    pub retry_backoff: Option<RetryBackoff>,
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
        let run_at = self
            .run_at
            .as_deref()
            .map(|t| parse_time(t, "runAt"))
            .transpose()?;
        let backoff = match &self.retry_backoff {
            Some(b) => b.validate()?,
            None => Backoff::default(),
        };
        Ok(NewJob {
            kind: self.kind,
            queue,
            priority,
            payload,
            max_attempts,
            status: JobStatus::Pending,
            run_at,
            backoff,
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
        validate_message(self.message.as_deref(), "message")?;
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

/// `POST /coordinator/jobs/{id}/fail`: RUNNING → FAILED, or back to QUEUED after a
/// backoff when `retryable` and attempts are left.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailJob {
    /// Not blank; at most 65536 characters.
    #[schema(min_length = 1, max_length = 65536)]
    pub error: String,
    /// Any JSON value.
    pub gate_results: Option<Value>,
    /// Default `false`: the failure is final.
    pub retryable: Option<bool>,
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

/// `POST /coordinator/jobs/{id}/cancel` (an empty body is `{}`).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelJob {
    /// Why; kept as the job's `message`.
    #[schema(max_length = 4096)]
    pub reason: Option<String>,
}

// ---- list -----------------------------------------------------------------------

pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 500;

/// Where a page ends: the (createdAt, id) of its last job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: i64,
    pub id: String,
}

impl Cursor {
    /// Opaque to clients: base64url of `createdAt:id`.
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.created_at, self.id))
    }

    #[expect(
        clippy::map_err_ignore,
        reason = "a cursor is opaque to its caller: which step failed to decode it tells them nothing"
    )]
    pub fn decode(raw: &str) -> Result<Cursor, ApiError> {
        use base64::Engine;
        let bad = || ApiError::bad_request("cursor", "is not a cursor from a previous page");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let (t, id) = text.split_once(':').ok_or_else(bad)?;
        let created_at = t.parse().map_err(|_| bad())?;
        let id = JobId::parse(id, "cursor").map_err(|_| bad())?;
        Ok(Cursor {
            created_at,
            id: id.into_string(),
        })
    }
}

/// The filters and page of `GET /coordinator/jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    pub queue: Option<String>,
    /// Empty: every status.
    pub statuses: Vec<JobStatus>,
    pub kind: Option<String>,
    /// Exclusive bounds, unix ms.
    pub created_after: Option<i64>,
    pub created_before: Option<i64>,
    pub limit: i64,
    pub after: Option<Cursor>,
}

impl ListFilter {
    /// From the query string's pairs (`status` may repeat); unknown names are a 400.
    pub fn parse(pairs: &[(String, String)]) -> Result<ListFilter, ApiError> {
        let mut f = ListFilter {
            queue: None,
            statuses: Vec::new(),
            kind: None,
            created_after: None,
            created_before: None,
            limit: DEFAULT_PAGE,
            after: None,
        };
        let mut seen: Vec<&str> = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            if k.is_empty() {
                return Err(ApiError::bad_request("query", "a parameter without a name"));
            }
            // Only `status` may repeat (each one adds a status): any other given twice
            // would leave one of two values to chance.
            if k != "status" {
                if seen.contains(&k.as_str()) {
                    return Err(ApiError::bad_request(
                        k.chars().take(64).collect::<String>(),
                        "given more than once",
                    ));
                }
                seen.push(k);
            }
            match k.as_str() {
                "queue" => {
                    validate_queue(v, "queue")?;
                    f.queue = Some(v.clone());
                }
                "status" => {
                    let s = JobStatus::parse(v).ok_or_else(|| {
                        ApiError::bad_request(
                            "status",
                            "must be PENDING, QUEUED, RUNNING, COMPLETED, FAILED or CANCELLED",
                        )
                    })?;
                    if !f.statuses.contains(&s) {
                        f.statuses.push(s);
                    }
                }
                "kind" => {
                    if !(1..=100).contains(&v.len()) || v.contains('\0') {
                        return Err(ApiError::bad_request("kind", "must be 1-100 characters"));
                    }
                    f.kind = Some(v.clone());
                }
                "createdAfter" => f.created_after = Some(parse_time(v, "createdAfter")?),
                "createdBefore" => f.created_before = Some(parse_time(v, "createdBefore")?),
                "limit" => {
                    f.limit = digits(v)
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad_request("limit", "must be between 1 and 500")
                        })?;
                }
                "cursor" => f.after = Some(Cursor::decode(v)?),
                other => {
                    return Err(ApiError::bad_request(
                        other.chars().take(64).collect::<String>(),
                        "unknown query parameter",
                    ))
                }
            }
        }
        Ok(f)
    }
}

// ---- queues ---------------------------------------------------------------------

pub const MAX_RUNNING_LIMIT: i32 = 1_000_000;

fn some_value<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// `PATCH /coordinator/queues/{queue}`: members left out stay as they are.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueuePatch {
    pub paused: Option<bool>,
    /// 1–1000000, or `null` to remove the limit.
    #[serde(default, deserialize_with = "some_value")]
    #[schema(value_type = Option<i32>, minimum = 1, maximum = 1_000_000)]
    pub max_running: Option<Option<i32>>,
}

impl QueuePatch {
    pub fn validate(&self) -> Result<(), ApiError> {
        match self.max_running {
            Some(Some(n)) if !(1..=MAX_RUNNING_LIMIT).contains(&n) => Err(ApiError::bad_request(
                "maxRunning",
                "must be between 1 and 1000000, or null",
            )),
            _ => Ok(()),
        }
    }
}

// ---- batch ----------------------------------------------------------------------

pub const MAX_BATCH: usize = 1_000;

/// One job of a batch: a `CreateJob` with its own optional idempotency key.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchJob {
    #[schema(min_length = 1, max_length = 100, pattern = r#"^[!#-\[\]-~]+$"#)]
    pub kind: String,
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$")]
    pub queue: Option<String>,
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i32>,
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<i32>,
    #[schema(format = DateTime)]
    pub run_at: Option<String>,
    pub retry_backoff: Option<RetryBackoff>,
    /// Like the `Idempotency-Key` header of a single create (and unique with those, per
    /// caller): a job with this key already made is returned instead (`created: false`);
    /// the same key with different contents is a 409 for the whole batch.
    #[serde(skip_serializing)]
    #[schema(min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
    pub idempotency_key: Option<String>,
}

impl BatchJob {
    pub fn into_create(self) -> (CreateJob, Option<String>) {
        (
            CreateJob {
                kind: self.kind,
                queue: self.queue,
                priority: self.priority,
                payload: self.payload,
                max_attempts: self.max_attempts,
                run_at: self.run_at,
                retry_backoff: self.retry_backoff,
            },
            self.idempotency_key,
        )
    }
}

/// `POST /coordinator/jobs/batch`
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchCreate {
    /// 1–1000 jobs, created in one transaction (all or none).
    #[schema(min_items = 1, max_items = 1000)]
    pub jobs: Vec<BatchJob>,
}

#[cfg(test)]
mod tests {

    #[test]
    fn digits_take_plain_decimal_only() {
        assert_eq!(digits::<i64>("0"), Some(0));
        assert_eq!(digits::<i64>("42"), Some(42));
        assert_eq!(digits::<i64>("000000000000000007"), Some(7));
        for bad in [
            "",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1e3",
            "0x10",
            "1_000",
            "\u{661}",
            "9999999999999999999",
        ] {
            assert_eq!(digits::<i64>(bad), None, "{bad:?}");
        }
        assert_eq!(digits::<u8>("256"), None);
    }

    #[test]
    fn a_timestamp_must_be_writable_in_utc() {
        for ok in [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "2026-01-31T12:00:00+01:00",
        ] {
            assert!(parse_time(ok, "runAt").is_ok(), "{ok}");
        }
        for bad in [
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+00:01",
            "0000-01-01T00:00:00+23:59",
        ] {
            match parse_time(bad, "runAt") {
                Err(ApiError::BadRequest { field, detail }) => {
                    assert_eq!(field, "runAt");
                    assert!(detail.contains("9999-12-31"), "{detail}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339("0001-01-01T00:00:00Z")
                .expect("parses")
                .timestamp_millis(),
            EARLIEST_MS
        );
        assert_eq!(
            chrono::DateTime::parse_from_rfc3339("9999-12-31T23:59:59.999Z")
                .expect("parses")
                .timestamp_millis(),
            LATEST_MS
        );
    }

    use super::*;

    #[test]
    fn create_defaults_and_limits() {
        let j = CreateJob {
            kind: "build".into(),
            queue: None,
            priority: None,
            payload: None,
            max_attempts: None,
            run_at: None,
            retry_backoff: None,
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
            run_at: None,
            retry_backoff: None,
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
        assert_eq!(
            bad(CreateJob {
                run_at: Some("tomorrow".into()),
                ..base()
            }),
            "runAt"
        );
        assert_eq!(
            bad(CreateJob {
                retry_backoff: Some(RetryBackoff {
                    base_ms: Some(10_000),
                    cap_ms: Some(5_000),
                }),
                ..base()
            }),
            "retryBackoff.capMs"
        );
        assert_eq!(
            bad(CreateJob {
                retry_backoff: Some(RetryBackoff {
                    base_ms: Some(0),
                    cap_ms: None,
                }),
                ..base()
            }),
            "retryBackoff.baseMs"
        );
        let j = CreateJob {
            run_at: Some("2030-01-01T00:00:00+01:00".into()),
            retry_backoff: Some(RetryBackoff {
                base_ms: Some(100),
                cap_ms: None,
            }),
            ..base()
        }
        .validate()
        .expect("valid");
        assert_eq!(j.run_at, Some(1_893_452_400_000));
        assert_eq!(
            j.backoff,
            Backoff {
                base_ms: 100,
                cap_ms: DEFAULT_RETRY_CAP_MS
            }
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
    fn list_filters_parse_and_refuse() {
        let p = |q: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = q
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            ListFilter::parse(&pairs)
        };
        let f = p(&[
            ("status", "QUEUED"),
            ("status", "RUNNING"),
            ("status", "QUEUED"),
            ("queue", "ci"),
            ("limit", "500"),
        ])
        .expect("valid");
        assert_eq!(f.statuses, [JobStatus::Queued, JobStatus::Running]);
        assert_eq!(f.queue.as_deref(), Some("ci"));
        assert_eq!(f.limit, 500);
        assert_eq!(p(&[]).expect("valid").limit, DEFAULT_PAGE);
        let field = |q: &[(&str, &str)]| match p(q) {
            Err(ApiError::BadRequest { field, .. }) => field,
            other => panic!("expected 400, got {other:?}"),
        };
        assert_eq!(field(&[("limit", "501")]), "limit");
        assert_eq!(field(&[("limit", "0")]), "limit");
        assert_eq!(field(&[("status", "running")]), "status");
        assert_eq!(field(&[("cursor", "nope")]), "cursor");
        assert_eq!(field(&[("createdAfter", "yesterday")]), "createdAfter");
        assert_eq!(field(&[("sort", "asc")]), "sort");
    }

    #[test]
    fn cursors_round_trip() {
        let c = Cursor {
            created_at: 1_700_000_000_123,
            id: "0192f0c1-7c1e-7aaa-8bbb-123456789abc".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).ok(), Some(c));
        assert!(Cursor::decode("MTIzOm5vdC1hLXV1aWQ").is_err());
    }

    #[test]
    fn queue_patch_tells_null_from_absent() {
        let p: QueuePatch = serde_json::from_str(r#"{"maxRunning": null}"#).expect("json");
        assert_eq!(p.max_running, Some(None));
        let p: QueuePatch = serde_json::from_str(r#"{"paused": true}"#).expect("json");
        assert_eq!(p.max_running, None);
        let p: QueuePatch = serde_json::from_str(r#"{"maxRunning": 0}"#).expect("json");
        assert!(p.validate().is_err());
    }

    #[test]
    fn queue_names_are_url_segments_and_never_only_dots() {
        for ok in ["default", "a", "ci.linux-x86_64", ".hidden", "a..b", "...a"] {
            assert!(validate_queue(ok, "queue").is_ok(), "{ok}");
        }
        let long = "q".repeat(65);
        for bad in ["", ".", "..", "...", "a/b", "a b", "é", "*", long.as_str()] {
            assert!(
                matches!(
                    validate_queue(bad, "queue"),
                    Err(ApiError::BadRequest { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
