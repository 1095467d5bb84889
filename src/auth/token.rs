//! Job tokens: JWT HS256 signed with a sealed, versioned `token-signing` key (`kid` =
//! `v<version>`), claims `iss, sub (worker), jid (job id), scope, jti, iat, exp`. The
//! algorithm is fixed on verify. Every bearer token goes through `verify_header`, which
//! always consults the revocation set: no route can skip it.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::audit::AuditRecord;
use super::model::{Purpose, Scheme};
use super::principal::Principal;
use super::{fail, repo, AuthContext, Scope};
use crate::crypto::credential::HmacSecret;
use crate::crypto::seal::Sealer;
use crate::db::{now_millis, Db, DbConnection};
use crate::error::{ApiError, StoreError};
use crate::jobs::JobId;

/// Owner of the token-signing keys in `sealed_secrets` (not a valid caller name, so it
/// can never collide with one).
pub const KEY_OWNER: &str = "_tokens";
pub const ISSUER: &str = "coordinator";
pub const MAX_TOKEN_LEN: usize = 4096;
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub jid: String,
    pub scope: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    /// The job's attempt the token was issued for; a requeue revokes that attempt's
    /// tokens (the next worker's token names the next attempt).
    #[serde(default)]
    pub att: i32,
}

/// A decrypted signing key.
pub struct TokenKey {
    pub version: i32,
    pub key: Zeroizing<Vec<u8>>,
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

impl TokenKey {
    /// Active now (checked at use, so a cached key stops verifying when its grace ends).
    pub fn is_active(&self, now_ms: i64) -> bool {
        !self.revoked && self.expires_at.is_none_or(|e| e > now_ms)
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey(v{})", self.version)
    }
}

/// A freshly minted token (shown once).
pub struct IssuedToken {
    pub token: Zeroizing<String>,
    pub jti: String,
    pub expires_at: i64,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IssuedToken(jti={})", self.jti)
    }
}

/// Worker names (the token's `sub`): 1–64 of `[A-Za-z0-9_.:-]`.
pub fn valid_worker(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

fn seal_new_key(sealer: &Sealer, version: i32) -> Result<super::model::SecretRow, StoreError> {
    let material = HmacSecret::generate();
    let sealed = sealer
        .seal(
            Purpose::TokenSigning,
            KEY_OWNER,
            version,
            material.expose_secret().as_bytes(),
        )
        .map_err(|e| StoreError::Internal(format!("seal failed: {e}")))?;
    Ok(super::model::SecretRow {
        caller: KEY_OWNER.to_owned(),
        purpose: Purpose::TokenSigning.as_str().to_owned(),
        version,
        ciphertext: sealed.ciphertext,
        nonce: sealed.nonce,
        master_key_id: sealed.key_id,
        created_at: now_millis(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    })
}

/// Create signing key v1 when no active key exists (at start).
pub fn ensure_signing_key(db: &Db, sealer: &Sealer) -> Result<(), StoreError> {
    use diesel::Connection;
    db.write_sync(|conn| {
        conn.transaction(|conn| {
            let now = now_millis();
            let rows = repo::secrets_for(conn, KEY_OWNER, Purpose::TokenSigning.as_str())?;
            if rows.iter().any(|r| r.is_active(now)) {
                return Ok(());
            }
            let version =
                repo::next_secret_version(conn, KEY_OWNER, Purpose::TokenSigning.as_str())?;
            repo::insert_secret(conn, &seal_new_key(sealer, version)?)
        })
    })
    .or_else(|e| match e {
        // Another instance starting at the same moment created it first.
        e if e.is_unique_violation() => Ok(()),
        other => Err(other),
    })
}

/// Add a new signing key version; older keys keep verifying until now + grace.
pub fn rotate_signing_key(db: &Db, sealer: &Sealer, grace: Duration) -> Result<i32, StoreError> {
    use diesel::Connection;
    super::admin::retry_on_version_race(|| {
        db.write_sync(|conn| {
            conn.transaction(|conn| {
                let purpose = Purpose::TokenSigning.as_str();
                let version = repo::next_secret_version(conn, KEY_OWNER, purpose)?;
                repo::insert_secret(conn, &seal_new_key(sealer, version)?)?;
                let until = now_millis()
                    .saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
                repo::expire_older(conn, KEY_OWNER, purpose, version, until)?;
                Ok(version)
            })
        })
    })
}

/// Load and open every signing key, newest first.
pub fn load_keys(conn: &mut DbConnection, sealer: &Sealer) -> Result<Vec<TokenKey>, StoreError> {
    let rows = repo::secrets_for(conn, KEY_OWNER, Purpose::TokenSigning.as_str())?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let sealed = r.sealed();
            match sealer.open(Purpose::TokenSigning, KEY_OWNER, r.version, &sealed) {
                Ok(key) => Some(TokenKey {
                    version: r.version,
                    key,
                    expires_at: r.expires_at,
                    revoked: r.revoked_at.is_some(),
                }),
                Err(e) => {
                    log::error!("cannot open token-signing key v{}: {e}", r.version);
                    None
                }
            }
        })
        .collect())
}

