//! Credential storage: callers, sealed secrets, API key hashes and the auth generation
//! counter. Plain functions over `&mut DbConnection`. (Replay records are stored by
//! `db::replay`, revoked job tokens by `db::revoked`.)

use diesel::prelude::*;

use super::model::{ApiKeyRow, CallerRow, SecretRow};
use crate::db::schema::{api_keys, auth_state, callers, sealed_secrets};
use crate::db::DbConnection;
use crate::error::{is_unique_violation, StoreError};

/// Bump the generation every instance polls, so cached credentials are dropped everywhere.
pub fn bump_generation(conn: &mut DbConnection) -> Result<(), StoreError> {
    diesel::update(auth_state::table.find(1))
        .set(auth_state::generation.eq(auth_state::generation + 1))
        .execute(conn)?;
    Ok(())
}

pub fn generation(conn: &mut DbConnection) -> Result<i64, StoreError> {
    Ok(auth_state::table
        .find(1)
        .select(auth_state::generation)
        .first(conn)?)
}

// ---- callers --------------------------------------------------------------------

pub fn insert_caller(conn: &mut DbConnection, row: &CallerRow) -> Result<(), StoreError> {
    match diesel::insert_into(callers::table)
        .values(row)
        .execute(conn)
    {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
            "caller `{}` already exists",
            row.name
        ))),
        Err(e) => Err(e.into()),
    }
}

pub fn find_caller(conn: &mut DbConnection, name: &str) -> Result<Option<CallerRow>, StoreError> {
    Ok(callers::table
        .find(name)
        .select(CallerRow::as_select())
        .first(conn)
        .optional()?)
}

/// The caller, its row locked until the transaction ends on PostgreSQL (`FOR UPDATE`),
/// so writers that count and then add to its credentials run one at a time. SQLite's
/// writes already hold the database's write lock.
pub fn lock_caller(conn: &mut DbConnection, name: &str) -> Result<Option<CallerRow>, StoreError> {
    match conn {
        DbConnection::Postgresql(pg) => Ok(callers::table
            .find(name)
            .select(CallerRow::as_select())
            .for_update()
            .first(pg)
            .optional()?),
        DbConnection::Sqlite(_) => find_caller(conn, name),
    }
}

/// Every caller's name and every API key's hash, at most `limit` of each (for the
/// credential store's directory; a caller asks for one more than it keeps to tell a
/// full list from a cut one).
pub fn directory(
    conn: &mut DbConnection,
    limit: i64,
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let names = callers::table
        .select(callers::name)
        .limit(limit)
        .load(conn)?;
    let hashes = api_keys::table
        .select(api_keys::key_hash)
        .limit(limit)
        .load(conn)?;
    Ok((names, hashes))
}

pub fn list_callers(conn: &mut DbConnection) -> Result<Vec<CallerRow>, StoreError> {
    Ok(callers::table
        .order(callers::name)
        .select(CallerRow::as_select())
        .load(conn)?)
}

pub fn disable_caller(conn: &mut DbConnection, name: &str, now: i64) -> Result<(), StoreError> {
    let Some(caller) = lock_caller(conn, name)? else {
        return Err(StoreError::NotFound);
    };
    // Disabled once: the first time stays the record (it dates the incident).
    if let Some(at) = caller.disabled_at {
        return Err(StoreError::Conflict(format!(
            "caller {name} was already disabled at {}",
            crate::jobs::model::rfc3339(at)
        )));
    }
    diesel::update(callers::table.find(name))
        .set(callers::disabled_at.eq(Some(now)))
        .execute(conn)?;
    bump_generation(conn)
}

// ---- sealed secrets ---------------------------------------------------------------

/// Every version of a caller's secrets for one purpose, newest first.
pub fn secrets_for(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
) -> Result<Vec<SecretRow>, StoreError> {
    Ok(sealed_secrets::table
        .filter(sealed_secrets::caller.eq(caller))
        .filter(sealed_secrets::purpose.eq(purpose))
        .order(sealed_secrets::version.desc())
        .select(SecretRow::as_select())
        .load(conn)?)
}

