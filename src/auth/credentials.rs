//! Operator actions on credentials (used by the CLI, `serve --dev` and tests). Each
//! change bumps the auth generation so every instance drops its cache within a second.
//! Plaintext credentials are returned exactly once, at issue. (The admin HTTP route is
//! `http::admin`; this module has no HTTP side.)

use std::time::Duration;

use super::model::{ApiKeyRow, CallerRow, Purpose, SecretRow};
use super::store::MAX_VERSIONS_TRIED;
use super::{repo, Scope};
use crate::crypto::credential::{ApiKey, HmacSecret, WebhookSecret};
use crate::crypto::seal::Sealer;
use crate::db::{now_millis, Db};
use crate::error::StoreError;
use diesel::Connection;

/// Which kind of secret an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretKind {
    Hmac,
    Webhook,
}

impl SecretKind {
    /// As the CLI names it: `hmac`, `webhook`.
    pub fn name(self) -> &'static str {
        match self {
            SecretKind::Hmac => "hmac",
            SecretKind::Webhook => "webhook",
        }
    }

    /// The CLI flag that selects it (none for the default, HMAC).
    pub fn flag(self) -> &'static str {
        match self {
            SecretKind::Hmac => "",
            SecretKind::Webhook => " --kind webhook",
        }
    }

    pub fn purpose(self) -> Purpose {
        match self {
            SecretKind::Hmac => Purpose::HmacSecret,
            SecretKind::Webhook => Purpose::WebhookSecret,
        }
    }
}

/// A newly issued secret: shown once.
pub struct IssuedSecret {
    pub caller: String,
    pub version: i32,
    pub plaintext: zeroize::Zeroizing<String>,
    pub expires_at: Option<i64>,
}

/// A newly issued API key: shown once.
pub struct IssuedKey {
    pub row: ApiKeyRow,
    pub key: ApiKey,
}

