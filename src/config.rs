//! Configuration: clap arguments backed by environment variables (flags win, `.env`
//! never overrides what is already set), validated once into [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use crate::auth::client_cert::ClientIdentity;
use crate::crypto::seal::MasterKey;
use crate::db::DatabaseUrl;
pub use crate::db::DbConfig;

/// Where `serve --dev` keeps its state.
pub const DEV_DIR: &str = ".coordinator";
pub const DEV_DATABASE_URL: &str = "sqlite://./.coordinator/coordinator.db";

/// Variables that carry secrets. They are read from the environment (or `.env`) only,
/// never from a command-line flag, which every local user can see in `ps`. The master
/// key can also come from a file (`--master-key-file`).
pub const SECRET_ENV_VARS: [&str; 3] = [
    "COORDINATOR_MASTER_KEY",
    "COORDINATOR_MASTER_KEY_PREVIOUS",
    "COORDINATOR_API_KEY",
];

/// A secret from the environment (`None` when unset or not valid UTF-8).
fn secret_env(name: &str) -> Option<SecretString> {
    std::env::var(name).ok().map(SecretString::from)
}

/// Database selection shared by `serve`, `migrate` and the operator commands.
#[derive(Clone, Args)]
pub struct DbArgs {
    /// Database URL: `postgres://…` or `sqlite://PATH`.
    // `hide_env_values`: `--help` would otherwise print the URL, password included.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
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

    /// SQLite `synchronous`: `normal` (WAL; survives a crash of the process, the last
    /// commits can be lost on power failure) or `full` (fsync on every commit).
    #[arg(long, env = "COORDINATOR_SQLITE_SYNCHRONOUS", default_value = "normal", value_parser = ["normal", "full"])]
    pub sqlite_synchronous: String,

    /// Accept `sslmode=prefer` or `allow` in a PostgreSQL URL (TLS that silently falls
    /// back to plain text). Refused at start without this flag.
    #[arg(long, env = "COORDINATOR_DB_ALLOW_TLS_DOWNGRADE", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub db_allow_tls_downgrade: bool,

    /// Start on a database that has migrations this binary does not know (migrated by
    /// a newer release: a rollback). Refused at start without this flag; set it only
    /// when the newer release says its schema is compatible with this one.
    #[arg(long, env = "COORDINATOR_DB_ALLOW_NEWER_SCHEMA", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub db_allow_newer_schema: bool,
}

/// Redacted: a PostgreSQL URL may carry a password, so only its scheme is shown.
impl std::fmt::Debug for DbArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbArgs")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("db_pool_size", &self.db_pool_size)
            .field("db_timeout_secs", &self.db_timeout_secs)
            .field("sqlite_busy_timeout_ms", &self.sqlite_busy_timeout_ms)
            .field("sqlite_synchronous", &self.sqlite_synchronous)
            .field("db_allow_tls_downgrade", &self.db_allow_tls_downgrade)
            .field("db_allow_newer_schema", &self.db_allow_newer_schema)
            .finish()
    }
}

/// `postgres://…` for any URL: the scheme and nothing that could be a credential.
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://…"),
        None => "…".to_owned(),
    }
}

/// Master keys: shared by `serve` and the commands that seal or open secrets. The keys
/// themselves come from the environment only (see [`SECRET_ENV_VARS`]).
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// Master key, 32 bytes in standard base64 (`COORDINATOR_MASTER_KEY`).
    #[arg(skip = secret_env("COORDINATOR_MASTER_KEY"))]
    pub master_key: Option<SecretString>,

    /// File holding the master key (base64), instead of COORDINATOR_MASTER_KEY. The
    /// key itself is never a flag (flags show in `ps`): set COORDINATOR_MASTER_KEY, or
    /// COORDINATOR_MASTER_KEY_PREVIOUS for the previous key during a rotation.
    #[arg(long, env = "COORDINATOR_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// The previous master key, tried for rows sealed under its id (during rotation)
    /// (`COORDINATOR_MASTER_KEY_PREVIOUS`).
    #[arg(skip = secret_env("COORDINATOR_MASTER_KEY_PREVIOUS"))]
    pub master_key_previous: Option<SecretString>,
}

