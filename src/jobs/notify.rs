//! Push: wake-ups for long-poll claims and live event streams.
//!
//! One [`Notifier`] per instance holds a map of topics (a queue's "a job may be
//! claimable", a job's "it has a new event"), each a `watch` channel that exists only
//! while someone waits on it (so the map is bounded by the waiters, themselves bounded).
//! Writes on this instance fan out in process at once ([`Notifier::job_changed`]); writes
//! on other instances arrive through one background thread per instance:
//!
//! - PostgreSQL: `LISTEN coordinator_jobs` on one dedicated connection; every change
//!   `pg_notify`s in its own transaction (delivered at commit). The thread drains the
//!   connection's socket without a round trip every [`PG_DRAIN`] and pings the server
//!   every [`PG_PING`] to notice a lost connection (then reconnects and wakes everyone).
//! - SQLite: `PRAGMA data_version` on one dedicated connection every [`SQLITE_TICK`]
//!   (no table read); only when another connection has committed does it read the new
//!   `job_events` rows (by rowid) and changed `queues` rows.
//!
//! Either way there is no query per waiter: each woken waiter retries the normal claim
//! (a transaction, so exactly one gets each job). A change seen both in process and
//! from the database is fanned out once (deduplicated by job id and event seq).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::model::JobRow;
use super::JobStatus;

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "coordinator_jobs";
/// Long-poll claims one instance holds at once (beyond: 429).
pub const MAX_WAITING_CLAIMS: usize = 1024;
/// Open event streams one instance holds at once (beyond: 429).
pub const MAX_STREAMS: usize = 1024;
/// How often the PostgreSQL listener drains its socket (no server round trip).
pub const PG_DRAIN: Duration = Duration::from_millis(5);
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

/// The wake-up hub of one instance.
pub struct Notifier {
    topics: Mutex<HashMap<Topic, watch::Sender<u64>>>,
    recent: Mutex<Recent>,
    waiting: AtomicUsize,
    streams: AtomicUsize,
    max_waiting: usize,
    max_streams: usize,
    /// Changes received from the database (other instances, or this one's echo).
    pub received: AtomicU64,
}

/// A registration on a topic; dropping it removes the topic when it was the last.
pub struct Subscription {
    notifier: Arc<Notifier>,
    topic: Topic,
    rx: watch::Receiver<u64>,
}

