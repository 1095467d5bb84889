//! Storage: one Diesel connection type over SQLite and PostgreSQL, an r2d2 pool, and
//! the helper that runs blocking database work off the async executor.
//!
//! Backend-specific SQL is an explicit `match` on the connection variant (or
//! `on_backend!`), written beside the storage it belongs to: in `db/` the claim
//! (`queue.rs`), the migration lock (`migrate.rs`), the replay records (`replay.rs`) and
//! PostgreSQL's notifications (`outbox.rs`); outside it the job write path
//! (`jobs::repo`, `jobs::statements`), PostgreSQL's `LISTEN` (`jobs::notify`), the
//! caller row lock (`auth::repo`) and deliveries (`stitcher::repo`).

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
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Validated database settings.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: DatabaseUrl,
    pub pool_size: u32,
    pub timeout: Duration,
    pub sqlite_busy_timeout: Duration,
    /// `PRAGMA synchronous = FULL` instead of NORMAL.
    pub sqlite_synchronous_full: bool,
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

/// A validated database URL. Unknown schemes are refused, so a typo never creates an
/// empty SQLite file somewhere.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    backend: Backend,
    /// For Postgres the whole URL; for SQLite the file path.
    target: String,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A Postgres URL may carry a password: print only the backend.
        write!(f, "DatabaseUrl({:?})", self.backend)
    }
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            return Ok(DatabaseUrl {
                backend: Backend::Postgres,
                target: raw.to_owned(),
            });
        }
        let path = raw
            .strip_prefix("sqlite://")
            .or_else(|| raw.strip_prefix("sqlite:"));
        match path {
            Some(p) if !p.is_empty() && !p.contains(":memory:") => Ok(DatabaseUrl {
                backend: Backend::Sqlite,
                target: p.to_owned(),
            }),
            Some(_) => Err("sqlite URL needs a file path, e.g. sqlite://./coordinator.db".into()),
            None => Err("unknown scheme; expected postgres://, postgresql:// or sqlite://".into()),
        }
    }

    /// PostgreSQL TLS policy, applied to the URL the service connects with: an explicit
    /// `sslmode=prefer` or `allow` (TLS that silently falls back to plain text) is refused
    /// unless `allow_downgrade`; a URL without `sslmode` gets `sslmode=verify-full` when
    /// any host it names is not local (a Unix socket or a loopback address), so the
    /// server's certificate is checked against `sslrootcert` (libpq's default
    /// `~/.postgresql/root.crt`, or `sslrootcert=system`). SQLite URLs pass unchanged.
    pub fn with_tls_policy(mut self, allow_downgrade: bool) -> Result<Self, String> {
        if self.backend != Backend::Postgres {
            return Ok(self);
        }
        let pg = pg_url::Parts::of(&self.target);
        match pg.sslmode.as_deref() {
            Some("prefer" | "allow") if !allow_downgrade => Err(format!(
                "sslmode={} may connect without TLS; use sslmode=verify-full (or require, \
                 verify-ca, disable), or set COORDINATOR_DB_ALLOW_TLS_DOWNGRADE=true",
                pg.sslmode.as_deref().unwrap_or_default()
            )),
            Some("disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full") => {
                Ok(self)
            }
            Some(other) => Err(format!(
                "unknown sslmode {other:?}; expected disable, require, verify-ca or verify-full"
            )),
            None if pg.all_hosts_local() => Ok(self),
            None => {
                let sep = if self.target.contains('?') { '&' } else { '?' };
                self.target.push(sep);
                self.target.push_str("sslmode=verify-full");
                Ok(self)
            }
        }
    }

    /// The connection string libpq gets: the URL with bounds on the network added,
    /// unless it names them itself. `connect_timeout` (the pool's wait, at least the
    /// 2 s libpq allows): a host that does not answer would otherwise hold a pool
    /// thread in `PQconnectdb` for good. TCP keepalives (idle 10 s, then 3 probes 5 s
    /// apart) and `tcp_user_timeout` (20 s for sent data to be acknowledged): an
    /// established connection whose peer vanished (a failed-over address, a host that
    /// froze) fails within about half a minute instead of after the kernel's ~15 min of
    /// retransmissions, is discarded by the pool, and its request answered 503. None of
    /// this touches a slow query: the server acknowledges what it is sent. Unix sockets
    /// ignore them.
    pub fn pg_conninfo(&self, connect_timeout: Duration) -> String {
        let secs = connect_timeout.as_secs().max(2);
        let given = |name: &str| {
            let query = self.target.split_once('?').map_or("", |(_, q)| q);
            query
                .split('&')
                .any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name)
        };
        let mut out = self.target.clone();
        for (name, value) in [
            ("connect_timeout", secs.to_string()),
            ("keepalives", "1".to_owned()),
            ("keepalives_idle", "10".to_owned()),
            ("keepalives_interval", "5".to_owned()),
            ("keepalives_count", "3".to_owned()),
            ("tcp_user_timeout", "20000".to_owned()),
        ] {
            if !given(name) {
                out.push(if out.contains('?') { '&' } else { '?' });
                out.push_str(name);
                out.push('=');
                out.push_str(&value);
            }
        }
        out
    }

    /// The `sslmode` the URL asks for, if any.
    pub fn sslmode(&self) -> Option<String> {
        (self.backend == Backend::Postgres)
            .then(|| pg_url::Parts::of(&self.target).sslmode)
            .flatten()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection string handed to the driver (a file path for SQLite).
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// A driver message on one line (libpq's run over several: "connection to server … failed:
/// SSL error: certificate verify failed\n").
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Just enough of a libpq connection URI to apply the TLS policy: the hosts (from the
/// authority, or a `host=` parameter, which wins as in libpq) and `sslmode`.
mod pg_url {
    pub struct Parts {
        pub hosts: Vec<String>,
        pub sslmode: Option<String>,
    }

    impl Parts {
        pub fn of(url: &str) -> Parts {
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
            let authority = before_query.split('/').next().unwrap_or_default();
            let hostlist = authority.rsplit('@').next().unwrap_or_default();
            let mut hosts: Vec<String> = hostlist.split(',').map(strip_port).collect();
            let mut sslmode = None;
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                    Some(("host", v)) => hosts = v.split(',').map(str::to_owned).collect(),
                    _ => {}
                }
            }
            Parts { hosts, sslmode }
        }

        /// Every host is a Unix socket directory, empty (libpq's default socket),
        /// `localhost` or a loopback address.
        pub fn all_hosts_local(&self) -> bool {
            self.hosts.iter().all(|h| {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h.is_empty()
                    || h.starts_with('/')
                    || h.to_ascii_lowercase().starts_with("%2f")
                    || h.eq_ignore_ascii_case("localhost")
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        }
    }

    fn strip_port(host: &str) -> String {
        if let Some(end) = host.find(']') {
            return host.get(..=end).unwrap_or(host).to_owned();
        }
        host.split(':').next().unwrap_or(host).to_owned()
    }
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
            conninfo: match cfg.url.backend {
                Backend::Postgres => cfg.url.pg_conninfo(cfg.timeout),
                Backend::Sqlite => String::new(),
            },
            busy_timeout: cfg.sqlite_busy_timeout,
            synchronous_full: cfg.sqlite_synchronous_full,
            health: None,
        }
    }

    pub fn establish(&self) -> Result<DbConnection, diesel::ConnectionError> {
        match self.url.backend {
            Backend::Postgres => {
                PgConnection::establish(&self.conninfo).map(DbConnection::Postgresql)
            }
            Backend::Sqlite => {
                let mut c = SqliteConnection::establish(&self.url.target)?;
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

/// On SQLite the writer resets the WAL (a RESTART checkpoint, after replying) once it
/// holds this many bytes of frames, as counted by the backfiller's last pass. The next
/// write then starts over at the front of the file, overwriting blocks already
/// allocated: no truncation, no fresh blocks for the file system to allocate, journal
/// or discard. Every reset makes the writes queued behind it wait for a few fsyncs;
/// why this size and not a larger one is in docs/decisions.md.
pub const WAL_RESET_BYTES: u64 = 16 << 20;
/// The `journal_size_limit`: a WAL file that grew past it (while resets could not run,
/// or while the frame count lagged) is cut back to it when the WAL next restarts. The
/// file keeps its size across resets, so only a file past this says anything about the
/// frames in it: then a reset is due whatever the count says, and one frame count or
/// file this far past it makes it urgent (the writer waits for the backfiller's turn
/// instead of skipping). Keeps the WAL file below 64 MiB under continuous load.
pub const WAL_LIMIT_BYTES: u64 = 24 << 20;
/// The soft limit on all of SQLite's memory in this process (`PRAGMA soft_heap_limit`,
/// which is process-wide): past it a connection's page cache reuses its own least
/// recently used pages instead of growing. Without it the caches of the read pool's
/// connections (up to 2 MB each, 16 connections) keep growing for as long as reads meet
/// pages they have not cached, and so does the RSS. The writer fills its cache within
/// seconds of the first writes, so in practice the budget binds the read connections.
pub const SQLITE_MEMORY_BUDGET: u64 = 4 << 20;
/// How long a RESTART checkpoint waits for readers still using the WAL before it gives
/// up (the writer's connection is held meanwhile, so every queued write waits too).
const CHECKPOINT_BUSY_MS: u64 = 100;
/// The same wait once the reset is urgent (the WAL ran past its limit because readers
/// kept the resets before from finishing): writes stall for up to this long rather than
/// let the WAL grow without bound; the door and the request deadlines shed meanwhile.
const URGENT_CHECKPOINT_BUSY_MS: u64 = 1000;
/// After a reset that readers kept from finishing, a due one is not tried again for
/// this long (an urgent one is): a long read must not stall every batch by
/// `CHECKPOINT_BUSY_MS`.
const RESET_RETRY_AFTER_MS: u64 = 250;
/// A waiter for a pooled connection looks at the health state at least this often, so
/// requests already waiting when the database fails are refused soon after.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// (device, inode) of the WAL file and of its index (`-shm`).
type FileIds = [(u64, u64); 2];

/// What the writer knows about the SQLite WAL file.
struct Wal {
    path: std::path::PathBuf,
    /// The WAL index (`-shm`).
    shm: std::path::PathBuf,
    /// Set once the WAL or its index was removed (or replaced) under the running
    /// server: every operation is refused from then on (the health probe fails), until
    /// a restart opens the files afresh.
    removed: Arc<AtomicBool>,
    /// File size at the last measurement (after every write).
    bytes: AtomicU64,
    /// Largest file size measured.
    max_bytes: AtomicU64,
    /// Bytes of frames in the WAL as of the backfiller's last pass (0 after a reset).
    frame_bytes: AtomicU64,
    /// Writes measured so far: the backfiller skips its pass when none came since.
    writes: AtomicU64,
    /// `writes` when the last complete reset ran: until the next write (which starts
    /// the WAL over) the WAL still reports its old frames, all copied back.
    writes_at_reset: AtomicU64,
    /// What `retry_at_ms` counts from.
    opened: Instant,
    /// No due (not urgent) reset before this, in ms since `opened` (set by an
    /// incomplete one).
    retry_at_ms: AtomicU64,
    checkpoints: AtomicU64,
    /// Resets that could not finish (readers kept the WAL busy).
    incomplete: AtomicU64,
}

/// A WAL reset due after a write, with the connection that wrote (it runs the reset).
type ResetDue = (PooledConnection<ConnectionManager>, WalReset);

/// Is a WAL reset due after a write, and has the WAL run so far past it that the
/// writer should wait for its turn rather than skip?
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum WalReset {
    No,
    Due,
    Urgent,
}

impl Wal {
    fn new(db_path: &str, removed: Arc<AtomicBool>) -> Self {
        Wal {
            path: format!("{db_path}-wal").into(),
            shm: format!("{db_path}-shm").into(),
            removed,
            bytes: AtomicU64::new(0),
            max_bytes: AtomicU64::new(0),
            frame_bytes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            writes_at_reset: AtomicU64::new(u64::MAX),
            opened: Instant::now(),
            retry_at_ms: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            incomplete: AtomicU64::new(0),
        }
    }

    /// Are the WAL and its index still the files the writing connection wrote through
    /// (`seen`: their ids after its first write, recorded here)? While a connection is
    /// open SQLite neither removes nor replaces them (the WAL goes when the last
    /// connection closes, and ours is open), so a file missing, or another file under
    /// its name, was removed under the server: its frames, acknowledged writes among
    /// them, live on only in the copies still open, and a connection opened now reads
    /// another WAL than the writer writes.
    fn still_the_files(&self, seen: &mut Option<FileIds>) -> bool {
        use std::os::unix::fs::MetadataExt;
        let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        match (id(&self.path), id(&self.shm), *seen) {
            (Some(wal), Some(shm), Some(ids)) => ids == [wal, shm],
            (_, _, Some(_)) => false,
            (Some(wal), Some(shm), None) => {
                *seen = Some([wal, shm]);
                true
            }
            // Not in WAL mode (`sqlite_wal` could not switch): nothing to watch.
            (_, _, None) => true,
        }
    }

    fn measure(&self) -> u64 {
        let n = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        self.bytes.store(n, Ordering::Relaxed);
        self.max_bytes.fetch_max(n, Ordering::Relaxed);
        n
    }

    /// After a write: measure the file and say whether a reset is due.
    fn after_write(&self) -> WalReset {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let file = self.measure();
        match wal_reset(self.frame_bytes.load(Ordering::Relaxed), file) {
            WalReset::Due if self.elapsed_ms() < self.retry_at_ms.load(Ordering::Relaxed) => {
                WalReset::No
            }
            r => r,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Record a reset's outcome: the next due one may run at once, or after a pause.
    fn reset_done(&self, complete: bool) {
        let at = if complete {
            self.frame_bytes.store(0, Ordering::Relaxed);
            self.writes_at_reset
                .store(self.writes.load(Ordering::Relaxed), Ordering::Relaxed);
            0
        } else {
            self.incomplete.fetch_add(1, Ordering::Relaxed);
            self.elapsed_ms().saturating_add(RESET_RETRY_AFTER_MS)
        };
        self.retry_at_ms.store(at, Ordering::Relaxed);
    }
}

/// The reset rule: due at [`WAL_RESET_BYTES`] of frames or a file past
/// [`WAL_LIMIT_BYTES`] (the frame count is only as fresh as the backfiller's last pass);
/// urgent at the limit of frames or a file as far again past it.
fn wal_reset(frame_bytes: u64, file_bytes: u64) -> WalReset {
    let margin = WAL_LIMIT_BYTES - WAL_RESET_BYTES;
    if frame_bytes >= WAL_LIMIT_BYTES || file_bytes >= WAL_LIMIT_BYTES + margin {
        WalReset::Urgent
    } else if frame_bytes >= WAL_RESET_BYTES || file_bytes > WAL_LIMIT_BYTES {
        WalReset::Due
    } else {
        WalReset::No
    }
}

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
        if wal.still_the_files(&mut c.wal_files) {
            return Ok(wal.after_write());
        }
        c.broken = true;
        rescue_removed_wal(self, wal, &mut c.conn).map(|()| WalReset::No)
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
        // One closure type per call site, deferred record or not: `dispatch` is
        // generic over it, and a second instance per call site doubles the code.
        let r = self
            .dispatch(write, move |conn| match &row {
                Some(row) => replay::record_then(conn, row, f),
                None => f(conn).map(Ok),
            })
            .await;
        if let Some(d) = deferred {
            d.settle(replay::verdict_of(&r));
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
                self.dispatch(true, move |conn| replay::record(conn, &row))
                    .await
            }
        };
        deferred.settle(replay::verdict_of(&r));
        r
    }

    /// Admission (health, deadline, queue bound) on the async side, then the work on
    /// the blocking pool. The reply is sent before any WAL checkpoint the write makes
    /// due, so no request waits for one.
    async fn dispatch<T, F>(&self, write: bool, f: F) -> Result<T, StoreError>
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
            let work = group_work(gate.clone(), permit, taken.clone(), gone, f, tx);
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
        if let Err(e) = &r {
            if e.is_connection_loss() {
                c.broken = true;
                self.shared
                    .health
                    .trip(Some(c.epoch), &format!("connection lost: {e}"));
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

/// A row of `PRAGMA wal_checkpoint(…)`: whether it could not finish, the frames in the
/// WAL and how many of them are now in the database file.
#[derive(diesel::QueryableByName)]
struct CheckpointOutcome {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    busy: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    log: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    checkpointed: i32,
}

/// What the log and the health probe say once the WAL was removed under the server.
const WAL_REMOVED: &str = "the SQLite WAL file or its index (-wal, -shm) was removed while \
     the server was running; every request is refused until the server is restarted";

/// The WAL or its index was removed under the server (`Wal::still_the_files`): copy
/// every frame into the database file through the writing connection, which still
/// has the removed WAL open (a TRUNCATE checkpoint, waiting up to
/// `URGENT_CHECKPOINT_BUSY_MS` for readers), so that what was acknowledged, and the
/// write about to be, no longer depends on it. Then refuse everything until a
/// restart: connections opened before and after the removal read different files,
/// and a write now would go where new connections cannot read it. `Err` when the copy
/// did not finish: the write must not be acknowledged.
fn rescue_removed_wal(shared: &Shared, wal: &Wal, lite: &mut DbConnection) -> Result<(), String> {
    let first = !wal.removed.swap(true, Ordering::AcqRel);
    let copied = match lite {
        DbConnection::Sqlite(lite) => {
            let _turn = writer::checkpoint_turn(&shared.checkpointing, true);
            lite.batch_execute(&format!(
                "PRAGMA busy_timeout = {URGENT_CHECKPOINT_BUSY_MS};"
            ))
            .and_then(|()| {
                diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .get_result::<CheckpointOutcome>(lite)
            })
            .map_err(|e| e.to_string())
            .and_then(|o| {
                (o.busy == 0)
                    .then_some(())
                    .ok_or_else(|| "readers kept the checkpoint from finishing".to_owned())
            })
        }
        DbConnection::Postgresql(_) => Ok(()),
    };
    if first {
        match &copied {
            Ok(()) => log::error!(
                "{WAL_REMOVED}; every committed write was copied into the database file"
            ),
            Err(e) => log::error!(
                "{WAL_REMOVED}; the last writes could not be copied into the database file \
                 ({e}) and were not acknowledged"
            ),
        }
    }
    shared.health.trip(None, WAL_REMOVED);
    copied.map_err(|e| format!("{WAL_REMOVED}: {e}"))
}

/// SQLite, on the writing connection after a write (the writer thread's, or a
/// synchronous write's): RESTART checkpoint, so the next write starts the WAL over at
/// its front. It takes the checkpoint turn from the backfiller — skipping when a pass
/// is running, unless the reset is urgent, when it waits for the pass to end. Readers
/// still using the WAL are waited for at most `CHECKPOINT_BUSY_MS`
/// (`URGENT_CHECKPOINT_BUSY_MS` when urgent); if they keep it, a later write tries
/// again.
fn reset_wal(shared: &Shared, mut c: PooledConnection<ConnectionManager>, reset: WalReset) {
    let Some(wal) = &shared.wal else { return };
    let urgent = reset == WalReset::Urgent;
    let Some(_turn) = writer::checkpoint_turn(&shared.checkpointing, urgent) else {
        return;
    };
    let DbConnection::Sqlite(lite) = &mut c.conn else {
        return;
    };
    let busy_ms = shared.busy_ms();
    let wait_ms = if urgent {
        URGENT_CHECKPOINT_BUSY_MS
    } else {
        CHECKPOINT_BUSY_MS
    };
    let r = lite
        .batch_execute(&format!("PRAGMA busy_timeout = {};", busy_ms.min(wait_ms)))
        .and_then(|()| {
            diesel::sql_query("PRAGMA wal_checkpoint(RESTART)")
                .get_result::<CheckpointOutcome>(lite)
        });
    let restored = lite.batch_execute(&format!("PRAGMA busy_timeout = {busy_ms};"));
    wal.checkpoints.fetch_add(1, Ordering::Relaxed);
    match r {
        Ok(o) if o.busy == 0 => wal.reset_done(true),
        Ok(_) => {
            wal.reset_done(false);
            log::debug!("WAL reset incomplete: readers still use the WAL");
        }
        Err(e) => {
            wal.reset_done(false);
            log::warn!("WAL reset failed: {e}");
        }
    }
    if restored.is_err() {
        c.broken = true;
    }
    wal.measure();
}

/// Wrap one request's write for the SQLite writer: skipped when the request withdrew
/// it (`taken` already set: its deadline passed while it was queued) or its client
/// left; otherwise run in its savepoint, and answered only once the batch's commit is
/// known.
fn group_work<T, F>(
    gate: Arc<Gate>,
    permit: load::Permit,
    taken: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
    f: F,
    tx: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
) -> writer::Work
where
    T: Send + 'static,
    F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
{
    Box::new(move |slot| {
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
                f(conn)
            }
        };
        let ok = r.is_ok();
        let reply: writer::Reply = Box::new(move |failed| {
            let r = match (r, failed) {
                (Ok(_), Some(why)) => Err(StoreError::Unavailable(why.to_owned())),
                (r, _) => r,
            };
            let _ = tx.send(r);
            drop(permit);
        });
        (ok, reply)
    })
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

impl Db {
    /// SQLite: copy the WAL back into the database file without blocking writers (a
    /// PASSIVE checkpoint, run once per housekeeping pass). Automatic checkpoints are
    /// off; most checkpoints are the writer's backfill thread's (every 100 ms) and its
    /// RESTART resets (`reset_wal`), see `db/writer.rs`. PostgreSQL: nothing to do.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite {
            return Ok(());
        }
        self.read(|conn| {
            conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);")?;
            Ok(())
        })
        .await
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

    #[test]
    fn wal_reset_is_due_on_the_frame_count_or_a_file_grown_past_the_limit() {
        let (reset, limit) = (WAL_RESET_BYTES, WAL_LIMIT_BYTES);
        // The file keeps its size after a reset (up to the journal size limit): a
        // large file with few frames is no reason for another reset.
        assert_eq!(wal_reset(0, limit), WalReset::No);
        assert_eq!(wal_reset(reset - 1, limit), WalReset::No);
        assert_eq!(wal_reset(reset, limit), WalReset::Due);
        // A stale frame count: a file grown past the limit is enough.
        assert_eq!(wal_reset(0, limit + 1), WalReset::Due);
        assert_eq!(wal_reset(limit - 1, limit), WalReset::Due);
        assert_eq!(wal_reset(limit, limit), WalReset::Urgent);
        let far = limit + (limit - reset);
        assert_eq!(wal_reset(0, far - 1), WalReset::Due);
        assert_eq!(wal_reset(0, far), WalReset::Urgent);
        const { assert!(WAL_RESET_BYTES < WAL_LIMIT_BYTES) };
        const {
            assert!(
                2 * WAL_LIMIT_BYTES - WAL_RESET_BYTES <= 32 << 20,
                "urgent well below 64 MiB"
            )
        };
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

    #[test]
    fn a_reset_readers_held_up_is_not_retried_at_once_unless_urgent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("x.db");
        std::fs::write(dir.path().join("x.db-wal"), b"").expect("wal file");
        let wal = Wal::new(&db.to_string_lossy(), Arc::new(AtomicBool::new(false)));
        wal.frame_bytes.store(WAL_RESET_BYTES, Ordering::Relaxed);
        assert_eq!(wal.after_write(), WalReset::Due);
        wal.reset_done(false);
        assert_eq!(wal.incomplete.load(Ordering::Relaxed), 1);
        assert_eq!(
            wal.after_write(),
            WalReset::No,
            "paused after an incomplete reset"
        );
        wal.frame_bytes.store(WAL_LIMIT_BYTES, Ordering::Relaxed);
        assert_eq!(
            wal.after_write(),
            WalReset::Urgent,
            "an urgent one is not paused"
        );
        wal.frame_bytes.store(WAL_RESET_BYTES, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(RESET_RETRY_AFTER_MS + 20));
        assert_eq!(
            wal.after_write(),
            WalReset::Due,
            "due again after the pause"
        );
        wal.reset_done(true);
        assert_eq!(wal.frame_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(
            wal.writes_at_reset.load(Ordering::Relaxed),
            4,
            "the backfiller learns after which write the reset ran"
        );
        assert_eq!(wal.after_write(), WalReset::No);
    }

    #[test]
    fn url_scheme_picks_the_backend() {
        assert_eq!(
            DatabaseUrl::parse("postgres://u@h/db").map(|u| u.backend()),
            Ok(Backend::Postgres)
        );
        assert_eq!(
            DatabaseUrl::parse("postgresql://u@h/db").map(|u| u.backend()),
            Ok(Backend::Postgres)
        );
        let s = DatabaseUrl::parse("sqlite://./x.db").expect("sqlite");
        assert_eq!(s.backend(), Backend::Sqlite);
        assert_eq!(s.target(), "./x.db");
        assert!(DatabaseUrl::parse("mysql://h/db").is_err());
        assert!(DatabaseUrl::parse("./x.db").is_err());
        assert!(DatabaseUrl::parse("sqlite://").is_err());
        assert!(DatabaseUrl::parse("sqlite::memory:").is_err());
    }

    #[test]
    fn libpq_gets_network_bounds_the_url_does_not_set() {
        let info = |url: &str| {
            DatabaseUrl::parse(url)
                .map(|u| u.pg_conninfo(Duration::from_secs(5)))
                .unwrap_or_default()
        };
        assert_eq!(
            info("postgres://u@db/c"),
            "postgres://u@db/c?connect_timeout=5&keepalives=1&keepalives_idle=10&\
             keepalives_interval=5&keepalives_count=3&tcp_user_timeout=20000"
        );
        // What the URL sets stays; the rest is added after it.
        let own = info("postgres://u@db/c?sslmode=require&keepalives_idle=60&tcp_user_timeout=0");
        assert!(own.starts_with("postgres://u@db/c?sslmode=require&keepalives_idle=60&tcp_user_timeout=0&connect_timeout=5&keepalives=1&keepalives_interval=5"), "{own}");
        assert_eq!(own.matches("keepalives_idle").count(), 1, "{own}");
        assert_eq!(own.matches("tcp_user_timeout").count(), 1, "{own}");
        // libpq's smallest connect_timeout is 2 s.
        let quick = DatabaseUrl::parse("postgres://u@db/c")
            .map(|u| u.pg_conninfo(Duration::from_millis(500)))
            .unwrap_or_default();
        assert!(quick.contains("connect_timeout=2&"), "{quick}");
    }

    #[test]
    fn postgres_tls_policy() {
        let policy = |url: &str, allow: bool| {
            DatabaseUrl::parse(url)
                .and_then(|u| u.with_tls_policy(allow))
                .map(|u| u.target().to_owned())
        };
        // A remote host without sslmode gets verify-full; local ones are left alone.
        assert_eq!(
            policy("postgres://u:p@db.example:5432/c", false).as_deref(),
            Ok("postgres://u:p@db.example:5432/c?sslmode=verify-full")
        );
        assert_eq!(
            policy("postgres://u@10.0.0.5/c?connect_timeout=3", false).as_deref(),
            Ok("postgres://u@10.0.0.5/c?connect_timeout=3&sslmode=verify-full")
        );
        assert_eq!(
            policy("postgres://u@localhost,db.example/c", false).as_deref(),
            Ok("postgres://u@localhost,db.example/c?sslmode=verify-full")
        );
        for local in [
            "postgres://u@127.0.0.1:5432/c",
            "postgres://u@localhost/c",
            "postgres://u@[::1]:5432/c",
            "postgresql:///c",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/c",
            "postgres://u@/c?host=/var/run/postgresql",
        ] {
            assert_eq!(policy(local, false).as_deref(), Ok(local), "{local}");
        }
        // host= wins over the authority, as in libpq.
        assert!(policy("postgres://u@localhost/c?host=db.example", false)
            .is_ok_and(|t| t.ends_with("&sslmode=verify-full")));
        // Explicit modes are kept; prefer/allow only when allowed.
        for mode in ["disable", "require", "verify-ca", "verify-full"] {
            let url = format!("postgres://u@db.example/c?sslmode={mode}");
            assert_eq!(policy(&url, false), Ok(url.clone()));
        }
        for mode in ["prefer", "allow"] {
            let url = format!("postgres://u@db.example/c?sslmode={mode}");
            let err = policy(&url, false).expect_err("refused");
            assert!(err.contains("COORDINATOR_DB_ALLOW_TLS_DOWNGRADE"), "{err}");
            assert!(!err.contains('\n'));
            assert_eq!(policy(&url, true), Ok(url.clone()));
        }
        assert!(policy("postgres://u@h/c?sslmode=verify_full", false).is_err());
        assert_eq!(policy("sqlite://./x.db", false).as_deref(), Ok("./x.db"));
    }

    #[test]
    fn debug_never_prints_the_url() {
        let u = DatabaseUrl::parse("postgres://user:hunter2@h/db").expect("pg");
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
