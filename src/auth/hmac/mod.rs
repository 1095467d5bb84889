//! The HMAC request-signature scheme (docs/design.md §4): cheap header checks, timestamp window,
//! cached secrets (named version, or active versions newest first, at most 8) —
//! all before the body is read (`precheck`) — then the constant-time compare over the
//! canonical request and the shared replay record (`finish`).
//!
//! This file is the verifier; the wire formats are pure and beside it: [`wire`] (the
//! `X-Coordinator-*` headers and the canonical string) and [`rfc9421`] (the RFC 9421
//! encoding).

pub mod rfc9421;
pub mod wire;

use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use actix_web::web::Bytes;
use actix_web::HttpMessage;

use self::rfc9421::{Component, Shape};
use self::wire::CanonicalRequest;
use super::audit::AuditRecord;
use super::model::{Purpose, Scheme};
use super::principal::{Held, Principal};
use super::store::{CallerEntry, Lookup, Touch, MAX_VERSIONS_TRIED};
use super::{fail, header, names, AuthContext};
use crate::db::now_millis;
use crate::error::{ApiError, AuthFailure};

/// The request target exactly as sent (path and `?query`).
pub fn request_target(req: &ServiceRequest) -> &str {
    req.uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
}

/// Replay records are kept this long past the end of a request's timestamp window, so
/// an instance whose clock is up to this much behind another still finds the record the
/// faster one wrote (see docs/security.md: the clock-skew assumption).
pub const CLOCK_SKEW_MARGIN_SECS: i64 = 60;

/// What the cheap checks established before the body is read.
pub struct Pending {
    headers: wire::SignatureHeaders,
    entry: Arc<CallerEntry>,
    /// The secret versions to try (at most `MAX_VERSIONS_TRIED`).
    versions: Vec<i32>,
}

/// The caller (known, enabled) and the secret versions to try: the named one (known,
/// not revoked, not expired), else the active ones newest first, at most 8.
async fn caller_versions(
    ctx: &AuthContext,
    caller: &str,
    key_version: Option<i32>,
    blocked: bool,
    audit: &mut AuditRecord,
) -> Result<(Arc<CallerEntry>, Vec<i32>), ApiError> {
    // A blocked address guessing caller names costs no database read.
    if blocked && ctx.store.surely_unknown(Lookup::Caller(caller)).await {
        return Err(fail("unknown caller"));
    }
    let mut entry = ctx
        .store
        .caller(caller)
        .await?
        .ok_or_else(|| fail("unknown caller"))?;
    audit.caller = Some(entry.name.clone());
    // A version this instance has not seen yet (rotated elsewhere moments ago): re-read
    // the caller once (rate-limited per caller) before refusing.
    if let Some(v) = key_version {
        if !entry.hmac.iter().any(|s| s.version == v) {
            if let Some(fresh) = ctx.store.caller_reread(caller).await? {
                entry = fresh;
            }
        }
    }
    if entry.disabled {
        return Err(fail("caller disabled"));
    }
    let now_ms = now_millis();
    let versions: Vec<i32> = match key_version {
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
            vec![s.version]
        }
        None => entry
            .hmac
            .iter()
            .filter(|s| s.is_active(now_ms))
            .take(MAX_VERSIONS_TRIED)
            .map(|s| s.version)
            .collect(),
    };
    if versions.is_empty() {
        return Err(fail("no active secret"));
    }
    Ok((entry, versions))
}

/// The timestamp window, with the server's clock in the refusal.
fn check_window(ctx: &AuthContext, timestamp: i64) -> Result<(), ApiError> {
    let now = now_millis() / 1000;
    if wire::timestamp_in_window(timestamp, now, ctx.settings.skew_secs) {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            AuthFailure::new("timestamp out of range").with("server_time", now),
        ))
    }
}

/// How long after its signed time a replay record is kept: the accepted skew plus
/// the margin.
pub fn record_window_secs(skew_secs: i64) -> i64 {
    skew_secs.saturating_add(CLOCK_SKEW_MARGIN_SECS)
}

/// The (caller, signature) pair may be used once within the window, on any instance
/// sharing the database; the record outlives the window by the skew margin. The
/// record goes into the request for the guard, which has it written with the
/// request's first database work (`db::replay::Deferred`).
fn record_once(
    ctx: &AuthContext,
    req: &ServiceRequest,
    caller: &str,
    signature: &[u8],
    timestamp: i64,
) {
    let expires_at = timestamp
        .saturating_add(record_window_secs(ctx.settings.skew_secs))
        .saturating_mul(1000);
    let sig_hash = crate::crypto::sha256_hex(signature);
    let row = crate::db::replay::ReplayRow::new(caller, sig_hash, timestamp, expires_at);
    req.extensions_mut().insert(ctx.replays.defer(row));
}

