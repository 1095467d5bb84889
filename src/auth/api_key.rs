//! The API key scheme: format and checksum checked before any database work, then the
//! SHA-256 hash looked up (cached); expiry, revocation and the caller's state checked.

use super::audit::AuditRecord;
use super::model::Scheme;
use super::principal::{Held, Principal};
use super::store::{Lookup, Touch};
use super::{fail, AuthContext, Scope};
use crate::crypto::credential::ApiKey;
use crate::db::now_millis;
use crate::error::ApiError;

pub const HEADER: &str = "x-api-key";
pub const BOOTSTRAP_CALLER: &str = "bootstrap";

#[expect(
    clippy::map_err_ignore,
    reason = "the presented key is a secret: why it fails to parse stays out of logs and responses"
)]
/// `blocked`: the request's address is over its failure budget (see
/// [`super::store::CredentialStore::surely_unknown`]).
pub async fn verify(
    ctx: &AuthContext,
    presented: &str,
    blocked: bool,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    audit.scheme = Some(Scheme::ApiKey);
    if ctx.settings.require_signature {
        return Err(fail("signature required"));
    }
    if let Some(boot) = &ctx.settings.bootstrap_key_hash {
        let given = crate::crypto::sha256(presented.as_bytes());
        if crate::crypto::ct_eq(&given, boot) {
            let key_ref: std::sync::Arc<str> = "bootstrap".into();
            audit.caller = Some(BOOTSTRAP_CALLER.into());
            audit.key_ref = Some(key_ref.clone());
            return Ok(Principal {
                caller: BOOTSTRAP_CALLER.to_owned(),
                scheme: Scheme::ApiKey,
                scopes: Scope::ALL.into(),
                key_ref: Some(key_ref),
                job_id: None,
                held: Held::Bootstrap,
                client_cert_until: None,
            });
        }
    }
    ApiKey::validate(presented).map_err(|_| fail("malformed api key"))?;
    // The stored form, in a stack buffer: the key itself is not copied anywhere.
    let hash = crate::crypto::sha256_hex_buf(presented.as_bytes());
    // A blocked address guessing keys costs no database read.
    if blocked
        && ctx
            .store
            .surely_unknown(Lookup::ApiKey(hash.as_str()))
            .await
    {
        return Err(fail("unknown api key"));
    }
    let found = ctx
        .store
        .api_key(hash.as_str())
        .await?
        .ok_or_else(|| fail("unknown api key"))?;
    let (row, caller) = (&found.key, &found.caller);
    audit.caller = Some(found.caller_name.clone());
    audit.key_ref = Some(found.display_prefix.clone());
    if row.revoked_at.is_some() {
        return Err(fail("revoked"));
    }
    if row.expires_at.is_some_and(|e| e <= now_millis()) {
        return Err(fail("expired"));
    }
    if caller.disabled_at.is_some() {
        return Err(fail("caller disabled"));
    }
    ctx.store.touch(Touch::ApiKey {
        id: found.id.clone(),
    });
    Ok(Principal {
        caller: row.caller.clone(),
        scheme: Scheme::ApiKey,
        // Effective scopes (the key's, limited to what the caller still holds), worked
        // out when the key was read.
        scopes: found.scopes.clone(),
        key_ref: Some(found.display_prefix.clone()),
        job_id: None,
        held: Held::ApiKey {
            hash: found.hash.clone(),
        },
        client_cert_until: None,
    })
}
