//! Push: wake-ups for long-poll claims and live event streams.
//!
//! One [`Notifier`] per instance holds a map of topics (a queue's "a job may be
//! claimable", a job's "it has a new event"), each a `watch` channel that exists only
//! while someone waits on it (so the map is bounded by the waiters, themselves bounded).
//! Writes on this instance fan out in process at once ([`Notifier::job_changed`]); writes
//! on other instances arrive through one background thread per instance:
//!
//! - PostgreSQL: `LISTEN coordinator_jobs` on one dedicated connection. A change's
//!   notification is sent after its transaction has committed, not inside it
//!   (`db::outbox`: a `NOTIFY` in the transaction would serialize the commits of every
//!   instance): the same thread takes the payloads of this instance's committed writes
//!   and sends each lot with one statement on its connection (`synchronous_commit` off
//!   there: a notification is not data). It drains the connection's socket without a
//!   round trip at least every [`PG_DRAIN`] (at once when payloads arrive) and pings the
//!   server every [`PG_PING`] to notice a lost connection (then reconnects, sends what
//!   it still holds and wakes everyone).
//! - SQLite: `PRAGMA data_version` on one dedicated connection every [`SQLITE_TICK`]
//!   (no table read); only when another connection has committed does it read the new
//!   `job_events` rows (by rowid) and changed `queues` rows.
//!
//! Either way there is no query per waiter: each woken waiter retries the normal claim
//! (a transaction, so exactly one gets each job). A change seen both in process and
//! from the database is fanned out once (deduplicated by job id and event seq).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::row::JobRow;
use super::JobStatus;

/// The PostgreSQL notification channel.
pub use crate::db::outbox::CHANNEL;
/// Default: long-poll claims one instance holds at once (beyond: 429).
pub const MAX_WAITING_CLAIMS: usize = 1024;
/// Default: open event streams one instance holds at once (beyond: 429).
pub const MAX_STREAMS: usize = 1024;
/// Default: long-poll claims one caller may hold on one instance.
pub const MAX_WAITING_CLAIMS_PER_CALLER: usize = 256;
/// Default: event streams one caller may hold open on one instance.
pub const MAX_STREAMS_PER_CALLER: usize = 64;
/// Event streams one job's tokens may hold open on one instance, within their caller's
/// bound: a worker watches its own job, and a reconnect may overlap the stream it
/// replaces. Without it one job token could hold every stream of its caller (third
/// security review, 2026-12-07).
pub const MAX_STREAMS_PER_JOB_TOKEN: usize = 4;
/// Changes a queue stream may fall behind by before it is dropped (slow consumer).
pub const QUEUE_STREAM_BUFFER: usize = 256;
/// The queue "name" of a stream of every queue (not a valid queue name).
pub const ALL_QUEUES: &str = "*";
/// How often the PostgreSQL listener drains its socket (no server round trip).
pub const PG_DRAIN: Duration = Duration::from_millis(5);
/// How long the PostgreSQL listener waits for its connection to be established.
const LISTENER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the PostgreSQL listener checks its connection with a query.
pub const PG_PING: Duration = Duration::from_secs(5);
/// How often the SQLite watcher asks whether another connection committed.
pub const SQLITE_TICK: Duration = Duration::from_millis(50);
/// (job, seq) pairs remembered to fan a change out once.
const RECENT: usize = 4096;

/// What a waiter waits for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A job of this queue may have become claimable (or a slot was freed).
    Claimable(String),
    /// This job has a new event.
    Job(String),
}

#[derive(Default)]
struct Recent {
    set: HashSet<(String, i64)>,
    order: VecDeque<(String, i64)>,
}

impl Recent {
    /// `true` when first seen.
    fn insert(&mut self, id: &str, seq: i64) -> bool {
        let key = (id.to_owned(), seq);
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The bounds on waiting claims and open streams (per instance and per caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushLimits {
    pub waiting: usize,
    pub streams: usize,
    pub waiting_per_caller: usize,
    pub streams_per_caller: usize,
}

impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            waiting: MAX_WAITING_CLAIMS,
            streams: MAX_STREAMS,
            waiting_per_caller: MAX_WAITING_CLAIMS_PER_CALLER,
            streams_per_caller: MAX_STREAMS_PER_CALLER,
        }
    }
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The instance holds its bound.
    Instance,
    /// This caller holds its bound on this instance.
    Caller,
    /// This job's tokens hold [`MAX_STREAMS_PER_JOB_TOKEN`] streams on this instance.
    JobToken,
}