/// Sign claims with the newest active key.
pub fn sign(
    keys: &[TokenKey],
    job_id: &JobId,
    attempt: i32,
    worker: &str,
    ttl: Duration,
) -> Result<IssuedToken, StoreError> {
    let key = keys
        .iter()
        .find(|k| k.is_active(now_millis()))
        .ok_or_else(|| StoreError::Internal("no active token-signing key".into()))?;
    let now = now_millis() / 1000;
    let ttl = ttl.min(MAX_TTL).as_secs();
    let exp = now.saturating_add(i64::try_from(ttl).unwrap_or(3600));
    let claims = Claims {
        iss: ISSUER.to_owned(),
        sub: worker.to_owned(),
        jid: job_id.as_str().to_owned(),
        scope: format!(
            "{} {}",
            Scope::JobsUpdate.as_str(),
            Scope::JobsRead.as_str()
        ),
        jti: uuid::Uuid::now_v7().to_string(),
        iat: now,
        exp,
        att: attempt,
    };
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(format!("v{}", key.version));
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key.key))
        .map_err(|e| StoreError::Internal(format!("token encode failed: {e}")))?;
    Ok(IssuedToken {
        token: Zeroizing::new(token),
        jti: claims.jti,
        expires_at: exp.saturating_mul(1000),
    })
}

/// Issue a token for a job that exists and has not ended (operator command), and
/// remember its expiry on the job so the token is revoked when the job ends.
pub fn issue(
    db: &Db,
    sealer: &Sealer,
    job_id: &JobId,
    worker: &str,
    ttl: Duration,
) -> Result<IssuedToken, StoreError> {
    use diesel::Connection;
    if !valid_worker(worker) {
        return Err(StoreError::Conflict(
            "worker name must be 1-64 of [A-Za-z0-9_.:-]".into(),
        ));
    }
    db.write_sync(|conn| {
        let keys = load_keys(conn, sealer)?;
        conn.transaction(|conn| {
            let job = crate::jobs::repo::find(conn, job_id)?;
            if job.status().is_terminal() {
                return Err(StoreError::Conflict(format!("job is {}", job.status())));
            }
            let t = sign(&keys, job_id, job.attempts, worker, ttl)?;
            crate::jobs::repo::extend_tokens_until(conn, job_id, t.expires_at)?;
            Ok(t)
        })
    })
}

/// Verify `Authorization: Bearer <jwt>`.
pub async fn verify_header(
    ctx: &AuthContext,
    value: &str,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    audit.scheme = Some(Scheme::Token);
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| fail("unsupported authorization scheme"))?;
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(fail("malformed token"));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| fail("malformed token"))?;
    if header.alg != Algorithm::HS256 {
        return Err(fail("invalid token"));
    }
    let version: i32 = header
        .kid
        .as_deref()
        .and_then(|k| k.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| fail("invalid token"))?;
    let keys = ctx.store.token_keys().await?;
    let key = keys
        .iter()
        .find(|k| k.version == version)
        .ok_or_else(|| fail("invalid token"))?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256];
    validation.leeway = 0;
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&key.key), &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => fail("expired"),
                _ => fail("invalid token"),
            })?;
    let claims = data.claims;
    audit.caller = Some(claims.sub.clone());
    audit.key_ref = Some(claims.jti.clone());
    if !key.is_active(now_millis()) {
        return Err(fail("expired"));
    }
    let job_id = JobId::parse(&claims.jid, "jid").map_err(|_| fail("invalid token"))?;
    if ctx
        .revocations
        .is_revoked(&claims.jti, job_id.as_str(), claims.att)
        .await?
    {
        return Err(fail("revoked"));
    }
    let scopes = claims
        .scope
        .split(' ')
        .filter_map(Scope::parse)
        .filter(|s| matches!(s, Scope::JobsUpdate | Scope::JobsRead))
        .collect();
    Ok(Principal {
        caller: claims.sub,
        scheme: Scheme::Token,
        scopes,
        key_ref: Some(claims.jti),
        job_id: Some(job_id),
    })
}
