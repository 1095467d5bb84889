//! Storage: one Diesel connection type over SQLite and PostgreSQL, an r2d2 pool, and
//! the helper that runs blocking database work off the async executor.
//!
//! Backend-specific SQL is an explicit `match` on the connection variant (or
//! `on_backend!`), written beside the storage it belongs to: in `db/` the claim
//! (`queue.rs`), the migration lock (`migrate.rs`), the replay records (`replay.rs`),
//! the open revocation writers (`revoked.rs`) and PostgreSQL's notifications
//! (`outbox.rs`); outside it the job write path (`jobs::repo`, `jobs::statements`), the
//! queue row lock of a claim (`jobs::queues`), the retention purge's `SKIP LOCKED` and
//! the vacuum (`jobs::upkeep`), PostgreSQL's `LISTEN` (`jobs::notify`), the caller row
//! lock (`auth::repo`) and deliveries (`stitcher::repo`).

/// Marks hand-written statement types (each a `QueryFragment` with one fixed SQL text
/// and one lifetime parameter) as statements diesel keeps prepared on each connection:
/// a static query id, which diesel's statement cache is keyed by, and `RunQueryDsl`.
/// (Diesel never caches its own `UPDATE`s or a `sql_query`; see `jobs::statements`.)
macro_rules! prepared_statement {
    ($($t:ident),+ $(,)?) => {$(
        impl diesel::query_builder::QueryId for $t<'_> {
            type QueryId = $t<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl<Conn> diesel::RunQueryDsl<Conn> for $t<'_> {}
    )+};
}
pub(crate) use prepared_statement;

/// Run a diesel query on the concrete connection inside a `DbConnection`: the body is
/// written once and compiled for each backend. Through the `DbConnection` enum itself
/// (diesel's `MultiConnection`) every execution renders the statement's SQL text again,
/// two or three times, even when the prepared statement is cached — for a job read with
/// 28 columns that was a fifth of a job-token GET's instructions. On the concrete
/// connection a query with a static query id is found in the statement cache by its
/// type. For the hot queries (a job's reads, a create's and a delivery's inserts);
/// elsewhere the enum is simpler and fast enough.
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::DbConnection::Postgresql($c) => $body,
            $crate::db::DbConnection::Sqlite($c) => $body,
        }
    };
}
pub(crate) use on_backend;

pub mod admission;
pub mod batch;
pub mod health;
pub mod load;
pub mod migrate;
pub mod outbox;
pub mod queue;
pub mod replay;
pub mod revoked;
pub mod schema;
mod url;
mod wal;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ManageConnection, Pool, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, RunQueryDsl};

use crate::error::StoreError;
use health::{DbHealth, DbState};
use load::{CancelOnDrop, Gate, Shed};
pub use url::{one_line, DatabaseUrl};
pub(crate) use wal::WalReset;
use wal::{rescue_removed_wal, reset_wal, wal_reset, FileIds, Files, ResetDue, Wal, WAL_REMOVED};
pub use wal::{WAL_LIMIT_BYTES, WAL_RESET_BYTES};

/// Validated database settings.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: DatabaseUrl,
    pub pool_size: u32,
    pub timeout: Duration,
    pub sqlite_busy_timeout: Duration,
    /// `PRAGMA synchronous = FULL` instead of NORMAL.
    pub sqlite_synchronous_full: bool,
    /// Start on a schema with migrations this binary does not embed (see
    /// [`migrate::run_pending`]).
    pub allow_newer_schema: bool,
}

/// One connection type for both backends; the variant is chosen by the URL scheme.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

/// Which backend a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A pooled connection, a flag the pool reads to discard it after a connection loss,
/// and the health epoch in which it was opened or last checked (see [`health`]).
pub struct Conn {
    pub conn: DbConnection,
    broken: bool,
    epoch: u64,
    /// SQLite: the WAL and its index as this connection found them after its first
    /// write (see [`Wal::still_the_files`]).
    wal_files: Option<FileIds>,
}

/// Opens the variant matching the URL and applies per-connection SQLite pragmas.
pub struct ConnectionManager {
    url: DatabaseUrl,
    /// What libpq connects with (`DatabaseUrl::pg_conninfo`); empty for SQLite.
    conninfo: String,
    busy_timeout: Duration,
    synchronous_full: bool,
    /// The pool's shared health: a failed connection attempt trips it.
    health: Option<Arc<DbHealth>>,
}

impl ConnectionManager {
    pub fn new(cfg: &DbConfig) -> Self {
        ConnectionManager {
            url: cfg.url.clone(),
            conninfo: match cfg.url.backend() {
                Backend::Postgres => cfg.url.pg_conninfo(cfg.timeout),
                Backend::Sqlite => String::new(),
            },
            busy_timeout: cfg.sqlite_busy_timeout,
            synchronous_full: cfg.sqlite_synchronous_full,
            health: None,
        }
    }