/// Every secret of one purpose (all callers), newest first per caller.
pub fn secrets_with_purpose(
    conn: &mut DbConnection,
    purpose: &str,
) -> Result<Vec<SecretRow>, StoreError> {
    Ok(sealed_secrets::table
        .filter(sealed_secrets::purpose.eq(purpose))
        .order((sealed_secrets::caller, sealed_secrets::version.desc()))
        .select(SecretRow::as_select())
        .load(conn)?)
}

pub fn all_secrets(conn: &mut DbConnection) -> Result<Vec<SecretRow>, StoreError> {
    Ok(sealed_secrets::table
        .order((
            sealed_secrets::caller,
            sealed_secrets::purpose,
            sealed_secrets::version,
        ))
        .select(SecretRow::as_select())
        .load(conn)?)
}

pub fn next_secret_version(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
) -> Result<i32, StoreError> {
    let max: Option<i32> = sealed_secrets::table
        .filter(sealed_secrets::caller.eq(caller))
        .filter(sealed_secrets::purpose.eq(purpose))
        .select(diesel::dsl::max(sealed_secrets::version))
        .first(conn)?;
    Ok(max.unwrap_or(0).saturating_add(1))
}

/// Versions of this caller's secret of this purpose that are neither revoked nor expired.
pub fn count_active_secrets(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
    now: i64,
) -> Result<i64, StoreError> {
    Ok(sealed_secrets::table
        .filter(sealed_secrets::caller.eq(caller))
        .filter(sealed_secrets::purpose.eq(purpose))
        .filter(sealed_secrets::revoked_at.is_null())
        .filter(
            sealed_secrets::expires_at
                .is_null()
                .or(sealed_secrets::expires_at.gt(now)),
        )
        .count()
        .get_result(conn)?)
}

pub fn insert_secret(conn: &mut DbConnection, row: &SecretRow) -> Result<(), StoreError> {
    diesel::insert_into(sealed_secrets::table)
        .values(row)
        .execute(conn)?;
    bump_generation(conn)
}

/// Give every active older version an expiry of at most `expires_at` (rotation grace).
pub fn expire_older(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
    below_version: i32,
    expires_at: i64,
) -> Result<usize, StoreError> {
    let base = sealed_secrets::table
        .filter(sealed_secrets::caller.eq(caller))
        .filter(sealed_secrets::purpose.eq(purpose))
        .filter(sealed_secrets::version.lt(below_version))
        .filter(sealed_secrets::revoked_at.is_null());
    let n = diesel::update(
        base.filter(
            sealed_secrets::expires_at
                .is_null()
                .or(sealed_secrets::expires_at.gt(expires_at)),
        ),
    )
    .set(sealed_secrets::expires_at.eq(Some(expires_at)))
    .execute(conn)?;
    Ok(n)
}

/// Revoke every active older version at once (a rotation with no grace). A revocation
/// ends a version on every instance whatever its clock; an expiry of "now" is compared
/// with each instance's own clock, so it left the older versions working for the
/// clock difference on an instance behind the host that rotated (review, 2026-12-06).
pub fn revoke_older(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
    below_version: i32,
    now: i64,
) -> Result<usize, StoreError> {
    Ok(diesel::update(
        sealed_secrets::table
            .filter(sealed_secrets::caller.eq(caller))
            .filter(sealed_secrets::purpose.eq(purpose))
            .filter(sealed_secrets::version.lt(below_version))
            .filter(sealed_secrets::revoked_at.is_null()),
    )
    .set(sealed_secrets::revoked_at.eq(Some(now)))
    .execute(conn)?)
}

pub fn revoke_secret(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
    version: i32,
    now: i64,
) -> Result<(), StoreError> {
    let n = diesel::update(sealed_secrets::table.find((caller, purpose, version)))
        .filter(sealed_secrets::revoked_at.is_null())
        .set(sealed_secrets::revoked_at.eq(Some(now)))
        .execute(conn)?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    bump_generation(conn)
}

