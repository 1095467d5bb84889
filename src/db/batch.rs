//! Group commit on PostgreSQL: requests hand one item each to a bounded queue, and a
//! few dedicated threads each take whatever has queued up (up to a limit), write it
//! with one statement on one connection and answer every item after the commit. A
//! request waits for exactly one hand-off to a thread and one back, with no async hop
//! in between, and its write costs a share of one commit instead of one commit of its
//! own. Nothing is answered before its batch has committed; a failed batch answers the
//! same error to every item in it.
//!
//! Used by the replay log (`auth::replay`), the progress reports (`jobs::progress`), and
//! through [`GroupLog`] the job creates (`jobs::creates`) and webhook deliveries
//! (`stitcher::ingest`). SQLite has its own group-commit writer (`db::writer`), through
//! which every write goes anyway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::load::{current_deadline, Gate, Permit, Shed};
use super::{deadline_passed, Db, DbConnection};
use crate::error::StoreError;

/// What a batch writes: one output per item, in the items' order.
pub type Run<I, O> = fn(&mut DbConnection, Vec<I>) -> Result<Vec<O>, StoreError>;

type Reply<O> = oneshot::Sender<Result<O, StoreError>>;
/// An item waiting for a batch, with its reply, its admission, and whether a thread
/// has taken it or its request withdrawn it (whoever sets it first).
type Queued<I, O> = (I, Reply<O>, Permit, Arc<AtomicBool>);
type Queue<I, O> = Arc<Mutex<mpsc::UnboundedReceiver<Queued<I, O>>>>;

/// The batching threads' queue. The threads stop when the last clone is dropped.
pub struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<Queued<I, O>>,
    db: Db,
    gate: Arc<Gate>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            db: self.db.clone(),
            gate: self.gate.clone(),
        }
    }
}

/// How a [`Batcher`] is shaped.
pub struct Shape<I, O> {
    /// The queue's name in metrics (`replay_log`) and, with `-` for `_`, its threads'.
    pub name: &'static str,
    /// Threads, so that batches overlap their commits.
    pub threads: usize,
    /// Most items written in one batch.
    pub max_batch: usize,
    /// Past this many waiting items a request is refused at once (503).
    pub bound: usize,
    pub run: Run<I, O>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    pub fn start(db: &Db, shape: Shape<I, O>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx: Queue<I, O> = Arc::new(Mutex::new(rx));
        for i in 0..shape.threads.max(1) {
            let (db, rx) = (db.clone(), rx.clone());
            let (run, max) = (shape.run, shape.max_batch.max(1));
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{i}", shape.name.replace('_', "-")))
                .spawn(move || writer(&db, &rx, max, run));
            if let Err(e) = spawned {
                log::error!("cannot start a {} writer: {e}", shape.name);
            }
        }
        let gate = Gate::bounded(shape.name, shape.bound);
        db.register_gate(gate.clone());
        Batcher {
            tx,
            db: db.clone(),
            gate,
        }
    }

    /// Wait (at most `within`) until every item handed over has been answered (each
    /// holds its admission until then): the shutdown's flush. `false` when some were
    /// still unwritten.
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        let until = Instant::now() + within;
        while self.gate.depth() > 0 {
            if Instant::now() >= until {
                return false;
            }
            actix_web::rt::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        true
    }

    /// Write `item` with the next batch and return its output once that batch has
    /// committed. Refused at once (503) while the database is known to be down, past
    /// the request's deadline, or when the queue is full; and refused at its deadline
    /// when no thread has taken it by then (the threads may all be waiting on a lock).
    /// Once taken, it runs to its batch's commit and the answer waits for that.
    pub async fn submit(&self, item: I) -> Result<O, StoreError> {
        if let Err(e) = self.db.health().admit() {
            self.gate.count_shed(Shed::Unavailable);
            return Err(e);
        }
        let deadline = current_deadline();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            self.gate.count_shed(Shed::Deadline);
            return Err(deadline_passed());
        }
        let permit = self.gate.enter()?;
        let (reply, mut answer) = oneshot::channel();
        let taken = Arc::new(AtomicBool::new(false));
        // A request dropped before a thread took its item (its client went away)
        // withdraws it: work whose client has gone is never started.
        let _withdraw = Withdraw(taken.clone());
        self.tx
            .send((item, reply, permit, taken.clone()))
            .map_err(|_closed| StoreError::Internal(format!("{} stopped", self.gate.name)))?;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            match actix_web::rt::time::timeout(left, &mut answer).await {
                Ok(r) => return self.answered(r),
                Err(_) if !taken.swap(true, Ordering::AcqRel) => {
                    self.gate.count_shed(Shed::Deadline);
                    return Err(deadline_passed());
                }
                Err(_) => {}
            }
        }
        self.answered(answer.await)
    }

    fn answered(
        &self,
        r: Result<Result<O, StoreError>, oneshot::error::RecvError>,
    ) -> Result<O, StoreError> {
        r.unwrap_or_else(|_| {
            Err(StoreError::Internal(format!(
                "{} dropped a request",
                self.gate.name
            )))
        })
    }
}

