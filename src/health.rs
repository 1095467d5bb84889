//! Liveness, readiness and the detailed health report.
//!
//! `GET /coordinator/health` is served from a snapshot at most one second old, taken by
//! whichever request finds it stale (one at a time), so that a health check costs about
//! what `/livez` costs instead of a `GROUP BY` per probe.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::json;

use crate::db::migrate;
use crate::error::{ApiError, ApiResult, StoreError};
use crate::jobs::repo;
use crate::openapi::problem;
use crate::startup::AppState;

/// How long a health snapshot is served before it is refreshed.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseHealth {
    #[schema(value_type = String, example = "up")]
    pub status: &'static str,
    #[schema(value_type = String, pattern = "^(sqlite|postgres)$")]
    pub backend: &'static str,
    /// How long the snapshot's queries took.
    pub latency_ms: f64,
    pub pool_connections: u32,
    pub pool_idle: u32,
}

/// The health snapshot (at most one second old).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
    /// The server's version.
    #[schema(value_type = String)]
    pub version: &'static str,
    pub database: DatabaseHealth,
    /// queue → status → count, for PENDING, QUEUED and RUNNING jobs.
    #[schema(example = json!({"default": {"QUEUED": 3, "RUNNING": 1}}))]
    pub queues: BTreeMap<String, BTreeMap<String, i64>>,
    /// Age of the oldest QUEUED job; `null` when none is queued.
    #[schema(required = true)]
    pub oldest_queued_age_secs: Option<f64>,
    #[schema(format = DateTime)]
    pub generated_at: String,
}

/// The body of `/livez` and `/readyz`: nothing beyond ok / not ready.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProbeStatus {
    #[schema(pattern = "^(ok|ready|not ready)$")]
    pub status: String,
}

/// The cached snapshot and the lock that makes refreshes single-flight.
#[derive(Default)]
pub struct HealthCache {
    snapshot: Mutex<Option<(Instant, HealthReport)>>,
    refresh: single_flight::Flag,
}

mod single_flight {
    //! A flag that lets one request at a time refresh the snapshot.
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    pub struct Flag(AtomicBool);

    impl Flag {
        /// Try to become the one refresher; `None` when another request refreshes.
        pub fn try_lock(&self) -> Option<Guard<'_>> {
            self.0
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .ok()
                .map(|_| Guard(&self.0))
        }
    }

    pub struct Guard<'a>(&'a AtomicBool);

    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
}

impl HealthCache {
    fn fresh(&self, max_age: Duration) -> Option<HealthReport> {
        let guard = self.snapshot.lock().ok()?;
        guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() < max_age)
            .map(|(_, r)| r.clone())
    }

    fn store(&self, report: &HealthReport) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = Some((Instant::now(), report.clone()));
        }
    }
}

async fn take_snapshot(state: &AppState) -> Result<HealthReport, StoreError> {
    let started = Instant::now();
    let (depths, oldest) = state
        .db
        .read(|conn| {
            let depths = repo::queue_depths(conn)?;
            let oldest = repo::oldest_queued_created_at(conn)?;
            Ok((depths, oldest))
        })
        .await?;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut queues: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (queue, status, n) in depths {
        queues.entry(queue).or_default().insert(status, n);
    }
    let now = crate::db::now_millis();
    let (connections, idle) = state.db.pool_state();
    Ok(HealthReport {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        database: DatabaseHealth {
            status: "up",
            backend: match state.db.backend() {
                crate::db::Backend::Postgres => "postgres",
                crate::db::Backend::Sqlite => "sqlite",
            },
            latency_ms,
            pool_connections: connections,
            pool_idle: idle,
        },
        queues,
        oldest_queued_age_secs: oldest.map(|t| (now - t).max(0) as f64 / 1000.0),
        generated_at: crate::jobs::model::rfc3339(now),
    })
}

/// The health snapshot, at most `SNAPSHOT_TTL` old (one refresher at a time). While
/// the database is failing there is none: a cached "ok" must not outlive the outage.
pub async fn snapshot(state: &AppState) -> Result<HealthReport, StoreError> {
    state.db.health().admit()?;
    if let Some(r) = state.health.fresh(SNAPSHOT_TTL) {
        return Ok(r);
    }
    let Some(_refreshing) = state.health.refresh.try_lock() else {
        // Someone else is refreshing: serve the previous snapshot if it is recent.
        if let Some(r) = state.health.fresh(SNAPSHOT_TTL * 5) {
            return Ok(r);
        }
        return take_snapshot(state).await;
    };
    match take_snapshot(state).await {
        Ok(r) => {
            state.health.store(&r);
            Ok(r)
        }
        Err(e) => {
            if let Ok(mut g) = state.health.snapshot.lock() {
                *g = None;
            }
            Err(e)
        }
    }
}

/// `GET /coordinator/health` [health:read]
#[utoipa::path(
    get,
    path = "/coordinator/health",
    tag = "probes",
    operation_id = "health",
    summary = "Database status, queue depths, version",
    responses(
        (status = 200, description = "The health snapshot.", body = HealthReport),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(("hmac" = ["health:read"]), ("apiKey" = ["health:read"])),
)]
pub async fn health(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let r = snapshot(&state).await.map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(r))
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
    m.db.observe(&state.db.stats(), Some(state.auth.replays.queue_stats()));
    match snapshot(&state).await {
        Ok(r) => m.set_queue_depths(&r.queues),
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

/// `GET /readyz`: the database answers and every migration has been applied. While
/// the shared health state is not healthy the answer is 503 at once, without a query.
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
    if let Err(e) = state.db.health().admit() {
        return not_ready(&e.to_string());
    }
    let ready = state
        .db
        .read(|conn| {
            repo::ping(conn)?;
            migrate::has_pending(conn).map_err(|e| StoreError::Internal(e.to_string()))
        })
        .await;
    match ready {
        Ok(false) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Ok(true) => not_ready("migrations pending"),
        Err(e) => not_ready(&e.to_string()),
    }
}

fn not_ready(why: &str) -> HttpResponse {
    log::warn!("not ready: {why}");
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", "1"))
        .json(json!({"status": "not ready"}))
}
