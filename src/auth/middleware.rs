//! The one authentication middleware. It wraps every route; the four open ones
//! (`/livez`, `/readyz`, `/metrics`, `/openapi.json`) pass straight through. For the
//! rest it picks the scheme in docs/design.md §4's order, verifies, checks the route's scope,
//! puts the `Principal` into the request extensions and writes one audit line.

use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, AUTHORIZATION, CONTENT_LENGTH};
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{Error, HttpMessage, ResponseError};
use futures_util::StreamExt;

use super::audit::{AuditLine, AuditRecord};
use super::principal::Principal;
use super::{api_key, fail, hmac, signing, webhook_sig, AuthContext};
use crate::error::ApiError;
use crate::startup::{access_for, Access, AppState};
use crate::telemetry::RequestId;

/// The route that also accepts Standard Webhooks signatures.
pub const WEBHOOK_ROUTE: &str = "/stitcher/webhook";

/// Which scheme a request uses (docs/design.md §4 order, first match wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Hmac,
    Webhook,
    Bearer,
    ApiKey,
}

/// Pure scheme choice from the headers. Any HMAC header → HMAC, with no fallback.
/// Otherwise exactly one of webhook (on its route), bearer, API key; two or none → 401.
pub fn choose_scheme(headers: &HeaderMap, webhook_route: bool) -> Result<Choice, &'static str> {
    let has = |n: &str| headers.contains_key(n);
    if has(signing::HEADER_CALLER)
        || has(signing::HEADER_TIMESTAMP)
        || has(signing::HEADER_SIGNATURE)
    {
        return Ok(Choice::Hmac);
    }
    let webhook = webhook_route
        && (has(webhook_sig::HEADER_ID)
            || has(webhook_sig::HEADER_TIMESTAMP)
            || has(webhook_sig::HEADER_SIGNATURE));
    let authz = headers.get(AUTHORIZATION);
    let bearer = authz.is_some();
    let api_key = has(api_key::HEADER);
    match (webhook, bearer, api_key) {
        (false, false, false) => Err("missing credentials"),
        (true, false, false) => Ok(Choice::Webhook),
        (false, true, false) => Ok(Choice::Bearer),
        (false, false, true) => Ok(Choice::ApiKey),
        _ => Err("more than one credential scheme"),
    }
}

