//! Job tokens: JWT HS256 signed with a sealed, versioned `token-signing` key (`kid` =
//! `v<version>`), claims `iss, sub (worker), cal (caller), jid (job id), att (attempt),
//! scope, jti, iat, exp`. The algorithm is fixed on verify. Every bearer token goes
//! through `verify_header`, which always consults the revocation set and the state of
//! the caller the token was issued to: no route can skip either.
//!
//! [`mint`] is the one place a token is minted (by a claim, [`claim`], by
//! `coordinator token issue`, [`issue`], and as a renewal on a heartbeat,
//! [`heartbeat_renewing`]); the repositories only store.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::audit::AuditRecord;
use super::model::{Purpose, Scheme};
use super::principal::{Held, Principal};
use super::{fail, repo, AuthContext, Scope};
use crate::crypto::credential::HmacSecret;
use crate::crypto::seal::Sealer;
use crate::db::{now_millis, Db, DbConnection};
use crate::error::{ApiError, StoreError};
use crate::jobs::row::JobRow;
use crate::jobs::{JobId, JobStatus};

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
    /// The worker name given at claim (shown in the audit line as `worker`).
    pub sub: String,
    /// The authenticated caller the token was issued to (the audit line's `caller`).
    /// The token is refused once that caller is disabled or gone; a token without
    /// it (minted before callers were recorded) is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cal: Option<String>,
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
    let has_one = |conn: &mut crate::db::DbConnection| -> Result<bool, StoreError> {
        let now = now_millis();
        let rows = repo::secrets_for(conn, KEY_OWNER, Purpose::TokenSigning.as_str())?;
        Ok(rows.iter().any(|r| r.is_active(now)))
    };
    if db.write_sync(has_one)? {
        return Ok(());
    }
    db.write_sync(|conn| {
        conn.transaction(|conn| {
            // Instances starting together: each statement of a PostgreSQL transaction
            // sees what committed before it, so two could both find no key, and the
            // second then number its own after the first's (two active keys; review,
            // 2026-12-06). The generation row's lock orders them; the second looks again.
            repo::bump_generation(conn)?;
            if has_one(conn)? {
                return Ok(());
            }
            super::credentials::refuse_a_foreign_master_key(conn, sealer)?;
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

/// Add a new signing key version; older keys keep verifying until now + grace, and
/// are revoked at once with no grace.
pub fn rotate_signing_key(db: &Db, sealer: &Sealer, grace: Duration) -> Result<i32, StoreError> {
    use diesel::Connection;
    super::credentials::retry_on_version_race(|| {
        db.write_sync(|conn| {
            conn.transaction(|conn| {
                super::credentials::refuse_a_foreign_master_key(conn, sealer)?;
                let purpose = Purpose::TokenSigning.as_str();
                let version = repo::next_secret_version(conn, KEY_OWNER, purpose)?;
                repo::insert_secret(conn, &seal_new_key(sealer, version)?)?;
                let now = now_millis();
                if grace.is_zero() {
                    // Ended on every instance whatever its clock (`repo::revoke_older`).
                    repo::revoke_older(conn, KEY_OWNER, purpose, version, now)?;
                } else {
                    let until =
                        now.saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
                    repo::expire_older(conn, KEY_OWNER, purpose, version, until)?;
                }
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

/// What a token is minted for: its job's attempt, the caller accountable for it, the
/// worker it names, and its id (`None`: a fresh one; a renewal keeps its token's id).
struct Grant<'a> {
    job_id: &'a JobId,
    attempt: i32,
    caller: &'a str,
    worker: &'a str,
    jti: Option<&'a str>,
}

/// Sign claims with the newest active key.
fn sign(keys: &[TokenKey], grant: &Grant<'_>, ttl: Duration) -> Result<IssuedToken, StoreError> {
    let key = keys
        .iter()
        .find(|k| k.is_active(now_millis()))
        .ok_or_else(|| StoreError::Internal("no active token-signing key".into()))?;
    let now = now_millis() / 1000;
    let ttl = ttl.min(MAX_TTL).as_secs();
    let exp = now.saturating_add(i64::try_from(ttl).unwrap_or(3600));
    let claims = Claims {
        iss: ISSUER.to_owned(),
        sub: grant.worker.to_owned(),
        cal: Some(grant.caller.to_owned()),
        jid: grant.job_id.as_str().to_owned(),
        scope: format!(
            "{} {}",
            Scope::JobsUpdate.as_str(),
            Scope::JobsRead.as_str()
        ),
        jti: grant
            .jti
            .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned),
        iat: now,
        exp,
        att: grant.attempt,
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

/// Mint a token for `job` (a row this transaction holds locked) on behalf of
/// `caller`, for the job's current attempt, and remember its expiry on the job so the
/// token is revoked when the attempt or the job ends.
pub fn issue_in(
    conn: &mut DbConnection,
    keys: &[TokenKey],
    job: &mut JobRow,
    caller: &str,
    worker: &str,
    ttl: Duration,
) -> Result<IssuedToken, StoreError> {
    let id = JobId::parse(&job.id, "id")
        .map_err(|e| StoreError::Internal(format!("bad job id in database: {e}")))?;
    let grant = Grant {
        job_id: &id,
        attempt: job.attempts,
        caller,
        worker,
        jti: None,
    };
    let t = mint(conn, keys, &grant, ttl)?;
    job.tokens_until = Some(job.tokens_until.unwrap_or(0).max(t.expires_at));
    Ok(t)
}

/// Sign, and move the job's `tokens_until` to the new token's expiry, so the
/// revocation written when the attempt or the job ends lasts as long as it does.
fn mint(
    conn: &mut DbConnection,
    keys: &[TokenKey],
    grant: &Grant<'_>,
    ttl: Duration,
) -> Result<IssuedToken, StoreError> {
    let t = sign(keys, grant, ttl)?;
    crate::jobs::repo::extend_tokens_until(conn, grant.job_id, t.expires_at)?;
    Ok(t)
}

/// A job token that a heartbeat renews: one with less than half of its own lifetime
/// left.
#[derive(Debug)]
pub struct Renewal {
    caller: String,
    worker: String,
    attempt: i32,
    jti: String,
    /// The token's own lifetime (`exp - iat`), which its successor keeps.
    lifetime: Duration,
    /// The version of the key that signed the token (see [`Renewal::signed_by_active_key`]).
    key_version: i32,
}

impl Renewal {
    /// Is the key that signed the token still active in `keys`, the set its successor
    /// is minted from? The guard checked it against the cache as it was then; a key
    /// retired in between (`token rotate-key --grace 0s` after a leak) must not hand
    /// its token a successor signed with the new key (review, 2026-12-06).
    pub fn signed_by_active_key(&self, keys: &[TokenKey], now_ms: i64) -> Result<(), ApiError> {
        if keys
            .iter()
            .any(|k| k.version == self.key_version && k.is_active(now_ms))
        {
            Ok(())
        } else {
            Err(fail("expired"))
        }
    }
}

/// Is `principal` a job token due for renewal (less than half of its lifetime left)?
/// A job's run is then not capped by its token's lifetime: each heartbeat in a token's
/// second half hands out its successor, which lives as long as the token was made to
/// (a claim's token `COORDINATOR_TOKEN_TTL_SECS`, one from `token issue --ttl` that).
pub fn renewal_due(principal: &Principal, now_ms: i64) -> Option<Renewal> {
    let Held::Token {
        jti,
        attempt,
        expires_at,
        issued_at,
        worker,
        key_version,
    } = &principal.held
    else {
        return None;
    };
    let secs = u64::try_from(expires_at.saturating_sub(*issued_at)).ok()?;
    let lifetime = Duration::from_secs(secs).min(MAX_TTL);
    if lifetime.is_zero() {
        return None;
    }
    let half_ms = i64::try_from(lifetime.as_millis() / 2).unwrap_or(i64::MAX);
    let left_ms = expires_at.saturating_mul(1000).saturating_sub(now_ms);
    (left_ms < half_ms).then(|| Renewal {
        caller: principal.caller.clone(),
        worker: worker.clone(),
        attempt: *attempt,
        jti: jti.clone(),
        lifetime,
        key_version: *key_version,
    })
}

/// A heartbeat with a job token due for renewal: the lease renewed (under the same
/// checks as any heartbeat: RUNNING, on the token's attempt) and the token's successor
/// minted, in one transaction. The successor keeps the token's id, attempt, caller and
/// worker, so what revokes the one (its id, the attempt's end, the job's end) revokes
/// the other; only its expiry is new. Nothing is minted when the heartbeat is refused.
pub fn heartbeat_renewing(
    conn: &mut DbConnection,
    keys: &[TokenKey],
    id: &JobId,
    lease_ms: i64,
    renewal: &Renewal,
) -> Result<(i64, IssuedToken), StoreError> {
    use diesel::Connection;
    conn.transaction(|conn| {
        let until = crate::jobs::repo::heartbeat(conn, id, lease_ms, Some(renewal.attempt))?;
        let grant = Grant {
            job_id: id,
            attempt: renewal.attempt,
            caller: &renewal.caller,
            worker: &renewal.worker,
            jti: Some(&renewal.jti),
        };
        Ok((until, mint(conn, keys, &grant, renewal.lifetime)?))
    })
}

/// A claimed job, its token, and a revocation the claim wrote (to apply locally at once).
pub struct Claimed {
    pub job: JobRow,
    pub token: IssuedToken,
    pub revoked: Vec<(String, i64)>,
}

/// Claim the best QUEUED job of `queue` for `worker`, on behalf of the authenticated
/// `caller`: RUNNING under a lease, with a token for the new attempt, in one
/// transaction. `None` when the queue is empty.
pub fn claim(
    conn: &mut DbConnection,
    queue: &str,
    caller: &str,
    worker: &str,
    terms: crate::jobs::model::Terms,
    keys: &[TokenKey],
    ttl: Duration,
) -> Result<Option<Claimed>, StoreError> {
    use diesel::Connection;
    conn.transaction(|conn| {
        let Some(mut job) = crate::jobs::repo::claim(conn, queue, worker, terms)? else {
            return Ok(None);
        };
        // Before this claim's token moves `tokens_until`: what the claim itself revoked.
        let revoked = crate::jobs::repo::token_revocation(&job, now_millis());
        let token = issue_in(conn, keys, &mut job, caller, worker, ttl)?;
        Ok(Some(Claimed {
            job,
            token,
            revoked,
        }))
    })
}

/// Issue a token for one job (operator command) on behalf of `caller` (default: the
/// caller that created the job), which must exist and be enabled.
///
/// A RUNNING job gets a token for its current attempt, revoked with that attempt. A job
/// never claimed (PENDING or QUEUED, no attempt yet) gets an attempt-0 token, revoked
/// when the first attempt starts. A job QUEUED between attempts, or one that has ended,
/// is refused: a token for it could outlive the attempt that follows. So is one whose
/// attempt's tokens are revoked already: the new token would be refused at once.
pub fn issue(
    db: &Db,
    sealer: &Sealer,
    job_id: &JobId,
    worker: &str,
    caller: Option<&str>,
    ttl: Duration,
) -> Result<IssuedToken, StoreError> {
    use diesel::Connection;
    if !valid_worker(worker) {
        return Err(StoreError::Conflict(
            "worker name must be 1-64 of [A-Za-z0-9_.:-]".into(),
        ));
    }
    db.write_sync(|conn| {
        // A command run with a stray master key opens no signing key: say so, rather
        // than "no active token-signing key" while one is there (sixth security
        // review, 2026-12-07).
        super::credentials::refuse_a_foreign_master_key(conn, sealer)?;
        let keys = load_keys(conn, sealer)?;
        conn.transaction(|conn| {
            // Hold the row so no claim or requeue slips between the check and the mint.
            crate::jobs::repo::lock_for_token(conn, job_id)?;
            let mut job = crate::jobs::repo::find(conn, job_id)?;
            match job.status() {
                JobStatus::Running => {}
                JobStatus::Pending | JobStatus::Queued if job.attempts == 0 => {}
                s => {
                    return Err(StoreError::Conflict(format!(
                        "job is {s}{}; a token can be issued for a RUNNING job or one \
                         not yet claimed",
                        if s.is_terminal() {
                            ""
                        } else {
                            " between attempts"
                        }
                    )))
                }
            }
            // A token its own attempt's revocation would refuse at once is not printed as
            // if it worked: a job never claimed, cancelled and retried, still has its
            // attempt-0 tokens revoked (until they expire), and an operator may have
            // revoked the attempt or the job by hand (review, 2026-12-06).
            let keys_of = [
                crate::db::revoked::job_key(&job.id),
                crate::db::revoked::attempt_key(&job.id, job.attempts),
            ];
            let ids: Vec<&str> = keys_of.iter().map(String::as_str).collect();
            if crate::db::revoked::any_revoked(conn, &ids, now_millis())? {
                return Err(StoreError::Conflict(format!(
                    "tokens of this job's attempt {} are revoked (its job was cancelled \
                     before a claim and retried, or they were revoked by hand), so a new \
                     one would be refused: claim the job, then issue a token for the \
                     RUNNING attempt",
                    job.attempts
                )));
            }
            let caller = caller.unwrap_or(&job.created_by).to_owned();
            match repo::find_caller(conn, &caller)? {
                Some(c) if c.disabled_at.is_some() => {
                    return Err(StoreError::Conflict(format!(
                        "caller `{caller}` is disabled"
                    )))
                }
                Some(_) => {}
                None if caller == super::api_key::BOOTSTRAP_CALLER => {}
                None => {
                    return Err(StoreError::Conflict(format!(
                        "caller `{caller}` does not exist (name one with --caller)"
                    )))
                }
            }
            issue_in(conn, &keys, &mut job, &caller, worker, ttl)
        })
    })
}

/// Verify `Authorization: Bearer <jwt>`.
#[expect(
    clippy::map_err_ignore,
    reason = "decode errors can quote the bearer token, a secret; only the public reason leaves"
)]
/// `route_job`: the `{id}` of the route, when it is one a job token may use.
pub async fn verify_header(
    ctx: &AuthContext,
    value: &str,
    route_job: Option<&str>,
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
    let mut keys = ctx.store.token_keys().await?;
    // A version newer than any held here: a key rotated moments ago, whose tokens
    // another instance (or `token issue`) already hands out. Read the keys again (at
    // most once a second) before refusing, as a signed request naming a secret version
    // rotated elsewhere is (review, 2026-12-06: such tokens were `invalid token`, and
    // counted as guesses, until this instance's next poll).
    if keys.iter().all(|k| k.version < version) {
        if let Some(fresh) = ctx.store.token_keys_reread().await? {
            keys = fresh;
        }
    }
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
    // The library compares whole seconds, so a token would pass for the whole second
    // of its `exp`, while its revocation ends at `exp` to the millisecond: a revoked
    // token worked again for up to a second (review finding, 2026-12-06).
    if claims.exp.saturating_mul(1000) <= now_millis() {
        return Err(fail("expired"));
    }
    audit.worker = Some(claims.sub.clone());
    let jti: std::sync::Arc<str> = claims.jti.as_str().into();
    audit.key_ref = Some(jti.clone());
    let Some(caller) = claims.cal.clone() else {
        // Minted before tokens recorded their caller: nobody to hold accountable.
        return Err(fail("token without caller"));
    };
    audit.caller = Some(caller.as_str().into());
    if !key.is_active(now_millis()) {
        return Err(fail("expired"));
    }
    let job_id = JobId::parse(&claims.jid, "jid").map_err(|_| fail("invalid token"))?;
    if ctx
        .revocations
        .is_revoked(&claims.jti, job_id.as_str(), claims.att)
        .await?
    {
        // A validly signed token whose job was cancelled, on that job's own route: its
        // holder is the worker that was running it, and "cancelled" (409) is the signal
        // it acts on, where a bare "revoked" (401) would look like a credential fault.
        // The token still grants nothing. Anywhere else (another job, a list, a claim)
        // it is a 401 like any revoked token: a 409 there would say that job was
        // cancelled (review, 2026-12-06).
        let own_route = route_job
            .and_then(|id| JobId::parse(id, "id").ok())
            .is_some_and(|id| id == job_id);
        if own_route && ctx.revocations.job_cancelled(&job_id).await? {
            return Err(ApiError::JobCancelled);
        }
        return Err(fail("revoked"));
    }
    match ctx.store.caller(&caller).await? {
        Some(c) if c.disabled => return Err(fail("caller disabled")),
        Some(_) => {}
        // The bootstrap caller has no row; its tokens live while its key is configured.
        None if caller == super::api_key::BOOTSTRAP_CALLER
            && ctx.settings.bootstrap_key_hash.is_some() => {}
        None => return Err(fail("unknown caller")),
    }
    let scopes = claims
        .scope
        .split(' ')
        .filter_map(Scope::parse)
        .filter(|s| matches!(s, Scope::JobsUpdate | Scope::JobsRead))
        .collect();
    Ok(Principal {
        caller,
        scheme: Scheme::Token,
        scopes,
        held: Held::Token {
            jti: claims.jti,
            attempt: claims.att,
            expires_at: claims.exp,
            issued_at: claims.iat,
            worker: claims.sub,
            key_version: version,
        },
        client_cert_until: None,
        key_ref: Some(jti),
        job_id: Some(job_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: i32, expires_at: Option<i64>, revoked: bool) -> TokenKey {
        TokenKey {
            version,
            key: Zeroizing::new(vec![7; 32]),
            expires_at,
            revoked,
        }
    }

    #[test]
    fn a_renewal_needs_the_signing_key_still_active() {
        let renewal = Renewal {
            caller: "dev".into(),
            worker: "w".into(),
            attempt: 1,
            jti: "j".into(),
            lifetime: Duration::from_secs(60),
            key_version: 1,
        };
        let now = 1_000_000;
        assert!(renewal
            .signed_by_active_key(&[key(2, None, false), key(1, None, false)], now)
            .is_ok());
        assert!(renewal
            .signed_by_active_key(&[key(1, Some(now + 1), false)], now)
            .is_ok());
        // Retired with no grace, its grace over, revoked, or gone from the set.
        for keys in [
            vec![key(2, None, false), key(1, Some(now), false)],
            vec![key(2, None, false), key(1, None, true)],
            vec![key(2, None, false)],
        ] {
            let e = renewal
                .signed_by_active_key(&keys, now)
                .expect_err("refused");
            assert!(
                matches!(e, ApiError::Unauthorized(ref f) if f.reason == "expired"),
                "{e:?}"
            );
        }
    }
}