/// One change of a job of a watched queue, as a queue stream receives it. `seq` 0 and
/// an empty `job_id`: a queue-wide change (controls, a batch of new jobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNote {
    pub queue: String,
    pub job_id: String,
    pub seq: i64,
    /// The job's status after the change, when known.
    pub status: Option<JobStatus>,
    /// When the change was written (ms since the epoch, the writer's clock).
    pub at: i64,
}

/// The wake-up hub of one instance.
pub struct Notifier {
    /// Each topic's channel carries the time (ms) of the change that last woke it.
    topics: Mutex<HashMap<Topic, watch::Sender<i64>>>,
    /// Queue streams: every change of the queue, bounded per subscriber.
    queues: Mutex<HashMap<String, tokio::sync::broadcast::Sender<QueueNote>>>,
    recent: Mutex<Recent>,
    waiting: AtomicUsize,
    streams: AtomicUsize,
    /// Subscribers inside [`Subscription::changed`] now: they have looked and wait.
    parked: AtomicUsize,
    /// (waiting claims, open streams) per caller; a caller with none has no entry.
    /// Also the streams of each job's tokens, under `job:<id>` (never a caller name:
    /// those hold no `:`).
    per_caller: Mutex<HashMap<String, [usize; 2]>>,
    limits: PushLimits,
    /// `true` once the instance is shutting down: waits and streams end.
    closing: watch::Sender<bool>,
    /// Changes received from the database (other instances, or this one's echo).
    pub received: AtomicU64,
}

/// A registration on a topic; dropping it removes the topic when it was the last.
pub struct Subscription {
    notifier: Arc<Notifier>,
    topic: Topic,
    rx: watch::Receiver<i64>,
}

impl Subscription {
    /// Mark everything so far as seen: [`Subscription::changed`] then waits for a
    /// wake-up after this point. Call it before looking (claim, read), so a change
    /// between the look and the wait is never missed.
    pub fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Wait for a wake-up after the last [`Subscription::mark_seen`]; the time (ms) of
    /// the change that woke it.
    pub async fn changed(&mut self) -> i64 {
        let _parked = Parked::new(&self.notifier.parked);
        if self.rx.changed().await.is_err() {
            // The sender never goes while we hold the topic; do not spin if it did.
            std::future::pending::<()>().await;
        }
        *self.rx.borrow()
    }
}

/// Counts a subscriber as parked while it lives (also when its wait is cancelled).
struct Parked<'a>(&'a AtomicUsize);

impl<'a> Parked<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A queue stream's registration; dropping it removes the queue's channel when it was
/// the last.
pub struct QueueSubscription {
    notifier: Arc<Notifier>,
    queue: String,
    rx: tokio::sync::broadcast::Receiver<QueueNote>,
}

/// What a queue stream receives next.
#[derive(Debug)]
pub enum QueueRecv {
    Note(QueueNote),
    /// The subscriber fell this many changes behind and was dropped.
    Lagged(u64),
}

impl QueueSubscription {
    /// The next change of the queue (waits for one).
    pub async fn recv(&mut self) -> QueueRecv {
        use tokio::sync::broadcast::error::RecvError;
        match self.rx.recv().await {
            Ok(n) => QueueRecv::Note(n),
            Err(RecvError::Lagged(n)) => QueueRecv::Lagged(n),
            // The sender never goes while we hold the queue; do not spin if it did.
            Err(RecvError::Closed) => std::future::pending().await,
        }
    }

    /// A change already waiting, without waiting (`None`: none now).
    pub fn try_recv(&mut self) -> Option<QueueRecv> {
        use tokio::sync::broadcast::error::TryRecvError;
        match self.rx.try_recv() {
            Ok(n) => Some(QueueRecv::Note(n)),
            Err(TryRecvError::Lagged(n)) => Some(QueueRecv::Lagged(n)),
            Err(_) => None,
        }
    }
}