    pub fn establish(&self) -> Result<DbConnection, diesel::ConnectionError> {
        match self.url.backend() {
            Backend::Postgres => {
                PgConnection::establish(&self.conninfo).map(DbConnection::Postgresql)
            }
            Backend::Sqlite => {
                let mut c = SqliteConnection::establish(self.url.target())?;
                let setup = |c: &mut SqliteConnection| -> diesel::QueryResult<()> {
                    c.batch_execute(&format!(
                        "PRAGMA busy_timeout = {};",
                        self.busy_timeout.as_millis()
                    ))?;
                    sqlite_wal(c, self.busy_timeout)?;
                    c.batch_execute(if self.synchronous_full {
                        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;"
                    } else {
                        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;"
                    })?;
                    // Checkpoints (which fsync the database file) are not run inside a
                    // committing request: the writer runs a RESTART one after replying
                    // once the WAL holds `WAL_RESET_BYTES`, the backfiller a passive one
                    // every pass; whatever resets the WAL cuts the file back to
                    // `journal_size_limit`. The savepoints' statement journals stay in
                    // memory rather than in temporary files created and deleted on
                    // the writer's thread. Each page cache keeps SQLite's default size,
                    // and all of SQLite's memory together has one budget
                    // (`SQLITE_MEMORY_BUDGET`; docs/decisions.md, "SQLite's memory has one
                    // budget").
                    c.batch_execute(&format!(
                        "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}; \
                         PRAGMA temp_store = MEMORY; PRAGMA soft_heap_limit = {SQLITE_MEMORY_BUDGET};"
                    ))
                };
                setup(&mut c).map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Sqlite(c))
            }
        }
    }

    /// The probe of the health state: a fresh connection that answers a query.
    fn probe(&self) -> Result<(), String> {
        let mut c = self.establish().map_err(|e| e.to_string())?;
        let sql = match c {
            // Reads a page of the file, so an unreadable file fails the probe too.
            DbConnection::Sqlite(_) => "SELECT count(*) FROM sqlite_master",
            DbConnection::Postgresql(_) => "SELECT 1",
        };
        c.batch_execute(sql).map_err(|e| e.to_string())
    }
}

