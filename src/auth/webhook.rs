//! Standard Webhooks verification on `/stitcher/webhook`: the signature must match an
//! active webhook secret of an enabled caller holding `stitcher:webhook`. Redelivery of
//! the same `webhook-id` is settled by the deliveries table (exactly-once processing).

use actix_web::dev::ServiceRequest;
use actix_web::web::Bytes;

use super::audit::AuditRecord;
use super::model::{Purpose, Scheme};
use super::principal::Principal;
use super::store::Touch;
use super::{fail, header, webhook_sig, AuthContext};
use crate::db::now_millis;
use crate::error::{ApiError, AuthFailure};

pub async fn verify(
    ctx: &AuthContext,
    req: &ServiceRequest,
    body: &Bytes,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    audit.scheme = Some(Scheme::Webhook);
    let ts_raw = header(req, webhook_sig::HEADER_TIMESTAMP).unwrap_or("");
    let h = webhook_sig::parse_headers(
        header(req, webhook_sig::HEADER_ID),
        header(req, webhook_sig::HEADER_TIMESTAMP),
        header(req, webhook_sig::HEADER_SIGNATURE),
    )
    .map_err(|e| fail(e.reason()))?;
    let now = now_millis() / 1000;
    if !super::signing::timestamp_in_window(h.timestamp, now, ctx.settings.skew_secs) {
        return Err(ApiError::unauthorized(
            AuthFailure::new("timestamp out of range").with("server_time", now),
        ));
    }
    let keys = ctx.store.webhook_keys().await?;
    let Some(k) = keys
        .iter()
        .find(|k| webhook_sig::verify(&k.key, &h, ts_raw, body))
    else {
        return Err(fail("signature mismatch"));
    };
    audit.caller = Some(k.caller.clone());
    audit.key_ref = Some(format!("v{}", k.version));
    ctx.store.touch(Touch::Secret {
        caller: k.caller.clone(),
        purpose: Purpose::WebhookSecret,
        version: k.version,
    });
    Ok(Principal {
        caller: k.caller.clone(),
        scheme: Scheme::Webhook,
        scopes: k.scopes.clone(),
        key_ref: Some(format!("v{}", k.version)),
        job_id: None,
    })
}
