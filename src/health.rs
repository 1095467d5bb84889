//! The detailed health report and the readiness check (the probe routes themselves,
//! `/livez`, `/readyz` and `/coordinator/health`, are in `http::health`).
//!
//! `GET /coordinator/health` is served from a snapshot at most one second old, taken by
//! whichever request finds it stale (one at a time), so that a health check costs about
//! what `/livez` costs instead of a `GROUP BY` per probe.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::db::{Db, DbConnection};
use crate::error::StoreError;
use crate::jobs::{queues, repo};
use serde::Serialize;

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
    /// How long the oldest QUEUED job that is due has waited, since its `runAt` (a job
    /// scheduled for later, or waiting out a retry's backoff, is not waiting yet);
    /// `null` when none is.
    #[schema(required = true)]
    pub oldest_queued_age_secs: Option<f64>,
    #[schema(format = DateTime)]
    pub generated_at: String,
}

/// A health report with its JSON body, serialized once when the report is taken, so a
/// request for the cached report costs no serialization.
pub struct Snapshot {
    pub report: HealthReport,
    pub json: actix_web::web::Bytes,
}

impl Snapshot {
    fn new(report: HealthReport) -> Result<Self, StoreError> {
        let json = serde_json::to_vec(&report)
            .map_err(|e| StoreError::Internal(format!("health report: {e}")))?;
        Ok(Snapshot {
            report,
            json: json.into(),
        })
    }
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
    /// The last snapshot and when it was stored.
    snapshot: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// Held by the one request that takes a snapshot; the others that need one wait
    /// for it here and use what it took.
    refresh: tokio::sync::Mutex<()>,
    /// Snapshots taken so far.
    taken: std::sync::atomic::AtomicU64,
    /// `/metrics`' totals per status, and when they were read.
    totals: tokio::sync::Mutex<Option<(Instant, Arc<StatusTotals>)>>,
    /// When the last readiness check that found the database ready started. Held
    /// across a check: the probes that arrive meanwhile wait for it (see [`readiness`]).
    ready: tokio::sync::Mutex<Option<Instant>>,
    /// Readiness checks run so far.
    ready_checks: std::sync::atomic::AtomicU64,
}

/// Jobs per non-terminal status, all queues together.
pub type StatusTotals = BTreeMap<String, i64>;

impl HealthCache {
    /// Health snapshots taken so far (each one a `GROUP BY` of every queue).
    pub fn snapshots_taken(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Readiness checks run so far (each one three statements on a pool connection).
    pub fn readiness_checks(&self) -> u64 {
        self.ready_checks.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn fresh(&self, max_age: Duration) -> Option<Arc<Snapshot>> {
        let guard = self.snapshot.lock().ok()?;
        guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() < max_age)
            .map(|(_, r)| Arc::clone(r))
    }

    /// The snapshot stored at or after `since`, if any.
    fn since(&self, since: Instant) -> Option<Arc<Snapshot>> {
        let guard = self.snapshot.lock().ok()?;
        guard
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, r)| Arc::clone(r))
    }

    fn store(&self, report: &Arc<Snapshot>) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = Some((Instant::now(), Arc::clone(report)));
        }
    }
}

/// `GET /coordinator/queues`, built once for every request that waits for it. The list
/// has one entry per queue with a job not yet ended, and queue names are the callers'
/// own: with 100,000 of them one build took ~270 ms and ~12 MB of JSON, and eight
/// `health:read` callers asking in a loop drove the instance from 95 to 420 MB RSS and
/// their answers to 1.5 s (review finding, 2026-12-06). Now one build runs at a time,
/// and a request shares the first build that *started after it arrived*: it never
/// sees a list older than itself (a change it made, or saw made, is in it), and however
/// many ask, at most one build runs and one more waits.
#[derive(Default)]
pub struct QueueListCache {
    /// When the last build started, and its body. Held across a build: the waiters
    /// queue on it.
    last: tokio::sync::Mutex<Option<(Instant, actix_web::web::Bytes)>>,
    builds: std::sync::atomic::AtomicU64,
}

