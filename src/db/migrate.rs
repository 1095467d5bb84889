//! Embedded migrations, one set per backend with identical folder names.
//!
//! On PostgreSQL, migrations run under `pg_advisory_lock` on a dedicated connection so
//! that instances starting together do not race (the lock is taken before anything
//! else, since even checking for pending migrations creates diesel's table).

use diesel::connection::SimpleConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::DbConfig;
use super::{ConnectionManager, DbConnection};

pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Arbitrary constant naming the migration lock ("coord" in ASCII).
const MIGRATION_LOCK_ID: i64 = 0x0063_6f6f_7264;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A migration failure carried through diesel's transaction API.
#[derive(Debug, thiserror::Error)]
enum MigrationTxError {
    #[error("{0}")]
    Migration(BoxError),
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

/// Apply every pending migration; returns how many ran.
pub fn run_pending(cfg: &DbConfig) -> anyhow::Result<usize> {
    if let Some(parent) = sqlite_parent_dir(cfg) {
        std::fs::create_dir_all(parent)?;
    }
    let mut conn = ConnectionManager::new(cfg).establish().map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the database: {}",
            super::one_line(&e.to_string())
        )
    })?;
    run_on(&mut conn).map_err(|e| anyhow::anyhow!("migration failed: {e}"))
}

fn sqlite_parent_dir(cfg: &DbConfig) -> Option<&std::path::Path> {
    match cfg.url.backend() {
        super::Backend::Sqlite => std::path::Path::new(cfg.url.target())
            .parent()
            .filter(|p| !p.as_os_str().is_empty()),
        super::Backend::Postgres => None,
    }
}

fn run_on(conn: &mut DbConnection) -> Result<usize, BoxError> {
    match conn {
        // One write transaction around the whole run: a second process migrating the
        // same file waits (busy timeout), then finds nothing pending.
        DbConnection::Sqlite(c) => c
            .immediate_transaction(|c| {
                c.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map(|v| v.len())
                    .map_err(MigrationTxError::Migration)
            })
            .map_err(BoxError::from),
        DbConnection::Postgresql(c) => {
            // Lock first: even the pending check creates diesel's bookkeeping table,
            // which races when instances start together on an empty database.
            c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))?;
            let ran = c
                .run_pending_migrations(POSTGRES_MIGRATIONS)
                .map(|v| v.len());
            let unlock =
                c.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"));
            let ran = ran?;
            unlock?;
            Ok(ran)
        }
    }
}

/// True while any migration is still to be applied (readiness fails then).
pub fn has_pending(conn: &mut DbConnection) -> Result<bool, BoxError> {
    match conn {
        DbConnection::Sqlite(c) => c.has_pending_migration(SQLITE_MIGRATIONS),
        DbConnection::Postgresql(c) => c.has_pending_migration(POSTGRES_MIGRATIONS),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_backends_have_the_same_migration_folders() {
        let list = |b: &str| {
            let mut v: Vec<String> = std::fs::read_dir(format!("migrations/{b}"))
                .expect("migrations dir")
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let sqlite = list("sqlite");
        assert!(!sqlite.is_empty());
        assert_eq!(sqlite, list("postgres"));
    }
}
