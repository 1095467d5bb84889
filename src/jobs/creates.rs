//! Job creates (`POST /coordinator/jobs`, `POST /stitcher/dispatch`) with group commit.
//!
//! On PostgreSQL each create is handed to batching threads (`db::batch::GroupLog`):
//! each takes whatever creates have queued up and writes them, with the signed ones'
//! replay records, in one transaction (`repo::create_group`: a multi-row insert for the
//! jobs and one for their events), and answers each create after that commit. Alone, a
//! create cost a commit of its own after its replay record's: two commits and a pool
//! connection's round trips per request. On SQLite every write already shares the
//! group-commit writer's commits, so a create goes straight to [`repo::create`].

use super::model::NewJob;
use super::repo::{self, Created, Idempotency, NewCreate};
use crate::db::batch::{GroupLog, Shape};
use crate::db::Db;
use crate::error::StoreError;

/// Most creates written in one transaction.
const MAX_BATCH: usize = 256;
/// Past this many waiting creates, a request is refused at once (503).
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct CreateLog(GroupLog<NewCreate, Created>);

impl CreateLog {
    /// Start the batching threads (PostgreSQL: two, so one batch's commit overlaps the
    /// next batch's statements).
    pub fn start(db: &Db) -> Self {
        CreateLog(GroupLog::start(
            db,
            Shape {
                name: "create_log",
                threads: 2,
                max_batch: MAX_BATCH,
                bound: QUEUE,
                run: repo::create_group,
            },
        ))
    }

    /// The shutdown's flush (`GroupLog::drain`).
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        self.0.drain(within).await
    }

    /// Create a job, as [`repo::create`] does.
    pub async fn create(
        &self,
        job: NewJob,
        created_by: String,
        idem: Option<Idempotency>,
    ) -> Result<Created, StoreError> {
        let create = NewCreate {
            job,
            created_by,
            idem,
            record: None,
        };
        self.0
            .write(
                create,
                |c, row| c.record = Some(row),
                |conn, c| repo::create(conn, &c.job, &c.created_by, c.idem.as_ref()),
            )
            .await
    }
}