impl Drop for QueueSubscription {
    fn drop(&mut self) {
        if let Ok(mut queues) = self.notifier.queues.lock() {
            if queues
                .get(&self.queue)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                queues.remove(&self.queue);
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut topics) = self.notifier.topics.lock() {
            if topics
                .get(&self.topic)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                topics.remove(&self.topic);
            }
        }
    }
}

/// A counted slot (a waiting claim or an open stream) of one caller; dropping it frees
/// the slot.
pub struct Slot {
    notifier: Arc<Notifier>,
    stream: bool,
    caller: String,
    /// `job:<id>` for a stream opened with that job's token.
    token: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let n = if self.stream {
            &self.notifier.streams
        } else {
            &self.notifier.waiting
        };
        n.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut per) = self.notifier.per_caller.lock() {
            let i = usize::from(self.stream);
            for key in std::iter::once(&self.caller).chain(self.token.as_ref()) {
                let empty = per.get_mut(key).is_some_and(|c| {
                    if let Some(v) = c.get_mut(i) {
                        *v = v.saturating_sub(1);
                    }
                    c.iter().all(|v| *v == 0)
                });
                if empty {
                    per.remove(key);
                }
            }
        }
    }
}

impl Notifier {
    pub fn new(limits: PushLimits) -> Arc<Notifier> {
        Arc::new(Notifier {
            topics: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::default()),
            waiting: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            per_caller: Mutex::new(HashMap::new()),
            limits,
            closing: watch::channel(false).0,
            received: AtomicU64::new(0),
        })
    }

    /// Register a queue stream: every change of `queue` from now on.
    pub fn subscribe_queue(self: &Arc<Self>, queue: &str) -> QueueSubscription {
        let rx = match self.queues.lock() {
            Ok(mut queues) => queues
                .entry(queue.to_owned())
                .or_insert_with(|| tokio::sync::broadcast::channel(QUEUE_STREAM_BUFFER).0)
                .subscribe(),
            // A poisoned map: a receiver nobody sends on (the stream keeps alive until
            // its client or the shutdown ends it).
            Err(_) => tokio::sync::broadcast::channel(1).1,
        };
        QueueSubscription {
            notifier: self.clone(),
            queue: queue.to_owned(),
            rx,
        }
    }

    /// Queue streams with at least one subscriber now.
    pub fn watched_queues(&self) -> usize {
        self.queues.lock().map_or(0, |q| q.len())
    }

    fn note(&self, note: QueueNote) {
        if let Ok(queues) = self.queues.lock() {
            for key in [note.queue.as_str(), ALL_QUEUES] {
                if let Some(tx) = queues.get(key) {
                    // No receiver left: nothing to do.
                    let _ = tx.send(note.clone());
                }
            }
        }
    }

    /// Begin the shutdown: every waiting claim answers and every stream ends now, and
    /// new ones do not wait.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// `true` once [`Notifier::close`] was called.
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once [`Notifier::close`] is called (at once if it was).
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        // The sender lives as long as `self`.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// The bounds this notifier applies.
    pub fn limits(&self) -> PushLimits {
        self.limits
    }

    pub fn subscribe(self: &Arc<Self>, topic: Topic) -> Subscription {
        let rx = match self.topics.lock() {
            Ok(mut topics) => topics
                .entry(topic.clone())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe(),
            // A poisoned map: a receiver of a channel nobody sends on; the waiter then
            // ends at its deadline or keep-alive check.
            Err(_) => watch::channel(0).1,
        };
        Subscription {
            notifier: self.clone(),
            topic,
            rx,
        }
    }

    fn take(
        self: &Arc<Self>,
        stream: bool,
        caller: &str,
        token_of: Option<&str>,
    ) -> Result<Slot, Refused> {
        let (n, max, per_max) = if stream {
            (
                &self.streams,
                self.limits.streams,
                self.limits.streams_per_caller,
            )
        } else {
            (
                &self.waiting,
                self.limits.waiting,
                self.limits.waiting_per_caller,
            )
        };
        let i = usize::from(stream);
        let mut per = self
            .per_caller
            .lock()
            .map_err(|_poisoned| Refused::Instance)?;
        let held = |key: &str| per.get(key).and_then(|c| c.get(i)).copied().unwrap_or(0);
        if held(caller) >= per_max {
            return Err(Refused::Caller);
        }
        let token = token_of.map(|job| format!("job:{job}"));
        if token
            .as_deref()
            .is_some_and(|t| held(t) >= MAX_STREAMS_PER_JOB_TOKEN)
        {
            return Err(Refused::JobToken);
        }
        // Counted under the per-caller lock, so the bounds are checked together.
        if n.load(Ordering::Acquire) >= max {
            return Err(Refused::Instance);
        }
        n.fetch_add(1, Ordering::AcqRel);
        for key in std::iter::once(caller).chain(token.as_deref()) {
            if let Some(v) = per.entry(key.to_owned()).or_insert([0, 0]).get_mut(i) {
                *v += 1;
            }
        }
        Ok(Slot {
            notifier: self.clone(),
            stream,
            caller: caller.to_owned(),
            token,
        })
    }

    /// A waiting-claim slot for `caller`, refused at the instance's or the caller's
    /// bound.
    pub fn waiting_slot(self: &Arc<Self>, caller: &str) -> Result<Slot, Refused> {
        self.take(false, caller, None)
    }

    /// An open-stream slot for `caller`, refused at either bound; `token_of`: the job
    /// whose token opens it, which also counts against that job's tokens' bound
    /// ([`MAX_STREAMS_PER_JOB_TOKEN`]).
    pub fn stream_slot(
        self: &Arc<Self>,
        caller: &str,
        token_of: Option<&str>,
    ) -> Result<Slot, Refused> {
        self.take(true, caller, token_of)
    }

    /// Waiting claims and open streams now.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.waiting.load(Ordering::Acquire),
            self.streams.load(Ordering::Acquire),
        )
    }

    /// Subscribers that have looked and now wait for a change. A waiting claim holds
    /// its slot (see [`Notifier::counts`]) from before its first look, so this is the
    /// count that says a change made now wakes it rather than meets its first look.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Topics with at least one waiter now.
    pub fn topics(&self) -> usize {
        self.topics.lock().map_or(0, |t| t.len())
    }

    fn wake(&self, topic: &Topic, at: i64) {
        if let Ok(topics) = self.topics.lock() {
            if let Some(tx) = topics.get(topic) {
                tx.send_modify(|v| *v = at);
            }
        }
    }

    /// Wake every waiter (after the database listener lost its connection, so a
    /// change may have been missed).
    pub fn wake_all(&self) {
        let at = crate::db::now_millis();
        if let Ok(topics) = self.topics.lock() {
            for tx in topics.values() {
                tx.send_modify(|v| *v = at);
            }
        }
        if let Ok(queues) = self.queues.lock() {
            for (queue, tx) in queues.iter() {
                // A queue-wide note: the stream's reader looks again.
                let _ = tx.send(QueueNote {
                    queue: queue.clone(),
                    job_id: String::new(),
                    seq: 0,
                    status: None,
                    at,
                });
            }
        }
    }

    /// A job changed (event `seq`, written at `at` ms) and is now `status`: wake its
    /// stream readers and the queue's streams and, when the change can make a job of
    /// `queue` claimable (it is QUEUED, or it ended and freed a slot), the queue's
    /// waiting claims. Each (job, seq) fans out once.
    pub fn job_changed(&self, queue: &str, id: &str, seq: i64, status: Option<JobStatus>, at: i64) {
        if seq > 0 {
            let first = self.recent.lock().map_or(true, |mut r| r.insert(id, seq));
            if !first {
                return;
            }
            self.wake(&Topic::Job(id.to_owned()), at);
        }
        self.note(QueueNote {
            queue: queue.to_owned(),
            job_id: if seq > 0 {
                id.to_owned()
            } else {
                String::new()
            },
            seq: seq.max(0),
            status,
            at,
        });
        let claimable = status.is_none_or(|s| s == JobStatus::Queued || s.is_terminal());
        if claimable {
            self.wake(&Topic::Claimable(queue.to_owned()), at);
        }
    }

    /// [`Notifier::job_changed`] for a row just written.
    pub fn row_changed(&self, row: &JobRow) {
        self.job_changed(
            &row.queue,
            &row.id,
            row.version,
            Some(row.status()),
            row.updated_at,
        );
    }

    /// A queue's controls changed (resumed, limit raised): wake its waiting claims and
    /// tell its streams.
    pub fn queue_changed(&self, queue: &str) {
        self.job_changed(queue, "", 0, None, crate::db::now_millis());
    }

    /// A notification payload from the database (see [`payload`]).
    pub fn from_db(&self, payload: &str) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut parts = payload.splitn(5, '|');
        let (Some(queue), Some(id), Some(seq), status, at) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return;
        };
        let seq = seq.parse::<i64>().unwrap_or(0);
        // An older instance's payload has no time: count from now.
        let at = at
            .and_then(|a| a.parse::<i64>().ok())
            .unwrap_or_else(crate::db::now_millis);
        if id.is_empty() || seq <= 0 {
            self.job_changed(queue, "", 0, None, at);
            return;
        }
        self.job_changed(queue, id, seq, status.and_then(JobStatus::parse), at);
    }
}

