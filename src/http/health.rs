//! The probe and health routes: `/livez`, `/readyz`, `/metrics`, `/coordinator/health`.

use actix_web::http::header::ContentType;
use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::health::{snapshot, HealthReport, ProbeStatus};
use crate::state::AppState;

/// `GET /coordinator/health` [health:read]
#[utoipa::path(
    get,
    path = "/coordinator/health",
    tag = "probes",
    operation_id = "health",
    summary = "Database status, queue depths, version",
    responses(
        (status = 200, description = "The health snapshot.", body = HealthReport),
    ),
)]
pub async fn health(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let r = snapshot(&state.db, &state.health)
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(r.json.clone()))
}

/// `GET /metrics`: Prometheus text; gauges are refreshed from the health snapshot.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4.",
            body = String, content_type = "text/plain"),
    ),
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let m = &state.metrics;
    m.db.observe(&state.db.stats());
    m.db.observe_door(
        state.door.shed(),
        state.door.limit(),
        state.door.delay(),
        state.door.shortest_request(),
    );
    match crate::health::status_totals(&state.db, &state.health).await {
        Ok(totals) => m.set_status_depths(&totals),
        Err(e) => log::warn!("metrics: queue depths unavailable: {e}"),
    }
    let (connections, idle) = state.db.pool_state();
    m.pool_connections
        .with_label_values(&["idle"])
        .set(i64::from(idle));
    m.pool_connections
        .with_label_values(&["in_use"])
        .set(i64::from(connections.saturating_sub(idle)));
    m.revoked_tokens
        .set(i64::try_from(state.auth.revocations.len()).unwrap_or(i64::MAX));
    m.observe_revocation_reloads(&state.auth.revocations.reloads());
    let (reading, evicted) = state.auth.throttle.body_reads();
    m.observe_body_reads(reading, evicted);
    let (open, refused) = state.connections.counts();
    m.observe_connections(open, refused);
    let (waiting, streams) = state.notifier.counts();
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.push_open
        .with_label_values(&["claims"])
        .set(gauge(waiting));
    m.push_open
        .with_label_values(&["streams"])
        .set(gauge(streams));
    m.push_received.set(
        i64::try_from(
            state
                .notifier
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .unwrap_or(i64::MAX),
    );
    match m.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(e) => {
            log::error!("metrics render failed: {e}");
            HttpResponse::InternalServerError().finish()
        }
    }
}

/// `GET /livez`: the process answers.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "probes",
    operation_id = "livez",
    summary = "Liveness",
    responses(
        (status = 200, description = "The process answers.", body = ProbeStatus,
            example = json!({"status": "ok"})),
    ),
)]
pub async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// How long `/readyz` waits for the database's answer before it says not ready.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// `GET /readyz`: the database answers and every migration has been applied. While
/// the shared health state is not healthy the answer is 503 at once, without a query;
/// an answer that takes over [`READY_WITHIN`] is a 503 too.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    operation_id = "readyz",
    summary = "Readiness",
    responses(
        (status = 200, description = "The database answers and every migration has been \
            applied.", body = ProbeStatus, example = json!({"status": "ready"})),
        (status = 503, description = "Not ready; retry later.", body = ProbeStatus,
            headers(("Retry-After" = String, description = "Seconds")),
            example = json!({"status": "not ready"})),
    ),
)]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    // Shared by the probes that arrive together, reused for a second once ready
    // (`health::readiness`: the route is open and never refused at the door).
    let ready = crate::health::readiness(&state.db, &state.health);
    // A database that stopped answering holds the query; the probe's client should
    // not wait for the stall watch to notice (`db::health::STALL_AFTER`).
    match actix_web::rt::time::timeout(READY_WITHIN, ready).await {
        Ok(Ok(false)) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Ok(Ok(true)) => not_ready("migrations pending"),
        Ok(Err(e)) => not_ready(&e.to_string()),
        Err(_elapsed) => not_ready("the database did not answer within 1 s"),
    }
}

fn not_ready(why: &str) -> HttpResponse {
    log::warn!("not ready: {why}");
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", "1"))
        .json(json!({"status": "not ready"}))
}