impl KeyArgs {
    /// Load the keys; in dev mode, `./.coordinator/master.key` is used (created, 0600)
    /// when neither the variable nor the file flag is set.
    pub fn load(&self, dev: bool) -> Result<(Arc<MasterKey>, Option<Arc<MasterKey>>), ConfigError> {
        if dev {
            // Dev mode always uses its own key (the dev database is sealed under it),
            // never a production key that happens to be in the environment.
            if self.master_key.is_some() || self.master_key_file.is_some() {
                eprintln!("coordinator: --dev ignores COORDINATOR_MASTER_KEY/_FILE and uses ./.coordinator/master.key");
            }
            return Ok((Arc::new(dev_master_key()?), None));
        }
        let current = match (&self.master_key, &self.master_key_file) {
            (Some(k), _) if !k.expose_secret().trim().is_empty() => {
                MasterKey::from_base64(k.expose_secret())
                    .map_err(|e| bad("COORDINATOR_MASTER_KEY", e))?
            }
            (_, Some(path)) => read_key_file(path)?,
            _ => {
                return Err(ConfigError(
                    "COORDINATOR_MASTER_KEY is not set (or use --master-key-file, or --dev for the generated ./.coordinator/master.key)"
                        .into(),
                ))
            }
        };
        let previous = match &self.master_key_previous {
            Some(k) if !k.expose_secret().trim().is_empty() => {
                let key = MasterKey::from_base64(k.expose_secret())
                    .map_err(|e| bad("COORDINATOR_MASTER_KEY_PREVIOUS", e))?;
                Some(Arc::new(key))
            }
            _ => None,
        };
        Ok((Arc::new(current), previous))
    }
}

fn read_key_file(path: &std::path::Path) -> Result<MasterKey, ConfigError> {
    let cannot_read = |e: std::io::Error| {
        bad(
            "COORDINATOR_MASTER_KEY_FILE",
            format!("cannot read {}: {e}", path.display()),
        )
    };
    // The file's text is the key itself: wiped when dropped, as the key is. The mode
    // looked at is the open file's, the one the key is read from.
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    let mut text = zeroize::Zeroizing::new(String::new());
    std::io::Read::read_to_string(&mut file, &mut text).map_err(cannot_read)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = file.metadata() {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                eprintln!(
                    "coordinator: warning: the master key file {} is readable by other users \
                     (mode {mode:04o}); chmod 600 it",
                    path.display()
                );
            }
        }
    }
    MasterKey::from_base64(text.trim()).map_err(|e| bad("COORDINATOR_MASTER_KEY_FILE", e))
}

/// The dev master key under `./.coordinator/master.key`, generated (0600) if absent.
fn dev_master_key() -> Result<MasterKey, ConfigError> {
    prepare_dev_dir()?;
    let dir = Config::dev_dir();
    let path = dir.join("master.key");
    if path.exists() {
        return read_key_file(&path);
    }
    // Secrets in the dev database were sealed under the key that is gone: a new key
    // would open none of them, and once written it would stay, so every later start
    // would fail too (sixth security review, 2026-12-07).
    if dev_db_holds_sealed_secrets(&dir.join("coordinator.db")) {
        return Err(ConfigError(format!(
            "{} is missing, but the dev database beside it holds secrets sealed under \
             that key, which a new key would not open. Put the key file back, or remove \
             {} to start a new dev state (nothing was written)",
            path.display(),
            dir.display()
        )));
    }
    let key = MasterKey::generate();
    crate::config::write_private(&path, key.to_base64().as_bytes())
        .map_err(|e| ConfigError(format!("cannot write {}: {e}", path.display())))?;
    Ok(key)
}

/// Whether the dev database holds any sealed secret: then some master key sealed it,
/// and only the dev key file held it. `false` when the database is new, not migrated,
/// or cannot be read (a key is then made, as before).
fn dev_db_holds_sealed_secrets(db: &std::path::Path) -> bool {
    use diesel::{Connection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let (Some(path), true) = (db.to_str(), db.is_file()) else {
        return false;
    };
    let Ok(mut conn) = diesel::SqliteConnection::establish(path) else {
        return false;
    };
    diesel::sql_query("SELECT count(*) AS n FROM sealed_secrets")
        .get_result::<Count>(&mut conn)
        .is_ok_and(|c| c.n > 0)
}

/// Make `./.coordinator/` private, whether it is new or not: the directory 0700 and
/// owned by us, every file in it 0600, no symbolic links anywhere in it (a link could
/// send a secret, or the database, somewhere else). The SQLite database is created
/// empty and 0600 before SQLite opens it, so its `-wal` and `-shm` files (which copy
/// the database's mode) are private from the start.
pub fn prepare_dev_dir() -> Result<(), ConfigError> {
    let dir = Config::dev_dir();
    let fail = |why: String| ConfigError(format!("{}: {why}", dir.display()));
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder
                .create(&dir)
                .map_err(|e| fail(format!("cannot create: {e}")))?;
        }
        Err(e) => return Err(fail(e.to_string())),
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(fail(
                "is a symbolic link; refusing to keep credentials behind it".into(),
            ))
        }
        Ok(meta) if !meta.is_dir() => return Err(fail("is not a directory".into())),
        Ok(_) => {}
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(&dir).map_err(|e| fail(e.to_string()))?;
        if let Some(uid) = current_uid() {
            if meta.uid() != uid {
                return Err(fail(format!(
                    "is owned by uid {}, not by the user running this command",
                    meta.uid()
                )));
            }
        }
        if meta.mode() & 0o777 != 0o700 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fail(format!("cannot make it private (chmod 700): {e}")))?;
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| fail(e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| fail(e.to_string()))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(e.to_string()))?;
            if meta.file_type().is_symlink() {
                return Err(ConfigError(format!(
                    "{} is a symbolic link; refusing to use it (remove it)",
                    path.display()
                )));
            }
            if meta.is_file() && meta.mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| ConfigError(format!("cannot chmod 600 {}: {e}", path.display())),
                )?;
            }
        }
    }
    let db = dir.join("coordinator.db");
    if !db.exists() {
        write_private(&db, b"")
            .map_err(|e| ConfigError(format!("cannot create {}: {e}", db.display())))?;
    }
    Ok(())
}