/// The notification payload of a change: `queue|job id|seq|status|ms` (job id and seq
/// empty and 0 for a queue-wide change; `ms` when it was written, for the wake-up
/// latency metric).
pub fn payload(queue: &str, id: &str, seq: i64, status: &str, at: i64) -> String {
    format!("{queue}|{id}|{seq}|{status}|{at}")
}

/// Start the background thread that carries other instances' changes into `notifier`
/// (see the module documentation). It ends once the notifier is gone.
pub fn start_listener(notifier: &Arc<Notifier>, db: &crate::db::Db, url: &crate::db::DatabaseUrl) {
    let weak = Arc::downgrade(notifier);
    let url = url.clone();
    let outgoing = (url.backend() == crate::db::Backend::Postgres)
        .then(|| db.take_notifications())
        .flatten();
    let spawned = std::thread::Builder::new()
        .name("coordinator-listen".into())
        .spawn(move || match url.backend() {
            // With the network bounds of the pool's connections (`pg_conninfo`): a
            // listener whose peer vanished would otherwise wait on it for minutes.
            crate::db::Backend::Postgres => pg_listen(
                &weak,
                &url.pg_conninfo(LISTENER_CONNECT_TIMEOUT),
                outgoing.as_ref(),
            ),
            crate::db::Backend::Sqlite => sqlite_watch(&weak, url.target()),
        });
    if let Err(e) = spawned {
        log::error!("push: cannot start the change listener: {e}");
    }
}

