//! Configuration: clap arguments backed by environment variables (flags win, `.env`
//! never overrides what is already set), validated once into [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::db::DatabaseUrl;

/// Where `serve --dev` keeps its state.
pub const DEV_DIR: &str = ".coordinator";
pub const DEV_DATABASE_URL: &str = "sqlite://./.coordinator/coordinator.db";

/// Database selection shared by `serve`, `migrate` and the operator commands.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Database URL: `postgres://…` or `sqlite://PATH`.
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Maximum connections in the pool.
    #[arg(long, env = "COORDINATOR_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,

    /// Seconds to wait for a pooled connection before answering 503.
    #[arg(long, env = "COORDINATOR_DB_TIMEOUT_SECS", default_value_t = 5)]
    pub db_timeout_secs: u64,

    /// SQLite busy timeout in milliseconds (wait for another process's lock).
    #[arg(
        long,
        env = "COORDINATOR_SQLITE_BUSY_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub sqlite_busy_timeout_ms: u64,
}

/// Arguments of `coordinator serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Development mode: SQLite under ./.coordinator/, generated master key and dev credentials.
    #[arg(long)]
    pub dev: bool,

    /// Address to listen on.
    #[arg(long, env = "COORDINATOR_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    #[command(flatten)]
    pub db: DbArgs,

    /// Largest accepted request body in bytes.
    #[arg(long, env = "COORDINATOR_BODY_LIMIT", default_value_t = 1_048_576)]
    pub body_limit: usize,

    /// HTTP worker threads (0 = one per CPU).
    #[arg(long, env = "COORDINATOR_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM.
    #[arg(long, env = "COORDINATOR_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

/// Validated database settings.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: DatabaseUrl,
    pub pool_size: u32,
    pub timeout: Duration,
    pub sqlite_busy_timeout: Duration,
}

/// Validated server configuration; passed to `Application::build`, never global.
#[derive(Debug, Clone)]
pub struct Config {
    pub dev: bool,
    pub bind: SocketAddr,
    pub db: DbConfig,
    pub body_limit: usize,
    pub workers: usize,
    pub shutdown_timeout: Duration,
}

/// A configuration error: one line naming the variable. `main` exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(var: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid {var}: {why}"))
}

impl DbArgs {
    /// Validate; `dev_default` is used when no URL is given (serve --dev).
    pub fn validate(&self, dev_default: Option<&str>) -> Result<DbConfig, ConfigError> {
        let raw = match (&self.database_url, dev_default) {
            (Some(u), _) if !u.trim().is_empty() => u.trim().to_owned(),
            (_, Some(d)) => d.to_owned(),
            _ => {
                return Err(ConfigError(
                    "DATABASE_URL is not set (use --database-url, or `serve --dev` for a local SQLite database)"
                        .into(),
                ))
            }
        };
        let url = DatabaseUrl::parse(&raw).map_err(|why| bad("DATABASE_URL", why))?;
        if !(1..=512).contains(&self.db_pool_size) {
            return Err(bad("COORDINATOR_DB_POOL_SIZE", "must be between 1 and 512"));
        }
        if !(1..=300).contains(&self.db_timeout_secs) {
            return Err(bad(
                "COORDINATOR_DB_TIMEOUT_SECS",
                "must be between 1 and 300",
            ));
        }
        if self.sqlite_busy_timeout_ms > 600_000 {
            return Err(bad(
                "COORDINATOR_SQLITE_BUSY_TIMEOUT_MS",
                "must be at most 600000",
            ));
        }
        Ok(DbConfig {
            url,
            pool_size: self.db_pool_size,
            timeout: Duration::from_secs(self.db_timeout_secs),
            sqlite_busy_timeout: Duration::from_millis(self.sqlite_busy_timeout_ms),
        })
    }
}

impl ServeArgs {
    /// All cross-field rules in one place.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let bind: SocketAddr = self.bind.parse().map_err(|_| {
            bad(
                "COORDINATOR_BIND",
                "expected HOST:PORT, e.g. 127.0.0.1:8080",
            )
        })?;
        let db = self.db.validate(self.dev.then_some(DEV_DATABASE_URL))?;
        if !(1024..=(256 << 20)).contains(&self.body_limit) {
            return Err(bad(
                "COORDINATOR_BODY_LIMIT",
                "must be between 1024 and 268435456 bytes",
            ));
        }
        if self.workers > 256 {
            return Err(bad("COORDINATOR_WORKERS", "must be at most 256"));
        }
        if self.shutdown_timeout_secs > 3600 {
            return Err(bad(
                "COORDINATOR_SHUTDOWN_TIMEOUT_SECS",
                "must be at most 3600",
            ));
        }
        Ok(Config {
            dev: self.dev,
            bind,
            db,
            body_limit: self.body_limit,
            workers: self.workers,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
        })
    }
}

impl Config {
    /// A configuration with every default, for embedding and tests.
    pub fn new(database_url: DatabaseUrl) -> Self {
        Config {
            dev: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: DbConfig {
                url: database_url,
                pool_size: 16,
                timeout: Duration::from_secs(5),
                sqlite_busy_timeout: Duration::from_millis(5000),
            },
            body_limit: 1_048_576,
            workers: 0,
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    pub fn dev_dir() -> PathBuf {
        PathBuf::from(DEV_DIR)
    }
}