/// One kind of write with group commit on PostgreSQL (job creates, webhook
/// deliveries): its batching threads there; on SQLite none, where every write already
/// shares the group-commit writer's commits and an item is written alone, as a write.
pub struct GroupLog<I, O> {
    batcher: Option<Batcher<I, Result<O, StoreError>>>,
    db: Db,
}

impl<I, O> Clone for GroupLog<I, O> {
    fn clone(&self) -> Self {
        GroupLog {
            batcher: self.batcher.clone(),
            db: self.db.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> GroupLog<I, O> {
    /// Start the batching threads on PostgreSQL. They stop when the last clone is
    /// dropped.
    pub fn start(db: &Db, shape: Shape<I, Result<O, StoreError>>) -> Self {
        GroupLog {
            batcher: (db.backend() == super::Backend::Postgres).then(|| Batcher::start(db, shape)),
            db: db.clone(),
        }
    }

    /// Wait (at most `within`) until every item handed to the batching threads has
    /// been written and answered: the shutdown's flush. `false` when some were not.
    pub async fn drain(&self, within: std::time::Duration) -> bool {
        match &self.batcher {
            Some(b) => b.drain(within).await,
            None => true,
        }
    }

    /// Write `item`: on PostgreSQL with the next batch, the request's deferred replay
    /// record (if it has one still to write) riding along in the batch's transaction
    /// (`attach`, [`super::replay::ride`]); on SQLite by `alone`, as a write.
    pub async fn write(
        &self,
        item: I,
        attach: fn(&mut I, super::replay::ReplayRow),
        alone: fn(&mut DbConnection, I) -> Result<O, StoreError>,
    ) -> Result<O, StoreError> {
        match &self.batcher {
            Some(b) => super::replay::ride(b, item, attach).await?,
            None => self.db.write(move |conn| alone(conn, item)).await,
        }
    }
}

/// Marks its item taken when dropped, so that no thread starts it afterwards.
struct Withdraw(Arc<AtomicBool>);

impl Drop for Withdraw {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Take whatever is queued (waiting for the first), up to `max`.
fn next_batch<I, O>(rx: &Queue<I, O>, max: usize) -> Option<Vec<Queued<I, O>>> {
    let mut rx = rx.lock().ok()?;
    let first = rx.blocking_recv()?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn writer<I, O>(db: &Db, rx: &Queue<I, O>, max: usize, run: Run<I, O>) {
    while let Some(batch) = next_batch(rx, max) {
        let mut items = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (item, reply, permit, taken) in batch {
            if taken.swap(true, Ordering::AcqRel) {
                // Withdrawn (its deadline passed, or its request was dropped): not
                // written, and its answer was given already or is not wanted.
                continue;
            }
            permit.started();
            items.push(item);
            // Held until the answer is sent: the queue's depth counts it until then.
            replies.push((reply, permit));
        }
        let n = items.len();
        if n == 0 {
            continue;
        }
        match db.write_sync(|conn| run(conn, items)) {
            Ok(outs) if outs.len() == n => {
                for ((reply, _permit), out) in replies.into_iter().zip(outs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Ok(outs) => {
                let e =
                    StoreError::Internal(format!("a batch of {n} returned {} answers", outs.len()));
                for (reply, _permit) in replies {
                    let _ = reply.send(Err(e.shared()));
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
