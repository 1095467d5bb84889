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

/// PostgreSQL: the longest a migration's statement waits for a table lock (not the
/// migration lock, taken before). A migration's `ALTER TABLE` waiting for a transaction
/// that holds the table makes every later statement on that table, from every instance,
/// wait behind it; past this the migration gives up and the start fails instead (the
/// supervisor starts the instance again).
pub const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
        Err(e) if e.to_string().contains("lock timeout") => anyhow::anyhow!(
            "migration failed: it waited more than {} s for a lock on a table it changes, \
             held by another transaction (a long query, a report, pg_dump); that migration \
             was rolled back, the ones before it stay applied. Start again once that \
             transaction ends ({})",
            LOCK_TIMEOUT.as_secs(),
            super::one_line(&e.to_string())
        ),
        Err(e) => anyhow::anyhow!("migration failed: {}", super::one_line(&e.to_string())),
    })
}

/// For the operator commands, which never migrate: refuse a database a newer release
/// migrated, as `serve` does, unless `allow` (then one warning).
pub fn refuse_newer(conn: &mut DbConnection, allow: bool) -> anyhow::Result<()> {
    let found = match conn {
        DbConnection::Sqlite(c) => newer_in(c, &SQLITE_MIGRATIONS),
        DbConnection::Postgresql(c) => newer_in(c, &POSTGRES_MIGRATIONS),
    }
    .map_err(|e| anyhow::anyhow!("cannot read the database's migration state: {e}"))?;
    check_newer(found, allow).map_err(|e| match e.downcast::<NewerSchema>() {
        Ok(newer) => anyhow::Error::new(*newer),
        Err(e) => anyhow::anyhow!("{e}"),
    })
}