pub fn update_seal(
    conn: &mut DbConnection,
    row: &SecretRow,
    ciphertext: &[u8],
    nonce: &[u8],
    master_key_id: &str,
) -> Result<(), StoreError> {
    diesel::update(sealed_secrets::table.find((&row.caller, &row.purpose, row.version)))
        .set((
            sealed_secrets::ciphertext.eq(ciphertext),
            sealed_secrets::nonce.eq(nonce),
            sealed_secrets::master_key_id.eq(master_key_id),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn touch_secret(
    conn: &mut DbConnection,
    caller: &str,
    purpose: &str,
    version: i32,
    now: i64,
) -> Result<(), StoreError> {
    diesel::update(sealed_secrets::table.find((caller, purpose, version)))
        .set(sealed_secrets::last_used_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}

/// Active sealed rows per master key id: `(key_id, rows)`.
pub fn active_seal_key_ids(
    conn: &mut DbConnection,
    now: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sealed_secrets::table
        .filter(sealed_secrets::revoked_at.is_null())
        .filter(
            sealed_secrets::expires_at
                .is_null()
                .or(sealed_secrets::expires_at.gt(now)),
        )
        .group_by(sealed_secrets::master_key_id)
        .select((sealed_secrets::master_key_id, diesel::dsl::count_star()))
        .load(conn)?)
}

// ---- API keys ---------------------------------------------------------------------

pub fn insert_api_key(conn: &mut DbConnection, row: &ApiKeyRow) -> Result<(), StoreError> {
    diesel::insert_into(api_keys::table)
        .values(row)
        .execute(conn)?;
    bump_generation(conn)
}

pub fn find_api_key(conn: &mut DbConnection, hash: &str) -> Result<Option<ApiKeyRow>, StoreError> {
    Ok(api_keys::table
        .filter(api_keys::key_hash.eq(hash))
        .select(ApiKeyRow::as_select())
        .first(conn)
        .optional()?)
}

pub fn list_api_keys(
    conn: &mut DbConnection,
    caller: Option<&str>,
) -> Result<Vec<ApiKeyRow>, StoreError> {
    let mut q = api_keys::table
        .order((api_keys::caller, api_keys::created_at))
        .select(ApiKeyRow::as_select())
        .into_boxed();
    if let Some(c) = caller {
        q = q.filter(api_keys::caller.eq(c.to_owned()));
    }
    Ok(q.load(conn)?)
}

/// Revoke by key id or by display prefix (which must then match exactly one key).
pub fn revoke_api_key(
    conn: &mut DbConnection,
    id_or_prefix: &str,
    now: i64,
) -> Result<ApiKeyRow, StoreError> {
    let matches: Vec<ApiKeyRow> = api_keys::table
        .filter(
            api_keys::id
                .eq(id_or_prefix)
                .or(api_keys::display_prefix.eq(id_or_prefix)),
        )
        .select(ApiKeyRow::as_select())
        .load(conn)?;
    let row = match matches.as_slice() {
        [one] => one.clone(),
        [] => return Err(StoreError::NotFound),
        _ => {
            return Err(StoreError::Conflict(
                "several keys share that prefix; revoke by id".into(),
            ))
        }
    };
    // Revoked once: the first time stays the record (it dates the incident).
    if let Some(at) = row.revoked_at {
        return Err(StoreError::Conflict(format!(
            "API key {} was already revoked at {}",
            row.display_prefix,
            crate::jobs::model::rfc3339(at)
        )));
    }
    // Only while not revoked: two revocations at once, the second changes nothing.
    let n = diesel::update(api_keys::table.find(&row.id))
        .filter(api_keys::revoked_at.is_null())
        .set(api_keys::revoked_at.eq(Some(now)))
        .execute(conn)?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "API key {} was already revoked",
            row.display_prefix
        )));
    }
    bump_generation(conn)?;
    Ok(row)
}

pub fn touch_api_key(conn: &mut DbConnection, id: &str, now: i64) -> Result<(), StoreError> {
    diesel::update(api_keys::table.find(id))
        .set(api_keys::last_used_at.eq(Some(now)))
        .execute(conn)?;
    Ok(())
}
