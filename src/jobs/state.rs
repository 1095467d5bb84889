//! The job state machine: one pure rule, [`JobStatus::can_move_to`], decides which
//! status moves are allowed, and [`backoff_delay_ms`] how long a retry waits.
//!
//! `PENDING → QUEUED → RUNNING → COMPLETED | FAILED`, any non-terminal → `CANCELLED`,
//! and `RUNNING → QUEUED` when a worker hands a job back, fails it with `retryable`
//! while attempts remain, or its lease expires with attempts remaining (on the last
//! attempt an expired lease fails the job). A terminal job never changes, except
//! through a redrive (FAILED or CANCELLED → QUEUED, `POST
//! /coordinator/jobs/{id}/retry`), which is its own rule below.
//!
//! What each change does to the row (attempts, lease, `run_at` after a backoff, the
//! event it appends) is `jobs::repo::apply_to_row`, under the row lock taken by
//! `jobs::repo::apply`. The lease sweep is `jobs::upkeep::expire_leases`, run by each
//! housekeeping pass (`housekeeping::pass`), which also revokes the attempt's tokens.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    Pending,
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Pending,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "PENDING",
            JobStatus::Queued => "QUEUED",
            JobStatus::Running => "RUNNING",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The single state-machine rule.
    pub fn can_move_to(self, next: JobStatus) -> bool {
        use JobStatus::*;
        match (self, next) {
            (from, _) if from.is_terminal() => false,
            (_, Cancelled) => true,
            (Pending, Queued) | (Queued, Running) | (Running, Queued) => true,
            (Running, Completed) | (Running, Failed) => true,
            _ => false,
        }
    }
}

impl JobStatus {
    /// A dead job that a redrive may put back in its queue.
    pub fn can_redrive(self) -> bool {
        matches!(self, JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// The delay before retry number `attempt` (1 = the retry after the first attempt):
/// exponential with full jitter, `unit × min(cap, base × 2^(attempt-1))`, where `unit`
/// is a uniform random number in `[0, 1]` (passed in so this stays pure).
pub fn backoff_delay_ms(base_ms: i64, cap_ms: i64, attempt: i32, unit: f64) -> i64 {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 62)).unwrap_or(0);
    let ceiling = base_ms
        .max(0)
        .saturating_mul(2_i64.saturating_pow(exp))
        .min(cap_ms.max(0));
    // `ceiling` is at most the cap (< 2^53 in practice), so the float is exact enough.
    #[expect(
        clippy::as_conversions,
        reason = "std has no f64 to i64 conversion; the result is clamped to [0, ceiling] below"
    )]
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_precision_loss,
        reason = "the float is exact enough (see above) and the result is clamped"
    )]
    let delay = (ceiling as f64 * unit.clamp(0.0, 1.0)).round() as i64;
    delay.clamp(0, ceiling)
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a transition was refused (→ 409).
pub fn transition_error(from: JobStatus, to: JobStatus) -> String {
    if from.is_terminal() {
        format!("job is {from} and can no longer change")
    } else {
        format!("cannot move a {from} job to {to}")
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::{self, *};

    #[test]
    fn every_pair_of_states() {
        let allowed = [
            (Pending, Queued),
            (Pending, Cancelled),
            (Queued, Running),
            (Queued, Cancelled),
            (Running, Queued),
            (Running, Completed),
            (Running, Failed),
            (Running, Cancelled),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                assert_eq!(
                    from.can_move_to(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn terminal_states_never_change() {
        for from in [Completed, Failed, Cancelled] {
            assert!(from.is_terminal());
            assert!(JobStatus::ALL.iter().all(|to| !from.can_move_to(*to)));
        }
    }

    #[test]
    fn only_dead_jobs_can_be_redriven() {
        for s in JobStatus::ALL {
            assert_eq!(s.can_redrive(), matches!(s, Failed | Cancelled), "{s}");
        }
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        use super::backoff_delay_ms as d;
        // The ceiling doubles per attempt...
        assert_eq!(d(1000, 60_000, 1, 1.0), 1000);
        assert_eq!(d(1000, 60_000, 2, 1.0), 2000);
        assert_eq!(d(1000, 60_000, 4, 1.0), 8000);
        // ...up to the cap, also for absurd attempt numbers.
        assert_eq!(d(1000, 60_000, 10, 1.0), 60_000);
        assert_eq!(d(1000, 60_000, i32::MAX, 1.0), 60_000);
        // Full jitter: anywhere from 0 to the ceiling.
        assert_eq!(d(1000, 60_000, 3, 0.0), 0);
        assert_eq!(d(1000, 60_000, 3, 0.5), 2000);
        // Out-of-range inputs stay in range.
        assert_eq!(d(1000, 60_000, 0, 1.0), 1000);
        assert_eq!(d(1000, 60_000, 1, 7.0), 1000);
        assert_eq!(d(-5, 60_000, 3, 1.0), 0);
    }

    #[test]
    fn names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobStatus::parse("running"), None);
        assert_eq!(JobStatus::parse("DONE"), None);
    }
}
