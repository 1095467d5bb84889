//! `coordinator secret create|rotate|list|revoke|rewrap`: sealed HMAC and webhook
//! secrets. Plaintext is printed once, by `create` and `rotate`. `list` shows each
//! secret's display prefix (its first characters, as an API key's prefix) when the
//! master key is at hand, so an operator can tell which secret a client holds; never
//! more of a secret than that.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::common::{after, cell_time, json_time, print_json, print_table, rfc3339};
use super::common::{parse_duration, parse_positive_duration, store_error};
use super::common::{undelivered, write_secret, write_secret_json, OutputArgs, StoreArgs};
use crate::auth::credentials::{self, IssuedSecret, SecretKind};
use crate::auth::model::{Purpose, SecretRow};
use crate::config::{ConfigError, KeyArgs};
use crate::db::{now_millis, Db};

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Issue a new secret version for a caller (printed once).
    Create(CreateArgs),
    /// Issue version N+1 and let older versions expire after a grace period.
    Rotate(RotateArgs),
    /// List secret versions and their state (never the secret itself).
    List(ListArgs),
    /// Revoke one secret version at once.
    Revoke(RevokeArgs),
    /// Re-seal every stored secret under the current master key (after a key change).
    Rewrap(RewrapArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The caller's name.
    pub caller: String,
    /// Which secret: `hmac` (request signing) or `webhook` (Standard Webhooks).
    #[arg(long, value_enum, default_value = "hmac")]
    pub kind: SecretKind,
    /// Lifetime of the new version, e.g. 30d (default: no expiry).
    #[arg(long, value_parser = parse_positive_duration)]
    pub expires_in: Option<Duration>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The caller's name.
    pub caller: String,
    /// Which secret: `hmac` or `webhook`.
    #[arg(long, value_enum, default_value = "hmac")]
    pub kind: SecretKind,
    /// How long older versions stay valid, e.g. 24h (0s: they stop at once).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub grace: Duration,
    /// Lifetime of the new version (default: no expiry).
    #[arg(long, value_parser = parse_positive_duration)]
    pub expires_in: Option<Duration>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this caller's secrets.
    pub caller: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// With a master key, each secret's display prefix is shown too.
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The caller's name.
    pub caller: String,
    /// The version to revoke (see `secret list`).
    #[arg(value_parser = clap::value_parser!(i32).range(1..))]
    pub version: i32,
    /// Which secret: `hmac` or `webhook`.
    #[arg(long, value_enum, default_value = "hmac")]
    pub kind: SecretKind,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RewrapArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl SecretCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            SecretCommand::Create(a) => create(a),
            SecretCommand::Rotate(a) => rotate(a),
            SecretCommand::List(a) => list(a),
            SecretCommand::Revoke(a) => revoke(a),
            SecretCommand::Rewrap(a) => rewrap(a),
        }
    }
}

/// The kind column of a stored row (`hmac`, `webhook`, or the purpose as stored).
fn row_kind(row: &SecretRow) -> &str {
    if row.purpose == Purpose::HmacSecret.as_str() {
        "hmac"
    } else if row.purpose == Purpose::WebhookSecret.as_str() {
        "webhook"
    } else {
        &row.purpose
    }
}

fn row_status(row: &SecretRow, now: i64) -> &'static str {
    if row.revoked_at.is_some() {
        "revoked"
    } else if row.is_active(now) {
        "active"
    } else {
        "expired"
    }
}

/// Print a freshly issued secret: `KEY=value` lines (or JSON), shown this once, in
/// one write. A failed write leaves the new version revoked (see [`undelivered`]).
fn print_issued(
    db: &Db,
    issued: &IssuedSecret,
    kind: SecretKind,
    older_expire_at: Option<i64>,
    json: bool,
    again: &str,
) -> anyhow::Result<()> {
    let written = if json {
        write_secret_json(&json!({
            "caller": issued.caller,
            "kind": kind.name(),
            "version": issued.version,
            "secret": issued.plaintext.as_str(),
            "expiresAt": json_time(issued.expires_at),
            "olderVersionsExpireAt": json_time(older_expire_at),
        }))?
    } else {
        let (secret_var, version_var) = match kind {
            SecretKind::Hmac => ("COORDINATOR_HMAC_SECRET", "COORDINATOR_KEY_VERSION"),
            SecretKind::Webhook => (
                "COORDINATOR_WEBHOOK_SECRET",
                "COORDINATOR_WEBHOOK_SECRET_VERSION",
            ),
        };
        write_secret(&zeroize::Zeroizing::new(format!(
            "COORDINATOR_CALLER={}\n{secret_var}={}\n{version_var}={}\n",
            issued.caller,
            issued.plaintext.as_str(),
            issued.version
        )))
    };
    written.map_err(|e| {
        let what = format!(
            "{} secret version {} of `{}`",
            kind.name(),
            issued.version,
            issued.caller
        );
        let err = undelivered(
            &e,
            &what,
            || {
                credentials::revoke_secret(db, &issued.caller, kind, issued.version)
                    .map_err(|e| store_error(e, &what))
            },
            &format!(
                "coordinator secret revoke {} {}{}",
                issued.caller,
                issued.version,
                kind.flag()
            ),
            again,
        );
        match older_expire_at.filter(|_| issued.version > 1) {
            Some(t) if t <= now_millis() => anyhow::anyhow!(
                "{err:#}; the older versions stopped working when it was created (--grace 0s)"
            ),
            Some(t) => anyhow::anyhow!(
                "{err:#}; the older versions still expire at {}, as this rotation set",
                rfc3339(t)
            ),
            None => err,
        }
    })
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    let sealer = args.store.sealer(&args.keys)?;
    let db = args.store.open()?;
    let issued =
        credentials::add_secret(&db, &sealer, &args.caller, args.kind, None, args.expires_in)
            .map_err(|e| store_error(e, format!("caller `{}`", args.caller)))?;
    if !args.output.json {
        eprintln!(
            "issued {} secret version {} for `{}`{}; it is shown only this once",
            args.kind.name(),
            issued.version,
            issued.caller,
            issued
                .expires_at
                .map(|t| format!(" (expires {})", rfc3339(t)))
                .unwrap_or_default(),
        );
    }
    let again = format!(
        "coordinator secret create {}{}{}",
        issued.caller,
        args.kind.flag(),
        args.expires_in
            .map(|d| format!(" --expires-in {}s", d.as_secs()))
            .unwrap_or_default()
    );
    print_issued(&db, &issued, args.kind, None, args.output.json, &again)
}