/// Switch the file to WAL once. Changing the journal mode does not wait on the busy
/// handler, so when another process is switching it at the same moment, retry within
/// the busy timeout.
fn sqlite_wal(c: &mut SqliteConnection, busy_timeout: Duration) -> diesel::QueryResult<()> {
    use diesel::sql_types::Text;
    #[derive(diesel::QueryableByName)]
    struct Mode {
        #[diesel(sql_type = Text)]
        journal_mode: String,
    }
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        let r = diesel::sql_query("PRAGMA journal_mode = WAL").get_result::<Mode>(c);
        match r {
            Ok(m) if m.journal_mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(m) => {
                log::warn!("SQLite journal mode is {}, not WAL", m.journal_mode);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

impl ManageConnection for ConnectionManager {
    type Connection = Conn;
    type Error = diesel::ConnectionError;

    fn connect(&self) -> Result<Conn, Self::Error> {
        // Read before connecting: a trip while connecting makes this connection stale.
        let epoch = self.health.as_ref().map_or(0, |h| h.epoch());
        match self.establish() {
            Ok(conn) => Ok(Conn {
                conn,
                broken: false,
                epoch,
                wal_files: None,
            }),
            Err(e) => {
                // Another process holding the SQLite file's lock is load, not an outage.
                let busy = matches!(&e, diesel::ConnectionError::CouldntSetupConfiguration(d)
                    if crate::error::is_busy(d));
                // Not a database any more ("file is not a database"): out of service.
                if let (Some(h), diesel::ConnectionError::CouldntSetupConfiguration(d)) =
                    (&self.health, &e)
                {
                    if crate::error::is_damage(d) {
                        damaged(h, self.url.backend(), &d.to_string());
                    }
                }
                if let (Some(h), false) = (&self.health, busy) {
                    h.trip(
                        None,
                        &format!("cannot connect: {}", one_line(&e.to_string())),
                    );
                }
                Err(e)
            }
        }
    }

    fn is_valid(&self, c: &mut Conn) -> Result<(), Self::Error> {
        c.conn
            .batch_execute("SELECT 1")
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)
    }

    fn has_broken(&self, c: &mut Conn) -> bool {
        c.broken
    }
}

pub type DbPool = Pool<ConnectionManager>;

/// The soft limit on all of SQLite's memory in this process (`PRAGMA soft_heap_limit`,
/// which is process-wide): past it a connection's page cache reuses its own least
/// recently used pages instead of growing. Without it the caches of the read pool's
/// connections (up to 2 MB each, 16 connections) keep growing for as long as reads meet
/// pages they have not cached, and so does the RSS. The writer fills its cache within
/// seconds of the first writes, so in practice the budget binds the read connections.
pub const SQLITE_MEMORY_BUDGET: u64 = 4 << 20;
/// A waiter for a pooled connection looks at the health state at least this often, so
/// requests already waiting when the database fails are refused soon after.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// State shared by every clone of one `Db`.
struct Shared {
    health: Arc<DbHealth>,
    read_gate: Arc<Gate>,
    write_gate: Arc<Gate>,
    wal: Option<Wal>,
    timeout: Duration,
    busy_timeout: Duration,
    /// SQLite: the group-commit writer every async write goes through.
    writer: Option<writer::Sender>,
    /// SQLite: whose turn it is to checkpoint, the writer's or the backfiller's.
    checkpointing: std::sync::Mutex<()>,
    /// PostgreSQL: when the replay table is due for its vacuum.
    replay_vacuum: std::sync::Mutex<replay::VacuumPacer>,
    /// PostgreSQL: where committed writes' notifications go.
    outbox: outbox::Outbox,
    /// The queues of the batching threads (`batch`), reported with the pools'.
    batch_gates: std::sync::Mutex<Vec<Arc<Gate>>>,
}

impl Shared {
    /// After a write committed on `c`, before it is acknowledged: is a reset of the
    /// SQLite WAL due (never on PostgreSQL)? `Err` when the write cannot be
    /// acknowledged: the WAL or its index was removed under the server and what it
    /// held could not all be copied into the database file ([`rescue_removed_wal`]).
    fn wal_after_write(&self, c: &mut Conn) -> Result<WalReset, String> {
        let Some(wal) = &self.wal else {
            return Ok(WalReset::No);
        };
        let found = wal.still_the_files(&mut c.wal_files);
        if found == Files::Same {
            return Ok(wal.after_write());
        }
        c.broken = true;
        rescue_removed_wal(self, wal, &mut c.conn, found).map(|()| WalReset::No)
    }

    fn busy_ms(&self) -> u64 {
        u64::try_from(self.busy_timeout.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The database handle every handler uses. On SQLite, writes go through a pool of one
/// connection so writers queue in-process instead of spinning on the file lock; reads
/// use the larger pool. On PostgreSQL both are the same pool.
///
/// Every operation passes the shared health state (refused at once while the database
/// is failing), a bounded queue per pool (refused at once when full) and the request's
/// deadline (refused once it has passed) before it may wait for a connection.
#[derive(Clone)]
pub struct Db {
    read: DbPool,
    write: DbPool,
    backend: Backend,
    shared: Arc<Shared>,
}

/// Counters and gauges of the storage layer, for `/metrics`.
#[derive(Debug, Clone)]
pub struct DbStats {
    pub state: DbState,
    pub trips: u64,
    /// Per queue (`read`/`write` on SQLite, `pool` on PostgreSQL): name, depth, bound,
    /// and refusals by reason.
    pub queues: Vec<QueueStats>,
    /// SQLite: (WAL file bytes now, largest seen, resets run, incomplete ones).
    pub wal: Option<(u64, u64, u64, u64)>,
}

#[derive(Debug, Clone)]
pub struct QueueStats {
    pub name: &'static str,
    pub depth: usize,
    pub limit: usize,
    /// The shortest wait for a turn over the last interval: a standing queue.
    pub standing: Duration,
    pub shed: Vec<(Shed, u64)>,
}

impl Db {
    /// Build the pools without connecting (connections are opened on demand, so a
    /// database that is down makes requests 503 instead of failing the build).
    pub fn new(cfg: &DbConfig) -> Self {
        let prober = ConnectionManager::new(cfg);
        let wal_removed = Arc::new(AtomicBool::new(false));
        let removed = wal_removed.clone();
        let health = DbHealth::new(Box::new(move || {
            if removed.load(Ordering::Acquire) {
                return Err(WAL_REMOVED.into());
            }
            prober.probe()
        }));
        let mk = |size: u32| {
            Pool::builder()
                .max_size(size)
                .min_idle(Some(0))
                .connection_timeout(cfg.timeout)
                .test_on_check_out(false)
                // Connection failures trip the health state; they need no log line each.
                .error_handler(Box::new(r2d2::NopErrorHandler))
                .build_unchecked(ConnectionManager {
                    health: Some(health.clone()),
                    ..ConnectionManager::new(cfg)
                })
        };
        let read = mk(cfg.pool_size);
        let (write, read_gate, write_gate) = match cfg.url.backend() {
            // The SQLite writer commits a whole batch of queued writes at once, so its
            // queue is as deep as the read pool's (528 by default); the gate's delay
            // watch bounds the time they wait.
            Backend::Sqlite => (
                mk(1),
                Gate::new("read", cfg.pool_size),
                Gate::bounded("write", Gate::new("read", cfg.pool_size).limit()),
            ),
            Backend::Postgres => {
                let g = Gate::new("pool", cfg.pool_size);
                (read.clone(), g.clone(), g)
            }
        };
        let wal =
            (cfg.url.backend() == Backend::Sqlite).then(|| Wal::new(cfg.url.target(), wal_removed));
        let backend = cfg.url.backend();
        let shared = Arc::new_cyclic(|me| Shared {
            health,
            read_gate,
            write_gate,
            wal,
            timeout: cfg.timeout,
            busy_timeout: cfg.sqlite_busy_timeout,
            // Without the thread, writes run one per transaction on the pool.
            writer: (backend == Backend::Sqlite)
                .then(|| writer::start(write.clone(), me.clone()))
                .and_then(|started| {
                    started
                        .map_err(|e| log::error!("cannot start the SQLite writer: {e}"))
                        .ok()
                }),
            checkpointing: std::sync::Mutex::new(()),
            replay_vacuum: std::sync::Mutex::default(),
            outbox: outbox::Outbox::default(),
            batch_gates: std::sync::Mutex::default(),
        });
        if backend == Backend::Sqlite {
            if let Err(e) = writer::start_backfiller(read.clone(), Arc::downgrade(&shared)) {
                log::error!("cannot start the SQLite WAL backfiller: {e}");
            }
        }
        // A PostgreSQL server can stop answering without refusing anything (a
        // partition): watch for operations that no longer finish. A SQLite file is
        // local; a write that waits on another process's lock is not a stall.
        if backend == Backend::Postgres {
            shared.health.watch_for_stalls();
        }
        Db {
            read,
            write,
            backend,
            shared,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The receiving end of committed writes' notifications (PostgreSQL), for the one
    /// thread that sends them; `None` once taken (see [`outbox`]).
    pub fn take_notifications(&self) -> Option<std::sync::mpsc::Receiver<Vec<String>>> {
        self.shared.outbox.take_receiver()
    }

    /// SQLite: has the WAL run past its limit (as of the writer's last measurement and
    /// the backfiller's last count)? Then resets are not keeping up — readers hold the WAL, or a
    /// pass of the backfill is running — and background writes (the replay purge) wait
    /// for a later pass instead of growing it further. Always `false` on PostgreSQL.
    pub fn wal_backlogged(&self) -> bool {
        self.shared.wal.as_ref().is_some_and(|w| {
            wal_reset(
                w.frame_bytes.load(Ordering::Relaxed),
                w.bytes.load(Ordering::Relaxed),
            ) == WalReset::Urgent
        })
    }

    /// PostgreSQL: count `purged` replay records; `true` when the replay table is due
    /// for its vacuum (`replay::VacuumPacer`). SQLite reuses freed pages by itself:
    /// never.
    pub fn replay_vacuum_due(&self, purged: usize) -> bool {
        if self.backend != Backend::Postgres {
            return false;
        }
        let n = u64::try_from(purged).unwrap_or(u64::MAX);
        let mut pacer = self
            .shared
            .replay_vacuum
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pacer.due(n, std::time::Instant::now())
    }

    /// The shared health state of this instance's database.
    pub fn health(&self) -> &Arc<DbHealth> {
        &self.shared.health
    }

    /// Pool state for health reporting: (connections, idle).
    pub fn pool_state(&self) -> (u32, u32) {
        let s = self.read.state();
        (s.connections, s.idle_connections)
    }

    /// Report a batching thread's queue with the pools' (`batch`).
    fn register_gate(&self, gate: Arc<Gate>) {
        if let Ok(mut gates) = self.shared.batch_gates.lock() {
            gates.push(gate);
        }
    }

    /// The storage layer's counters (cheap: atomics only).
    pub fn stats(&self) -> DbStats {
        let s = &self.shared;
        let gate = |g: &Gate| QueueStats {
            name: g.name,
            depth: g.depth(),
            limit: g.limit(),
            standing: g.standing_wait(),
            shed: Shed::ALL.iter().map(|&w| (w, g.shed_count(w))).collect(),
        };
        let mut queues = vec![gate(&s.read_gate)];
        if !Arc::ptr_eq(&s.read_gate, &s.write_gate) {
            queues.push(gate(&s.write_gate));
        }
        if let Ok(batches) = s.batch_gates.lock() {
            queues.extend(batches.iter().map(|g| gate(g)));
        }
        DbStats {
            state: s.health.state(),
            trips: s.health.trips(),
            queues,
            wal: s.wal.as_ref().map(|w| {
                (
                    w.bytes.load(Ordering::Relaxed),
                    w.max_bytes.load(Ordering::Relaxed),
                    w.checkpoints.load(Ordering::Relaxed),
                    w.incomplete.load(Ordering::Relaxed),
                )
            }),
        }
    }

    /// Run read-only work on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.run_async(false, f).await
    }

    /// Run work that writes on the blocking pool.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.run_async(true, f).await
    }

    /// [`Db::write`] for work that either writes whole or fails in a way that fails
    /// its batch anyway — one statement — and writes nothing when it answers
    /// `StoreError::Replayed`: in SQLite's writer it runs without a savepoint of its
    /// own ([`writer::Work::bare`]). Elsewhere the same as `write`, but for the request's
    /// deferred replay record, which it neither writes nor waits for: it is how that
    /// record itself is written (`auth::replay::ReplayLog`), so any other work must go
    /// through `write`.
    pub async fn write_one_statement<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        self.dispatch(true, true, f).await
    }

    /// Wait (at most `within`) until no admitted write is queued or running — on SQLite
    /// until the group-commit writer has committed and answered everything handed to
    /// it: the shutdown's flush. `false` when some were still under way.
    pub async fn drain_writes(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while self.shared.write_gate.depth() > 0 {
            if Instant::now() >= until {
                return false;
            }
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Synchronous variant for CLI commands, startup and the replay-log writer.
    pub fn write_sync<T>(
        &self,
        f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let permit = self.shared.write_gate.enter()?;
        let (r, due) = self.run_sync(true, None, None, true, &permit, f);
        if let Some((c, reset)) = due {
            reset_wal(&self.shared, c, reset);
        }
        r
    }

    fn gate(&self, write: bool) -> &Arc<Gate> {
        if write {
            &self.shared.write_gate
        } else {
            &self.shared.read_gate
        }
    }

    /// Settle the request's deferred replay record first, if it has one
    /// (`replay::Deferred`): on SQLite a write carries it in the same work item, so
    /// the record and the write share one commit; a read (or a write elsewhere)
    /// writes it on its own first. A replayed or unrecorded request gets no further
    /// database work.
    async fn run_async<T, F>(&self, write: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        let (deferred, row) = self.deferred_record(write).await?;
        // With a record in front the work needs no savepoint of its own from the
        // writer: `record_then` keeps the record and gives the write its own.
        let bare = row.is_some();
        // One closure type per call site, deferred record or not: `dispatch` is
        // generic over it, and a second instance per call site doubles the code.
        let r = self
            .dispatch(write, bare, move |conn| match &row {
                Some(row) => replay::record_then(conn, row, f),
                None => f(conn).map(Ok),
            })
            .await;
        if let Some(d) = deferred {
            d.settle(replay::verdict_of(&r));
        }
        // The request's own write met a damaged file behind its record: the writer kept
        // the record and saw the work succeed (`record_then` returns the write's error
        // inside `Ok`), so neither it nor `group_work` sees the damage. Same as there.
        if let Ok(Err(e)) = &r {
            if e.is_damage() {
                damaged(&self.shared.health, self.backend, &e.to_string());
            }
        }
        r?
    }

    /// The request's deferred replay record, if it has one still to write: with the
    /// work when it is a write for SQLite's writer (the record, and its holder to
    /// settle), otherwise written alone first. Not generic, so compiled once.
    async fn deferred_record(
        &self,
        write: bool,
    ) -> Result<(Option<Arc<replay::Deferred>>, Option<replay::ReplayRow>), StoreError> {
        let Some(d) = replay::current_deferred() else {
            return Ok((None, None));
        };
        match d.turn().await {
            replay::Turn::Clear => Ok((None, None)),
            replay::Turn::Refused(e) => Err(e),
            replay::Turn::Take(row) if write && self.shared.writer.is_some() => {
                Ok((Some(d), Some(row)))
            }
            replay::Turn::Take(row) => {
                self.record_alone(&d, row).await?;
                Ok((None, None))
            }
        }
    }

    /// Write a deferred replay record on its own (before a read, or where there is no
    /// group-commit writer) and settle it: with PostgreSQL's replay batch, or as a
    /// write of SQLite's writer.
    async fn record_alone(
        &self,
        deferred: &replay::Deferred,
        row: replay::ReplayRow,
    ) -> Result<(), StoreError> {
        let r = match deferred.batch() {
            Some(batch) => match batch.submit(row).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(StoreError::Replayed),
                Err(e) => Err(e),
            },
            None => {
                self.dispatch(true, true, move |conn| replay::record(conn, &row))
                    .await
            }
        };
        deferred.settle(replay::verdict_of(&r));
        r
    }

    /// Admission (health, deadline, queue bound) on the async side, then the work on
    /// the blocking pool. The reply is sent before any WAL checkpoint the write makes
    /// due, so no request waits for one. `bare`: the work may run without a savepoint
    /// of its own in SQLite's writer ([`writer::Work::bare`]).
    async fn dispatch<T, F>(&self, write: bool, bare: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        let gate = self.gate(write);
        if let Err(e) = self.shared.health.admit() {
            gate.count_shed(Shed::Unavailable);
            return Err(e);
        }
        let deadline = load::current_deadline();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            gate.count_shed(Shed::Deadline);
            return Err(deadline_passed());
        }
        let permit = gate.enter()?;
        let (cancel, gone) = CancelOnDrop::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let (true, Some(writer)) = (write, &self.shared.writer) {
            let taken = Arc::new(AtomicBool::new(false));
            let health = self.shared.health.clone();
            let work = group_work(
                gate.clone(),
                permit,
                (taken.clone(), gone),
                bare,
                health,
                f,
                tx,
            );
            if writer.send(work).is_err() {
                return Err(StoreError::Internal("the SQLite writer stopped".into()));
            }
            let mut rx = rx;
            let mut answer = None;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                match actix_web::rt::time::timeout(left, &mut rx).await {
                    Ok(r) => answer = Some(r),
                    // Past the deadline and not yet started (its batch may be waiting
                    // for another process's lock): withdraw it and answer now. Once
                    // started it runs to its commit, and the answer waits for it.
                    Err(_) if !taken.swap(true, Ordering::AcqRel) => {
                        gate.count_shed(Shed::Deadline);
                        cancel.finish();
                        return Err(deadline_passed());
                    }
                    Err(_) => {}
                }
            }
            let r = match answer {
                Some(r) => r,
                None => rx.await,
            }
            .map_err(|e| StoreError::Internal(format!("the SQLite writer failed: {e}")));
            cancel.finish();
            return r?;
        }
        let turn = match gate.turns() {
            Some(turns) => Some(take_turn(&self.shared, turns, gate, deadline).await?),
            None => None,
        };
        let db = self.clone();
        // Detached: it ends on its own, after replying.
        drop(actix_web::rt::task::spawn_blocking(move || {
            // Request work is watched for stalls; housekeeping (no deadline) is not:
            // its vacuum may take long on its own.
            let watched = deadline.is_some();
            let (r, due) = db.run_sync(write, deadline, Some(&gone), watched, &permit, f);
            drop(permit);
            let _ = tx.send(r);
            if let Some((c, reset)) = due {
                reset_wal(&db.shared, c, reset);
            }
            drop(turn);
        }));
        let r = rx
            .await
            .map_err(|e| StoreError::Internal(format!("blocking task failed: {e}")));
        cancel.finish();
        r?
    }

    /// Check out a connection and run `f`. Returns the connection as well when a WAL
    /// checkpoint is due after this write. `watched`: the work counts as under way for
    /// the health state's stall watch (`DbHealth::under_way`).
    fn run_sync<T>(
        &self,
        write: bool,
        deadline: Option<Instant>,
        gone: Option<&AtomicBool>,
        watched: bool,
        permit: &load::Permit,
        f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> (Result<T, StoreError>, Option<ResetDue>) {
        let gate = self.gate(write);
        let client_gone = || gone.is_some_and(|g| g.load(Ordering::Acquire));
        if client_gone() {
            gate.count_shed(Shed::Gone);
            return (Err(client_gone_error()), None);
        }
        let pool = if write { &self.write } else { &self.read };
        let mut c = match checkout(&self.shared, pool, gate, deadline) {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        };
        permit.started();
        // Never start work whose client has gone; work once started runs to its commit
        // or rollback.
        if client_gone() {
            gate.count_shed(Shed::Gone);
            return (Err(client_gone_error()), None);
        }
        let under_way = watched.then(|| self.shared.health.under_way());
        LOST.with(|l| l.borrow_mut().take());
        let r = if write {
            outbox::clear();
            let r = sqlite_immediate(&mut c.conn, f);
            // Committed (the work's transactions end inside `f`): notify; else drop.
            let queued = outbox::take();
            if r.is_ok() {
                self.shared.outbox.publish(&mut c.conn, queued);
            }
            r
        } else {
            f(&mut c.conn)
        };
        if let Some(why) = LOST.with(|l| l.borrow_mut().take()) {
            c.broken = true;
            self.shared
                .health
                .trip(Some(c.epoch), &format!("connection lost: {why}"));
        }
        if let Err(e) = &r {
            if e.is_connection_loss() {
                c.broken = true;
                self.shared
                    .health
                    .trip(Some(c.epoch), &format!("connection lost: {e}"));
            } else if e.is_damage() {
                damaged(&self.shared.health, self.backend, &e.to_string());
            } else if e.is_write_refused() && self.backend == Backend::Sqlite {
                // Opened while the file could not be written: SQLite fell back to
                // read-only for good. A fresh one writes once the file can be written.
                c.broken = true;
            }
        }
        drop(under_way);
        let (r, reset) = match (write && !c.broken).then(|| self.shared.wal_after_write(&mut c)) {
            Some(Ok(reset)) => (r, reset),
            // Committed, but not where the database file will keep it: not acknowledged.
            Some(Err(why)) if r.is_ok() => (Err(StoreError::Unavailable(why)), WalReset::No),
            Some(Err(_)) | None => (r, WalReset::No),
        };
        (r, (reset != WalReset::No).then_some((c, reset)))
    }
}

/// How long an operation may wait for its turn or its connection: until the pool
/// timeout from now, or the request's deadline when that comes first (`true`).
fn wait_until(shared: &Shared, deadline: Option<Instant>) -> (Instant, bool) {
    let pool_until = Instant::now() + shared.timeout;
    match deadline {
        Some(d) if d < pool_until => (d, true),
        _ => (pool_until, false),
    }
}

/// Wait for one of the pool's turns (see `load::Gate`), in arrival order, until the
/// pool timeout or the request's deadline, whichever is first; refused as soon as the
/// health state leaves healthy (looked at every `WAIT_SLICE`, without losing the
/// place in the queue).
async fn take_turn(
    shared: &Shared,
    turns: &Arc<tokio::sync::Semaphore>,
    gate: &Gate,
    deadline: Option<Instant>,
) -> Result<tokio::sync::OwnedSemaphorePermit, StoreError> {
    let (until, by_request) = wait_until(shared, deadline);
    let turn = turns.clone().acquire_owned();
    tokio::pin!(turn);
    loop {
        let now = Instant::now();
        if now >= until {
            if by_request {
                gate.count_shed(Shed::Deadline);
                return Err(deadline_passed());
            }
            return Err(StoreError::Unavailable(
                "timed out waiting for a connection".into(),
            ));
        }
        tokio::select! {
            biased;
            t = &mut turn => {
                return t.map_err(|e| StoreError::Internal(format!("the pool's turns: {e}")));
            }
            () = actix_web::rt::time::sleep((until - now).min(WAIT_SLICE)) => {}
        }
        if let Err(e) = shared.health.admit() {
            gate.count_shed(Shed::Unavailable);
            return Err(e);
        }
    }
}

/// Wait for a connection until the pool timeout or the request's deadline, whichever
/// is first, giving up at once when the health state leaves healthy. A connection
/// opened before the last trip is checked with one query before it is used.
fn checkout(
    shared: &Shared,
    pool: &DbPool,
    gate: &Gate,
    deadline: Option<Instant>,
) -> Result<PooledConnection<ConnectionManager>, StoreError> {
    let health = &shared.health;
    let (until, by_request) = wait_until(shared, deadline);
    let mut last: Option<r2d2::PoolError> = None;
    loop {
        if let Err(e) = health.admit() {
            gate.count_shed(Shed::Unavailable);
            return Err(e);
        }
        let now = Instant::now();
        if now >= until {
            if by_request {
                gate.count_shed(Shed::Deadline);
                return Err(deadline_passed());
            }
            // Not one connection exists: nothing to wait behind, the database does
            // not let us in.
            if pool.state().connections == 0 {
                health.trip(
                    None,
                    "no connection could be opened within the pool timeout",
                );
            }
            return Err(StoreError::Unavailable(last.map_or_else(
                || "timed out waiting for a connection".into(),
                |e| e.to_string(),
            )));
        }
        match pool.get_timeout((until - now).min(WAIT_SLICE)) {
            Ok(mut c) => {
                let epoch = health.epoch();
                if c.epoch == epoch {
                    return Ok(c);
                }
                if c.conn.batch_execute("SELECT 1").is_ok() {
                    c.epoch = epoch;
                    return Ok(c);
                }
                // Dead since the outage: discard it and take another.
                c.broken = true;
            }
            Err(e) => last = Some(e),
        }
    }
}

/// Wrap one request's write for the SQLite writer: skipped when the request withdrew
/// it (`taken` already set: its deadline passed while it was queued) or its client
/// left; otherwise run in its savepoint (or `bare`, without one: [`writer::Work::bare`]),
/// and answered only once the batch's commit is known.
fn group_work<T, F>(
    gate: Arc<Gate>,
    permit: load::Permit,
    (taken, gone): (Arc<AtomicBool>, Arc<AtomicBool>),
    bare: bool,
    health: Arc<DbHealth>,
    f: F,
    tx: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
) -> writer::Work
where
    T: Send + 'static,
    F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
{
    let run = Box::new(move |slot: writer::Slot<'_>| {
        let mut ran = false;
        let r = match slot {
            writer::Slot::Refused(e) => Err(e),
            // Withdrawn by the request (which has answered already and counted it).
            writer::Slot::Run(_) if taken.swap(true, Ordering::AcqRel) => Err(deadline_passed()),
            writer::Slot::Run(_) if gone.load(Ordering::Acquire) => {
                gate.count_shed(Shed::Gone);
                Err(client_gone_error())
            }
            writer::Slot::Run(conn) => {
                permit.started();
                ran = true;
                let r = f(conn);
                if let Some(e) = r.as_ref().err().filter(|e| e.is_damage()) {
                    damaged(&health, Backend::Sqlite, &e.to_string());
                }
                r
            }
        };
        let step = match &r {
            Ok(_) => writer::Step::Keep,
            Err(_) if !bare => writer::Step::Undo,
            // Bare work that did not run, or found its record already there
            // (`INSERT OR IGNORE` wrote nothing), left nothing behind.
            Err(StoreError::Replayed) => writer::Step::Keep,
            Err(_) if !ran => writer::Step::Keep,
            Err(e) => writer::Step::Broken(e.to_string()),
        };
        let reply: writer::Reply = Box::new(move |failed| {
            let r = match (r, failed) {
                (Ok(_), Some(why)) => Err(StoreError::Unavailable(why.to_owned())),
                (r, _) => r,
            };
            let _ = tx.send(r);
            drop(permit);
        });
        (step, reply)
    });
    writer::Work { bare, run }
}

/// The database reported damaged files (`error::is_damage`; the request is answered
/// 503). SQLite: the instance is taken out of service until a restart
/// ([`DbHealth::retire`]: every request refused, `/readyz` 503), with one ERROR line.
/// The file is this instance's alone and does not mend itself; SQLite reads a damaged
/// b-tree page as damaged only when it meets it, and writing on into a file whose
/// free-page list or b-trees are damaged can spread the damage to pages that were
/// sound. PostgreSQL: nothing more (the answer's log line names the cause, at ERROR
/// once a minute): the database is shared by every instance, so failing readiness
/// would take all of them away for the sake of one relation, a restart mends nothing,
/// and PostgreSQL itself refuses what it cannot read. docs/decisions.md, "A damaged
/// database".
fn damaged(health: &Arc<DbHealth>, backend: Backend, why: &str) {
    if backend != Backend::Sqlite {
        if health.damage_line_due(false) {
            crate::error::log_damage(why, None);
        }
        return;
    }
    if health.retire(&format!("damaged database file: {}", one_line(why)))
        && health.damage_line_due(true)
    {
        crate::error::log_damage(
            why,
            Some("; every request is refused until the server is restarted"),
        );
    }
}

thread_local! {
    /// A connection loss that work on this thread answered item by item instead of
    /// returning it (a batch whose earlier items had committed on their own,
    /// `jobs::repo::progress_batch`): set by [`connection_lost`], taken by `run_sync`.
    static LOST: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Work that met a connection loss but returns `Ok` (each item answered with its own
/// outcome) says so here: the connection is then discarded and the health state
/// tripped, as when the loss is the work's error.
pub fn connection_lost(why: &StoreError) {
    LOST.with(|l| *l.borrow_mut() = Some(why.to_string()));
}

pub(crate) fn deadline_passed() -> StoreError {
    StoreError::Overloaded("request deadline passed before the database was reached")
}

fn client_gone_error() -> StoreError {
    StoreError::Overloaded("client went away before the database was reached")
}

/// On SQLite, run `f` inside `BEGIN IMMEDIATE`: the write lock is taken (waiting up to
/// the busy timeout) before anything is read, so another process writing the same file
/// can never make this transaction fail on upgrade. Transactions `f` opens itself
/// become savepoints. Other backends run `f` as it is.
fn sqlite_immediate<T>(
    conn: &mut DbConnection,
    f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    type Tm = AnsiTransactionManager;
    match conn {
        DbConnection::Sqlite(c) => Tm::begin_transaction_sql(c, "BEGIN IMMEDIATE")?,
        DbConnection::Postgresql(_) => return f(conn),
    }
    let r = f(conn);
    let DbConnection::Sqlite(c) = conn else {
        return r;
    };
    match r {
        Ok(v) => {
            <Tm as TransactionManager<SqliteConnection>>::commit_transaction(c)?;
            Ok(v)
        }
        Err(e) => {
            let _ = <Tm as TransactionManager<SqliteConnection>>::rollback_transaction(c);
            Err(e)
        }
    }
}

/// Process-wide setup of the database client libraries, first thing in `main`:
/// libpq's OpenSSL is initialised without its exit-time cleanup. Without this, a
/// process that exits while a pool thread is still inside libpq (r2d2 opening a
/// connection in the background, a blocking thread held by a database that stopped
/// answering) can crash in `OPENSSL_cleanup` as `exit` frees what that thread uses:
/// SIGSEGV in 1–4 % of CLI runs with 24 at once on PostgreSQL (core dumps: the main
/// thread in `OPENSSL_cleanup`, another in `PQconnectdb`). Nothing is left to clean
/// up at exit; the kernel takes the memory back.
pub fn prepare_process() {
    openssl_sys::init();
}

/// Unix time in milliseconds, the storage form of every timestamp.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_cfg(dir: &std::path::Path) -> DbConfig {
        let url =
            DatabaseUrl::parse(&format!("sqlite://{}", dir.join("d.db").display())).expect("url");
        DbConfig {
            url,
            pool_size: 2,
            timeout: Duration::from_secs(5),
            sqlite_busy_timeout: Duration::from_secs(1),
            sqlite_synchronous_full: false,
            allow_newer_schema: false,
        }
    }

    /// `LOST` (`connection_lost`) is the work's word about its own connection: one left
    /// on a blocking thread by anything else is never taken for the next work's, which
    /// would discard its sound connection and trip the health state.
    #[test]
    fn a_connection_loss_said_outside_a_work_is_not_the_next_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = sqlite_cfg(dir.path());
        migrate::run_pending(&cfg).expect("migrations");
        let db = Db::new(&cfg);
        connection_lost(&StoreError::Unavailable("said by nobody's work".into()));
        db.write_sync(|_| Ok(())).expect("write");
        assert_eq!(
            db.shared.health.trips(),
            0,
            "a stale loss tripped the state"
        );
        db.write_sync(|_| {
            connection_lost(&StoreError::Unavailable("cut".into()));
            Ok(())
        })
        .expect("answered item by item");
        assert_eq!(db.shared.health.trips(), 1, "the work's own loss trips it");
        assert!(LOST.with(|l| l.borrow().is_none()), "taken");
    }

    /// A signed write on SQLite whose own work meets a damaged file, behind its replay
    /// record (`replay::record_then`, the write's error inside `Ok`): the instance is
    /// taken out of service as for any other work that meets it (`damaged`), and the
    /// request is answered with the damage (503).
    #[actix_web::test]
    async fn a_signed_write_that_meets_damage_retires_a_sqlite_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = sqlite_cfg(dir.path());
        migrate::run_pending(&cfg).expect("migrations");
        let db = Db::new(&cfg);
        let malformed = || {
            StoreError::Db(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new("database disk image is malformed".to_owned()),
            ))
        };
        let deferred = replay::Deferred::new(replay::ReplayRow::new("c", "sig", 1, 2), None);
        let r = deferred
            .scope(db.write(move |_| Err::<(), _>(malformed())))
            .await;
        assert!(r.is_err_and(|e| e.is_damage()));
        assert!(
            db.shared.health.is_retired(),
            "a damaged file met behind a replay record left the instance in service"
        );
    }

    #[derive(diesel::QueryableByName)]
    struct Pragma {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        value: i64,
    }

    #[test]
    fn sqlite_connections_get_their_pragmas() {
        // (`wal_autocheckpoint` and `journal_size_limit` have no table-valued form; the
        // WAL tests in tests/api see their effect.)
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.db");
        let url = DatabaseUrl::parse(&format!("sqlite://{}", path.display())).expect("url");
        let cfg = DbConfig {
            url,
            pool_size: 1,
            timeout: Duration::from_secs(1),
            sqlite_busy_timeout: Duration::from_millis(1234),
            sqlite_synchronous_full: false,
            allow_newer_schema: false,
        };
        let DbConnection::Sqlite(mut c) = ConnectionManager::new(&cfg).establish().expect("open")
        else {
            panic!("not SQLite");
        };
        let mut pragma = |name: &str| {
            diesel::sql_query(format!("SELECT (SELECT * FROM pragma_{name}()) AS value"))
                .get_result::<Pragma>(&mut c)
                .map(|p| p.value)
                .expect(name)
        };
        assert_eq!(pragma("busy_timeout"), 1234);
        assert_eq!(pragma("synchronous"), 1, "NORMAL");
        assert_eq!(pragma("temp_store"), 2, "MEMORY");
        assert_eq!(pragma("foreign_keys"), 1);
        #[derive(diesel::QueryableByName)]
        struct Limit {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            soft_heap_limit: i64,
        }
        let limit = diesel::sql_query("PRAGMA soft_heap_limit")
            .get_result::<Limit>(&mut c)
            .expect("soft_heap_limit");
        assert_eq!(
            u64::try_from(limit.soft_heap_limit).ok(),
            Some(SQLITE_MEMORY_BUDGET)
        );
    }
}

/// What the storage modules' SQLite plan tests share: a migrated in-memory database and
/// one step of `EXPLAIN QUERY PLAN`.
#[cfg(test)]
pub mod plan_tests {
    use diesel::prelude::*;
    use diesel_migrations::MigrationHarness;

    /// One step of SQLite's `EXPLAIN QUERY PLAN`.
    #[derive(QueryableByName)]
    pub(crate) struct Step {
        #[diesel(sql_type = diesel::sql_types::Text)]
        pub(crate) detail: String,
    }

    /// An in-memory SQLite database with every migration run.
    pub(crate) fn migrated_sqlite() -> SqliteConnection {
        let mut c = SqliteConnection::establish(":memory:").expect("sqlite");
        c.run_pending_migrations(crate::db::migrate::SQLITE_MIGRATIONS)
            .expect("migrations");
        c
    }
}
