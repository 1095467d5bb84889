//! The job's own types, shared by every layer: its id, the types of its events, the
//! change a route asks for, a validated new job and its retry backoff, and the time
//! format of the API. Storage rows are in `row`, the JSON views in `view`, request
//! bodies and their validators in `request`.

use serde::Serialize;
use serde_json::Value;

use super::state::JobStatus;
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
            .map_err(|e| ApiError::bad_request(field, format!("must be a UUID ({e})")))
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

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The type of a job event. Every event that changes the status has `from` (the
/// status before; `null` for `created`) and `to` (the status after) in its `data`:
///
/// - `created`: the job was created (`to` PENDING or QUEUED; also `queue`, `runAt`).
/// - `status`: a `PATCH …/status` move (`message`).
/// - `claimed`: a worker claimed it, QUEUED → RUNNING (`worker`, `attempt`).
/// - `progress`: progress while RUNNING (`percent`, `message`); no status change.
/// - `completed`: RUNNING → COMPLETED (`result`).
/// - `failed`: → FAILED, for good (`error`, `gateResults`, `retryable`).
/// - `retry_scheduled`: a retryable failure with attempts left, RUNNING → QUEUED
///   (`error`, `gateResults`, `attempt`, `runAt`).
/// - `lease_expired`: the worker's lease ran out, RUNNING → QUEUED (with `runAt`) or,
///   after the last attempt, FAILED (`worker`, `attempts`).
/// - `cancelled`: → CANCELLED (`reason`).
/// - `redriven`: a FAILED or CANCELLED job back to QUEUED with a fresh attempt budget
///   (`maxAttempts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Created,
    Status,
    Claimed,
    Progress,
    Completed,
    Failed,
    RetryScheduled,
    LeaseExpired,
    Cancelled,
    Redriven,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "created",
            EventType::Status => "status",
            EventType::Claimed => "claimed",
            EventType::Progress => "progress",
            EventType::Completed => "completed",
            EventType::Failed => "failed",
            EventType::RetryScheduled => "retry_scheduled",
            EventType::LeaseExpired => "lease_expired",
            EventType::Cancelled => "cancelled",
            EventType::Redriven => "redriven",
        }
    }
}

/// Retry backoff defaults (a job may set its own at create, `retryBackoff`).
pub const DEFAULT_RETRY_BASE_MS: i64 = 5_000;
pub const DEFAULT_RETRY_CAP_MS: i64 = 3_600_000;

/// A validated backoff: (base, cap) in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base_ms: i64,
    pub cap_ms: i64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: DEFAULT_RETRY_BASE_MS,
            cap_ms: DEFAULT_RETRY_CAP_MS,
        }
    }
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
    /// Unix ms; `None` is "at once" (the creation time).
    pub run_at: Option<i64>,
    pub backoff: Backoff,
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
        retryable: bool,
    },
    /// Any non-terminal job → CANCELLED.
    Cancel {
        reason: Option<String>,
    },
    /// A FAILED or CANCELLED job back to QUEUED with a fresh attempt budget.
    Redrive,
    /// A worker claimed the job from its queue (QUEUED → RUNNING).
    Claim {
        worker: String,
    },
    /// The worker's lease ran out: back to QUEUED, or FAILED after the last attempt.
    LeaseExpired,
}

/// How many events one job keeps (`COORDINATOR_EVENTS_PER_JOB`), and how often its
/// older ones are trimmed.
///
/// The trim is amortized: the write of an event whose `seq` is a multiple of
/// [`EventBound::step`] and above [`EventBound::keep`] also deletes the job's events
/// with `seq <= seq - keep` (one contiguous range of the primary key), in the same
/// statement or transaction. So a job holds at most `keep + step - 1` events (a job's
/// `seq` has no holes: every version is an event), and the delete runs on one write in
/// `step`, removing `step` rows at a time once the job is past `keep`. (On PostgreSQL
/// the progress statement does not write a report whose job moved `keep` or more
/// while it waited for the row lock, whose events its trim could not see:
/// `statements::PgProgressBatch`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventBound {
    // Read by reference by the statements that bind them (`jobs::statements`).
    pub(super) keep: i64,
    pub(super) step: i64,
}

impl EventBound {
    /// Events a job keeps by default: as many as `GET …/jobs/{id}` shows
    /// (`repo::EVENTS_PER_READ`).
    pub const DEFAULT: i64 = 1_000;
    /// The smallest setting: fewer would trim a single attempt's own status events
    /// (created, queued, claimed, completed) away under a few progress reports.
    pub const MIN: i64 = 16;
    /// The largest setting: 100 000 events of a few hundred bytes is tens of MiB per
    /// job, the most one `jobs:update` caller should be able to pin per job.
    pub const MAX: i64 = 100_000;
    /// The longest step: the rows one trim deletes in steady state (once a job is past
    /// `keep`).
    pub const MAX_STEP: i64 = 64;
    /// The most rows one trim deletes, the job's oldest first: a backlog (after an
    /// upgrade from a release without the bound, or after `keep` was lowered) drains
    /// over the job's later trimming writes, `MAX_TRIM - step` (960 or more) each, in
    /// place of one delete of the whole backlog — about 1 s per million events on
    /// SQLite, every write of the instance waiting behind it. 1 024 rows (16 longest
    /// steps) cost about a millisecond there; in steady state a trim deletes `step`
    /// rows (at most [`Self::MAX_STEP`]), so the bound never binds.
    pub const MAX_TRIM: i64 = 16 * Self::MAX_STEP;