/// Sleep `d` in slices, `false` once the notifier is gone.
fn sleep_alive(weak: &Weak<Notifier>, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if weak.strong_count() == 0 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
    weak.strong_count() > 0
}

fn pg_listen(weak: &Weak<Notifier>, url: &str, outgoing: Option<&Receiver<Vec<String>>>) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let mut first = true;
    // Payloads taken from `outgoing` and not sent yet (the connection was lost).
    let mut held: Vec<String> = Vec::new();
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        let mut conn = match diesel::PgConnection::establish(url) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("push: listener cannot connect: {e}");
                if !sleep_alive(weak, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        let setup = format!("SET synchronous_commit = off; LISTEN {CHANNEL}");
        if let Err(e) = conn.batch_execute(&setup) {
            log::warn!("push: LISTEN failed: {e}");
            if !sleep_alive(weak, Duration::from_secs(1)) {
                return;
            }
            continue;
        }
        if !first {
            // Changes made while we were not listening: let every waiter look again.
            if let Some(n) = weak.upgrade() {
                n.wake_all();
            }
        }
        first = false;
        let mut pinged = Instant::now();
        'conn: loop {
            let Some(n) = weak.upgrade() else { return };
            for note in conn.notifications_iter() {
                match note {
                    Ok(note) => n.from_db(&note.payload),
                    Err(e) => {
                        log::warn!("push: listener connection lost: {e}");
                        break 'conn;
                    }
                }
            }
            drop(n);
            if pinged.elapsed() >= PG_PING {
                if let Err(e) = conn.batch_execute("SELECT 1") {
                    log::warn!("push: listener connection lost: {e}");
                    break 'conn;
                }
                pinged = Instant::now();
            }
            if let Err(e) = send_outgoing(&mut conn, outgoing, &mut held) {
                log::warn!("push: listener connection lost: {e}");
                break 'conn;
            }
        }
        if !sleep_alive(weak, Duration::from_millis(200)) {
            return;
        }
    }
}