/// The user id this process runs as, where it can be found without `unsafe` (Linux:
/// the owner of `/proc/self`). `None` elsewhere: ownership checks are then skipped.
pub fn current_uid() -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").ok().map(|m| m.uid())
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Write a file readable by its owner only (0600 on Unix), new or not: an existing
/// file gets mode 0600 before anything is written to it. A symbolic link is refused
/// (never followed), and so is a path that changed between the check and the open.
pub fn write_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind, Write};
    let mut opts = std::fs::OpenOptions::new();
    let mut file = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{} is a symbolic link; refusing to write through it",
                    path.display()
                ),
            ))
        }
        Ok(meta) if !meta.is_file() => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ))
        }
        Ok(meta) => {
            // Neither create nor truncate yet: first make sure this is the file checked.
            let file = opts.write(true).open(path)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let opened = file.metadata()?;
                if opened.dev() != meta.dev() || opened.ino() != meta.ino() {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("{} changed while it was opened", path.display()),
                    ));
                }
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            #[cfg(not(unix))]
            let _ = meta;
            file.set_len(0)?;
            file
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // `create_new` (O_EXCL) does not follow a link planted meanwhile.
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            opts.open(path)?
        }
        Err(e) => return Err(e),
    };
    file.write_all(contents)?;
    file.sync_all()
}

