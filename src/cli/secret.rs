//! `coordinator secret create|rotate|list|revoke|rewrap`: sealed HMAC and webhook
//! secrets. Plaintext is printed once, by `create` and `rotate`; `list` never opens a
//! seal.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::common::{after, cell_time, json_time, print_json, print_table, rfc3339};
use super::common::{parse_duration, parse_positive_duration, store_error};
use super::common::{OutputArgs, StoreArgs};
use crate::auth::admin::{self, IssuedSecret, SecretKind};
use crate::auth::model::{Purpose, SecretRow};
use crate::config::{ConfigError, KeyArgs};
use crate::db::now_millis;

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

fn kind_name(kind: SecretKind) -> &'static str {
    match kind {
        SecretKind::Hmac => "hmac",
        SecretKind::Webhook => "webhook",
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

/// Print a freshly issued secret: `KEY=value` lines (or JSON), shown this once.
fn print_issued(
    issued: &IssuedSecret,
    kind: SecretKind,
    older_expire_at: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({
            "caller": issued.caller,
            "kind": kind_name(kind),
            "version": issued.version,
            "secret": issued.plaintext.as_str(),
            "expiresAt": json_time(issued.expires_at),
            "olderVersionsExpireAt": json_time(older_expire_at),
        }));
    }
    let (secret_var, version_var) = match kind {
        SecretKind::Hmac => ("COORDINATOR_HMAC_SECRET", "COORDINATOR_KEY_VERSION"),
        SecretKind::Webhook => (
            "COORDINATOR_WEBHOOK_SECRET",
            "COORDINATOR_WEBHOOK_SECRET_VERSION",
        ),
    };
    outln!("COORDINATOR_CALLER={}", issued.caller)?;
    outln!("{secret_var}={}", issued.plaintext.as_str())?;
    outln!("{version_var}={}", issued.version)?;
    Ok(())
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    let sealer = args.store.sealer(&args.keys)?;
    let db = args.store.open()?;
    let issued = admin::add_secret(&db, &sealer, &args.caller, args.kind, None, args.expires_in)
        .map_err(|e| store_error(e, format!("caller `{}`", args.caller)))?;
    if !args.output.json {
        eprintln!(
            "issued {} secret version {} for `{}`{}; it is shown only this once",
            kind_name(args.kind),
            issued.version,
            issued.caller,
            issued
                .expires_at
                .map(|t| format!(" (expires {})", rfc3339(t)))
                .unwrap_or_default(),
        );
    }
    print_issued(&issued, args.kind, None, args.output.json)
}

pub fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let sealer = args.store.sealer(&args.keys)?;
    let db = args.store.open()?;
    let issued = admin::add_secret(
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
            kind_name(args.kind),
            issued.version,
            issued.caller,
        );
        if issued.version > 1 {
            eprintln!(
                "older versions stay valid until {} at the latest; deploy the new secret to \
                 the client, then `coordinator secret revoke {} {}{}`",
                rfc3339(until),
                issued.caller,
                issued.version.saturating_sub(1),
                match args.kind {
                    SecretKind::Hmac => "",
                    SecretKind::Webhook => " --kind webhook",
                },
            );
        }
    }
    print_issued(&issued, args.kind, Some(until), args.output.json)
}

fn row_json(row: &SecretRow, now: i64) -> Value {
    json!({
        "caller": row.caller,
        "kind": row_kind(row),
        "version": row.version,
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
    let rows =
        admin::list_secrets(&db, args.caller.as_deref()).map_err(|e| store_error(e, "secrets"))?;
    let now = now_millis();
    if args.output.json {
        return print_json(&Value::Array(
            rows.iter().map(|r| row_json(r, now)).collect(),
        ));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.caller.clone(),
                row_kind(r).to_owned(),
                r.version.to_string(),
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
        kind_name(args.kind),
        args.version,
        args.caller
    );
    admin::revoke_secret(&db, &args.caller, args.kind, args.version)
        .map_err(|e| store_error(e, &what))?;
    let now = now_millis();
    let purpose = args.kind.purpose().as_str();
    let remaining = admin::list_secrets(&db, Some(&args.caller))
        .map_err(|e| store_error(e, "secrets"))?
        .iter()
        .filter(|r| r.purpose == purpose && r.is_active(now))
        .count();
    if args.output.json {
        return print_json(&json!({
            "caller": args.caller,
            "kind": kind_name(args.kind),
            "version": args.version,
            "revoked": true,
            "activeVersionsLeft": remaining,
        }));
    }
    eprintln!(
        "revoked {} secret version {} of `{}`",
        kind_name(args.kind),
        args.version,
        args.caller
    );
    if remaining == 0 {
        eprintln!(
            "warning: `{}` has no active {} secret left",
            args.caller,
            kind_name(args.kind)
        );
    }
    Ok(())
}

pub fn rewrap(args: RewrapArgs) -> anyhow::Result<()> {
    let sealer = args.store.sealer(&args.keys)?;
    let db = args.store.open()?;
    // Refuse up front when some rows name a key we do not hold: a config problem.
    let rows = admin::list_secrets(&db, None).map_err(|e| store_error(e, "secrets"))?;
    let mut unknown: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows
        .iter()
        .filter(|r| !sealer.knows_key_id(&r.master_key_id))
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
    let n = admin::rewrap(&db, &sealer).map_err(|e| store_error(e, "rewrap"))?;
    let current = sealer.current_key_id();
    if args.output.json {
        return print_json(&json!({
            "rewrapped": n,
            "rows": rows.len(),
            "masterKeyId": current,
        }));
    }
    eprintln!(
        "re-sealed {n} of {} row(s) under master key {current}; \
         COORDINATOR_MASTER_KEY_PREVIOUS is no longer needed",
        rows.len()
    );
    outln!("REWRAPPED={n}")?;
    outln!("MASTER_KEY_ID={current}")?;
    Ok(())
}
