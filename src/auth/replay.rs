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
//!
//! The replay record lives here and in `db::replay`, nowhere else: this module decides
//! when to write (the runtime log); that one is the `replay_records` table (insert,
//! purge).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::db::load::{Gate, Permit, Shed};
use crate::db::replay::{insert_replays, Deferred, ReplayRow, Turn, Verdict};
use crate::db::{Backend, Db};
use crate::error::StoreError;

/// Most records written in one transaction.
const MAX_BATCH: usize = 512;
/// Bounded queue: past this many waiting records, a request is refused at once (503)
/// instead of waiting for room.
pub const QUEUE: usize = 1024;

type Reply = oneshot::Sender<Result<bool, StoreError>>;

#[derive(Clone)]
pub struct ReplayLog {
    /// PostgreSQL: the batching threads' queue. SQLite: `None`, records go through
    /// `db` like any write.
    tx: Option<mpsc::UnboundedSender<Queued>>,
    db: Db,
    /// PostgreSQL: the bound of that queue, in number and in waiting time.
    gate: Arc<Gate>,
}

/// A record waiting for a batch, with its reply and its admission.
type Queued = (ReplayRow, Reply, Permit);

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
                gate: Gate::bounded("replay", 0),
            };
        }
        let (tx, rx) = mpsc::unbounded_channel();
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
            gate: Gate::bounded("replay", QUEUE),
        }
    }

    /// Wait (at most `within`) until every record handed over has been written (each
    /// holds its admission until its batch is answered): the shutdown's flush. `false`
    /// when some were still unwritten. On SQLite the records are the database's writes
    /// (`Db::drain_writes`).
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + within;
        while self.gate.depth() > 0 {
            if std::time::Instant::now() >= until {
                return false;
            }
            actix_web::rt::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// (records waiting, bound, records refused: queue full or too slow).
    /// On SQLite the records share the database's write queue (its own metrics).
    pub fn queue_stats(&self) -> (usize, usize, u64) {
        let g = &self.gate;
        (
            g.depth(),
            g.limit(),
            g.shed_count(Shed::Full) + g.shed_count(Shed::Delay),
        )
    }

    /// Whether a request's record is deferred to its first database work
    /// (`db::replay::Deferred`) instead of written now: on SQLite, where the record
    /// and the request's write then share one work item of the group commit.
    pub fn defers(&self) -> bool {
        self.tx.is_none()
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

    /// Record the (caller, signature) pair; `Ok(false)` when it was already recorded (a
    /// replay).
    pub async fn record(&self, row: ReplayRow) -> Result<bool, StoreError> {
        let Some(tx) = &self.tx else {
            return self
                .db
                .write(move |conn| insert_replays(conn, std::slice::from_ref(&row)))
                .await?
                .first()
                .copied()
                .ok_or_else(|| StoreError::Internal("replay insert returned nothing".into()));
        };
        let permit = self.gate.enter()?;
        let (reply, answer) = oneshot::channel();
        tx.send((row, reply, permit))
            .map_err(|_closed| StoreError::Internal("replay log stopped".into()))?;
        match answer.await {
            Ok(Ok(fresh)) => Ok(fresh),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Internal("replay log dropped a request".into())),
        }
    }
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>;

/// Take whatever is queued (waiting for the first), up to `MAX_BATCH`.
fn next_batch(rx: &Queue) -> Option<Vec<Queued>> {
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
        let mut rows = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (row, reply, permit) in batch {
            permit.started();
            rows.push(row);
            // Held until the answer is sent: the queue's depth counts it until then.
            replies.push((reply, permit));
        }
        match db.write_sync(|conn| insert_replays(conn, &rows)) {
            Ok(fresh) => {
                for ((reply, _permit), f) in replies.into_iter().zip(fresh) {
                    let _ = reply.send(Ok(f));
                }
            }
            Err(e) => {
                for (reply, _permit) in replies {
                    let _ = reply.send(Err(e.shared()));
                }
            }
        }
    }
}
