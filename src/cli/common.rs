//! Pieces the operator commands share: database and master-key loading, `--json`
//! output, durations, timestamps and tables.
//!
//! Output convention: data meant for scripts goes to stdout (`KEY=value` lines, tables,
//! or one JSON document with `--json`); messages meant for people go to stderr.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::Value;

use crate::config::{ConfigError, DbArgs, DbConfig, KeyArgs, DEV_DATABASE_URL};
use crate::crypto::seal::Sealer;
use crate::db::{migrate, Backend, ConnectionManager, Db};
use crate::error::StoreError;

/// `--json`, taken by every operator command.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Print one machine-readable JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The database an operator command works on.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Use the `serve --dev` state: SQLite database and master key under ./.coordinator/.
    #[arg(long)]
    pub dev: bool,

    #[command(flatten)]
    pub db: DbArgs,
}

impl StoreArgs {
    /// Validate the database settings (a bad value is a config error, exit code 2).
    pub fn config(&self) -> Result<DbConfig, ConfigError> {
        if self.dev {
            // Like `serve --dev`: always the dev database, whatever DATABASE_URL says.
            if self.db.database_url.is_some() {
                eprintln!("coordinator: --dev ignores DATABASE_URL and uses {DEV_DATABASE_URL}");
            }
            let dev = crate::config::DbArgs {
                database_url: None,
                ..self.db.clone()
            };
            return dev.validate(Some(DEV_DATABASE_URL));
        }
        if self
            .db
            .database_url
            .as_deref()
            .is_none_or(|u| u.trim().is_empty())
        {
            return Err(ConfigError(
                "DATABASE_URL is not set (use --database-url, or add --dev to work on the \
                 `serve --dev` state in ./.coordinator/)"
                    .into(),
            ));
        }
        self.db.validate(None)
    }

    /// Validate, then connect. With `--dev` pending migrations are applied (as
    /// `serve --dev` does); otherwise a database that is missing or not migrated is
    /// refused with a pointer to `coordinator migrate`, so an operator command never
    /// creates or changes a schema by surprise.
    pub fn open(&self) -> anyhow::Result<Db> {
        let cfg = self.config()?;
        if self.dev {
            // Run in another directory than `serve --dev`, the command would act on a
            // new state no server reads: say so (the command itself goes on).
            let dir = crate::config::Config::dev_dir();
            if !dir.exists() {
                eprintln!(
                    "note: created a new dev state in {} (no `serve --dev` has run in this \
                     directory); a `serve --dev` running elsewhere does not see it",
                    dir.display()
                );
            }
            crate::config::prepare_dev_dir()?;
            migrate::run_pending(&cfg)?;
        } else {
            ensure_migrated(&cfg)?;
        }
        Ok(Db::new(&cfg))
    }

    /// The sealer for commands that seal or open secrets; `--dev` uses (and creates,
    /// 0600) `./.coordinator/master.key` when no key is configured.
    pub fn sealer(&self, keys: &KeyArgs) -> anyhow::Result<Sealer> {
        let (current, previous) = keys.load(self.dev)?;
        Sealer::new((*current).clone(), previous.as_deref().cloned())
            .map_err(|e| anyhow!("cannot derive the sealing keys: {e}"))
    }
}

fn ensure_migrated(cfg: &DbConfig) -> anyhow::Result<()> {
    if cfg.url.backend() == Backend::Sqlite && !Path::new(cfg.url.target()).exists() {
        bail!(
            "database file {} does not exist; run `coordinator migrate` first",
            cfg.url.target()
        );
    }
    let mut conn = ConnectionManager::new(cfg)
        .establish()
        .map_err(|e| anyhow!("cannot connect to the database: {e}"))?;
    let pending = migrate::has_pending(&mut conn)
        .map_err(|e| anyhow!("cannot read the database's migration state: {e}"))?;
    if pending {
        bail!("the database has pending migrations; run `coordinator migrate` first");
    }
    // A database a newer release migrated is refused as `serve` refuses it.
    migrate::refuse_newer(&mut conn, cfg.allow_newer_schema)
}