/// Most payloads sent with one statement.
const SEND_BATCH: usize = 4096;

/// Wait up to [`PG_DRAIN`] for this instance's committed changes and send them: what
/// is `held` from a lost connection first, then whatever has queued up. Without a
/// queue (or once it is closed) it only waits. A lot is kept across a lost connection
/// and sent after the reconnect; one that fails for any other reason is dropped
/// (logged), so one bad lot cannot stall the rest.
fn send_outgoing(
    conn: &mut diesel::PgConnection,
    outgoing: Option<&Receiver<Vec<String>>>,
    held: &mut Vec<String>,
) -> Result<(), crate::error::StoreError> {
    if held.is_empty() {
        match outgoing.map(|rx| rx.recv_timeout(PG_DRAIN)) {
            Some(Ok(first)) => *held = first,
            Some(Err(RecvTimeoutError::Timeout)) => return Ok(()),
            Some(Err(RecvTimeoutError::Disconnected)) | None => {
                std::thread::sleep(PG_DRAIN);
                return Ok(());
            }
        }
    }
    while held.len() < SEND_BATCH {
        match outgoing.map(Receiver::try_recv) {
            Some(Ok(more)) => held.extend(more),
            _ => break,
        }
    }
    match crate::db::outbox::send_now_pg(conn, held) {
        Ok(()) => {
            held.clear();
            Ok(())
        }
        Err(e) if e.is_connection_loss() => Err(e),
        Err(e) => {
            log::warn!(
                "push: dropped {} notifications other instances would have read: {e}",
                held.len()
            );
            held.clear();
            Ok(())
        }
    }
}

#[derive(diesel::QueryableByName)]
struct DataVersion {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    data_version: i64,
}

#[derive(diesel::QueryableByName)]
struct Mark {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    mark: i64,
}

#[derive(diesel::QueryableByName)]
struct NewEvent {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rid: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    seq: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    queue: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    created_at: i64,
}

#[derive(diesel::QueryableByName)]
struct ChangedQueue {
    #[diesel(sql_type = diesel::sql_types::Text)]
    queue: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    updated_at: i64,
}

/// The SQLite watcher's view: the last event rowid and queue change it has seen.
struct SqliteMarks {
    version: i64,
    event: i64,
    queue: i64,
}

fn sqlite_marks(c: &mut diesel::SqliteConnection) -> diesel::QueryResult<SqliteMarks> {
    use diesel::RunQueryDsl;
    let version = diesel::sql_query("PRAGMA data_version")
        .get_result::<DataVersion>(c)?
        .data_version;
    let event = diesel::sql_query("SELECT coalesce(max(rowid), 0) AS mark FROM job_events")
        .get_result::<Mark>(c)?
        .mark;
    let queue = diesel::sql_query("SELECT coalesce(max(updated_at), 0) AS mark FROM queues")
        .get_result::<Mark>(c)?
        .mark;
    Ok(SqliteMarks {
        version,
        event,
        queue,
    })
}