impl QueueListCache {
    /// The list as JSON, from a build that started after this call.
    pub async fn get<F, Fut>(&self, build: F) -> Result<actix_web::web::Bytes, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<actix_web::web::Bytes, StoreError>>,
    {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, body)) = last.as_ref() {
            if *started >= arrived {
                return Ok(body.clone());
            }
        }
        // Not kept past its use: a stale list is never served, so holding it would
        // only keep its memory.
        *last = None;
        let started = Instant::now();
        self.builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = build().await?;
        *last = Some((started, body.clone()));
        Ok(body)
    }

    /// Builds so far.
    pub fn builds(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Jobs per non-terminal status, all queues together, at most [`SNAPSHOT_TTL`] old, for
/// `/metrics` (the open listener). Not from the health snapshot: that one has an entry
/// per queue, and with 100,000 queues (names are the creators' own) each snapshot was
/// a ~100 ms `GROUP BY` and 2.4 MB of JSON, which any unauthenticated client could
/// have taken once a second by scraping (review finding, 2026-12-06). This is one
/// row per status (~7 ms over 100,000 jobs). One read at a time: the others wait for
/// it and use what it read.
pub async fn status_totals(db: &Db, cache: &HealthCache) -> Result<Arc<StatusTotals>, StoreError> {
    db.health().admit()?;
    let mut last = cache.totals.lock().await;
    if let Some((at, totals)) = last.as_ref() {
        if at.elapsed() < SNAPSHOT_TTL {
            return Ok(Arc::clone(totals));
        }
    }
    let totals: StatusTotals = db.read(queues::status_depths).await?.into_iter().collect();
    let totals = Arc::new(totals);
    *last = Some((Instant::now(), Arc::clone(&totals)));
    Ok(totals)
}

async fn take_snapshot(db: &Db) -> Result<HealthReport, StoreError> {
    let started = Instant::now();
    let (depths, oldest, now) = db
        .read(|conn| {
            let now = crate::db::now_millis();
            let depths = queues::queue_depths(conn)?;
            let oldest = queues::oldest_due_run_at(conn, now)?;
            Ok((depths, oldest, now))
        })
        .await?;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut queues: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (queue, status, n) in depths {
        queues.entry(queue).or_default().insert(status, n);
    }
    let (connections, idle) = db.pool_state();
    Ok(HealthReport {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        database: DatabaseHealth {
            status: "up",
            backend: match db.backend() {
                crate::db::Backend::Postgres => "postgres",
                crate::db::Backend::Sqlite => "sqlite",
            },
            latency_ms,
            pool_connections: connections,
            pool_idle: idle,
        },
        queues,
        oldest_queued_age_secs: oldest.map(|t| {
            std::time::Duration::from_millis(u64::try_from(now - t).unwrap_or(0)).as_secs_f64()
        }),
        generated_at: crate::jobs::model::rfc3339(now),
    })
}

/// `/readyz`'s check: whether a migration is still pending (`true`: not ready), or why
/// the database cannot say. The route is open and never refused at the door, and the
/// check is three statements on a pool connection (the ping, and diesel's
/// `CREATE TABLE IF NOT EXISTS` and `SELECT` of applied migrations): one per probe let
/// anyone with a few dozen connections keep the pool busy, and the database queue
/// then refused authenticated requests (third security review, 2026-12-07). So one
/// check runs at a time, the probes that arrive meanwhile wait for it, and a check
/// that found the database ready answers every probe of the next [`SNAPSHOT_TTL`]. A
/// failure is never reused, and the health state is asked first at every probe: an
/// outage it knows of is not ready at once.
pub async fn readiness(db: &Db, cache: &HealthCache) -> Result<bool, StoreError> {
    db.health().admit()?;
    let mut last = cache.ready.lock().await;
    if last.is_some_and(|at| at.elapsed() < SNAPSHOT_TTL) {
        return Ok(false);
    }
    db.health().admit()?;
    let started = Instant::now();
    cache
        .ready_checks
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pending = db.read(migrations_pending).await;
    *last = match pending {
        Ok(false) => Some(started),
        _ => None,
    };
    pending
}

/// Readiness, asked of one connection: the database answers, and whether a migration
/// is still pending (`true`: not ready).
pub fn migrations_pending(conn: &mut DbConnection) -> Result<bool, StoreError> {
    repo::ping(conn)?;
    crate::db::migrate::has_pending(conn).map_err(|e| StoreError::Internal(e.to_string()))
}

/// The health snapshot, at most `SNAPSHOT_TTL` old. One request at a time takes a
/// new one: while it does, the others get the previous one if it is at most
/// `5 × SNAPSHOT_TTL` old, and otherwise wait for it and share what it took (or, if it
/// failed, take theirs one after the other). Before, each request that found no recent
/// snapshot took its own, so a snapshot slower than 5 s (100,000 queues) or the first
/// one after a start ran once per waiting request. While the database is failing there
/// is none: a cached "ok" must not outlive the outage.
pub async fn snapshot(db: &Db, cache: &HealthCache) -> Result<Arc<Snapshot>, StoreError> {
    db.health().admit()?;
    if let Some(r) = cache.fresh(SNAPSHOT_TTL) {
        return Ok(r);
    }
    let arrived = Instant::now();
    let _refreshing = match cache.refresh.try_lock() {
        Ok(g) => g,
        Err(_) => {
            // Someone else is refreshing: serve the previous snapshot if it is recent.
            if let Some(r) = cache.fresh(SNAPSHOT_TTL * 5) {
                return Ok(r);
            }
            let g = cache.refresh.lock().await;
            if let Some(r) = cache.since(arrived) {
                return Ok(r);
            }
            db.health().admit()?;
            g
        }
    };
    cache
        .taken
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match take_snapshot(db)
        .await
        .and_then(Snapshot::new)
        .map(Arc::new)
    {
        Ok(r) => {
            cache.store(&r);
            Ok(r)
        }
        Err(e) => {
            if let Ok(mut g) = cache.snapshot.lock() {
                *g = None;
            }
            Err(e)
        }
    }
}