pub fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let sealer = args.store.sealer(&args.keys)?;
    let db = args.store.open()?;
    let issued = credentials::add_secret(
        &db,
        &sealer,
        &args.caller,
        args.kind,
        Some(args.grace),
        args.expires_in,
    )
    .map_err(|e| store_error(e, format!("caller `{}`", args.caller)))?;
    let until = after(args.grace);
    if !args.output.json {
        eprintln!(
            "issued {} secret version {} for `{}`; it is shown only this once",
            args.kind.name(),
            issued.version,
            issued.caller,
        );
    }
    let again = format!(
        "coordinator secret rotate {}{} --grace {}s{}",
        issued.caller,
        args.kind.flag(),
        args.grace.as_secs(),
        args.expires_in
            .map(|d| format!(" --expires-in {}s", d.as_secs()))
            .unwrap_or_default()
    );
    print_issued(
        &db,
        &issued,
        args.kind,
        Some(until),
        args.output.json,
        &again,
    )?;
    if !args.output.json && issued.version > 1 {
        if args.grace.is_zero() {
            eprintln!(
                "older versions stopped working now (--grace 0s); deploy the new secret to \
                 the client, whose requests are refused until then"
            );
        } else {
            eprintln!(
                "older versions stay valid until {} at the latest; deploy the new secret to \
                 the client, then `coordinator secret revoke {} {}{}`",
                rfc3339(until),
                issued.caller,
                issued.version.saturating_sub(1),
                args.kind.flag(),
            );
        }
    }
    Ok(())
}

/// How many characters after the `coh_` / `whsec_` prefix a display prefix shows.
const PREFIX_CHARS: usize = 4;

/// A secret's display prefix: its kind prefix and the next [`PREFIX_CHARS`]
/// characters (`coh_AbCd`), as `call --explain` shows the client's.
pub fn display_prefix(secret: &str) -> String {
    let kind = if secret.starts_with("whsec_") { 6 } else { 4 };
    secret.chars().take(kind + PREFIX_CHARS).collect()
}

/// Each row's display prefix, when a master key is configured (or `--dev`): `None`
/// for rows it cannot open, and for token-signing keys, which are not text.
fn prefixes(args: &ListArgs, rows: &[SecretRow]) -> anyhow::Result<Option<Vec<Option<String>>>> {
    let configured =
        args.store.dev || args.keys.master_key.is_some() || args.keys.master_key_file.is_some();
    if !configured {
        return Ok(None);
    }
    let sealer = args.store.sealer(&args.keys)?;
    // A stray master key opens nothing: say so, or every PREFIX is `-` as if the
    // secrets had none (sixth security review, 2026-12-07).
    let now = now_millis();
    let mut unknown: Vec<&str> = rows
        .iter()
        .filter(|r| r.is_active(now) && !sealer.knows_key_id(&r.master_key_id))
        .map(|r| r.master_key_id.as_str())
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    if !unknown.is_empty() {
        eprintln!(
            "note: this command's master key ({}) is not the one active secrets are sealed \
             under ({}), so their PREFIX is `-`; check COORDINATOR_MASTER_KEY / \
             COORDINATOR_MASTER_KEY_FILE",
            sealer.current_key_id(),
            unknown.join(", ")
        );
    }
    Ok(Some(
        rows.iter()
            .map(|row| {
                let purpose = crate::auth::model::purpose_from_str(&row.purpose)?;
                if purpose == Purpose::TokenSigning {
                    return None;
                }
                let plain = sealer
                    .open(purpose, &row.caller, row.version, &row.sealed())
                    .ok()?;
                std::str::from_utf8(&plain).ok().map(display_prefix)
            })
            .collect(),
    ))
}