fn validate_name(name: &str) -> Result<(), StoreError> {
    if name == super::api_key::BOOTSTRAP_CALLER {
        // The bootstrap key's identity: a caller of that name would share its
        // idempotency scope and the check of its job tokens.
        return Err(StoreError::Conflict(format!(
            "caller name '{name}' is reserved for the bootstrap key"
        )));
    }
    if crate::auth::hmac::wire::is_valid_caller_name(name) {
        Ok(())
    } else {
        Err(StoreError::Conflict(
            "caller name must match ^[a-z][a-z0-9_-]{0,31}$".into(),
        ))
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub fn add_caller(db: &Db, name: &str, scopes: &[Scope]) -> Result<CallerRow, StoreError> {
    validate_name(name)?;
    let row = CallerRow {
        name: name.to_owned(),
        scopes: Scope::join(scopes),
        created_at: now_millis(),
        disabled_at: None,
    };
    db.write_sync(|conn| {
        conn.transaction(|conn| {
            repo::insert_caller(conn, &row)?;
            repo::bump_generation(conn)
        })
    })?;
    Ok(row)
}

pub fn list_callers(db: &Db) -> Result<Vec<CallerRow>, StoreError> {
    db.write_sync(repo::list_callers)
}

/// One caller by name, if it exists.
pub fn find_caller(db: &Db, name: &str) -> Result<Option<CallerRow>, StoreError> {
    db.write_sync(|conn| repo::find_caller(conn, name))
}

pub fn disable_caller(db: &Db, name: &str) -> Result<(), StoreError> {
    db.write_sync(|conn| conn.transaction(|conn| repo::disable_caller(conn, name, now_millis())))
}

fn seal_row(
    sealer: &Sealer,
    caller: &str,
    purpose: Purpose,
    version: i32,
    plaintext: &str,
    expires_at: Option<i64>,
) -> Result<SecretRow, StoreError> {
    let sealed = sealer
        .seal(purpose, caller, version, plaintext.as_bytes())
        .map_err(|e| StoreError::Internal(format!("seal failed: {e}")))?;
    Ok(SecretRow {
        caller: caller.to_owned(),
        purpose: purpose.as_str().to_owned(),
        version,
        ciphertext: sealed.ciphertext,
        nonce: sealed.nonce,
        master_key_id: sealed.key_id,
        created_at: now_millis(),
        expires_at,
        revoked_at: None,
        last_used_at: None,
    })
}

fn generate(kind: SecretKind) -> zeroize::Zeroizing<String> {
    match kind {
        SecretKind::Hmac => {
            zeroize::Zeroizing::new(HmacSecret::generate().expose_secret().to_owned())
        }
        SecretKind::Webhook => {
            zeroize::Zeroizing::new(WebhookSecret::generate().expose_secret().to_owned())
        }
    }
}

/// Add a new version of a caller's secret. With `grace`, every older active version
/// expires at now + grace (rotation); without it older versions stay as they are.
pub fn add_secret(
    db: &Db,
    sealer: &Sealer,
    caller: &str,
    kind: SecretKind,
    grace: Option<Duration>,
    expires_in: Option<Duration>,
) -> Result<IssuedSecret, StoreError> {
    let plaintext = generate(kind);
    let purpose = kind.purpose();
    let now = now_millis();
    let expires_at = expires_in.map(|d| now.saturating_add(millis(d)));
    let version = retry_on_version_race(|| {
        db.write_sync(|conn| {
            conn.transaction(|conn| {
                if repo::lock_caller(conn, caller)?.is_none() {
                    return Err(StoreError::NotFound);
                }
                // Only the newest `MAX_VERSIONS_TRIED` active versions are tried: one
                // more would silently stop the oldest working during its grace.
                let ends_the_others = grace.is_some_and(|g| g.is_zero());
                let active = repo::count_active_secrets(conn, caller, purpose.as_str(), now)?;
                if !ends_the_others
                    && usize::try_from(active).unwrap_or(usize::MAX) >= MAX_VERSIONS_TRIED
                {
                    return Err(StoreError::Conflict(format!(
                        "`{caller}` already has {active} active {} secret versions, the most \
                         that are tried; revoke an older one first (`coordinator secret \
                         revoke {caller} VERSION{}`), or rotate with `--grace 0s`",
                        kind.name(),
                        kind.flag()
                    )));
                }
                let version = repo::next_secret_version(conn, caller, purpose.as_str())?;
                let row = seal_row(sealer, caller, purpose, version, &plaintext, expires_at)?;
                repo::insert_secret(conn, &row)?;
                if let Some(g) = grace {
                    repo::expire_older(
                        conn,
                        caller,
                        purpose.as_str(),
                        version,
                        now.saturating_add(millis(g)),
                    )?;
                }
                Ok(version)
            })
        })
    })?;
    Ok(IssuedSecret {
        caller: caller.to_owned(),
        version,
        plaintext,
        expires_at,
    })
}

/// Two writers adding a version at once both pick N+1; the loser's insert hits the
/// primary key. Try again (bounded) with the next number.
pub fn retry_on_version_race<T>(
    mut f: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.is_unique_violation() && tries < 5 => tries += 1,
            other => return other,
        }
    }
}

pub fn revoke_secret(
    db: &Db,
    caller: &str,
    kind: SecretKind,
    version: i32,
) -> Result<(), StoreError> {
    db.write_sync(|conn| {
        conn.transaction(|conn| {
            repo::revoke_secret(conn, caller, kind.purpose().as_str(), version, now_millis())
        })
    })
}

/// Every sealed row (ciphertext stays sealed), for `secret list`.
pub fn list_secrets(db: &Db, caller: Option<&str>) -> Result<Vec<SecretRow>, StoreError> {
    let mut rows = db.write_sync(repo::all_secrets)?;
    if let Some(c) = caller {
        rows.retain(|r| r.caller == c);
    }
    Ok(rows)
}

