//! The command line: one clap derive tree; each leaf is a small `run` that loads only
//! what it needs and calls the library.
//!
//! Operator commands print data for scripts on stdout (`KEY=value` lines, tables, or
//! JSON with `--json`) and messages for people on stderr.

/// `println!` for command output: a closed stdout (`… | head`) ends the command
/// quietly instead of panicking. Evaluates to `anyhow::Result<()>`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::common::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod call;
mod caller;
mod client;
mod common;
pub mod dev;
pub mod env_file;
mod jobs;
mod key;
mod secret;
mod sign;
mod token;

use clap::{Parser, Subcommand};

use crate::config::{DbArgs, ServeArgs};

pub use caller::CallerCommand;
pub use key::KeyCommand;
pub use secret::SecretCommand;
pub use token::TokenCommand;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Coordinator jobs and stitcher ingestion behind signed-request authentication"
)]
pub struct Cli {
    /// Read settings from this file instead of ./.env (never from a parent directory).
    /// Refused when another user could have written it.
    #[arg(long, global = true, value_name = "FILE")]
    pub env_file: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (migrates the database first).
    #[command(
        after_help = "Secrets are read from the environment (or .env) only, never \
        from flags, which every local user can see in `ps`: COORDINATOR_MASTER_KEY (or \
        --master-key-file), COORDINATOR_MASTER_KEY_PREVIOUS, COORDINATOR_API_KEY."
    )]
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate(DbArgs),
    /// Manage callers (named internal services) and their scopes.
    #[command(subcommand)]
    Caller(CallerCommand),
    /// Manage sealed HMAC and webhook secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Issue and revoke job tokens; rotate the token-signing key.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the X-Coordinator-* signature headers for a request.
    Sign(sign::SignArgs),
    /// Sign and send a request to COORDINATOR_URL; print the response.
    Call(call::CallArgs),
    /// List, inspect, cancel and redrive jobs over HTTP (credentials as for `call`).
    Jobs(jobs::JobsArgs),
    /// List queues; pause, resume or limit one over HTTP (credentials as for `call`).
    Queues(jobs::QueuesArgs),
}

/// How a command ended: `Config` errors exit with code 2, others with 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Migrate(args) => {
            let cfg = args.validate(None)?;
            let n = crate::db::migrate::run_pending(&cfg)?;
            eprintln!("applied {n} migration(s)");
            Ok(())
        }
        Command::Caller(cmd) => cmd.run().map_err(classify),
        Command::Secret(cmd) => cmd.run().map_err(classify),
        Command::Key(cmd) => cmd.run().map_err(classify),
        Command::Token(cmd) => cmd.run().map_err(classify),
        Command::Sign(args) => sign::run(args).map_err(classify),
        Command::Call(args) => call::run(args).map_err(classify),
        Command::Jobs(args) => args.run().map_err(classify),
        Command::Queues(args) => args.run().map_err(classify),
    }
}

/// A command-line or environment value clap refused, as one line that names the
/// environment variable behind the flag (exit code 2, like every config error).
pub fn describe_parse_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let text = e.to_string();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned();
    // "the following required arguments were not provided:" names them on the next
    // (indented) lines, up to the usage: keep them.
    if first.ends_with(':') {
        let named: Vec<&str> = lines
            .take_while(|l| l.starts_with(' ') || l.starts_with('\t'))
            .map(str::trim)
            .collect();
        if !named.is_empty() {
            first = format!("{first} {}", named.join(", "));
        }
    }
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().map(str::to_owned),
        _ => None,
    };
    // The secrets that used to have flags: say where they go instead.
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
        let name = arg.split(['=', ' ']).next().unwrap_or_default();
        let var = match name {
            "--master-key" => Some("COORDINATOR_MASTER_KEY (or --master-key-file)"),
            "--master-key-previous" => Some("COORDINATOR_MASTER_KEY_PREVIOUS"),
            "--api-key" => Some("COORDINATOR_API_KEY"),
            _ => None,
        };
        if let Some(var) = var {
            return format!(
                "{name} is not accepted: a secret on the command line is visible to every \
                 local user in `ps`; set {var} in the environment or .env instead"
            );
        }
    }
    let env = flag.and_then(|flag| env_of(&<Cli as clap::CommandFactory>::command(), &flag));
    match env {
        Some(var) => format!("{first} (environment variable {var})"),
        None => first,
    }
}

/// The environment variable of the argument whose long flag is `flag` (e.g. `--bind`).
fn env_of(cmd: &clap::Command, flag: &str) -> Option<String> {
    let long = flag.trim_start_matches("--");
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .or_else(|| cmd.get_subcommands().find_map(|sc| env_of(sc, flag)))
}