/// Read the whole body once, bounded by the body limit, and put the same bytes back
/// so the handler's extractors read them unchanged.
pub async fn take_body(req: &mut ServiceRequest, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge);
    }
    let mut payload = req.take_payload();
    let mut buf = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request("body", "could not read the request body"))?;
        if buf.len().saturating_add(chunk.len()) > limit {
            return Err(ApiError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    let bytes = buf.freeze();
    let again = bytes.clone();
    let stream = futures_util::stream::once(async move { Ok(again) });
    let boxed: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>>>,
    > = Box::pin(stream);
    req.set_payload(Payload::from(boxed));
    Ok(bytes)
}

async fn authenticate(
    ctx: &AuthContext,
    req: &mut ServiceRequest,
    webhook_route: bool,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    match choose_scheme(req.headers(), webhook_route).map_err(fail)? {
        Choice::Hmac => {
            let body = take_body(req, ctx.settings.body_limit).await?;
            hmac::verify(ctx, req, &body, audit).await
        }
        Choice::Webhook => {
            let body = take_body(req, ctx.settings.body_limit).await?;
            super::webhook::verify(ctx, req, &body, audit).await
        }
        Choice::Bearer => {
            let value = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            super::token::verify_header(ctx, value, audit).await
        }
        Choice::ApiKey => {
            let value = req
                .headers()
                .get(api_key::HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            api_key::verify(ctx, &value, audit).await
        }
    }
}

/// The middleware (use with `middleware::from_fn`).
pub async fn auth_middleware(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let pattern = req.match_pattern();
    let spec = pattern.as_deref().and_then(access_for);
    if spec.is_some_and(|s| s.access == Access::Open) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        let e = ApiError::internal(anyhow::anyhow!("application state missing"));
        return Ok(req.into_response(e.error_response()).map_into_right_body());
    };
    let ctx = &state.auth;
    let started = Instant::now();
    let route = pattern.unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().to_string();
    let peer = req.peer_addr().map(|a| a.ip());
    let mut audit = AuditRecord::default();

    // A peer over its failure quota still gets its credentials checked: a valid caller
    // behind the same address (NAT, a proxy) is served, while every further failure
    // from that peer is answered 429 instead of 401.
    let blocked = peer.and_then(|ip| ctx.throttle.blocked_for(ip));
    let webhook_route = route == WEBHOOK_ROUTE;
    let outcome = match authenticate(ctx, &mut req, webhook_route, &mut audit).await {
        Ok(p) => authorize(&p, spec, req.method().as_str()).map(|()| p),
        Err(ApiError::Unauthorized(f)) if blocked.is_some() => {
            audit.reason = Some(f.reason);
            log::warn!(
                "authentication failed on {method} {route} (throttled): {}",
                f.reason
            );
            if let Some(ip) = peer {
                ctx.throttle.record_failure(ip);
            }
            Err(ApiError::TooManyRequests {
                retry_after_secs: blocked.unwrap_or(1),
            })
        }
        Err(e) => Err(e),
    };

    let res = match outcome {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.call(req).await?.map_into_left_body()
        }
        Err(mut e) => {
            if let ApiError::Unauthorized(f) = &e {
                audit.reason = Some(f.reason);
                log::warn!("authentication failed on {method} {route}: {}", f.reason);
                if let Some(wait) = peer.and_then(|ip| ctx.throttle.record_failure(ip)) {
                    e = ApiError::TooManyRequests {
                        retry_after_secs: wait,
                    };
                }
            } else if let ApiError::TooManyRequests { .. } = &e {
                audit.reason.get_or_insert("throttled");
            } else if let ApiError::Forbidden(why) = &e {
                audit.reason = Some(why);
            }
            req.into_response(e.error_response()).map_into_right_body()
        }
    };
    let status = res.status().as_u16();
    let denied = audit.reason.is_some() || matches!(status, 401 | 403 | 429);
    state.metrics.auth_outcome(
        audit.scheme.map_or("none", |s| s.as_str()),
        if denied { "deny" } else { "allow" },
        audit.reason.unwrap_or("ok"),
    );
    let rid = res
        .request()
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone());
    AuditLine {
        record: &audit,
        method: &method,
        route: &route,
        peer: peer.map(|p| p.to_string()),
        status: res.status().as_u16(),
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        request_id: rid.as_deref(),
    }
    .write();
    Ok(res)
}

/// 401 is who-you-are, 403 is what-you-may: the route's scope, looked up by pattern.
/// A path that matches no route, or a method the route lacks, needs only a principal
/// (it then gets 404/405).
fn authorize(
    p: &Principal,
    spec: Option<&crate::startup::RouteSpec>,
    method: &str,
) -> Result<(), ApiError> {
    match spec {
        Some(s) if s.method == method => match s.access {
            Access::Open => Ok(()),
            Access::Scope(scope) if p.has_scope(scope) => Ok(()),
            Access::Scope(_) => Err(ApiError::Forbidden("missing scope for this route")),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static("x"),
            );
        }
        h
    }

    #[test]
    fn scheme_order() {
        use Choice::*;
        let c = |n: &[&str], wh: bool| choose_scheme(&headers(n), wh);
        assert_eq!(c(&["x-coordinator-signature"], false), Ok(Hmac));
        // No fallback once any signature header is present.
        assert_eq!(c(&["x-coordinator-caller", "x-api-key"], false), Ok(Hmac));
        assert_eq!(
            c(&["x-coordinator-timestamp", "authorization"], false),
            Ok(Hmac)
        );
        assert_eq!(c(&["webhook-signature"], true), Ok(Webhook));
        assert!(c(&["webhook-signature"], false).is_err());
        assert_eq!(c(&["authorization"], false), Ok(Bearer));
        assert_eq!(c(&["X-API-KEY"], false), Ok(ApiKey));
        assert!(c(&["authorization", "x-api-key"], false).is_err());
        assert!(c(&["webhook-id", "x-api-key"], true).is_err());
        assert_eq!(c(&[], false), Err("missing credentials"));
    }
}