    /// Keep the newest `keep` events (clamped to [`Self::MIN`]..=[`Self::MAX`]); the
    /// step is `keep / 16`, at least 1 and at most [`Self::MAX_STEP`], so a job holds
    /// at most about 6 % more than `keep`.
    pub fn new(keep: i64) -> Self {
        let keep = keep.clamp(Self::MIN, Self::MAX);
        EventBound {
            keep,
            step: (keep / 16).clamp(1, Self::MAX_STEP),
        }
    }

    pub fn keep(&self) -> i64 {
        self.keep
    }

    pub fn step(&self) -> i64 {
        self.step
    }

    /// The most events a job holds: `keep + step - 1`.
    pub fn most(&self) -> i64 {
        self.keep + self.step - 1
    }

    /// The newest `seq` the write of event `seq` deletes (with every older one), or
    /// `None` when that write trims nothing. The statements compute the same in SQL.
    pub fn trim_upto(&self, seq: i64) -> Option<i64> {
        (seq > self.keep && seq % self.step == 0).then(|| seq - self.keep)
    }

    /// The newest `seq` the write of event `seq` actually deletes when the job's oldest
    /// event is `oldest`: [`Self::trim_upto`], but at most [`Self::MAX_TRIM`] events
    /// from the oldest on (`None` when it deletes nothing). The statements compute
    /// the same in SQL (`seq < oldest + MAX_TRIM`, the oldest one probe of the
    /// primary key).
    pub fn trim_bounded(&self, oldest: i64, seq: i64) -> Option<i64> {
        let upto = self
            .trim_upto(seq)?
            .min(oldest.saturating_add(Self::MAX_TRIM - 1));
        (upto >= oldest).then_some(upto)
    }
}

impl Default for EventBound {
    fn default() -> Self {
        EventBound::new(EventBound::DEFAULT)
    }
}

/// What the settings add to a job change: the lease a RUNNING job gets from it
/// (`COORDINATOR_LEASE_SECS`) and how many events the job keeps
/// (`COORDINATOR_EVENTS_PER_JOB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub lease_ms: i64,
    pub events: EventBound,
}

impl Terms {
    /// This lease, and the default event bound.
    pub fn with_lease_ms(lease_ms: i64) -> Self {
        Terms {
            lease_ms,
            events: EventBound::default(),
        }
    }
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
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn an_event_bound_trims_every_step_th_event_past_keep() {
        let b = EventBound::new(1000);
        assert_eq!((b.keep(), b.step(), b.most()), (1000, 62, 1061));
        assert_eq!(b.trim_upto(992), None, "not past keep yet");
        assert_eq!(b.trim_upto(1054), Some(54));
        assert_eq!(b.trim_upto(1055), None);
        assert_eq!(EventBound::new(16).step(), 1);
        assert_eq!(EventBound::new(1).keep(), EventBound::MIN);
        assert_eq!(EventBound::new(i64::MAX).step(), EventBound::MAX_STEP);
        // Every event written in turn: never more than `most` kept.
        let b = EventBound::new(100);
        let mut kept: Vec<i64> = Vec::new();
        for seq in 1..=2_000 {
            kept.push(seq);
            if let Some(upto) = b.trim_upto(seq) {
                kept.retain(|s| *s > upto);
            }
            assert!(i64::try_from(kept.len()).unwrap_or(i64::MAX) <= b.most());
        }
        assert_eq!(kept.last(), Some(&2_000));
    }

    /// A backlog far past `keep` (20 000 events under a bound of 100): each trimming
    /// write deletes at most `MAX_TRIM` of its oldest events, never one of the newest
    /// `keep`, and later writes drain it to the steady state, where the bound never
    /// binds (the same deletes as `trim_upto`).
    #[test]
    fn a_bounded_trim_drains_a_backlog_from_its_oldest_event() {
        let b = EventBound::new(100);
        let (mut oldest, mut seq) = (1_i64, 20_000_i64);
        let mut trims = 0;
        while seq - oldest + 1 > b.most() {
            seq += 1;
            if let Some(upto) = b.trim_bounded(oldest, seq) {
                assert!(upto - oldest < EventBound::MAX_TRIM);
                assert!(upto <= seq - b.keep(), "never one of the newest keep");
                oldest = upto + 1;
                trims += 1;
            }
            assert!(trims < 100, "drains");
        }
        assert_eq!(trims, 20, "19 900 past keep, 1 018 net each");
        // Steady state: every trim deletes what `trim_upto` says.
        for _ in 0..1_000 {
            seq += 1;
            assert_eq!(
                b.trim_bounded(oldest, seq),
                b.trim_upto(seq).filter(|u| *u >= oldest)
            );
            if let Some(upto) = b.trim_bounded(oldest, seq) {
                oldest = upto + 1;
            }
            assert!(seq - oldest < b.most());
        }
        let b = EventBound::new(EventBound::MAX);
        assert_eq!(b.trim_bounded(1, 100_032), Some(32));
        assert_eq!(b.trim_bounded(1, 200_000), Some(EventBound::MAX_TRIM));
        assert_eq!(b.trim_bounded(500, 100_032), None, "nothing that old");
    }
}
