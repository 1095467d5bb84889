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
use crate::db::{now_millis, Db, DbConnection};
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
/// expires at now + grace (rotation), or is revoked when the grace is zero (an expiry
/// of "now" would be compared with each instance's own clock); without it older
/// versions stay as they are.
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
                refuse_a_foreign_master_key(conn, sealer)?;
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
                if ends_the_others {
                    repo::revoke_older(conn, caller, purpose.as_str(), version, now)?;
                } else if let Some(g) = grace {
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

/// What [`rewrap`] did.
pub struct Rewrapped {
    /// Rows re-sealed under the current master key.
    pub rows: usize,
    /// Revoked or expired rows sealed under a key this sealer does not hold, left as
    /// they are: nothing opens them again, and they stay listed.
    pub left_inactive: usize,
}

/// Re-seal every row under the current master key. A revoked or expired row under a
/// key the sealer lacks (a stray key's row, revoked) is left: it would otherwise keep
/// every later rewrap from running (review, 2026-12-06).
pub fn rewrap(db: &Db, sealer: &Sealer) -> Result<Rewrapped, StoreError> {
    let current = sealer.current_key_id();
    let now = now_millis();
    db.write_sync(|conn| {
        conn.transaction(|conn| {
            let mut n = 0;
            let mut left_inactive = 0;
            for row in repo::all_secrets(conn)? {
                if row.master_key_id == current {
                    continue;
                }
                if !row.is_active(now) && !sealer.knows_key_id(&row.master_key_id) {
                    left_inactive += 1;
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
            Ok(Rewrapped {
                rows: n,
                left_inactive,
            })
        })
    })
}

/// Refuse to start when active sealed rows name a master key we do not have:
/// returns one line naming the unknown key ids and their row counts.
pub fn check_master_keys(db: &Db, sealer: &Sealer) -> Result<(), String> {
    let rows = db
        .write_sync(|conn| repo::active_seal_key_ids(conn, now_millis()))
        .map_err(|e| format!("cannot read sealed secrets: {e}"))?;
    match unknown_master_keys(&rows, sealer) {
        None => Ok(()),
        Some(unknown) => Err(format!(
            "active sealed secrets use unknown master key id(s): {unknown}; current is {}. \
             Set COORDINATOR_MASTER_KEY_PREVIOUS to the old key and run `coordinator secret rewrap`",
            sealer.current_key_id()
        )),
    }
}

/// The master key ids of `rows` (id, active rows) that `sealer` holds neither as its
/// current nor as its previous key, with their counts; `None` when it holds them all.
fn unknown_master_keys(rows: &[(String, i64)], sealer: &Sealer) -> Option<String> {
    let unknown: Vec<String> = rows
        .iter()
        .filter(|(id, _)| !sealer.knows_key_id(id))
        .map(|(id, n)| format!("{id} ({n} rows)"))
        .collect();
    (!unknown.is_empty()).then(|| unknown.join(", "))
}

/// Before sealing a new row (in its transaction): every active sealed row must be one
/// this sealer can open. An operator command run with a stray master key (a leftover
/// `COORDINATOR_MASTER_KEY` in the shell) would otherwise seal under a key no instance
/// holds: the new secret fails everywhere, the old ones may already be expired, and no
/// instance starts again (review, 2026-12-06).
pub fn refuse_a_foreign_master_key(
    conn: &mut DbConnection,
    sealer: &Sealer,
) -> Result<(), StoreError> {
    let rows = repo::active_seal_key_ids(conn, now_millis())?;
    match unknown_master_keys(&rows, sealer) {
        None => Ok(()),
        Some(unknown) => Err(StoreError::Conflict(format!(
            "this command's master key ({}) is not the one the active sealed secrets use \
             ({unknown}): nothing was written. Check COORDINATOR_MASTER_KEY / \
             COORDINATOR_MASTER_KEY_FILE (the environment wins over --env-file); during a \
             master-key rotation set COORDINATOR_MASTER_KEY_PREVIOUS to the old key",
            sealer.current_key_id()
        ))),
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