/// Record the request's other signatures in the RFC 9421 profile as used, before the
/// request runs, so none of them can run it again (alone, or relabelled as the
/// preferred one). One of them already recorded means the request was run with it:
/// refused as a replay. Unverified (a caller may attach anything next to its own valid
/// signature), so each is recorded under the caller its `keyid` names, only while its
/// `created` is in the window (it could not be used otherwise), and at most
/// [`rfc9421::MAX_OTHER_SIGNATURES`] per request.
async fn record_others(
    ctx: &AuthContext,
    others: &[rfc9421::OtherSignature],
) -> Result<(), ApiError> {
    let now = now_millis() / 1000;
    for o in others {
        if !wire::timestamp_in_window(o.created, now, ctx.settings.skew_secs) {
            continue;
        }
        let expires_at = o
            .created
            .saturating_add(record_window_secs(ctx.settings.skew_secs))
            .saturating_mul(1000);
        let sig_hash = crate::crypto::sha256_hex(&o.signature);
        let row = crate::db::replay::ReplayRow::new(&o.caller, sig_hash, o.created, expires_at);
        if !ctx.replays.record_now(row).await? {
            return Err(fail("replayed request"));
        }
    }
    Ok(())
}

/// The cheap checks, before any body byte is read: header formats, the timestamp
/// window, the caller known and enabled, a usable secret version.
pub async fn precheck(
    ctx: &AuthContext,
    req: &ServiceRequest,
    blocked: bool,
    audit: &mut AuditRecord,
) -> Result<Pending, ApiError> {
    audit.scheme = Some(Scheme::Hmac);
    let h = wire::parse_headers(
        header(req, &names::HMAC_CALLER),
        header(req, &names::HMAC_TIMESTAMP),
        header(req, &names::HMAC_SIGNATURE),
        header(req, &names::HMAC_KEY_VERSION),
        header(req, &names::HMAC_NONCE),
    )
    .map_err(|e| fail(e.reason()))?;
    check_window(ctx, h.timestamp)?;
    let (entry, versions) = caller_versions(ctx, &h.caller, h.key_version, blocked, audit).await?;
    Ok(Pending {
        headers: h,
        entry,
        versions,
    })
}

/// The MAC over the canonical request (body included), then the shared replay record.
pub async fn finish(
    ctx: &AuthContext,
    req: &ServiceRequest,
    pending: Pending,
    body: &Bytes,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    let Pending {
        headers: h,
        entry,
        versions,
    } = pending;
    // Expiry is checked again at use: the body may have taken a while.
    let now_ms = now_millis();
    let candidates = entry
        .hmac
        .iter()
        .filter(|s| versions.contains(&s.version) && s.is_active(now_ms));
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
    let mut candidates = candidates;
    let Some(matched) = candidates.find(|s| wire::verify(&s.secret, &canonical, &h.signature))
    else {
        return Err(ApiError::unauthorized(
            AuthFailure::new("signature mismatch").with("canonical", canonical),
        ));
    };
    let key_ref: Arc<str> = format!("v{}", matched.version).into();
    audit.key_ref = Some(key_ref.clone());

    record_once(ctx, req, &entry.name, h.signature.as_bytes(), h.timestamp);

    ctx.store.touch(Touch::Secret {
        caller: entry.name.clone(),
        purpose: Purpose::HmacSecret,
        version: matched.version,
    });
    Ok(Principal {
        caller: entry.name.to_string(),
        scheme: Scheme::Hmac,
        scopes: entry.scopes.clone(),
        key_ref: Some(key_ref),
        job_id: None,
        held: Held::Secret {
            version: matched.version,
        },
        client_cert_until: None,
    })
}

/// An RFC 9421 signature after the cheap checks.
pub struct PendingHttpSig {
    input: rfc9421::SignatureInput,
    entry: Arc<CallerEntry>,
    versions: Vec<i32>,
}

