//! The shared state of one application instance (never global), handed to handlers
//! as `web::Data<AppState>`. Its own module so that handlers, housekeeping and the
//! server builder can all name it without importing each other.

use std::sync::Arc;

use crate::auth::AuthContext;
use crate::config::Config;
use crate::db::Db;
use crate::health::HealthCache;

/// Shared state of one application instance (never global).
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub health: HealthCache,
    /// `GET /coordinator/queues`, one build shared by the requests waiting for it.
    pub queue_list: crate::health::QueueListCache,
    pub auth: Arc<AuthContext>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub estimates: crate::stitcher::EstimateCache,
    /// Job creates, batched on PostgreSQL.
    pub creates: crate::jobs::creates::CreateLog,
    /// Webhook deliveries, batched on PostgreSQL.
    pub ingests: crate::stitcher::ingest::IngestLog,
    /// Progress reports, batched on PostgreSQL.
    pub progress: crate::jobs::progress::ProgressLog,
    /// Wake-ups for long-poll claims and event streams.
    pub notifier: Arc<crate::jobs::notify::Notifier>,
    /// Open connections per peer address (`COORDINATOR_MAX_CONNECTIONS_PER_PEER`).
    pub connections: Arc<crate::auth::throttle::Connections>,
    /// What the HTTP workers' doors (CPU overload shedding) report.
    pub door: Arc<crate::db::admission::DoorStats>,
}