/// The applied versions `source` does not hold, if any (creates diesel's table when
/// missing, as every harness call does).
fn newer_in<DB, C, S>(c: &mut C, source: &S) -> Result<Option<NewerSchema>, BoxError>
where
    DB: diesel::backend::Backend,
    C: MigrationHarness<DB>,
    S: MigrationSource<DB>,
{
    let mut known: Vec<String> = MigrationSource::<DB>::migrations(source)?
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

/// The migrations of `source` not applied yet, in version order (as diesel's
/// `pending_migrations`, which takes its source by value).
fn pending<S>(
    c: &mut diesel::PgConnection,
    source: &S,
) -> Result<Vec<Box<dyn diesel::migration::Migration<diesel::pg::Pg>>>, BoxError>
where
    S: MigrationSource<diesel::pg::Pg>,
{
    let applied = c.applied_migrations()?;
    let mut pending: Vec<_> = MigrationSource::<diesel::pg::Pg>::migrations(source)?
        .into_iter()
        .filter(|m| !applied.contains(&m.name().version()))
        .collect();
    pending.sort_by(|a, b| a.name().version().cmp(&b.name().version()));
    Ok(pending)
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

/// PostgreSQL's migrations from `source` (the embedded ones; a test's own): under the
/// migration lock, refusing a newer schema, each pending migration with its own
/// `lock_timeout`. One that runs in a transaction waits at most [`LOCK_TIMEOUT`] for a
/// table lock. One that runs outside a transaction (`run_in_transaction = false`: a
/// `CREATE INDEX CONCURRENTLY`, the rule's way to index a table that exists) waits as
/// long as it must: it blocks no reader or writer while it waits, and a concurrent
/// build cancelled by the timeout (it waits for every transaction older than it, a
/// report or `pg_dump` included) leaves an invalid index behind, which the next start's
/// run of the same migration finds "already exists" (or, with `IF NOT EXISTS`, keeps
/// invalid for good). docs/decisions.md, "A PostgreSQL migration waits at most 5 s for
/// a table lock".
#[doc(hidden)]
pub fn run_postgres<S>(
    c: &mut diesel::PgConnection,
    source: &S,
    allow_newer: bool,
) -> Result<usize, BoxError>
where
    S: MigrationSource<diesel::pg::Pg>,
{
    // Lock first: even the pending check creates diesel's bookkeeping table, which
    // races when instances start together on an empty database.
    lock_migrations(c)?;
    // After the migration lock: instances starting together wait for it as long as the
    // first one migrates.
    let ran = newer_in(c, source)
        .and_then(|found| check_newer(found, allow_newer))
        .and_then(|()| pending(c, source))
        .and_then(|pending| {
            for m in &pending {
                let wait = if m.metadata().run_in_transaction() {
                    LOCK_TIMEOUT.as_millis()
                } else {
                    0
                };
                c.batch_execute(&format!("SET lock_timeout = '{wait}ms'"))?;
                c.run_migration(m.as_ref())?;
            }
            Ok(pending.len())
        });
    let unlock = c.batch_execute(&format!(
        "RESET lock_timeout; SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"
    ));
    let ran = ran?;
    unlock?;
    Ok(ran)
}

/// Take the migration lock, trying every [`LOCK_RETRY`] instead of waiting inside
/// `pg_advisory_lock`: a session waiting there is a statement in progress, and a
/// `CREATE INDEX CONCURRENTLY` run by the instance that holds the lock waits for every
/// such statement to end, while they wait for its lock: a deadlock, which PostgreSQL
/// broke by cancelling the build and left its invalid index behind, failing the next
/// instance's run with "already exists"
/// (`ops::postgres::instances_starting_together_on_an_empty_database`, with the first
/// concurrent build, `…_jobs_queued`). Between tries a waiting session holds no snapshot.
fn lock_migrations(c: &mut diesel::PgConnection) -> Result<(), BoxError> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Got {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        got: bool,
    }
    loop {
        let g: Got = diesel::sql_query(format!(
            "SELECT pg_try_advisory_lock({MIGRATION_LOCK_ID}) AS got"
        ))
        .get_result(c)?;
        if g.got {
            return Ok(());
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

/// How often an instance waiting for another's migrations tries the lock again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

fn run_on(conn: &mut DbConnection, allow_newer: bool) -> Result<usize, BoxError> {
    match conn {
        // One write transaction around the whole run: a second process migrating the
        // same file waits (busy timeout), then finds nothing pending.
        DbConnection::Sqlite(c) => c
            .immediate_transaction(|c| {
                newer_in(c, &SQLITE_MIGRATIONS)
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
        DbConnection::Postgresql(c) => run_postgres(c, &POSTGRES_MIGRATIONS, allow_newer),
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

    /// Released before the rule below was written down (2026-12-06): they index or
    /// rewrite `jobs`/`revoked_tokens` inside the migration's transaction. Never add to it.
    const LOCKING_BEFORE_THE_RULE: &[&str] = &[
        "2026-11-24-000004_webhook_deliveries",
        "2026-11-25-000001_revocation_seq",
        "2026-11-26-000001_job_lifecycle",
    ];

    /// What in one `up.sql` would break or stall instances of the previous release
    /// still serving during a rolling upgrade on PostgreSQL (docs/decisions.md,
    /// "Upgrades and rollbacks"): a contracting statement without a `-- contract:` line
    /// saying why the previous release no longer uses what it removes, a `NOT NULL`
    /// column without a default (their inserts leave it out), and an index built, or
    /// rows rewritten, on a table that existed before, outside `CONCURRENTLY`
    /// (writes to it wait for the migration's commit).
    fn expand_only_findings(up: &str) -> Vec<String> {
        let contract_marked = up
            .lines()
            .any(|l| l.trim_start().starts_with("-- contract:"));
        let code: String = up
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let statements: Vec<String> = code
            .split(';')
            .map(|s| {
                s.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_uppercase()
            })
            .filter(|s| !s.is_empty())
            .collect();
        let created: Vec<String> = statements
            .iter()
            .filter_map(|s| s.strip_prefix("CREATE TABLE "))
            .filter_map(|s| s.split([' ', '(']).next().map(str::to_owned))
            .collect();
        let existing = |table: &str| !created.iter().any(|c| c == table);
        let mut found = Vec::new();
        for s in &statements {
            let contracting = [" DROP COLUMN ", "DROP TABLE ", " RENAME ", " ALTER COLUMN "]
                .iter()
                .any(|k| format!(" {s} ").contains(k));
            if contracting && !contract_marked {
                found.push(format!("contracts without a `-- contract:` line: {s}"));
            }
            let adds_required = s.contains(" ADD COLUMN ")
                && s.contains(" NOT NULL")
                && !s.contains(" DEFAULT ")
                && !s.contains(" GENERATED ");
            if adds_required {
                found.push(format!("a NOT NULL column without a default: {s}"));
            }
            let index_on = s
                .strip_prefix("CREATE UNIQUE INDEX ")
                .or_else(|| s.strip_prefix("CREATE INDEX "))
                .filter(|rest| !rest.starts_with("CONCURRENTLY"))
                .and_then(|rest| rest.split(" ON ").nth(1))
                .and_then(|rest| rest.split([' ', '(']).next());
            let rewrites = s
                .strip_prefix("UPDATE ")
                .or_else(|| s.strip_prefix("DELETE FROM "))
                .and_then(|rest| rest.split(' ').next());
            if let Some(t) = index_on.or(rewrites).filter(|t| existing(t)) {
                found.push(format!("locks {t} until the migration commits: {s}"));
            }
        }
        found
    }

    #[test]
    fn the_expand_only_check_finds_what_it_is_for() {
        assert!(expand_only_findings("ALTER TABLE jobs ADD COLUMN x BIGINT;").is_empty());
        assert!(expand_only_findings(
            "ALTER TABLE jobs ADD COLUMN x BIGINT NOT NULL DEFAULT 0;\n\
             CREATE TABLE t (a TEXT NOT NULL);\nCREATE INDEX t_a ON t (a);\n\
             CREATE INDEX CONCURRENTLY jobs_x ON jobs (x);"
        )
        .is_empty());
        for bad in [
            "ALTER TABLE jobs DROP COLUMN worker;",
            "ALTER TABLE jobs RENAME COLUMN worker TO holder;",
            "ALTER TABLE jobs ALTER COLUMN worker SET NOT NULL;",
            "DROP TABLE queues;",
            "ALTER TABLE jobs ADD COLUMN x BIGINT NOT NULL;",
            "CREATE INDEX jobs_x ON jobs (x);",
            "UPDATE jobs SET x = 1;",
        ] {
            assert_eq!(expand_only_findings(bad).len(), 1, "{bad}");
        }
        let marked = "-- contract: the previous release no longer reads it\n\
                      ALTER TABLE jobs DROP COLUMN worker;";
        assert!(expand_only_findings(marked).is_empty());
    }

    /// Every PostgreSQL migration keeps the previous release working while it runs
    /// and after (expand/contract; docs/decisions.md, "Upgrades and rollbacks").
    #[test]
    fn postgres_migrations_keep_the_previous_release_working() {
        let mut dirs: Vec<_> = std::fs::read_dir("migrations/postgres")
            .expect("migrations dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        dirs.sort();
        let mut found = Vec::new();
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let up = std::fs::read_to_string(dir.join("up.sql")).expect("up.sql");
            found.extend(
                expand_only_findings(&up)
                    .into_iter()
                    .filter(|f| {
                        !(f.starts_with("locks ") && LOCKING_BEFORE_THE_RULE.contains(&&*name))
                    })
                    .map(|f| format!("{name}: {f}")),
            );
        }
        assert!(found.is_empty(), "{found:#?}");
    }

    /// One line per column and per index of a SQLite schema (diesel's table left out).
    fn sqlite_schema(c: &mut diesel::SqliteConnection) -> Vec<String> {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Line {
            #[diesel(sql_type = diesel::sql_types::Text)]
            line: String,
        }
        diesel::sql_query(
            "SELECT m.name || '.' || p.cid || ' ' || p.name || ' ' || p.type || ' ' || \
               p.\"notnull\" || ' ' || COALESCE(p.dflt_value, '-') || ' ' || p.pk AS line \
             FROM sqlite_master m JOIN pragma_table_info(m.name) p \
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' \
               AND m.name NOT LIKE '__diesel%' \
             UNION ALL SELECT 'index ' || name || ': ' || sql FROM sqlite_master \
             WHERE type = 'index' AND sql IS NOT NULL ORDER BY 1",
        )
        .load::<Line>(c)
        .expect("schema")
        .into_iter()
        .map(|l| l.line)
        .collect()
    }

    /// `down.sql` is not used by the service (there is no revert command), but it is
    /// what `diesel migration revert` runs: each one must give back the schema as it
    /// was before its `up.sql`, and the migrations must apply again after.
    #[test]
    fn every_sqlite_down_migration_restores_the_schema_before_it() {
        use diesel::migration::MigrationSource;
        use diesel::Connection;
        use diesel_migrations::MigrationHarness;
        let mut c = diesel::SqliteConnection::establish(":memory:").expect("memory db");
        c.applied_migrations().expect("bookkeeping table");
        let all = MigrationSource::<diesel::sqlite::Sqlite>::migrations(&super::SQLITE_MIGRATIONS)
            .expect("migrations");
        let mut before = vec![sqlite_schema(&mut c)];
        for m in &all {
            c.run_migration(m.as_ref()).expect("up");
            before.push(sqlite_schema(&mut c));
        }
        for (i, m) in all.iter().enumerate().rev() {
            c.revert_migration(m.as_ref())
                .unwrap_or_else(|e| panic!("{}: down.sql fails: {e}", m.name()));
            assert_eq!(
                sqlite_schema(&mut c),
                before[i],
                "{}: down.sql leaves another schema",
                m.name()
            );
        }
        let again = c
            .run_pending_migrations(super::SQLITE_MIGRATIONS)
            .expect("up again");
        assert_eq!(again.len(), all.len());
    }
}