/// Whether the request announces a body (so `content-digest` must be covered).
fn announces_body(req: &ServiceRequest) -> bool {
    let length = header(req, &CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    length.is_some_and(|n| n > 0) || req.headers().contains_key(TRANSFER_ENCODING)
}

/// RFC 9421, the cheap checks before the body: both headers parse, the chosen
/// signature covers what the profile requires, `created` is in the window, `expires`
/// has not passed, the caller and key version are usable.
pub async fn precheck_http_sig(
    ctx: &AuthContext,
    req: &ServiceRequest,
    blocked: bool,
    audit: &mut AuditRecord,
) -> Result<PendingHttpSig, ApiError> {
    audit.scheme = Some(Scheme::Rfc9421);
    let shape = Shape {
        has_body: announces_body(req),
        has_query: req.uri().query().is_some_and(|q| !q.is_empty()),
    };
    let input = rfc9421::parse(
        header(req, &names::SIGNATURE_INPUT).unwrap_or(""),
        header(req, &names::SIGNATURE).unwrap_or(""),
        shape,
    )
    .map_err(fail)?;
    check_window(ctx, input.created)?;
    let names_authority = input
        .components
        .iter()
        .any(|c| matches!(c, Component::TargetUri | Component::Authority));
    if names_authority && host(req).is_some_and(|h| !rfc9421::is_authority(&h)) {
        return Err(fail("malformed host"));
    }
    if input.expires.is_some_and(|e| e < now_millis() / 1000) {
        return Err(fail("signature expired"));
    }
    let (entry, versions) =
        caller_versions(ctx, &input.caller, input.key_version, blocked, audit).await?;
    Ok(PendingHttpSig {
        input,
        entry,
        versions,
    })
}

/// The request's authority: its `Host`, else (HTTP/2) the URI's.
fn host(req: &ServiceRequest) -> Option<String> {
    header(req, &HOST)
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// A covered component's value in this request (`None`: absent).
fn component_value(req: &ServiceRequest, scheme: &str, c: &Component) -> Option<String> {
    let host = || host(req);
    Some(match c {
        Component::Method => req.method().as_str().to_owned(),
        Component::TargetUri => {
            let authority = rfc9421::authority(&host()?, scheme);
            format!("{scheme}://{authority}{}", request_target(req))
        }
        Component::Authority => rfc9421::authority(&host()?, scheme),
        Component::Path => req.uri().path().to_owned(),
        Component::Query => format!("?{}", req.uri().query().unwrap_or("")),
        Component::Field(name) => {
            let values: Vec<&str> = req
                .headers()
                .get_all(name.as_str())
                .map(|v| v.to_str().map(str::trim))
                .collect::<Result<_, _>>()
                .ok()?;
            if values.is_empty() {
                return None;
            }
            values.join(", ")
        }
    })
}

/// RFC 9421: `Content-Digest` against the body, the base, the MAC under each candidate
/// version (a signed `@target-uri` or `@authority` is tried with `http` and `https`, as
/// TLS may end in front of the service), then the shared replay record.
pub async fn finish_http_sig(
    ctx: &AuthContext,
    req: &ServiceRequest,
    pending: PendingHttpSig,
    body: &Bytes,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    let PendingHttpSig {
        input,
        entry,
        versions,
    } = pending;
    let digest_header = header(req, &names::CONTENT_DIGEST);
    if !body.is_empty() {
        let covered = input
            .components
            .contains(&Component::Field(rfc9421::HEADER_CONTENT_DIGEST.to_owned()));
        if !covered {
            return Err(fail("content-digest must be covered when there is a body"));
        }
    }
    if let Some(d) = digest_header {
        rfc9421::check_content_digest(d, body).map_err(fail)?;
    }
    let scheme_matters = input
        .components
        .iter()
        .any(|c| matches!(c, Component::TargetUri | Component::Authority));
    let schemes: &[&str] = if scheme_matters {
        &["http", "https"]
    } else {
        &["http"]
    };
    let now_ms = now_millis();
    let secrets: Vec<&super::store::SecretVersion> = entry
        .hmac
        .iter()
        .filter(|s| versions.contains(&s.version) && s.is_active(now_ms))
        .collect();
    let mut first_base = None;
    let mut matched = None;
    'outer: for scheme in schemes {
        let base =
            rfc9421::signature_base(&input, |c| component_value(req, scheme, c)).map_err(fail)?;
        for s in &secrets {
            let mac = rfc9421::sign(&s.secret, &base);
            if crate::crypto::ct_eq(&mac, &input.signature) {
                matched = Some(*s);
                break 'outer;
            }
        }
        first_base.get_or_insert(base);
    }
    let Some(matched) = matched else {
        return Err(ApiError::unauthorized(
            AuthFailure::new("signature mismatch")
                .with("signature_base", first_base.unwrap_or_default()),
        ));
    };
    let key_ref: Arc<str> = format!("v{}", matched.version).into();
    audit.key_ref = Some(key_ref.clone());
    record_others(ctx, &input.others).await?;
    record_once(ctx, req, &entry.name, &input.signature, input.created);
    ctx.store.touch(Touch::Secret {
        caller: entry.name.clone(),
        purpose: Purpose::HmacSecret,
        version: matched.version,
    });
    Ok(Principal {
        caller: entry.name.to_string(),
        scheme: Scheme::Rfc9421,
        scopes: entry.scopes.clone(),
        key_ref: Some(key_ref),
        job_id: None,
        held: Held::Secret {
            version: matched.version,
        },
        client_cert_until: None,
    })
}