/// Arguments of `coordinator serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Development mode: SQLite under ./.coordinator/, generated master key and dev credentials.
    #[arg(long)]
    pub dev: bool,

    /// Address to listen on: IP:PORT (an IP address, not a host name).
    #[arg(long, env = "COORDINATOR_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    #[command(flatten)]
    pub db: DbArgs,

    /// Largest accepted request body in bytes.
    #[arg(long, env = "COORDINATOR_BODY_LIMIT", default_value_t = 1_048_576)]
    pub body_limit: usize,

    /// Seconds a request body may take to arrive once its headers passed (408 past it).
    #[arg(long, env = "COORDINATOR_BODY_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub body_read_timeout_secs: u64,

    /// HTTP worker threads (0 = one per CPU).
    #[arg(long, env = "COORDINATOR_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Seconds in-flight requests get to finish on SIGTERM (SIGINT stops at once).
    #[arg(long, env = "COORDINATOR_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,

    /// Milliseconds after its arrival past which a request is no longer sent to the
    /// database (answered 503 instead).
    #[arg(long, env = "COORDINATOR_REQUEST_DEADLINE_MS", default_value_t = 3000)]
    pub request_deadline_ms: u64,

    /// Requests one HTTP worker may have in progress at once (waiting claims not
    /// counted); past it a request is answered 503 at once. The ceiling of the adaptive
    /// limit.
    #[arg(long, env = "COORDINATOR_MAX_IN_FLIGHT", default_value_t = 32)]
    pub max_in_flight: usize,

    /// Open connections this instance holds at most, over every HTTP worker (past it new
    /// connections wait in the kernel's accept queue). 0: derived from the open-file
    /// limit (raised to its hard limit at start), less a reserve for the database.
    #[arg(long, env = "COORDINATOR_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Open connections one peer address (an IPv6 one by its /64) may hold; a further
    /// one is closed at once. 0: no bound per peer. Behind a load balancer every
    /// connection comes from it: raise this, or set 0.
    #[arg(
        long,
        env = "COORDINATOR_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 256
    )]
    pub max_connections_per_peer: usize,

    /// Event-loop lag, in milliseconds, above which a worker lowers its in-flight limit;
    /// 0 keeps the limit at its ceiling.
    #[arg(long, env = "COORDINATOR_OVERLOAD_TARGET_MS", default_value_t = 5)]
    pub overload_target_ms: u64,

    #[command(flatten)]
    pub keys: KeyArgs,

    /// Bootstrap API key for caller `bootstrap` (all scopes); at least 32 characters.
    /// From `COORDINATOR_API_KEY` only, never a flag.
    #[arg(skip = secret_env("COORDINATOR_API_KEY"))]
    pub api_key: Option<SecretString>,

    /// Kill switch: refuse API keys, accept only signed requests (and job tokens).
    #[arg(long, env = "COORDINATOR_REQUIRE_SIGNATURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_signature: bool,

    /// Accepted clock skew of signed requests, in seconds.
    #[arg(long, env = "COORDINATOR_SIGNATURE_SKEW_SECS", default_value_t = 300)]
    pub signature_skew_secs: i64,

    /// Failed authentications allowed per peer address per minute before 429.
    #[arg(
        long,
        env = "COORDINATOR_AUTH_FAILURES_PER_MINUTE",
        default_value_t = 30
    )]
    pub auth_failures_per_minute: u32,

    /// Seconds a RUNNING job may go without word from its worker before it is requeued.
    #[arg(long, env = "COORDINATOR_LEASE_SECS", default_value_t = 300)]
    pub lease_secs: u64,

    /// Events one job keeps: its newest this many (a few more between trims, at most
    /// 1/16 more); older ones are deleted as new ones are written (16-100000).
    #[arg(long, env = "COORDINATOR_EVENTS_PER_JOB", default_value_t = 1000)]
    pub events_per_job: i64,

    /// Lifetime of job tokens handed out by claim, in seconds (at most 86400).
    #[arg(long, env = "COORDINATOR_TOKEN_TTL_SECS", default_value_t = 3600)]
    pub token_ttl_secs: u64,

    /// Queue that webhook deliveries dispatch to.
    #[arg(long, env = "COORDINATOR_WEBHOOK_QUEUE", default_value = "issues")]
    pub webhook_queue: String,

    /// Seconds between housekeeping passes (leases, replay records).
    #[arg(long, env = "COORDINATOR_HOUSEKEEPING_SECS", default_value_t = 5)]
    pub housekeeping_secs: u64,

    /// Serve /livez, /readyz, /metrics and /openapi.json on this address (IP:PORT)
    /// instead of the service port.
    #[arg(long, env = "COORDINATOR_METRICS_BIND")]
    pub metrics_bind: Option<String>,

    /// Delete COMPLETED/FAILED/CANCELLED jobs (and their events) this many days after
    /// they finished; unset keeps them forever.
    #[arg(long, env = "COORDINATOR_JOB_RETENTION_DAYS")]
    pub job_retention_days: Option<u64>,

    /// PEM certificate chain (leaf first): serve HTTPS on COORDINATOR_BIND. Needs
    /// --tls-key.
    #[arg(long, env = "COORDINATOR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "COORDINATOR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Seconds between checks of the certificate and key files; changed files are
    /// loaded without a restart (also at once on SIGHUP).
    #[arg(long, env = "COORDINATOR_TLS_RELOAD_SECS", default_value_t = 60)]
    pub tls_reload_secs: u64,

    /// PEM CA certificate(s) for client certificates (mutual TLS). A client presenting
    /// a certificate not issued by them is refused in the handshake.
    #[arg(long, env = "COORDINATOR_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Which name in a client certificate is the caller: cn, san-dns:SUFFIX or
    /// san-uri:PREFIX.
    #[arg(long, env = "COORDINATOR_TLS_CLIENT_IDENTITY", default_value = "cn")]
    pub tls_client_identity: String,

    /// Serve plain HTTP without the start-up warning (TLS is terminated in front).
    #[arg(long, env = "COORDINATOR_INSECURE_HTTP", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub insecure_http: bool,

    #[command(flatten)]
    pub push: PushArgs,
}

/// HTTPS on the service listener (`--tls-cert`/`--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the files are checked for a new certificate.
    pub reload_every: Duration,
    /// Mutual TLS: the CA bundle client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    pub client_identity: ClientIdentity,
}

/// Bounds on long-poll claims and event streams, per instance and per caller
/// (`jobs::notify::PushLimits`; beyond them, 429).
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// Long-poll claims waiting at once on this instance (beyond: 429).
    #[arg(long, env = "COORDINATOR_MAX_WAITING_CLAIMS", default_value_t = crate::jobs::notify::MAX_WAITING_CLAIMS)]
    pub max_waiting_claims: usize,

    /// Long-poll claims one caller may have waiting at once on this instance (default
    /// 256, or the instance's bound when that is lower).
    #[arg(long, env = "COORDINATOR_MAX_WAITING_CLAIMS_PER_CALLER")]
    pub max_waiting_claims_per_caller: Option<usize>,

    /// Event streams (job and queue) open at once on this instance (beyond: 429).
    #[arg(long, env = "COORDINATOR_MAX_STREAMS", default_value_t = crate::jobs::notify::MAX_STREAMS)]
    pub max_streams: usize,

    /// Event streams one caller may have open at once on this instance (default 64, or
    /// the instance's bound when that is lower).
    #[arg(long, env = "COORDINATOR_MAX_STREAMS_PER_CALLER")]
    pub max_streams_per_caller: Option<usize>,
}

