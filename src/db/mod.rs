//! Storage: one Diesel connection type over SQLite and PostgreSQL, an r2d2 pool, and
//! the helper that runs blocking database work off the async executor.
//!
//! Backend-specific SQL (advisory locks, row locks) lives only in this module, as an
//! explicit `match` on the connection variant.

pub mod batch;
pub mod migrate;
pub mod queue;
pub mod schema;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{self, ManageConnection, Pool, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, RunQueryDsl};

use crate::config::DbConfig;
use crate::error::StoreError;

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

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection string handed to the driver (a file path for SQLite).
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// A pooled connection plus a flag the pool reads to discard it after a connection loss.
pub struct Conn {
    pub conn: DbConnection,
    broken: bool,
}

/// Opens the variant matching the URL and applies per-connection SQLite pragmas.
pub struct ConnectionManager {
    url: DatabaseUrl,
    busy_timeout: Duration,
    synchronous_full: bool,
}

impl ConnectionManager {
    pub fn new(cfg: &DbConfig) -> Self {
        ConnectionManager {
            url: cfg.url.clone(),
            busy_timeout: cfg.sqlite_busy_timeout,
            synchronous_full: cfg.sqlite_synchronous_full,
        }
    }

    pub fn establish(&self) -> Result<DbConnection, diesel::ConnectionError> {
        match self.url.backend {
            Backend::Postgres => {
                PgConnection::establish(&self.url.target).map(DbConnection::Postgresql)
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
                    // committing request; housekeeping runs a passive one every pass.
                    c.batch_execute("PRAGMA wal_autocheckpoint = 0;")
                };
                setup(&mut c).map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(DbConnection::Sqlite(c))
            }
        }
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
        self.establish().map(|conn| Conn {
            conn,
            broken: false,
        })
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

/// The database handle every handler uses. On SQLite, writes go through a pool of one
/// connection so writers queue in-process instead of spinning on the file lock; reads
/// use the larger pool. On PostgreSQL both are the same pool.
#[derive(Clone)]
pub struct Db {
    read: DbPool,
    write: DbPool,
    backend: Backend,
}

impl Db {
    /// Build the pools without connecting (connections are opened on demand, so a
    /// database that is down makes requests 503 instead of failing the build).
    pub fn new(cfg: &DbConfig) -> Self {
        let mk = |size: u32| {
            Pool::builder()
                .max_size(size)
                .min_idle(Some(0))
                .connection_timeout(cfg.timeout)
                .test_on_check_out(false)
                .build_unchecked(ConnectionManager::new(cfg))
        };
        let read = mk(cfg.pool_size);
        let write = match cfg.url.backend() {
            Backend::Sqlite => mk(1),
            Backend::Postgres => read.clone(),
        };
        Db {
            read,
            write,
            backend: cfg.url.backend(),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Pool state for health reporting: (connections, idle).
    pub fn pool_state(&self) -> (u32, u32) {
        let s = self.read.state();
        (s.connections, s.idle_connections)
    }

    /// Run read-only work on the blocking pool.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(self.read.clone(), false, f).await
    }

    /// Run work that writes on the blocking pool.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        run_blocking(self.write.clone(), true, f).await
    }

    /// Synchronous variant for CLI commands and startup.
    pub fn write_sync<T>(
        &self,
        f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        with_conn(&self.write, true, f)
    }
}

fn with_conn<T>(
    pool: &DbPool,
    immediate: bool,
    f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut c: PooledConnection<ConnectionManager> = pool
        .get()
        .map_err(|e: r2d2::PoolError| StoreError::Unavailable(e.to_string()))?;
    let r = if immediate {
        sqlite_immediate(&mut c.conn, f)
    } else {
        f(&mut c.conn)
    };
    if let Err(e) = &r {
        if e.is_connection_loss() {
            c.broken = true;
        }
    }
    r
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

async fn run_blocking<T, F>(pool: DbPool, immediate: bool, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
{
    actix_web::rt::task::spawn_blocking(move || with_conn(&pool, immediate, f))
        .await
        .map_err(|e| StoreError::Internal(format!("blocking task failed: {e}")))?
}

impl Db {
    /// SQLite: copy the WAL back into the database file without blocking writers (run by
    /// housekeeping, since automatic checkpoints are off). PostgreSQL: nothing to do.
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

/// Unix time in milliseconds, the storage form of every timestamp.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn debug_never_prints_the_url() {
        let u = DatabaseUrl::parse("postgres://user:hunter2@h/db").expect("pg");
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
