//! Webhook deliveries (`POST /stitcher/webhook`) with group commit.
//!
//! On PostgreSQL each delivery is handed to batching threads (`db::batch::GroupLog`):
//! each takes whatever deliveries have queued up and writes them in one transaction
//! (`repo::ingest_group`: the delivery rows, then their jobs and events with multi-row
//! inserts), and answers each delivery after that commit. Alone, a delivery cost a
//! transaction of its own (five round trips and a commit). On SQLite every write
//! already shares the group-commit writer's commits, so a delivery goes straight to
//! [`repo::ingest`].

use super::repo::{self, Ingest};
use crate::db::batch::{GroupLog, Shape};
use crate::db::Db;
use crate::error::StoreError;
use crate::jobs::model::NewJob;
use crate::jobs::row::JobRow;

/// Most deliveries written in one transaction.
const MAX_BATCH: usize = 256;
/// Past this many waiting deliveries, a request is refused at once (503).
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct IngestLog(GroupLog<Ingest, (JobRow, bool)>);

impl IngestLog {
    /// Start the batching threads (PostgreSQL: two, so one batch's commit overlaps the
    /// next batch's statements).
    pub fn start(db: &Db) -> Self {
        IngestLog(GroupLog::start(
            db,
            Shape {
                name: "ingest_log",
                threads: 2,
                max_batch: MAX_BATCH,
                bound: QUEUE,
                run: repo::ingest_group,
            },
        ))
    }

    /// The shutdown's flush (`GroupLog::drain`).
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        self.0.drain(within).await
    }

    /// Store a delivery and create its job, as [`repo::ingest`] does: its job, and
    /// `true` for a delivery stored before.
    pub async fn ingest(
        &self,
        caller: String,
        delivery_id: String,
        payload: String,
        job: NewJob,
        same_body_only: bool,
    ) -> Result<(JobRow, bool), StoreError> {
        let delivery = Ingest {
            caller,
            delivery_id,
            payload,
            job,
            same_body_only,
            record: None,
        };
        self.0
            .write(
                delivery,
                |d, row| d.record = Some(row),
                |conn, d| d.alone(conn),
            )
            .await
    }
}
