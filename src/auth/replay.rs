//! The replay record, with group commit. Each verified signature is recorded once in
//! the database shared by every instance; a (caller, signature) pair seen again within
//! the window is a replay. A replay check costs a share of one commit instead of one
//! commit per request, and nothing is acknowledged before it is durable:
//!
//! - the guard defers the record to the request's first database work
//!   (`db::replay::Deferred`): a job change on SQLite, and on PostgreSQL a progress
//!   report, a job create (`POST /coordinator/jobs`, `POST /stitcher/dispatch`) or a
//!   webhook delivery signed with HMAC (either encoding), carry it in their own
//!   transaction, so the request costs one commit;
//! - written on its own (before a read, another write on PostgreSQL, or after a
//!   handler that did no database work), it is one more write for SQLite's
//!   group-commit writer (`db::writer`), or on PostgreSQL it goes to batching
//!   threads, each of which writes whatever has queued up with one statement and
//!   answers after the commit.
//!
//! The replay record lives here and in `db::replay`, nowhere else: this module decides
//! when to write (the runtime log); that one is the `replay_records` table (insert,
//! purge).

use crate::db::batch::{Batcher, Shape};
use crate::db::replay::{insert_replays, Deferred, ReplayRow, Turn, Verdict};
use crate::db::{Backend, Db};
use crate::error::StoreError;

/// Most records written in one transaction.
const MAX_BATCH: usize = 512;
/// Bounded queue: past this many waiting records, a request is refused at once (503)
/// instead of waiting for room.
pub const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct ReplayLog {
    /// PostgreSQL: the batching threads (`db::batch`). SQLite: `None`, records go
    /// through `db` like any write.
    batcher: Option<Batcher<ReplayRow, bool>>,
    db: Db,
}

impl ReplayLog {
    /// Start the batch writers on PostgreSQL: four threads (`db::batch`), so batches
    /// overlap their commits; they stop when the last `ReplayLog` is dropped. SQLite
    /// has none: its records are writes of the group-commit writer.
    pub fn start(db: Db) -> Self {
        if db.backend() == Backend::Sqlite {
            return ReplayLog { batcher: None, db };
        }
        let batcher = Batcher::start(
            &db,
            Shape {
                name: "replay_log",
                threads: 4,
                max_batch: MAX_BATCH,
                bound: QUEUE,
                run: |conn, rows| insert_replays(conn, &rows),
            },
        );
        ReplayLog {
            batcher: Some(batcher),
            db,
        }
    }

    /// Wait (at most `within`) until every record handed over has been written (each
    /// holds its admission until its batch is answered): the shutdown's flush. `false`
    /// when some were still unwritten. On SQLite the records are the database's writes
    /// (`Db::drain_writes`).
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        match &self.batcher {
            Some(b) => b.drain(within).await,
            None => true,
        }
    }

    /// A request's record, deferred to its first database work
    /// (`db::replay::Deferred`).
    pub fn defer(&self, row: ReplayRow) -> std::sync::Arc<Deferred> {
        Deferred::new(row, self.batcher.clone())
    }

    /// After the handler: whether a deferred record was fresh (`Ok(false)`: a replay),
    /// writing it now when no database work of the request took it.
    pub async fn settle(&self, deferred: &Deferred) -> Result<bool, StoreError> {
        match deferred.turn().await {
            Turn::Clear => Ok(true),
            Turn::Refused(StoreError::Replayed) => Ok(false),
            Turn::Refused(e) => Err(e),
            Turn::Take(row) => {
                let r = self.record(row).await;
                deferred.settle(match &r {
                    Ok(true) => Verdict::Fresh,
                    Ok(false) => Verdict::Replayed,
                    Err(e) => Verdict::Failed(e.shared()),
                });
                r
            }
        }
    }

    /// Record a (caller, signature) pair now rather than with the request's first
    /// write: a request's other signatures (`hmac::finish_http_sig`). `Ok(false)` when
    /// it was already recorded.
    pub async fn record_now(&self, row: ReplayRow) -> Result<bool, StoreError> {
        self.record(row).await
    }

    /// Record the (caller, signature) pair; `Ok(false)` when it was already recorded (a
    /// replay).
    async fn record(&self, row: ReplayRow) -> Result<bool, StoreError> {
        match &self.batcher {
            Some(b) => b.submit(row).await,
            // One `INSERT OR IGNORE`: no savepoint needed around it.
            None => self
                .db
                .write_one_statement(move |conn| insert_replays(conn, std::slice::from_ref(&row)))
                .await?
                .first()
                .copied()
                .ok_or_else(|| StoreError::Internal("replay insert returned nothing".into())),
        }
    }
}
