//! Job creates (`POST /coordinator/jobs`, `POST /stitcher/dispatch`) with group commit.
//!
//! On PostgreSQL each create is handed to batching threads (`db::batch`): each takes
//! whatever creates have queued up and writes them, with the signed ones' replay
//! records, in one transaction (`repo::create_group`: a multi-row insert for the jobs
//! and one for their events), and answers each create after that commit. Alone, a
//! create cost a commit of its own after its replay record's: two commits and a pool
//! connection's round trips per request. On SQLite every write already shares the
//! group-commit writer's commits, so a create goes straight to [`repo::create`].

use super::model::NewJob;
use super::repo::{self, Created, Idempotency, Made, NewCreate};
use crate::db::batch::{Batcher, Shape};
use crate::db::{replay, Backend, Db};
use crate::error::StoreError;

/// Most creates written in one transaction.
const MAX_BATCH: usize = 256;
/// Past this many waiting creates, a request is refused at once (503).
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct CreateLog {
    /// PostgreSQL: the batching threads; SQLite: `None`.
    batcher: Option<Batcher<NewCreate, Made>>,
    db: Db,
}

impl CreateLog {
    /// Start the batching threads (PostgreSQL: two, so one batch's commit overlaps the
    /// next batch's statements). They stop when the last `CreateLog` is dropped.
    pub fn start(db: Db) -> Self {
        let batcher = (db.backend() == Backend::Postgres).then(|| {
            Batcher::start(
                &db,
                Shape {
                    name: "create_log",
                    threads: 2,
                    max_batch: MAX_BATCH,
                    bound: QUEUE,
                    run: repo::create_group,
                },
            )
        });
        CreateLog { batcher, db }
    }

    /// Wait (at most `within`) until every create handed to the batching threads has
    /// been written and answered: the shutdown's flush. `false` when some were not.
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        match &self.batcher {
            Some(b) => b.drain(within).await,
            None => true,
        }
    }

    /// Create a job, as [`repo::create`] does. On PostgreSQL the request's deferred
    /// replay record, if it has one still to write, goes with the create into its
    /// batch's transaction (`db::replay::ride`).
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
        match &self.batcher {
            Some(b) => replay::ride(b, create, |c, row| c.record = Some(row)).await?,
            None => {
                self.db
                    .write(move |conn| {
                        repo::create(conn, &create.job, &create.created_by, create.idem.as_ref())
                    })
                    .await
            }
        }
    }
}