/// Leaves return `anyhow::Result`; a [`crate::config::ConfigError`] they return keeps
/// its exit code 2.
fn classify(e: anyhow::Error) -> CliError {
    match e.downcast::<crate::config::ConfigError>() {
        Ok(config) => CliError::Config(config),
        Err(other) => CliError::Failed(other),
    }
}

fn serve(args: ServeArgs) -> Result<(), CliError> {
    let _dev_lock = if args.dev {
        crate::config::prepare_dev_dir()?;
        Some(dev::lock_dev_dir()?)
    } else {
        None
    };
    let config = args.validate()?;
    if config.dev {
        dev_bootstrap(&config)?;
    }
    let sys = actix_web::rt::System::new();
    sys.block_on(async move {
        let app = crate::startup::Application::build(config.clone()).await?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        log::info!(
            "listening on {scheme}://{}:{}",
            config.bind.ip(),
            app.port()
        );
        app.run_until_stopped().await?;
        exit_if_stuck(config.shutdown_timeout);
        log::info!("stopped");
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}

/// After the stop and the flush, the runtime waits for its blocking threads. One held
/// in the database client by a server that stopped answering would hold the exit
/// without end, so past one more shutdown timeout the process exits anyway. What such
/// a thread was doing was never acknowledged (its reply was not sent).
fn exit_if_stuck(within: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("exit-watch".into())
        .spawn(move || {
            std::thread::sleep(within);
            log::warn!(
                "database calls still waiting {} s after the stop; exiting",
                within.as_secs()
            );
            log::logger().flush();
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        log::warn!("cannot watch the exit: {e}");
    }
}

/// Migrate, then create (once) and print the dev caller's credentials.
fn dev_bootstrap(config: &crate::config::Config) -> anyhow::Result<()> {
    crate::db::migrate::run_pending(&config.db)?;
    let db = crate::db::Db::new(&config.db);
    let sealer = crate::crypto::seal::Sealer::new(
        (*config.master_key).clone(),
        config.master_key_previous.as_deref().cloned(),
    )?;
    let path = dev::credentials_path();
    // The scheme the listener speaks: `call`, `jobs` and `queues` send the file's
    // credentials only to the file's URL.
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", config.bind);
    match dev::ensure_dev_caller(&db, &sealer, &url, &path)? {
        Some(text) => {
            // Shown once, when created; later starts only point to the file.
            common::write_stdout(format_args!("{text}"))?;
            eprintln!("dev credentials written to {} (0600)", path.display());
        }
        None => {
            keep_dev_url_current(&path, &url)?;
            eprintln!(
                "dev credentials (caller `dev`, every scope) are in {} (0600); load them with \
                 `set -a; . {}; set +a`",
                path.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// A later `serve --dev --bind …` on another address: point the credentials file's
/// `COORDINATOR_URL` at it, since `call` and `sign` send the file's credentials only
/// to the file's URL.
fn keep_dev_url_current(path: &std::path::Path, url: &str) -> anyhow::Result<()> {
    // The file holds the dev credentials: both copies are wiped when dropped.
    let text = std::fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let line = format!("COORDINATOR_URL={url}");
    if text.lines().any(|l| l == line) {
        return Ok(());
    }
    let mut updated = zeroize::Zeroizing::new(String::with_capacity(text.len() + line.len() + 2));
    updated.push_str(&line);
    updated.push('\n');
    for l in text.lines().filter(|l| !l.starts_with("COORDINATOR_URL=")) {
        updated.push_str(l);
        updated.push('\n');
    }
    crate::config::write_private(path, updated.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot update {}: {e}", path.display()))?;
    eprintln!("dev credentials: COORDINATOR_URL is now {url}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    /// `--help` shows an argument's environment value unless told not to: every
    /// variable that can hold a secret (a password in a URL, a key, a token) hides it.
    #[test]
    fn help_never_shows_a_secret_environment_value() {
        fn walk(cmd: &clap::Command, bad: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let Some(var) = a.get_env().map(|v| v.to_string_lossy().into_owned()) else {
                    continue;
                };
                // A URL can carry a password; a path to a key file is fine to show.
                let secret = var == "DATABASE_URL"
                    || var.contains("PASSWORD")
                    || (["_KEY", "_SECRET", "_TOKEN", "_PREVIOUS"]
                        .iter()
                        .any(|end| var.ends_with(end))
                        && var != "COORDINATOR_TLS_KEY");
                if secret && !a.is_hide_env_values_set() {
                    bad.push(format!("{} {var}", cmd.get_name()));
                }
            }
            for sc in cmd.get_subcommands() {
                walk(sc, bad);
            }
        }
        let mut bad = Vec::new();
        walk(&Cli::command(), &mut bad);
        assert!(bad.is_empty(), "shown by --help: {bad:?}");
    }
}
