//! Standard Webhooks verification on the webhook routes. A delivery names its sender
//! before any MAC is computed: `/stitcher/webhook/{caller}`, or the bare
//! `/stitcher/webhook` while exactly one caller holds webhook secrets. Only that
//! sender's active secrets (at most `MAX_VERSIONS_TRIED`) are tried, and only after the
//! header formats and the timestamp window passed (`precheck`), so a bogus delivery
//! costs at most one sender's MACs over a body that was read only once it could pass.
//! Redelivery of the same `webhook-id` is settled by the deliveries table.
//!
//! This file is the verifier; the wire format (headers, signed content) is [`wire`].

pub mod wire;

use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::web::Bytes;

use super::audit::AuditRecord;
use super::model::{Purpose, Scheme};
use super::principal::{Held, Principal};
use super::store::{Touch, WebhookKey, MAX_VERSIONS_TRIED};
use super::{fail, header, names, AuthContext};
use crate::db::now_millis;
use crate::error::{ApiError, AuthFailure};

/// The path parameter that names the sender.
pub const SENDER_PARAM: &str = "caller";

/// What the cheap checks established before the body is read.
pub struct Pending {
    headers: wire::WebhookHeaders,
    timestamp_raw: String,
    keys: Arc<Vec<WebhookKey>>,
    /// Indexes into `keys`: the sender's versions to try, newest first.
    tried: Vec<usize>,
}

/// Which caller a delivery is for: the one its URL names, or the only caller holding
/// webhook secrets.
fn sender<'k>(keys: &'k [WebhookKey], named: Option<&str>) -> Result<&'k str, ApiError> {
    match named {
        Some(name) => keys
            .iter()
            .find(|k| k.caller == name)
            .map(|k| k.caller.as_str())
            .ok_or_else(|| fail("unknown webhook sender")),
        None => {
            let mut callers = keys.iter().map(|k| k.caller.as_str());
            let first = callers
                .next()
                .ok_or_else(|| fail("unknown webhook sender"))?;
            if callers.any(|c| c != first) {
                return Err(fail(
                    "several webhook senders: deliver to /stitcher/webhook/{caller}",
                ));
            }
            Ok(first)
        }
    }
}

pub async fn precheck(
    ctx: &AuthContext,
    req: &ServiceRequest,
    audit: &mut AuditRecord,
) -> Result<Pending, ApiError> {
    audit.scheme = Some(Scheme::Webhook);
    let timestamp_raw = header(req, &names::WEBHOOK_TIMESTAMP)
        .unwrap_or("")
        .to_owned();
    let h = wire::parse_headers(
        header(req, &names::WEBHOOK_ID),
        header(req, &names::WEBHOOK_TIMESTAMP),
        header(req, &names::WEBHOOK_SIGNATURE),
    )
    .map_err(|e| fail(e.reason()))?;
    let now = now_millis() / 1000;
    if !super::hmac::wire::timestamp_in_window(h.timestamp, now, ctx.settings.skew_secs) {
        return Err(ApiError::unauthorized(
            AuthFailure::new("timestamp out of range").with("server_time", now),
        ));
    }
    let keys = ctx.store.webhook_keys().await?;
    let now_ms = now_millis();
    let named = req.match_info().get(SENDER_PARAM);
    let caller = sender(&keys, named)?.to_owned();
    audit.caller = Some(caller.as_str().into());
    let mut tried: Vec<usize> = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| k.caller == caller && k.is_active(now_ms))
        .map(|(i, _)| i)
        .collect();
    tried.sort_by_key(|i| std::cmp::Reverse(keys.get(*i).map_or(0, |k| k.version)));
    tried.truncate(MAX_VERSIONS_TRIED);
    Ok(Pending {
        headers: h,
        timestamp_raw,
        keys,
        tried,
    })
}

/// The MAC over `id.timestamp.body` under each of the sender's versions.
pub fn finish(
    ctx: &AuthContext,
    pending: Pending,
    body: &Bytes,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    let Pending {
        headers,
        timestamp_raw,
        keys,
        tried,
    } = pending;
    // Expiry is checked again at use: the body may have taken a while.
    let now_ms = now_millis();
    let Some(k) = tried
        .iter()
        .filter_map(|i| keys.get(*i))
        .filter(|k| k.is_active(now_ms))
        .find(|k| wire::verify(&k.key, &headers, &timestamp_raw, body))
    else {
        return Err(fail("signature mismatch"));
    };
    let key_ref: std::sync::Arc<str> = format!("v{}", k.version).into();
    audit.key_ref = Some(key_ref.clone());
    ctx.store.touch(Touch::Secret {
        caller: k.caller.as_str().into(),
        purpose: Purpose::WebhookSecret,
        version: k.version,
    });
    Ok(Principal {
        caller: k.caller.clone(),
        scheme: Scheme::Webhook,
        scopes: k.scopes.as_slice().into(),
        key_ref: Some(key_ref),
        job_id: None,
        held: Held::WebhookSecret { version: k.version },
        client_cert_until: None,
    })
}