impl PushArgs {
    fn validate(&self) -> Result<crate::jobs::notify::PushLimits, ConfigError> {
        let check = |v: usize, var: &str, max: usize| {
            if (1..=max).contains(&v) {
                Ok(v)
            } else {
                Err(bad(var, format!("must be between 1 and {max}")))
            }
        };
        let waiting = check(
            self.max_waiting_claims,
            "COORDINATOR_MAX_WAITING_CLAIMS",
            100_000,
        )?;
        let streams = check(self.max_streams, "COORDINATOR_MAX_STREAMS", 100_000)?;
        Ok(crate::jobs::notify::PushLimits {
            waiting,
            streams,
            // Unset, a per-caller bound follows a lower instance bound down: lowering
            // only the instance's bound must not make the default refuse to start.
            waiting_per_caller: check(
                self.max_waiting_claims_per_caller
                    .unwrap_or(crate::jobs::notify::MAX_WAITING_CLAIMS_PER_CALLER.min(waiting)),
                "COORDINATOR_MAX_WAITING_CLAIMS_PER_CALLER",
                waiting,
            )?,
            streams_per_caller: check(
                self.max_streams_per_caller
                    .unwrap_or(crate::jobs::notify::MAX_STREAMS_PER_CALLER.min(streams)),
                "COORDINATOR_MAX_STREAMS_PER_CALLER",
                streams,
            )?,
        })
    }
}

/// Validated server configuration; passed to `Application::build`, never global.
#[derive(Debug, Clone)]
pub struct Config {
    pub dev: bool,
    pub bind: SocketAddr,
    pub db: DbConfig,
    pub body_limit: usize,
    /// The longest a request body may take to arrive (408 past it).
    pub body_read_timeout: Duration,
    pub workers: usize,
    pub shutdown_timeout: Duration,
    /// Past this after its arrival a request is not sent to the database (503).
    pub request_deadline: Duration,
    /// Delay past which a worker lowers its in-flight limit (`db::admission`); zero:
    /// the limit stays at `max_in_flight`.
    pub overload_target: Duration,
    /// Requests in progress per HTTP worker before 503 (`db::admission`).
    pub max_in_flight: usize,
    /// Open connections of the instance at most; 0: derived from the open-file limit.
    pub max_connections: usize,
    /// Open connections per peer address at most; 0: no bound.
    pub max_connections_per_peer: usize,
    pub master_key: Arc<MasterKey>,
    pub master_key_previous: Option<Arc<MasterKey>>,
    /// SHA-256 of the bootstrap API key (the key itself is not kept).
    pub bootstrap_api_key: Option<[u8; 32]>,
    pub require_signature: bool,
    pub signature_skew_secs: i64,
    pub auth_failures_per_minute: u32,
    pub lease: Duration,
    /// Events one job keeps (`COORDINATOR_EVENTS_PER_JOB`).
    pub events: crate::jobs::model::EventBound,
    pub token_ttl: Duration,
    pub webhook_queue: String,
    pub housekeeping_interval: Duration,
    pub metrics_bind: Option<SocketAddr>,
    pub job_retention: Option<Duration>,
    /// `None`: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Plain HTTP on purpose (`--insecure-http`): no start-up warning.
    pub insecure_http: bool,
    /// Bounds on waiting claims and open streams.
    pub push: crate::jobs::notify::PushLimits,
}

/// A configuration error: one line naming the variable. `main` exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(var: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("invalid {var}: {why}"))
}

/// Every port a PostgreSQL URL names (`host:PORT`, several hosts, or `?port=`) is a
/// number libpq can use: otherwise the mistake would only show as "cannot connect"
/// (exit 1) instead of a bad setting (exit 2). The message never quotes the URL, which
/// may hold a password.
fn check_pg_ports(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    // As libpq reads it: the user info ends at an `@` before the first `/`.
    let authority = before_query.split('/').next().unwrap_or_default();
    let hostlist = authority.rsplit('@').next().unwrap_or_default();
    let from_hosts = hostlist.split(',').filter_map(|host| match host.find(']') {
        Some(end) => host.get(end + 1..).and_then(|p| p.strip_prefix(':')),
        None => host.split_once(':').map(|(_, p)| p),
    });
    let from_query = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("port="))
        .flat_map(|ports| ports.split(','));
    for port in from_hosts.chain(from_query) {
        // An empty port is libpq's default, 5432.
        let ok = port.is_empty()
            || (port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !ok {
            return Err("a port must be a number from 1 to 65535 (the URL is not shown)".into());
        }
    }
    Ok(())
}

