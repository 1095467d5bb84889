//! Embedded migrations, one set per backend with identical folder names.
//!
//! On PostgreSQL, migrations run under `pg_advisory_lock` on a dedicated connection so
//! that instances starting together do not race (the lock is taken before anything
//! else, since even checking for pending migrations creates diesel's table).
//!
//! A database with applied migrations this binary does not embed was migrated by a
//! newer release (a rollback). diesel's harness ignores them; this module refuses to
//! migrate or serve it unless `DbConfig::allow_newer_schema` is set
//! (`COORDINATOR_DB_ALLOW_NEWER_SCHEMA`; docs/decisions.md, "Upgrades and rollbacks").

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
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

/// Applied migrations this binary does not embed: the database was migrated by a newer
/// release (or a build of another branch). Its `Display` is the operator's one line.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database has migration(s) {} that this binary does not know (its newest is {}): \
     a newer release migrated it. Run that release, or restore the backup taken before it \
     migrated; set COORDINATOR_DB_ALLOW_NEWER_SCHEMA=true (--db-allow-newer-schema) only \
     if that release says its schema still works with this one",
    unknown.join(", "),
    newest_known
)]
pub struct NewerSchema {
    /// The unknown versions, in order (`20261204000002` for folder `2026-12-04-000002_…`).
    pub unknown: Vec<String>,
    pub newest_known: String,
}

/// Apply every pending migration; returns how many ran. A database migrated by a newer
/// release ([`NewerSchema`]) is refused unless `cfg.allow_newer_schema`.
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
    run_on(&mut conn, cfg.allow_newer_schema).map_err(|e| match e.downcast::<NewerSchema>() {
        Ok(newer) => anyhow::Error::new(*newer),
        Err(e) => anyhow::anyhow!("migration failed: {e}"),
    })
}

/// For the operator commands, which never migrate: refuse a database a newer release
/// migrated, as `serve` does, unless `allow` (then one warning).
pub fn refuse_newer(conn: &mut DbConnection, allow: bool) -> anyhow::Result<()> {
    let found = match conn {
        DbConnection::Sqlite(c) => newer_in(c, SQLITE_MIGRATIONS),
        DbConnection::Postgresql(c) => newer_in(c, POSTGRES_MIGRATIONS),
    }
    .map_err(|e| anyhow::anyhow!("cannot read the database's migration state: {e}"))?;
    check_newer(found, allow).map_err(|e| match e.downcast::<NewerSchema>() {
        Ok(newer) => anyhow::Error::new(*newer),
        Err(e) => anyhow::anyhow!("{e}"),
    })
}

/// The applied versions `source` does not hold, if any (creates diesel's table when
/// missing, as every harness call does).
fn newer_in<DB, C>(c: &mut C, source: EmbeddedMigrations) -> Result<Option<NewerSchema>, BoxError>
where
    DB: diesel::backend::Backend,
    C: MigrationHarness<DB>,
    EmbeddedMigrations: MigrationSource<DB>,
{
    let mut known: Vec<String> = MigrationSource::<DB>::migrations(&source)?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    known.sort();
    let mut unknown: Vec<String> = c
        .applied_migrations()?
        .iter()
        .map(ToString::to_string)
        .filter(|v| known.binary_search(v).is_err())
        .collect();
    if unknown.is_empty() {
        return Ok(None);
    }
    unknown.sort();
    Ok(Some(NewerSchema {
        unknown,
        newest_known: known.last().cloned().unwrap_or_default(),
    }))
}

/// Refuse what [`newer_in`] found, or with `allow` go on after one warning.
fn check_newer(found: Option<NewerSchema>, allow: bool) -> Result<(), BoxError> {
    match found {
        None => Ok(()),
        Some(newer) if allow => {
            log::warn!(
                "the database has migration(s) {} that this binary does not know (its newest \
                 is {}); going on because COORDINATOR_DB_ALLOW_NEWER_SCHEMA is set",
                newer.unknown.join(", "),
                newer.newest_known
            );
            Ok(())
        }
        Some(newer) => Err(Box::new(newer)),
    }
}

fn sqlite_parent_dir(cfg: &DbConfig) -> Option<&std::path::Path> {
    match cfg.url.backend() {
        super::Backend::Sqlite => std::path::Path::new(cfg.url.target())
            .parent()
            .filter(|p| !p.as_os_str().is_empty()),
        super::Backend::Postgres => None,
    }
}

fn run_on(conn: &mut DbConnection, allow_newer: bool) -> Result<usize, BoxError> {
    match conn {
        // One write transaction around the whole run: a second process migrating the
        // same file waits (busy timeout), then finds nothing pending.
        DbConnection::Sqlite(c) => c
            .immediate_transaction(|c| {
                newer_in(c, SQLITE_MIGRATIONS)
                    .and_then(|found| check_newer(found, allow_newer))
                    .map_err(MigrationTxError::Migration)?;
                c.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map(|v| v.len())
                    .map_err(MigrationTxError::Migration)
            })
            .map_err(|e| match e {
                // Unwrapped, so that a `NewerSchema` stays one to downcast.
                MigrationTxError::Migration(e) => e,
                MigrationTxError::Db(e) => BoxError::from(e),
            }),
        DbConnection::Postgresql(c) => {
            // Lock first: even the pending check creates diesel's bookkeeping table,
            // which races when instances start together on an empty database.
            c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))?;
            let ran = newer_in(c, POSTGRES_MIGRATIONS)
                .and_then(|found| check_newer(found, allow_newer))
                .and_then(|()| {
                    c.run_pending_migrations(POSTGRES_MIGRATIONS)
                        .map(|v| v.len())
                });
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