/// A store error as an operator message; `what` names the thing looked up.
pub fn store_error(e: StoreError, what: impl std::fmt::Display) -> anyhow::Error {
    match e {
        StoreError::NotFound => anyhow!("{what} not found"),
        StoreError::Conflict(why) => anyhow!("{why}"),
        other => anyhow::Error::new(other).context(format!("{what}")),
    }
}

/// Write command output; a reader that went away (`EPIPE`) is not an error.
pub fn write_stdout(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

/// Write output that holds a secret shown only this once, all of it in one write.
/// Unlike [`write_stdout`], a reader that went away (`EPIPE`) is an error: the secret
/// did not arrive anywhere.
pub fn write_secret(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush())
}

/// [`write_secret`] of one JSON document.
pub fn write_secret_json(value: &Value) -> anyhow::Result<std::io::Result<()>> {
    let text = zeroize::Zeroizing::new(
        serde_json::to_string_pretty(value).context("cannot encode JSON output")? + "\n",
    );
    Ok(write_secret(&text))
}

/// A credential that was stored but whose secret could not be written (`e`): nobody
/// has it, so `revoke` it and say so, naming it (never its secret) and how to get a
/// new one. When revoking fails too, give the exact command to revoke it by hand.
/// `what` names the credential, e.g. "API key cok_AbCd (id …) of `svc`".
pub fn undelivered(
    e: &std::io::Error,
    what: &str,
    revoke: impl FnOnce() -> anyhow::Result<()>,
    revoke_command: &str,
    again_command: &str,
) -> anyhow::Error {
    match revoke() {
        Ok(()) => anyhow!(
            "cannot write the secret to stdout ({e}); {what} was created but not delivered, \
             so it has been revoked; issue a new one with `{again_command}`"
        ),
        Err(why) => anyhow!(
            "cannot write the secret to stdout ({e}); {what} was created but not delivered \
             and is STILL ACTIVE (revoking it failed: {why:#}): revoke it with \
             `{revoke_command}`, then issue a new one with `{again_command}`"
        ),
    }
}

/// Print one JSON document on stdout.
pub fn print_json(value: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode JSON output")?;
    outln!("{text}")
}

/// Unix milliseconds as RFC 3339 UTC (seconds precision).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// An optional timestamp for a table cell (`-` when absent).
pub fn cell_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), rfc3339)
}

/// An optional timestamp for JSON (`null` when absent).
pub fn json_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |m| Value::String(rfc3339(m)))
}

/// Text the server sent, made safe to print on a terminal: every control character
/// (C0, DEL, C1: escape sequences, carriage returns, line breaks) and every Unicode
/// bidirectional override becomes `?`. A job's `message` and `error` are written by
/// whoever holds its job token; printed as they came, an `ESC ]52` sequence would set
/// the operator's clipboard, a `\r` or `ESC [2K` overwrite what the table shows.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// Print rows as left-aligned columns on stdout.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{}", out.trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// Parse `30d`, `24h`, `15m`, `90s` or `2w` (a whole number and one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit: s, m, h, d or w (e.g. 24h)"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("`{text}` must start with a whole number (e.g. 30d): {e}"))?;
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("unknown unit `{unit}`: use s, m, h, d or w")),
    };
    // Ten years is plenty and keeps every later addition far from overflow.
    const MAX_SECS: u64 = 10 * 366 * 86_400;
    match n.checked_mul(unit_secs) {
        Some(secs) if secs <= MAX_SECS => Ok(Duration::from_secs(secs)),
        _ => Err(format!("`{text}` is longer than ten years")),
    }
}

/// Like [`parse_duration`] but refuses zero (an expiry of "now" is a revoke).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

/// `now + d` as unix milliseconds, for messages.
pub fn after(d: Duration) -> i64 {
    crate::db::now_millis().saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        for bad in [
            "",
            "30",
            "d",
            "1.5h",
            "-1h",
            "1y",
            "1 h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("3700d").is_err());
        assert!(parse_positive_duration("0h").is_err());
        assert!(parse_positive_duration("1h").is_ok());
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(cell_time(None), "-");
        assert_eq!(json_time(None), Value::Null);
    }
}