/// `COORDINATOR_EVENTS_PER_JOB`: the bound of a job's events, within
/// `EventBound::MIN..=EventBound::MAX`.
fn events_per_job(n: i64) -> Result<crate::jobs::model::EventBound, ConfigError> {
    use crate::jobs::model::EventBound;
    if !(EventBound::MIN..=EventBound::MAX).contains(&n) {
        return Err(bad(
            "COORDINATOR_EVENTS_PER_JOB",
            format!(
                "must be between {} and {}",
                EventBound::MIN,
                EventBound::MAX
            ),
        ));
    }
    Ok(EventBound::new(n))
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
        let url = DatabaseUrl::parse(&raw)
            .and_then(|u| u.with_tls_policy(self.db_allow_tls_downgrade))
            .map_err(|why| bad("DATABASE_URL", why))?;
        if url.backend() == crate::db::Backend::Postgres {
            check_pg_ports(&raw).map_err(|why| bad("DATABASE_URL", why))?;
        }
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
            sqlite_synchronous_full: self.sqlite_synchronous == "full",
            allow_newer_schema: self.db_allow_newer_schema,
        })
    }
}

impl ServeArgs {
    /// All cross-field rules in one place.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let bind: SocketAddr = self.bind.parse().map_err(|e| {
            bad(
                "COORDINATOR_BIND",
                format!("expected IP:PORT (not a host name), e.g. 127.0.0.1:8080 ({e})"),
            )
        })?;
        // Dev mode always uses the dev SQLite file: a DATABASE_URL left in the
        // environment must never get an all-scopes `dev` caller created in it.
        let db = if self.dev {
            if self.db.database_url.is_some() {
                eprintln!("coordinator: --dev ignores DATABASE_URL and uses {DEV_DATABASE_URL}");
            }
            DbArgs {
                database_url: None,
                ..self.db.clone()
            }
            .validate(Some(DEV_DATABASE_URL))?
        } else {
            self.db.validate(None)?
        };
        if !(1024..=(256 << 20)).contains(&self.body_limit) {
            return Err(bad(
                "COORDINATOR_BODY_LIMIT",
                "must be between 1024 and 268435456 bytes",
            ));
        }
        if self.workers > 256 {
            return Err(bad("COORDINATOR_WORKERS", "must be at most 256"));
        }
        if !(1..=300).contains(&self.body_read_timeout_secs) {
            return Err(bad(
                "COORDINATOR_BODY_READ_TIMEOUT_SECS",
                "must be between 1 and 300 seconds",
            ));
        }
        if self.shutdown_timeout_secs > 3600 {
            return Err(bad(
                "COORDINATOR_SHUTDOWN_TIMEOUT_SECS",
                "must be at most 3600",
            ));
        }
        if !(1..=100_000).contains(&self.max_in_flight) {
            return Err(bad(
                "COORDINATOR_MAX_IN_FLIGHT",
                "must be between 1 and 100000",
            ));
        }
        if self.max_connections > 1_000_000 {
            return Err(bad(
                "COORDINATOR_MAX_CONNECTIONS",
                "must be at most 1000000",
            ));
        }
        if self.max_connections_per_peer > 1_000_000 {
            return Err(bad(
                "COORDINATOR_MAX_CONNECTIONS_PER_PEER",
                "must be at most 1000000",
            ));
        }
        if self.overload_target_ms > 1000 {
            return Err(bad(
                "COORDINATOR_OVERLOAD_TARGET_MS",
                "must be between 0 (off) and 1000",
            ));
        }
        if !(100..=300_000).contains(&self.request_deadline_ms) {
            return Err(bad(
                "COORDINATOR_REQUEST_DEADLINE_MS",
                "must be between 100 and 300000",
            ));
        }
        let bootstrap_api_key = match &self.api_key {
            Some(k) if k.expose_secret().chars().count() < 32 => {
                return Err(bad("COORDINATOR_API_KEY", "must be at least 32 characters"))
            }
            Some(k) => Some(crate::crypto::sha256(k.expose_secret().as_bytes())),
            None => None,
        };
        if !(1..=3600).contains(&self.signature_skew_secs) {
            return Err(bad(
                "COORDINATOR_SIGNATURE_SKEW_SECS",
                "must be between 1 and 3600",
            ));
        }
        if !(1..=100_000).contains(&self.auth_failures_per_minute) {
            return Err(bad(
                "COORDINATOR_AUTH_FAILURES_PER_MINUTE",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=86_400).contains(&self.lease_secs) {
            return Err(bad("COORDINATOR_LEASE_SECS", "must be between 1 and 86400"));
        }
        let events = events_per_job(self.events_per_job)?;
        if !(1..=86_400).contains(&self.token_ttl_secs) {
            return Err(bad(
                "COORDINATOR_TOKEN_TTL_SECS",
                "must be between 1 and 86400",
            ));
        }
        // The rule's own words, not the HTTP error's ("bad request: queue: …").
        crate::jobs::request::validate_queue(&self.webhook_queue, "queue").map_err(
            |e| match e {
                crate::error::ApiError::BadRequest { detail, .. } => {
                    bad("COORDINATOR_WEBHOOK_QUEUE", detail)
                }
                other => bad("COORDINATOR_WEBHOOK_QUEUE", other),
            },
        )?;
        if !(1..=3600).contains(&self.housekeeping_secs) {
            return Err(bad(
                "COORDINATOR_HOUSEKEEPING_SECS",
                "must be between 1 and 3600",
            ));
        }
        let metrics_bind = match self.metrics_bind.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                bad(
                    "COORDINATOR_METRICS_BIND",
                    format!("expected IP:PORT (not a host name), e.g. 127.0.0.1:9090 ({e})"),
                )
            })?),
        };
        if metrics_bind.is_some() && metrics_bind == Some(bind) && bind.port() != 0 {
            return Err(bad(
                "COORDINATOR_METRICS_BIND",
                "must differ from COORDINATOR_BIND",
            ));
        }
        let job_retention = match self.job_retention_days {
            None => None,
            Some(d) if (1..=36_500).contains(&d) => Some(Duration::from_secs(d * 86_400)),
            Some(_) => {
                return Err(bad(
                    "COORDINATOR_JOB_RETENTION_DAYS",
                    "must be between 1 and 36500",
                ))
            }
        };
        let tls = self.tls()?;
        let push = self.push.validate()?;
        let (master_key, master_key_previous) = self.keys.load(self.dev)?;
        Ok(Config {
            dev: self.dev,
            bind,
            db,
            body_limit: self.body_limit,
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
            workers: self.workers,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            request_deadline: Duration::from_millis(self.request_deadline_ms),
            overload_target: Duration::from_millis(self.overload_target_ms),
            max_in_flight: self.max_in_flight,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            master_key,
            master_key_previous,
            bootstrap_api_key,
            require_signature: self.require_signature,
            signature_skew_secs: self.signature_skew_secs,
            auth_failures_per_minute: self.auth_failures_per_minute,
            lease: Duration::from_secs(self.lease_secs),
            events,
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            webhook_queue: self.webhook_queue.clone(),
            housekeeping_interval: Duration::from_secs(self.housekeeping_secs),
            metrics_bind,
            job_retention,
            tls,
            insecure_http: self.insecure_http,
            push,
        })
    }

    fn tls(&self) -> Result<Option<TlsConfig>, ConfigError> {
        let identity = ClientIdentity::parse(&self.tls_client_identity)
            .map_err(|why| bad("COORDINATOR_TLS_CLIENT_IDENTITY", why))?;
        if !(1..=86_400).contains(&self.tls_reload_secs) {
            return Err(bad(
                "COORDINATOR_TLS_RELOAD_SECS",
                "must be between 1 and 86400",
            ));
        }
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.tls_client_ca.is_some() {
                    return Err(bad(
                        "COORDINATOR_TLS_CLIENT_CA",
                        "needs COORDINATOR_TLS_CERT and COORDINATOR_TLS_KEY",
                    ));
                }
                return Ok(None);
            }
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (Some(_), None) => {
                return Err(bad(
                    "COORDINATOR_TLS_KEY",
                    "is required with COORDINATOR_TLS_CERT",
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "COORDINATOR_TLS_CERT",
                    "is required with COORDINATOR_TLS_KEY",
                ))
            }
        };
        if self.insecure_http {
            return Err(bad(
                "COORDINATOR_INSECURE_HTTP",
                "contradicts COORDINATOR_TLS_CERT (HTTPS is on)",
            ));
        }
        Ok(Some(TlsConfig {
            cert,
            key,
            reload_every: Duration::from_secs(self.tls_reload_secs),
            client_ca: self.tls_client_ca.clone(),
            client_identity: identity,
        }))
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
                sqlite_synchronous_full: false,
                allow_newer_schema: false,
            },
            body_limit: 1_048_576,
            body_read_timeout: Duration::from_secs(10),
            workers: 0,
            shutdown_timeout: Duration::from_secs(30),
            request_deadline: Duration::from_secs(3),
            overload_target: Duration::from_millis(5),
            max_in_flight: 32,
            max_connections: 0,
            max_connections_per_peer: 256,
            master_key: Arc::new(MasterKey::generate()),
            master_key_previous: None,
            bootstrap_api_key: None,
            require_signature: false,
            signature_skew_secs: 300,
            auth_failures_per_minute: 30,
            lease: Duration::from_secs(300),
            events: crate::jobs::model::EventBound::default(),
            token_ttl: Duration::from_secs(3600),
            webhook_queue: "issues".to_owned(),
            housekeeping_interval: Duration::from_secs(5),
            metrics_bind: None,
            job_retention: None,
            tls: None,
            insecure_http: false,
            push: crate::jobs::notify::PushLimits::default(),
        }
    }

    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// What these settings add to a job change: its lease and the events it keeps.
    pub fn terms(&self) -> crate::jobs::model::Terms {
        crate::jobs::model::Terms {
            lease_ms: self.lease_ms(),
            events: self.events,
        }
    }

    pub fn dev_dir() -> PathBuf {
        PathBuf::from(DEV_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Review finding (2026-12-06): `COORDINATOR_MAX_STREAMS=32` alone was refused,
    /// naming `COORDINATOR_MAX_STREAMS_PER_CALLER` (its default, 64, above 32).
    #[test]
    fn a_lower_instance_bound_lowers_an_unset_per_caller_one() {
        let push = |waiting, streams, per_caller: Option<usize>| PushArgs {
            max_waiting_claims: waiting,
            max_waiting_claims_per_caller: per_caller,
            max_streams: streams,
            max_streams_per_caller: per_caller,
        };
        let l = push(100, 32, None)
            .validate()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.waiting_per_caller, l.streams_per_caller), (100, 32));
        let l = push(100_000, 100_000, None)
            .validate()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.waiting_per_caller, l.streams_per_caller), (256, 64));
        let l = push(100, 32, Some(8))
            .validate()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((l.waiting_per_caller, l.streams_per_caller), (8, 8));
        // Set above the instance's bound: still refused, naming the variable.
        let e = push(100, 32, Some(40))
            .validate()
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("COORDINATOR_MAX_STREAMS_PER_CALLER")),
            "{e:?}"
        );
    }

    /// `COORDINATOR_EVENTS_PER_JOB`: 16 to 100000 (default 1000), anything else one
    /// line naming the variable; the step of the trim follows from it.
    #[test]
    fn events_per_job_is_bounded() {
        let parse = |value: Option<&str>| {
            let mut argv = vec!["coordinator", "serve", "--database-url", "sqlite://x.db"];
            let flag = value.map(|v| format!("--events-per-job={v}"));
            argv.extend(flag.as_deref());
            let cli = crate::cli::Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
            let crate::cli::Command::Serve(args) = cli.command else {
                panic!("not serve");
            };
            events_per_job(args.events_per_job)
        };
        let default = parse(None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((default.keep(), default.step()), (1000, 62));
        assert_eq!(default, crate::jobs::model::EventBound::default());
        let low = parse(Some("16")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((low.keep(), low.step()), (16, 1));
        let high = parse(Some("100000")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((high.keep(), high.step()), (100_000, 64));
        for bad in ["15", "0", "-1", "100001"] {
            let e = parse(Some(bad)).err().map(|e| e.to_string());
            assert_eq!(
                e.as_deref(),
                Some("invalid COORDINATOR_EVENTS_PER_JOB: must be between 16 and 100000"),
                "{bad}"
            );
        }
    }

    /// A bad `COORDINATOR_WEBHOOK_QUEUE` is one line like every other bad setting:
    /// the variable and the rule, not the HTTP error the same check gives a request
    /// (`invalid COORDINATOR_WEBHOOK_QUEUE: bad request: queue: must be …`).
    #[test]
    fn a_bad_webhook_queue_names_the_variable_and_the_rule() {
        for queue in ["..", "a/b", ""] {
            let cli = crate::cli::Cli::try_parse_from([
                "coordinator",
                "serve",
                "--database-url",
                "sqlite://x.db",
                "--webhook-queue",
                queue,
            ])
            .unwrap_or_else(|e| panic!("{e}"));
            let crate::cli::Command::Serve(args) = cli.command else {
                panic!("not serve");
            };
            let e = args.validate().err().map(|e| e.to_string());
            assert_eq!(
                e.as_deref(),
                Some(
                    "invalid COORDINATOR_WEBHOOK_QUEUE: must be 1-64 characters of letters, \
                     digits, '_', '.' or '-', not only dots"
                ),
                "{queue:?}"
            );
        }
    }

    /// `Debug` of the argument structs (e.g. in a log line or a panic message) never
    /// shows a key or a database password.
    #[test]
    fn debug_redacts_every_secret() {
        let cli = crate::cli::Cli::try_parse_from([
            "coordinator",
            "serve",
            "--database-url",
            "postgres://app:hunter2@db.internal/coordinator",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let crate::cli::Command::Serve(mut args) = cli.command else {
            panic!("not serve");
        };
        args.api_key = Some(SecretString::from("bootstrap-key-0123456789-0123456789"));
        args.keys.master_key = Some(SecretString::from("current-master-key-base64"));
        args.keys.master_key_previous = Some(SecretString::from("previous-master-key-base64"));
        let shown = format!("{args:?}");
        for secret in [
            "hunter2",
            "bootstrap-key",
            "current-master",
            "previous-master",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("postgres://…"), "{shown}");
    }
}