fn sqlite_poll(
    c: &mut diesel::SqliteConnection,
    marks: &mut SqliteMarks,
    n: &Notifier,
) -> diesel::QueryResult<()> {
    use diesel::sql_types::BigInt;
    use diesel::RunQueryDsl;
    let version = diesel::sql_query("PRAGMA data_version")
        .get_result::<DataVersion>(c)?
        .data_version;
    if version == marks.version {
        return Ok(());
    }
    marks.version = version;
    loop {
        let rows: Vec<NewEvent> = diesel::sql_query(
            "SELECT e.rowid AS rid, e.job_id, e.seq, j.queue, j.status, e.created_at \
             FROM job_events e JOIN jobs j ON j.id = e.job_id \
             WHERE e.rowid > ? ORDER BY e.rowid LIMIT 1000",
        )
        .bind::<BigInt, _>(marks.event)
        .load(c)?;
        let more = rows.len() == 1000;
        for r in rows {
            marks.event = marks.event.max(r.rid);
            n.received.fetch_add(1, Ordering::Relaxed);
            n.job_changed(
                &r.queue,
                &r.job_id,
                r.seq,
                JobStatus::parse(&r.status),
                r.created_at,
            );
        }
        if !more {
            break;
        }
    }
    let queues: Vec<ChangedQueue> =
        diesel::sql_query("SELECT queue, updated_at FROM queues WHERE updated_at > ?")
            .bind::<BigInt, _>(marks.queue)
            .load(c)?;
    for q in queues {
        marks.queue = marks.queue.max(q.updated_at);
        n.received.fetch_add(1, Ordering::Relaxed);
        n.job_changed(&q.queue, "", 0, None, q.updated_at);
    }
    Ok(())
}

