//! The replay record, with group commit. Each verified signature is recorded once in
//! the database shared by every instance; a (caller, signature) pair seen again within
//! the window is a replay. A replay check costs a share of one commit instead of one
//! commit per request, and nothing is acknowledged before it is durable:
//!
//! - on SQLite the record is one more write for the database's group-commit writer
//!   (`db::writer`), committed together with whatever other writes have queued up —
//!   the job changes of other requests included;
//! - on PostgreSQL requests hand their record to batching threads, each of which
//!   writes whatever has queued up with one statement and answers after the commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::db::batch::{insert_replays, ReplayRow};
use crate::db::{Backend, Db};
use crate::error::StoreError;

/// Most records written in one transaction.
const MAX_BATCH: usize = 512;
/// Bounded queue: past this many waiting records, a request is refused at once (503)
/// instead of waiting for room.
pub const QUEUE: usize = 1024;

type Reply = oneshot::Sender<Result<bool, String>>;

#[derive(Clone)]
pub struct ReplayLog {
    /// PostgreSQL: the batching threads' queue. SQLite: `None`, records go through
    /// `db` like any write.
    tx: Option<mpsc::Sender<(ReplayRow, Reply)>>,
    db: Db,
    /// Records refused because the queue was full.
    shed: Arc<AtomicU64>,
}

impl ReplayLog {
    /// Start the batch writers: dedicated threads (one on SQLite, whose writes are
    /// serial anyway; four on PostgreSQL, so batches overlap their commits). A request
    /// waits for exactly one hand-off to a writer and one back, with no async hop in
    /// between. The writers stop when the last `ReplayLog` is dropped.
    pub fn start(db: Db) -> Self {
        if db.backend() == Backend::Sqlite {
            return ReplayLog {
                tx: None,
                db,
                shed: Arc::default(),
            };
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..4 {
            let (db, rx) = (db.clone(), rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("replay-log-{i}"))
                .spawn(move || writer(&db, &rx));
            if let Err(e) = spawned {
                log::error!("cannot start replay writer: {e}");
            }
        }
        ReplayLog {
            tx: Some(tx),
            db,
            shed: Arc::default(),
        }
    }

    /// (records waiting, bound, records refused because the queue was full).
    /// On SQLite the records share the database's write queue (its own metrics).
    pub fn queue_stats(&self) -> (usize, usize, u64) {
        let Some(tx) = &self.tx else {
            return (0, 0, 0);
        };
        let bound = tx.max_capacity();
        (
            bound - tx.capacity(),
            bound,
            self.shed.load(Ordering::Relaxed),
        )
    }

    /// Record the pair; `Ok(false)` when it was already recorded (a replay).
    pub async fn record(
        &self,
        caller: String,
        signature_hash: String,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let Some(tx) = &self.tx else {
            let row = (caller, signature_hash, expires_at);
            return self
                .db
                .write(move |conn| insert_replays(conn, std::slice::from_ref(&row)))
                .await?
                .first()
                .copied()
                .ok_or_else(|| StoreError::Internal("replay insert returned nothing".into()));
        };
        let (reply, answer) = oneshot::channel();
        tx.try_send(((caller, signature_hash, expires_at), reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.shed.fetch_add(1, Ordering::Relaxed);
                    StoreError::Overloaded("replay log queue full")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::Internal("replay log stopped".into())
                }
            })?;
        match answer.await {
            Ok(Ok(fresh)) => Ok(fresh),
            Ok(Err(e)) => Err(StoreError::Unavailable(e)),
            Err(_) => Err(StoreError::Internal("replay log dropped a request".into())),
        }
    }
}

type Queue = Arc<Mutex<mpsc::Receiver<(ReplayRow, Reply)>>>;

/// Take whatever is queued (waiting for the first), up to `MAX_BATCH`.
fn next_batch(rx: &Queue) -> Option<Vec<(ReplayRow, Reply)>> {
    let mut rx = rx.lock().ok()?;
    let first = rx.blocking_recv()?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn writer(db: &Db, rx: &Queue) {
    while let Some(batch) = next_batch(rx) {
        let (rows, replies): (Vec<ReplayRow>, Vec<Reply>) = batch.into_iter().unzip();
        match db.write_sync(|conn| insert_replays(conn, &rows)) {
            Ok(fresh) => {
                for (reply, f) in replies.into_iter().zip(fresh) {
                    let _ = reply.send(Ok(f));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