fn row_json(row: &SecretRow, now: i64, prefix: Option<&str>) -> Value {
    json!({
        "caller": row.caller,
        "kind": row_kind(row),
        "version": row.version,
        "prefix": prefix,
        "status": row_status(row, now),
        "masterKeyId": row.master_key_id,
        "createdAt": json_time(Some(row.created_at)),
        "expiresAt": json_time(row.expires_at),
        "revokedAt": json_time(row.revoked_at),
        "lastUsedAt": json_time(row.last_used_at),
    })
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    let rows = credentials::list_secrets(&db, args.caller.as_deref())
        .map_err(|e| store_error(e, "secrets"))?;
    let now = now_millis();
    let prefixes = prefixes(&args, &rows)?;
    let prefix_of = |i: usize| -> Option<&str> {
        prefixes
            .as_ref()
            .and_then(|p| p.get(i))
            .and_then(|p| p.as_deref())
    };
    if prefixes.is_none() && !args.output.json {
        eprintln!("(PREFIX needs the master key: set COORDINATOR_MASTER_KEY or --master-key-file)");
    }
    if args.output.json {
        return print_json(&Value::Array(
            rows.iter()
                .enumerate()
                .map(|(i, r)| row_json(r, now, prefix_of(i)))
                .collect(),
        ));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![
                r.caller.clone(),
                row_kind(r).to_owned(),
                r.version.to_string(),
                prefix_of(i).unwrap_or("-").to_owned(),
                row_status(r, now).to_owned(),
                r.master_key_id.clone(),
                cell_time(Some(r.created_at)),
                cell_time(r.expires_at),
                cell_time(r.revoked_at),
                cell_time(r.last_used_at),
            ]
        })
        .collect();
    print_table(
        &[
            "CALLER",
            "KIND",
            "VERSION",
            "PREFIX",
            "STATUS",
            "MASTER_KEY",
            "CREATED",
            "EXPIRES",
            "REVOKED",
            "LAST_USED",
        ],
        &table,
    )
}

pub fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    let what = format!(
        "active {} secret version {} of `{}`",
        args.kind.name(),
        args.version,
        args.caller
    );
    credentials::revoke_secret(&db, &args.caller, args.kind, args.version)
        .map_err(|e| store_error(e, &what))?;
    let now = now_millis();
    let purpose = args.kind.purpose().as_str();
    let remaining = credentials::list_secrets(&db, Some(&args.caller))
        .map_err(|e| store_error(e, "secrets"))?
        .iter()
        .filter(|r| r.purpose == purpose && r.is_active(now))
        .count();
    if args.output.json {
        return print_json(&json!({
            "caller": args.caller,
            "kind": args.kind.name(),
            "version": args.version,
            "revoked": true,
            "activeVersionsLeft": remaining,
        }));
    }
    eprintln!(
        "revoked {} secret version {} of `{}`",
        args.kind.name(),
        args.version,
        args.caller
    );
    if remaining == 0 {
        eprintln!(
            "warning: `{}` has no active {} secret left",
            args.caller,
            args.kind.name()
        );
    }
    Ok(())
}

pub fn rewrap(args: RewrapArgs) -> anyhow::Result<()> {
    let sealer = args.store.sealer(&args.keys)?;
    let db = args.store.open()?;
    // Refuse up front when some rows name a key we do not hold: a config problem.
    // Only active rows count: a revoked or expired one under a key nobody holds is left.
    let rows = credentials::list_secrets(&db, None).map_err(|e| store_error(e, "secrets"))?;
    let now = crate::db::now_millis();
    let mut unknown: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| r.is_active(now) && !sealer.knows_key_id(&r.master_key_id))
    {
        *unknown.entry(r.master_key_id.as_str()).or_default() += 1;
    }
    if !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|(id, n)| format!("{id} ({n} rows)"))
            .collect();
        return Err(ConfigError(format!(
            "COORDINATOR_MASTER_KEY_PREVIOUS must be the key the rows were sealed with: \
             unknown master key id(s) {}; current is {}, previous is {}",
            list.join(", "),
            sealer.current_key_id(),
            sealer
                .previous_key_id()
                .unwrap_or_else(|| "not set".to_owned()),
        ))
        .into());
    }
    let done = credentials::rewrap(&db, &sealer).map_err(|e| store_error(e, "rewrap"))?;
    let n = done.rows;
    let current = sealer.current_key_id();
    if args.output.json {
        return print_json(&json!({
            "rewrapped": n,
            "rows": rows.len(),
            "leftInactive": done.left_inactive,
            "masterKeyId": current,
        }));
    }
    if done.left_inactive > 0 {
        eprintln!(
            "left {} revoked or expired row(s) sealed under a master key not given here \
             (nothing opens them again)",
            done.left_inactive
        );
    }
    eprintln!(
        "re-sealed {n} of {} row(s) under master key {current}; \
         COORDINATOR_MASTER_KEY_PREVIOUS is no longer needed once every instance runs \
         with the new key (restart any still running with only the old one)",
        rows.len()
    );
    outln!("REWRAPPED={n}")?;
    outln!("MASTER_KEY_ID={current}")?;
    Ok(())
}