fn sqlite_watch(weak: &Weak<Notifier>, path: &str) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    loop {
        if weak.strong_count() == 0 {
            return;
        }
        let opened = diesel::SqliteConnection::establish(path).and_then(|mut c| {
            c.batch_execute("PRAGMA busy_timeout = 1000;")
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(c)
        });
        let mut conn = match opened {
            Ok(c) => c,
            Err(e) => {
                log::warn!("push: watcher cannot open the database: {e}");
                if !sleep_alive(weak, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        let mut marks = match sqlite_marks(&mut conn) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("push: watcher cannot read: {e}");
                if !sleep_alive(weak, Duration::from_secs(1)) {
                    return;
                }
                continue;
            }
        };
        loop {
            std::thread::sleep(SQLITE_TICK);
            let Some(n) = weak.upgrade() else { return };
            if let Err(e) = sqlite_poll(&mut conn, &mut marks, &n) {
                log::warn!("push: watcher read failed: {e}");
                n.wake_all();
                break;
            }
        }
        if !sleep_alive(weak, Duration::from_secs(1)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(waiting: usize, streams: usize, per_caller: usize) -> PushLimits {
        PushLimits {
            waiting,
            streams,
            waiting_per_caller: per_caller,
            streams_per_caller: per_caller,
        }
    }

    #[test]
    fn a_change_fans_out_once_and_topics_go_with_their_last_waiter() {
        let n = Notifier::new(limits(2, 1, 2));
        let mut a = n.subscribe(Topic::Claimable("q".into()));
        let mut b = n.subscribe(Topic::Job("j1".into()));
        let mut q = n.subscribe_queue("q");
        let mut all = n.subscribe_queue(ALL_QUEUES);
        a.mark_seen();
        b.mark_seen();
        assert_eq!(n.topics(), 2);
        assert_eq!(n.watched_queues(), 2);
        n.job_changed("q", "j1", 2, Some(JobStatus::Queued), 1234);
        assert!(a.rx.has_changed().unwrap_or(false));
        assert!(b.rx.has_changed().unwrap_or(false));
        assert_eq!(*a.rx.borrow(), 1234, "the wake carries the change's time");
        a.mark_seen();
        b.mark_seen();
        // The same change again (from the database): nothing.
        n.from_db(&payload("q", "j1", 2, "QUEUED", 1300));
        assert!(!a.rx.has_changed().unwrap_or(true));
        // A RUNNING change wakes the job's readers only.
        n.from_db(&payload("q", "j1", 3, "RUNNING", 1400));
        assert!(!a.rx.has_changed().unwrap_or(true));
        assert!(b.rx.has_changed().unwrap_or(false));
        // The queue stream saw each change once, in order.
        let seqs: Vec<(i64, i64)> = std::iter::from_fn(|| match q.try_recv() {
            Some(QueueRecv::Note(n)) => Some((n.seq, n.at)),
            _ => None,
        })
        .collect();
        assert_eq!(seqs, vec![(2, 1234), (3, 1400)]);
        n.job_changed("elsewhere", "j2", 1, Some(JobStatus::Pending), 1500);
        let everywhere: Vec<(String, i64)> = std::iter::from_fn(|| match all.try_recv() {
            Some(QueueRecv::Note(n)) => Some((n.queue, n.seq)),
            _ => None,
        })
        .collect();
        let name = |s: &str| s.to_owned();
        assert_eq!(
            everywhere,
            vec![(name("q"), 2), (name("q"), 3), (name("elsewhere"), 1)]
        );
        // An older instance's payload (no time) still wakes.
        n.from_db("q|j1|4|QUEUED");
        assert!(a.rx.has_changed().unwrap_or(false));
        drop(a);
        drop(b);
        drop(q);
        drop(all);
        assert_eq!(n.topics(), 0);
        assert_eq!(n.watched_queues(), 0);
    }

    #[test]
    fn a_slow_queue_subscriber_is_told_it_lagged() {
        let n = Notifier::new(PushLimits::default());
        let mut q = n.subscribe_queue("q");
        for seq in 1..=i64::try_from(QUEUE_STREAM_BUFFER + 5).unwrap_or(i64::MAX) {
            n.job_changed("q", "j", seq, Some(JobStatus::Running), 0);
        }
        assert!(matches!(q.try_recv(), Some(QueueRecv::Lagged(5))));
    }

    #[test]
    fn slots_are_bounded_per_instance_and_per_caller() {
        let n = Notifier::new(limits(3, 1, 2));
        let s1 = n.waiting_slot("a");
        let s2 = n.waiting_slot("a");
        assert!(s1.is_ok() && s2.is_ok());
        assert_eq!(n.waiting_slot("a").err(), Some(Refused::Caller));
        let s3 = n.waiting_slot("b");
        assert!(s3.is_ok());
        assert_eq!(n.waiting_slot("c").err(), Some(Refused::Instance));
        drop(s1);
        assert!(n.waiting_slot("a").is_ok());
        let t = n.stream_slot("a", None);
        assert!(t.is_ok());
        assert_eq!(n.stream_slot("b", None).err(), Some(Refused::Instance));
        drop((s2, s3, t));
        assert_eq!(n.counts(), (0, 0));
        assert!(n.per_caller.lock().map(|p| p.is_empty()).unwrap_or(false));
    }

    #[test]
    fn close_ends_waits() {
        let n = Notifier::new(PushLimits::default());
        assert!(!n.is_closing());
        n.close();
        assert!(n.is_closing());
        // `closed` resolves at once after `close`.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(n.closed());
        }
    }

    /// Poll a future once, from inside a task.
    async fn poll_once<F: std::future::Future>(
        mut f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
    }

    #[test]
    fn a_subscriber_counts_as_parked_only_while_it_waits_for_a_change() {
        let n = Notifier::new(PushLimits::default());
        let mut sub = n.subscribe(Topic::Claimable("q".into()));
        assert_eq!(n.parked(), 0, "subscribed is not parked");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            sub.mark_seen();
            let mut wait = Box::pin(sub.changed());
            // One poll: the wait is pending, so the subscriber is parked.
            assert!(poll_once(wait.as_mut()).await.is_pending());
            assert_eq!(n.parked(), 1);
            n.wake(&Topic::Claimable("q".into()), 7);
            assert_eq!(wait.await, 7);
        });
        assert_eq!(n.parked(), 0, "woken is no longer parked");
        // A wait given up (dropped mid-way, as by a deadline) is not parked either.
        rt.block_on(async {
            sub.mark_seen();
            let mut wait = Box::pin(sub.changed());
            assert!(poll_once(wait.as_mut()).await.is_pending());
            assert_eq!(n.parked(), 1);
        });
        assert_eq!(n.parked(), 0);
    }
}
