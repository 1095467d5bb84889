//! The job state machine: one pure function decides every transition.
//!
//! `PENDING → QUEUED → RUNNING → COMPLETED | FAILED`, any non-terminal → `CANCELLED`,
//! and `RUNNING → QUEUED` when a worker hands a job back or its lease expires.
//! A terminal job never changes.

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

    pub fn as_str(self) -> &'static str {
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
    fn names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobStatus::parse("running"), None);
        assert_eq!(JobStatus::parse("DONE"), None);
    }
}