impl Subscription {
    /// Mark everything so far as seen: [`Subscription::changed`] then waits for a
    /// wake-up after this point. Call it before looking (claim, read), so a change
    /// between the look and the wait is never missed.
    pub fn mark_seen(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Wait for a wake-up after the last [`Subscription::mark_seen`].
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The sender never goes while we hold the topic; do not spin if it did.
            std::future::pending::<()>().await;
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

/// A counted slot (a waiting claim or an open stream); dropping it frees the slot.
pub struct Slot {
    notifier: Arc<Notifier>,
    stream: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let n = if self.stream {
            &self.notifier.streams
        } else {
            &self.notifier.waiting
        };
        n.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Notifier {
    pub fn new(max_waiting: usize, max_streams: usize) -> Arc<Notifier> {
        Arc::new(Notifier {
            topics: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::default()),
            waiting: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            max_waiting,
            max_streams,
            received: AtomicU64::new(0),
        })
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

    fn take(self: &Arc<Self>, stream: bool) -> Option<Slot> {
        let (n, max) = if stream {
            (&self.streams, self.max_streams)
        } else {
            (&self.waiting, self.max_waiting)
        };
        let mut cur = n.load(Ordering::Acquire);
        loop {
            if cur >= max {
                return None;
            }
            match n.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    return Some(Slot {
                        notifier: self.clone(),
                        stream,
                    })
                }
                Err(now) => cur = now,
            }
        }
    }

    /// A waiting-claim slot, `None` at the bound.
    pub fn waiting_slot(self: &Arc<Self>) -> Option<Slot> {
        self.take(false)
    }

    /// An open-stream slot, `None` at the bound.
    pub fn stream_slot(self: &Arc<Self>) -> Option<Slot> {
        self.take(true)
    }

    /// Waiting claims and open streams now.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.waiting.load(Ordering::Acquire),
            self.streams.load(Ordering::Acquire),
        )
    }

    /// Topics with at least one waiter now.
    pub fn topics(&self) -> usize {
        self.topics.lock().map_or(0, |t| t.len())
    }

    fn wake(&self, topic: &Topic) {
        if let Ok(topics) = self.topics.lock() {
            if let Some(tx) = topics.get(topic) {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// Wake every waiter (after the database listener lost its connection, so a
    /// change may have been missed).
    pub fn wake_all(&self) {
        if let Ok(topics) = self.topics.lock() {
            for tx in topics.values() {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    /// A job changed (event `seq`) and is now `status`: wake its stream readers and,
    /// when the change can make a job of `queue` claimable (it is QUEUED, or it ended
    /// and freed a slot), the queue's waiting claims. Each (job, seq) fans out once.
    pub fn job_changed(&self, queue: &str, id: &str, seq: i64, status: Option<JobStatus>) {
        if seq > 0 {
            let first = self.recent.lock().map_or(true, |mut r| r.insert(id, seq));
            if !first {
                return;
            }
            self.wake(&Topic::Job(id.to_owned()));
        }
        let claimable = status.is_none_or(|s| s == JobStatus::Queued || s.is_terminal());
        if claimable {
            self.wake(&Topic::Claimable(queue.to_owned()));
        }
    }

    /// [`Notifier::job_changed`] for a row just written.
    pub fn row_changed(&self, row: &JobRow) {
        self.job_changed(&row.queue, &row.id, row.version, Some(row.status()));
    }

    /// A queue's controls changed (resumed, limit raised): wake its waiting claims.
    pub fn queue_changed(&self, queue: &str) {
        self.wake(&Topic::Claimable(queue.to_owned()));
    }

    /// A notification payload from the database (see [`payload`]).
    pub fn from_db(&self, payload: &str) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut parts = payload.splitn(4, '|');
        let (Some(queue), Some(id), Some(seq), status) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let seq = seq.parse::<i64>().unwrap_or(0);
        if id.is_empty() || seq <= 0 {
            self.queue_changed(queue);
            return;
        }
        self.job_changed(queue, id, seq, status.and_then(JobStatus::parse));
    }
}

/// The notification payload of a change: `queue|job id|seq|status` (job id and seq
/// empty and 0 for a queue-wide change).
pub fn payload(queue: &str, id: &str, seq: i64, status: &str) -> String {
    format!("{queue}|{id}|{seq}|{status}")
}

/// Start the background thread that carries other instances' changes into `notifier`
/// (see the module documentation). It ends once the notifier is gone.
pub fn start_listener(notifier: &Arc<Notifier>, url: &crate::db::DatabaseUrl) {
    let weak = Arc::downgrade(notifier);
    let url = url.clone();
    let spawned = std::thread::Builder::new()
        .name("coordinator-listen".into())
        .spawn(move || match url.backend() {
            crate::db::Backend::Postgres => pg_listen(&weak, url.target()),
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

fn pg_listen(weak: &Weak<Notifier>, url: &str) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let mut first = true;
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
        if let Err(e) = conn.batch_execute(&format!("LISTEN {CHANNEL}")) {
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
            std::thread::sleep(PG_DRAIN);
        }
        if !sleep_alive(weak, Duration::from_millis(200)) {
            return;
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
            "SELECT e.rowid AS rid, e.job_id, e.seq, j.queue, j.status \
             FROM job_events e JOIN jobs j ON j.id = e.job_id \
             WHERE e.rowid > ? ORDER BY e.rowid LIMIT 1000",
        )
        .bind::<BigInt, _>(marks.event)
        .load(c)?;
        let more = rows.len() == 1000;
        for r in rows {
            marks.event = marks.event.max(r.rid);
            n.received.fetch_add(1, Ordering::Relaxed);
            n.job_changed(&r.queue, &r.job_id, r.seq, JobStatus::parse(&r.status));
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
        n.queue_changed(&q.queue);
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

    #[test]
    fn a_change_fans_out_once_and_topics_go_with_their_last_waiter() {
        let n = Notifier::new(2, 1);
        let mut a = n.subscribe(Topic::Claimable("q".into()));
        let mut b = n.subscribe(Topic::Job("j1".into()));
        a.mark_seen();
        b.mark_seen();
        assert_eq!(n.topics(), 2);
        n.job_changed("q", "j1", 2, Some(JobStatus::Queued));
        assert!(a.rx.has_changed().unwrap_or(false));
        assert!(b.rx.has_changed().unwrap_or(false));
        a.mark_seen();
        b.mark_seen();
        // The same change again (from the database): nothing.
        n.from_db(&payload("q", "j1", 2, "QUEUED"));
        assert!(!a.rx.has_changed().unwrap_or(true));
        // A RUNNING change wakes the job's readers only.
        n.from_db(&payload("q", "j1", 3, "RUNNING"));
        assert!(!a.rx.has_changed().unwrap_or(true));
        assert!(b.rx.has_changed().unwrap_or(false));
        drop(a);
        drop(b);
        assert_eq!(n.topics(), 0);
    }

    #[test]
    fn slots_are_bounded() {
        let n = Notifier::new(2, 1);
        let s1 = n.waiting_slot();
        let s2 = n.waiting_slot();
        assert!(s1.is_some() && s2.is_some());
        assert!(n.waiting_slot().is_none());
        drop(s1);
        assert!(n.waiting_slot().is_some());
        let t = n.stream_slot();
        assert!(t.is_some());
        assert!(n.stream_slot().is_none());
    }
}
