//! A worker's progress report, the service's most frequent write, with group commit.
//!
//! On PostgreSQL each report is handed to batching threads (`db::batch`): each takes
//! whatever reports have queued up and writes them with one statement and one commit
//! (`repo::progress_batch`), and answers each report after that commit. A signed
//! report's replay record (`db::replay::Deferred`) is written in the same
//! transaction, so the request costs one commit, not two. A report that
//! statement does not apply to (the job is not RUNNING, or the report would revoke
//! tokens) takes the general path of every change (`repo::apply`), which gives the
//! exact answer. On SQLite every write already shares the group-commit writer's
//! commits, so a report goes straight to the general path.

use super::model::Change;
use super::repo::{self, ProgressReport};
use super::row::JobRow;
use crate::db::batch::{Batcher, Shape};
use crate::db::replay;
use crate::db::{Backend, Db};
use crate::error::StoreError;

/// Most reports written in one statement.
const MAX_BATCH: usize = 256;
/// Past this many waiting reports, a request is refused at once (503).
const QUEUE: usize = 1024;

type Written = Result<Option<JobRow>, StoreError>;

#[derive(Clone)]
pub struct ProgressLog {
    /// PostgreSQL: the batching threads; SQLite: `None`.
    batcher: Option<Batcher<ProgressReport, Written>>,
    db: Db,
}

impl ProgressLog {
    /// Start the batching threads (PostgreSQL: two, so one batch's commit overlaps the
    /// next batch's statement). They stop when the last `ProgressLog` is dropped.
    pub fn start(db: Db) -> Self {
        let batcher = (db.backend() == Backend::Postgres).then(|| {
            Batcher::start(
                &db,
                Shape {
                    name: "progress_log",
                    threads: 2,
                    max_batch: MAX_BATCH,
                    bound: QUEUE,
                    run: repo::progress_batch,
                },
            )
        });
        ProgressLog { batcher, db }
    }

    /// Wait (at most `within`) until every report handed to the batching threads has
    /// been written and answered: the shutdown's flush. `false` when some were not.
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        match &self.batcher {
            Some(b) => b.drain(within).await,
            None => true,
        }
    }

    /// Write a progress report and return the job after it. On PostgreSQL the
    /// request's deferred replay record, if it has one still to write, goes with the
    /// report into its batch's transaction (`db::replay::Deferred`), and its verdict is
    /// settled from the batch's answer.
    pub async fn report(&self, report: ProgressReport) -> Result<JobRow, StoreError> {
        if let Some(b) = &self.batcher {
            let written = replay::ride(b, report.clone(), |r, row| r.record = Some(row)).await;
            if let Some(row) = written?? {
                return Ok(row);
            }
        }
        let ProgressReport {
            id,
            percent,
            message,
            terms,
            attempt,
            record: _,
        } = report;
        let change = Change::Progress { percent, message };
        self.db
            .write(move |conn| repo::apply(conn, &id, &change, terms, attempt))
            .await
    }
}
