//! The HMAC request-signature scheme (docs/design.md §4): cheap header checks, timestamp window,
//! cached secrets (named version, or active versions newest first, at most 8),
//! constant-time compare, then the shared replay record.

use actix_web::dev::ServiceRequest;
use actix_web::web::Bytes;

use super::audit::AuditRecord;
use super::model::{Purpose, Scheme};
use super::principal::Principal;
use super::signing::{self, CanonicalRequest};
use super::store::{Touch, MAX_VERSIONS_TRIED};
use super::{fail, header, AuthContext};
use crate::db::now_millis;
use crate::error::{ApiError, AuthFailure};

/// The request target exactly as sent (path and `?query`).
pub fn request_target(req: &ServiceRequest) -> &str {
    req.uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
}

pub async fn verify(
    ctx: &AuthContext,
    req: &ServiceRequest,
    body: &Bytes,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    audit.scheme = Some(Scheme::Hmac);
    let h = signing::parse_headers(
        header(req, signing::HEADER_CALLER),
        header(req, signing::HEADER_TIMESTAMP),
        header(req, signing::HEADER_SIGNATURE),
        header(req, signing::HEADER_KEY_VERSION),
        header(req, signing::HEADER_NONCE),
    )
    .map_err(|e| fail(e.reason()))?;

    let now = now_millis() / 1000;
    if !signing::timestamp_in_window(h.timestamp, now, ctx.settings.skew_secs) {
        return Err(ApiError::unauthorized(
            AuthFailure::new("timestamp out of range").with("server_time", now),
        ));
    }

    let entry = ctx
        .store
        .caller(&h.caller)
        .await?
        .ok_or_else(|| fail("unknown caller"))?;
    audit.caller = Some(entry.name.clone());
    if entry.disabled {
        return Err(fail("caller disabled"));
    }

    let now_ms = now_millis();
    let candidates: Vec<&super::store::SecretVersion> = match h.key_version {
        Some(v) => {
            let s = entry
                .hmac
                .iter()
                .find(|s| s.version == v)
                .ok_or_else(|| fail("unknown key version"))?;
            if s.revoked {
                return Err(fail("revoked"));
            }
            if !s.is_active(now_ms) {
                return Err(fail("expired"));
            }
            vec![s]
        }
        None => entry
            .hmac
            .iter()
            .filter(|s| s.is_active(now_ms))
            .take(MAX_VERSIONS_TRIED)
            .collect(),
    };
    if candidates.is_empty() {
        return Err(fail("no active secret"));
    }

    let method = req.method().as_str();
    let canonical = CanonicalRequest::new(
        method,
        request_target(req),
        &h.caller,
        &h.timestamp_raw,
        h.nonce.as_deref().unwrap_or(""),
        body,
    )
    .to_signed_string();
    let Some(matched) = candidates
        .into_iter()
        .find(|s| signing::verify(&s.secret, &canonical, &h.signature))
    else {
        return Err(ApiError::unauthorized(
            AuthFailure::new("signature mismatch").with("canonical", canonical),
        ));
    };
    audit.key_ref = Some(format!("v{}", matched.version));

    // Replay: the (caller, signature) pair may be used once within the window, on any
    // instance sharing the database.
    let sig_hash = crate::crypto::sha256_hex(h.signature.as_bytes());
    let expires_at = h
        .timestamp
        .saturating_add(ctx.settings.skew_secs)
        .saturating_add(1)
        .saturating_mul(1000);
    let fresh = ctx
        .replays
        .record(entry.name.clone(), sig_hash, expires_at)
        .await?;
    if !fresh {
        return Err(fail("replayed request"));
    }

    ctx.store.touch(Touch::Secret {
        caller: entry.name.clone(),
        purpose: Purpose::HmacSecret,
        version: matched.version,
    });
    Ok(Principal {
        caller: entry.name.clone(),
        scheme: Scheme::Hmac,
        scopes: entry.scopes.clone(),
        key_ref: Some(format!("v{}", matched.version)),
        job_id: None,
    })
}