/// Re-seal every row under the current master key; returns how many rows changed.
pub fn rewrap(db: &Db, sealer: &Sealer) -> Result<usize, StoreError> {
    let current = sealer.current_key_id();
    db.write_sync(|conn| {
        conn.transaction(|conn| {
            let mut n = 0;
            for row in repo::all_secrets(conn)? {
                if row.master_key_id == current {
                    continue;
                }
                let purpose = super::model::purpose_from_str(&row.purpose).ok_or_else(|| {
                    StoreError::Internal(format!("unknown purpose {}", row.purpose))
                })?;
                let sealed = row.sealed();
                let plain = sealer
                    .open(purpose, &row.caller, row.version, &sealed)
                    .map_err(|e| {
                        StoreError::Internal(format!(
                            "cannot open {} v{} of {} (master key {}): {e}",
                            row.purpose, row.version, row.caller, row.master_key_id
                        ))
                    })?;
                let fresh = sealer
                    .seal(purpose, &row.caller, row.version, &plain)
                    .map_err(|e| StoreError::Internal(format!("seal failed: {e}")))?;
                repo::update_seal(conn, &row, &fresh.ciphertext, &fresh.nonce, &fresh.key_id)?;
                n += 1;
            }
            if n > 0 {
                repo::bump_generation(conn)?;
            }
            Ok(n)
        })
    })
}

/// Refuse to start when active sealed rows name a master key we do not have:
/// returns one line naming the unknown key ids and their row counts.
pub fn check_master_keys(db: &Db, sealer: &Sealer) -> Result<(), String> {
    let rows = db
        .write_sync(|conn| repo::active_seal_key_ids(conn, now_millis()))
        .map_err(|e| format!("cannot read sealed secrets: {e}"))?;
    let unknown: Vec<String> = rows
        .iter()
        .filter(|(id, _)| !sealer.knows_key_id(id))
        .map(|(id, n)| format!("{id} ({n} rows)"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "active sealed secrets use unknown master key id(s): {}; current is {}. \
             Set COORDINATOR_MASTER_KEY_PREVIOUS to the old key and run `coordinator secret rewrap`",
            unknown.join(", "),
            sealer.current_key_id()
        ))
    }
}

/// Issue an API key for a caller; its scopes default to the caller's.
pub fn issue_key(
    db: &Db,
    caller: &str,
    scopes: Option<&[Scope]>,
    expires_in: Option<Duration>,
) -> Result<IssuedKey, StoreError> {
    let key = ApiKey::generate();
    let now = now_millis();
    let row = db.write_sync(|conn| {
        conn.transaction(|conn| {
            let c = repo::find_caller(conn, caller)?.ok_or(StoreError::NotFound)?;
            let scopes = match scopes {
                Some(s) => Scope::join(s),
                None => c.scopes.clone(),
            };
            let row = ApiKeyRow {
                id: uuid::Uuid::now_v7().to_string(),
                caller: caller.to_owned(),
                key_hash: key.hash().into_string(),
                display_prefix: key.display_prefix(),
                scopes,
                created_at: now,
                expires_at: expires_in.map(|d| now.saturating_add(millis(d))),
                revoked_at: None,
                last_used_at: None,
            };
            repo::insert_api_key(conn, &row)?;
            Ok(row)
        })
    })?;
    Ok(IssuedKey { row, key })
}

pub fn list_keys(db: &Db, caller: Option<&str>) -> Result<Vec<ApiKeyRow>, StoreError> {
    db.write_sync(|conn| repo::list_api_keys(conn, caller))
}

pub fn revoke_key(db: &Db, id_or_prefix: &str) -> Result<ApiKeyRow, StoreError> {
    db.write_sync(|conn| {
        conn.transaction(|conn| repo::revoke_api_key(conn, id_or_prefix, now_millis()))
    })
}
