//! `coordinator key issue|list|revoke`: hashed API keys. The key is printed once, by
//! `issue`; `list` shows the display prefix and id, never the key or its hash.

use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::caller::{parse_scopes, Scopes};
use super::common::{cell_time, json_time, print_json, print_table, rfc3339, store_error};
use super::common::{parse_positive_duration, OutputArgs, StoreArgs};
use super::common::{undelivered, write_secret, write_secret_json};
use crate::auth::credentials;
use crate::auth::model::ApiKeyRow;
use crate::auth::Scope;
use crate::db::now_millis;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Issue an API key for a caller (printed once).
    Issue(IssueArgs),
    /// List API keys: prefix, id, scopes, dates (never the key or its hash).
    List(ListArgs),
    /// Revoke an API key by id or by its 8-character display prefix.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The caller's name.
    pub caller: String,
    /// The key's scopes, a subset of the caller's (default: all of the caller's).
    #[arg(long, value_parser = parse_scopes)]
    pub scopes: Option<Scopes>,
    /// Lifetime, e.g. 90d (default: no expiry).
    #[arg(long, value_parser = parse_positive_duration)]
    pub expires_in: Option<Duration>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this caller's keys.
    pub caller: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key id (UUID) or its display prefix (`cok_` + 4 characters).
    pub id_or_prefix: String,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

impl KeyCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            KeyCommand::Issue(a) => issue(a),
            KeyCommand::List(a) => list(a),
            KeyCommand::Revoke(a) => revoke(a),
        }
    }
}

fn key_status(row: &ApiKeyRow, now: i64) -> &'static str {
    if row.revoked_at.is_some() {
        "revoked"
    } else if row.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    }
}

/// A key row for output: every column except the hash.
fn key_json(row: &ApiKeyRow, now: i64) -> Value {
    let scopes: Vec<&str> = row.scopes.split(',').filter(|s| !s.is_empty()).collect();
    json!({
        "id": row.id,
        "prefix": row.display_prefix,
        "caller": row.caller,
        "scopes": scopes,
        "status": key_status(row, now),
        "createdAt": json_time(Some(row.created_at)),
        "expiresAt": json_time(row.expires_at),
        "revokedAt": json_time(row.revoked_at),
        "lastUsedAt": json_time(row.last_used_at),
    })
}

pub fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    let what = format!("caller `{}`", args.caller);
    let Some(caller) =
        credentials::find_caller(&db, &args.caller).map_err(|e| store_error(e, &what))?
    else {
        bail!("{what} not found");
    };
    // A key never carries more than its caller: the verifier would drop the extra
    // scopes anyway, so refuse them here rather than issue a misleading key.
    if let Some(Scopes(wanted)) = &args.scopes {
        let held = caller.scope_list();
        let extra: Vec<Scope> = wanted
            .iter()
            .copied()
            .filter(|s| !held.contains(s))
            .collect();
        if !extra.is_empty() {
            bail!(
                "{what} does not hold {}; its scopes are {}",
                Scope::join(&extra),
                caller.scopes
            );
        }
    }
    if caller.disabled_at.is_some() {
        eprintln!("warning: {what} is disabled; requests with this key will be refused");
    }
    let issued = credentials::issue_key(
        &db,
        &args.caller,
        args.scopes.as_ref().map(|s| s.0.as_slice()),
        args.expires_in,
    )
    .map_err(|e| store_error(e, &what))?;
    let row = &issued.row;
    let written = if args.output.json {
        let mut v = key_json(row, now_millis());
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "key".into(),
                Value::String(issued.key.expose_secret().into()),
            );
        }
        write_secret_json(&v)?
    } else {
        eprintln!(
            "issued API key {} ({}) for `{}` with scopes {}{}; it is shown only this once",
            row.display_prefix,
            row.id,
            row.caller,
            row.scopes,
            row.expires_at
                .map(|t| format!(", expires {}", rfc3339(t)))
                .unwrap_or_default(),
        );
        write_secret(&zeroize::Zeroizing::new(format!(
            "COORDINATOR_CLIENT_API_KEY={}\nCOORDINATOR_KEY_ID={}\n",
            issued.key.expose_secret(),
            row.id
        )))
    };
    // Stored but not delivered: nobody holds the key, so it must not stay usable.
    written.map_err(|e| {
        let mut again = format!("coordinator key issue {}", row.caller);
        if let Some(Scopes(s)) = &args.scopes {
            again.push_str(&format!(" --scopes {}", Scope::join(s)));
        }
        if let Some(d) = args.expires_in {
            again.push_str(&format!(" --expires-in {}s", d.as_secs()));
        }
        undelivered(
            &e,
            &format!(
                "API key {} (id {}) of `{}`",
                row.display_prefix, row.id, row.caller
            ),
            || {
                credentials::revoke_key(&db, &row.id)
                    .map(drop)
                    .map_err(|e| store_error(e, "API key"))
            },
            &format!("coordinator key revoke {}", row.id),
            &again,
        )
    })
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let db = args.store.open()?;
    let rows = credentials::list_keys(&db, args.caller.as_deref())
        .map_err(|e| store_error(e, "API keys"))?;
    let now = now_millis();
    if args.output.json {
        return print_json(&Value::Array(
            rows.iter().map(|r| key_json(r, now)).collect(),
        ));
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.display_prefix.clone(),
                r.id.clone(),
                r.caller.clone(),
                key_status(r, now).to_owned(),
                r.scopes.clone(),
                cell_time(Some(r.created_at)),
                cell_time(r.expires_at),
                cell_time(r.revoked_at),
                cell_time(r.last_used_at),
            ]
        })
        .collect();
    print_table(
        &[
            "PREFIX",
            "ID",
            "CALLER",
            "STATUS",
            "SCOPES",
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
    let row = credentials::revoke_key(&db, &args.id_or_prefix)
        .map_err(|e| store_error(e, format!("API key `{}`", args.id_or_prefix)))?;
    if args.output.json {
        return print_json(&json!({
            "id": row.id,
            "prefix": row.display_prefix,
            "caller": row.caller,
            "revoked": true,
        }));
    }
    eprintln!(
        "revoked API key {} ({}) of `{}`",
        row.display_prefix, row.id, row.caller
    );
    Ok(())
}
