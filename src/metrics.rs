//! Prometheus metrics, one registry per application instance (no global state).
//!
//! Label values are bounded: route *patterns* (never raw paths), methods, status codes,
//! scheme and reason strings from fixed sets, job statuses. `/metrics` is open, so no
//! series carries a string a caller chose: job depth is per status only, summed over
//! queues (per-queue depth is behind `health:read`: `GET /coordinator/queues` and
//! `GET /coordinator/health`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::db::health::DbState;
use crate::db::DbStats;

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
    pub auth_outcomes: IntCounterVec,
    pub job_transitions: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub pool_connections: IntGaugeVec,
    pub revoked_tokens: IntGauge,
    /// Full reads of the revocations table by why (`auth::revocation`), at scrape time.
    revocation_reloads: IntCounterVec,
    /// Bodies on their way before their requests are verified, and those whose place
    /// went to a peer holding fewer (`auth::throttle`), set at scrape time.
    unverified_body_reads: IntGauge,
    unverified_body_reads_evicted: IntCounter,
    body_reads_sync: Mutex<()>,
    connections_open: IntGauge,
    connections_refused: IntCounter,
    /// Push (`jobs::notify`): waiting claims and open streams now, and changes
    /// received from the database, set at scrape time.
    pub push_open: IntGaugeVec,
    pub push_received: IntGauge,
    /// Seconds from a change being written to its delivery to a woken waiter.
    pub push_wakeup: HistogramVec,
    /// The storage layer (health state, queues, shedding, SQLite WAL), copied from
    /// `Db::stats` at scrape time.
    pub db: DbMetrics,
}

/// Metrics of the storage layer. Its counters live as atomics in `Db` (which has no
/// registry); a scrape adds what they grew since the previous scrape.
pub struct DbMetrics {
    state: IntGaugeVec,
    trips: IntCounter,
    queue_depth: IntGaugeVec,
    queue_limit: IntGaugeVec,
    queue_wait: GaugeVec,
    shed: IntCounterVec,
    wal_bytes: IntGauge,
    wal_max_bytes: IntGauge,
    wal_checkpoints: IntCounterVec,
    in_flight_limit: IntGauge,
    queue_delay: Gauge,
    shortest_request: Gauge,
    /// Serialises scrapes so counter deltas are applied once.
    sync: Mutex<()>,
}

impl DbMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let state = IntGaugeVec::new(
            Opts::new(
                "db_state",
                "Database health state of this instance: 1 for the current state",
            ),
            &["state"],
        )?;
        let trips = IntCounter::new(
            "db_trips_total",
            "Times the database health state left healthy (requests then get 503 at once)",
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "db_queue_depth",
                "Operations waiting for or holding a database connection, per queue",
            ),
            &["queue"],
        )?;
        let queue_limit = IntGaugeVec::new(
            Opts::new(
                "db_queue_limit",
                "Bound of each queue in front of the database; past it, 503 at once",
            ),
            &["queue"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "db_shed_total",
                "Requests refused before reaching the database, by queue and reason",
            ),
            &["queue", "reason"],
        )?;
        let queue_wait = GaugeVec::new(
            Opts::new(
                "db_queue_standing_wait_seconds",
                "Shortest wait for a turn over the last interval, per queue: above 0 means a standing queue",
            ),
            &["queue"],
        )?;
        let wal_bytes = IntGauge::new(
            "sqlite_wal_bytes",
            "Size of the SQLite WAL file at the last write (SQLite only)",
        )?;
        let wal_max_bytes = IntGauge::new(
            "sqlite_wal_max_bytes",
            "Largest SQLite WAL file size measured since start (SQLite only)",
        )?;
        let wal_checkpoints = IntCounterVec::new(
            Opts::new(
                "sqlite_wal_checkpoints_total",
                "WAL resets (RESTART checkpoints) run by the writer, by outcome (SQLite only)",
            ),
            &["outcome"],
        )?;
        let in_flight_limit = IntGauge::new(
            "http_in_flight_limit",
            "Requests the instance's HTTP workers may have in progress now (adaptive; past it, 503 at once)",
        )?;
        let queue_delay = Gauge::new(
            "http_event_loop_lag_seconds",
            "Largest over the HTTP workers of the last interval's shortest event-loop lag",
        )?;
        registry.register(Box::new(in_flight_limit.clone()))?;
        registry.register(Box::new(queue_delay.clone()))?;
        let shortest_request = Gauge::new(
            "http_shortest_request_seconds",
            "Largest over the HTTP workers of the last interval's shortest admitted request (door to reply)",
        )?;
        registry.register(Box::new(shortest_request.clone()))?;
        registry.register(Box::new(state.clone()))?;
        registry.register(Box::new(trips.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_limit.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(wal_bytes.clone()))?;
        registry.register(Box::new(wal_max_bytes.clone()))?;
        registry.register(Box::new(wal_checkpoints.clone()))?;
        Ok(DbMetrics {
            state,
            trips,
            queue_depth,
            queue_limit,
            queue_wait,
            shed,
            wal_bytes,
            wal_max_bytes,
            wal_checkpoints,
            in_flight_limit,
            queue_delay,
            shortest_request,
            sync: Mutex::new(()),
        })
    }

    /// The HTTP workers' doors (`db::admission`): refused so far, the instance's
    /// in-flight limit, the largest delay.
    pub fn observe_door(
        &self,
        shed: u64,
        limit: u64,
        delay: std::time::Duration,
        shortest: std::time::Duration,
    ) {
        let Ok(_one_at_a_time) = self.sync.lock() else {
            return;
        };
        let c = self.shed.with_label_values(&["http", "in_flight"]);
        c.inc_by(shed.saturating_sub(c.get()));
        self.in_flight_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        self.queue_delay.set(delay.as_secs_f64());
        self.shortest_request.set(shortest.as_secs_f64());
    }

    /// Copy the storage layer's counters (its pools' queues and, on PostgreSQL, the
    /// batching threads': `replay_log`, `progress_log`, `create_log`, `ingest_log`).
    pub fn observe(&self, s: &DbStats) {
        let Ok(_one_at_a_time) = self.sync.lock() else {
            return;
        };
        let to_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        fn catch_up(c: &IntCounter, total: u64) {
            c.inc_by(total.saturating_sub(c.get()));
        }
        for st in [DbState::Healthy, DbState::Failing, DbState::Probing] {
            self.state
                .with_label_values(&[st.as_str()])
                .set(i64::from(st == s.state));
        }
        catch_up(&self.trips, s.trips);
        for q in &s.queues {
            self.queue_depth
                .with_label_values(&[q.name])
                .set(to_i64(q.depth));
            self.queue_limit
                .with_label_values(&[q.name])
                .set(to_i64(q.limit));
            self.queue_wait
                .with_label_values(&[q.name])
                .set(q.standing.as_secs_f64());
            for (why, n) in &q.shed {
                catch_up(&self.shed.with_label_values(&[q.name, why.as_str()]), *n);
            }
        }
        if let Some((bytes, max, checkpoints, incomplete)) = s.wal {
            self.wal_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            self.wal_max_bytes
                .set(i64::try_from(max).unwrap_or(i64::MAX));
            catch_up(
                &self.wal_checkpoints.with_label_values(&["complete"]),
                checkpoints.saturating_sub(incomplete),
            );
            catch_up(
                &self.wal_checkpoints.with_label_values(&["incomplete"]),
                incomplete,
            );
        }
    }
}

impl Metrics {
    /// The unverified bodies on their way now, and those ended so far to give their
    /// place to a peer holding fewer (`auth::throttle`). Under a lock: two scrapes at
    /// once must not both add the difference.
    pub fn observe_body_reads(&self, reading: usize, evicted: u64) {
        let Ok(_one_at_a_time) = self.body_reads_sync.lock() else {
            return;
        };
        self.unverified_body_reads
            .set(i64::try_from(reading).unwrap_or(i64::MAX));
        let c = &self.unverified_body_reads_evicted;
        c.inc_by(evicted.saturating_sub(c.get()));
    }

    /// Connections open now and those refused so far (`auth::throttle::Connections`),
    /// under the same lock as the body reads: two scrapes must not both add.
    pub fn observe_connections(&self, open: u64, refused: u64) {
        let Ok(_one_at_a_time) = self.body_reads_sync.lock() else {
            return;
        };
        self.connections_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        let c = &self.connections_refused;
        c.inc_by(refused.saturating_sub(c.get()));
    }

    /// The revocation set's full reads so far, by reason (`Revocations::reloads`),
    /// under the same lock as the body reads: two scrapes must not both add.
    pub fn observe_revocation_reloads(&self, counts: &[(&str, u64)]) {
        let Ok(_one_at_a_time) = self.body_reads_sync.lock() else {
            return;
        };
        for (reason, n) in counts {
            let c = self.revocation_reloads.with_label_values(&[*reason]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("coordinator".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route pattern, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_latency = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Request latency by route pattern",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )?;
        let auth_outcomes = IntCounterVec::new(
            Opts::new(
                "auth_outcomes_total",
                "Authentication outcomes by scheme, outcome and reason",
            ),
            &["scheme", "outcome", "reason"],
        )?;
        let job_transitions = IntCounterVec::new(
            Opts::new(
                "job_transitions_total",
                "Job state changes by the state entered",
            ),
            &["to"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "queue_depth",
                "Jobs per non-terminal status, all queues together (at scrape time, at most \
                 1 s old; per-queue depth needs health:read)",
            ),
            &["status"],
        )?;
        let pool_connections = IntGaugeVec::new(
            Opts::new(
                "db_pool_connections",
                "Pooled database connections by state",
            ),
            &["state"],
        )?;
        let revoked_tokens =
            IntGauge::new("revoked_tokens", "Revoked job-token ids held in memory")?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_latency.clone()))?;
        registry.register(Box::new(auth_outcomes.clone()))?;
        registry.register(Box::new(job_transitions.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(pool_connections.clone()))?;
        registry.register(Box::new(revoked_tokens.clone()))?;
        let revocation_reloads = IntCounterVec::new(
            Opts::new(
                "revocation_reloads_total",
                "Full reads of the token revocations table, by reason: first (at start), \
                 repair (a writer the poll moved past ended, or the clock went back), \
                 outgrown (the Bloom filter is built larger), periodic (hourly), shrunk \
                 (the ids may fit in memory again)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(revocation_reloads.clone()))?;
        let unverified_body_reads = IntGauge::new(
            "unverified_body_reads",
            "Request bodies being read before their request is verified (HMAC, RFC 9421, \
             webhooks)",
        )?;
        let unverified_body_reads_evicted = IntCounter::new(
            "unverified_body_reads_evicted_total",
            "Such reads ended (503) to give their place to a peer holding fewer, while \
             every place was taken",
        )?;
        registry.register(Box::new(unverified_body_reads.clone()))?;
        registry.register(Box::new(unverified_body_reads_evicted.clone()))?;
        let connections_open = IntGauge::new(
            "connections_open",
            "Connections open on this instance (after the TLS handshake on HTTPS)",
        )?;
        let connections_refused = IntCounter::new(
            "connections_refused_total",
            "Connections closed at once because their peer address already held \
             COORDINATOR_MAX_CONNECTIONS_PER_PEER",
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        let push_open = IntGaugeVec::new(
            Opts::new(
                "push_open",
                "Long-poll claims waiting and event streams open on this instance",
            ),
            &["kind"],
        )?;
        let push_received = IntGauge::new(
            "push_notifications_received",
            "Job and queue changes this instance has received from the database",
        )?;
        let push_wakeup = HistogramVec::new(
            HistogramOpts::new(
                "push_wakeup_seconds",
                "From a job change being written (on any instance) to a woken long-poll \
                 claim getting its job (kind=claim) or a stream sending the event \
                 (kind=job_stream|queue_stream)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["kind"],
        )?;
        registry.register(Box::new(push_open.clone()))?;
        registry.register(Box::new(push_received.clone()))?;
        registry.register(Box::new(push_wakeup.clone()))?;
        let db = DbMetrics::new(&registry)?;
        Ok(Metrics {
            registry,
            http_requests,
            http_latency,
            auth_outcomes,
            job_transitions,
            queue_depth,
            pool_connections,
            revoked_tokens,
            revocation_reloads,
            unverified_body_reads,
            unverified_body_reads_evicted,
            body_reads_sync: Mutex::new(()),
            connections_open,
            connections_refused,
            push_open,
            push_received,
            push_wakeup,
            db,
        })
    }

    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.count_request(route, method, status);
        self.http_latency
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Count one request in `http_requests_total`.
    fn count_request(&self, route: &str, method: &str, status: u16) {
        // Methods outside the usual set are folded so a client cannot mint series.
        let method = match method {
            "GET" | "POST" | "PATCH" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" => method,
            _ => "OTHER",
        };
        // A status code is three digits: its label without an allocation.
        let digits =
            [100, 10, 1].map(|d| b'0'.saturating_add(u8::try_from(status / d % 10).unwrap_or(0)));
        let code = std::str::from_utf8(&digits).unwrap_or("000");
        self.http_requests
            .with_label_values(&[route, method, code])
            .inc();
    }

    /// The request series of one route, for its guard to keep (see [`RouteSeries`]).
    pub fn route_series(self: &Arc<Self>, route: &'static str) -> RouteSeries {
        RouteSeries {
            metrics: self.clone(),
            route,
            latency: OnceLock::new(),
            ok: Default::default(),
        }
    }

    pub fn auth_outcome(&self, scheme: &str, outcome: &str, reason: &str) {
        self.auth_outcomes
            .with_label_values(&[scheme, outcome, reason])
            .inc();
    }

    /// A woken waiter delivered a change written at `written_ms` (the writer's clock;
    /// a negative difference from clock skew counts as 0).
    pub fn wakeup(&self, kind: &str, written_ms: i64) {
        let ms = crate::db::now_millis().saturating_sub(written_ms).max(0);
        let secs = f64::from(u32::try_from(ms).unwrap_or(u32::MAX)) / 1000.0;
        self.push_wakeup.with_label_values(&[kind]).observe(secs);
    }

    pub fn transition(&self, to: crate::jobs::JobStatus) {
        self.job_transitions.with_label_values(&[to.as_str()]).inc();
    }

    /// Replace the depth series with this snapshot, summed over queues (queue names are
    /// chosen by callers and never become labels on the open listener).
    pub fn set_queue_depths(&self, queues: &BTreeMap<String, BTreeMap<String, i64>>) {
        self.queue_depth.reset();
        for statuses in queues.values() {
            for (status, n) in statuses {
                // Statuses come from the job model's fixed set; anything else is summed.
                let label = match status.as_str() {
                    "PENDING" | "QUEUED" | "RUNNING" => status.as_str(),
                    _ => "OTHER",
                };
                self.queue_depth.with_label_values(&[label]).add(*n);
            }
        }
    }

    /// Replace the depth series with these totals per status (all queues together).
    pub fn set_status_depths(&self, totals: &BTreeMap<String, i64>) {
        self.queue_depth.reset();
        for (status, n) in totals {
            // Statuses come from the job model's fixed set; anything else is summed.
            let label = match status.as_str() {
                "PENDING" | "QUEUED" | "RUNNING" => status.as_str(),
                _ => "OTHER",
            };
            self.queue_depth.with_label_values(&[label]).add(*n);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// The methods with series of their own; any other is counted as `OTHER`.
const METHODS: [&str; 7] = ["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"];

/// One route's request series, kept by its guard (`auth::middleware::Gate`) so that a
/// request does not look them up by their labels (a hash of the label values and a
/// read lock, per series, per request): its latency histogram and its `200` counters.
/// Each is looked up on the first request that needs it, as `with_label_values` would
/// create it then, so `/metrics` shows the same series; any other status goes through
/// [`Metrics::observe_request`].
pub struct RouteSeries {
    metrics: Arc<Metrics>,
    route: &'static str,
    latency: OnceLock<Histogram>,
    /// `http_requests_total` with status 200, per method in [`METHODS`] order.
    ok: [OnceLock<IntCounter>; 7],
}

impl RouteSeries {
    pub fn route(&self) -> &'static str {
        self.route
    }

    /// As [`Metrics::observe_request`] for this route.
    pub fn observe(&self, method: &str, status: u16, seconds: f64) {
        let m = &self.metrics;
        let ok = METHODS
            .iter()
            .position(|known| *known == method)
            .and_then(|i| self.ok.get(i))
            .filter(|_| status == 200);
        match ok {
            Some(counter) => counter
                .get_or_init(|| {
                    m.http_requests
                        .with_label_values(&[self.route, method, "200"])
                })
                .inc(),
            None => m.count_request(self.route, method, status),
        }
        self.latency
            .get_or_init(|| m.http_latency.with_label_values(&[self.route]))
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scrapes at once copy the eviction count, never add it twice.
    #[test]
    fn scrapes_at_once_copy_the_body_read_count_once() {
        let m = std::sync::Arc::new(Metrics::new().expect("metrics"));
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (m, start) = (m.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for n in 1..=100_000u64 {
                        m.observe_body_reads(1, n);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(m.unverified_body_reads_evicted.get(), 100_000);
        assert_eq!(m.unverified_body_reads.get(), 1);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new().expect("metrics");
        m.observe_request("/livez", "GET", 200, 0.001);
        m.observe_request("/livez", "BREW", 200, 0.001);
        m.auth_outcome("hmac", "deny", "signature mismatch");
        let mut q = BTreeMap::new();
        q.insert("ci".to_owned(), BTreeMap::from([("QUEUED".to_owned(), 3)]));
        q.insert("<b>".to_owned(), BTreeMap::from([("QUEUED".to_owned(), 2)]));
        m.set_queue_depths(&q);
        let text = m.render().expect("render");
        assert!(text.contains(
            r#"coordinator_http_requests_total{method="GET",route="/livez",status="200"} 1"#
        ));
        assert!(text.contains(r#"method="OTHER""#));
        assert!(text.contains(r#"coordinator_queue_depth{status="QUEUED"} 5"#));
        assert!(
            !text.contains("ci") && !text.contains("<b>"),
            "no queue name: {text}"
        );
        assert!(text.contains("coordinator_auth_outcomes_total"));
    }

    /// A route's kept series count as the label lookups do: the same text, and no
    /// series before the request that makes it.
    #[test]
    fn route_series_write_what_the_label_lookups_write() {
        let by_labels = Metrics::new().expect("metrics");
        let kept = Arc::new(Metrics::new().expect("metrics"));
        let series = kept.route_series("/coordinator/jobs");
        assert_eq!(by_labels.render().ok(), kept.render().ok());
        for (method, status) in [
            ("GET", 200),
            ("GET", 200),
            ("POST", 201),
            ("POST", 200),
            ("BREW", 200),
            ("OPTIONS", 200),
            ("GET", 404),
        ] {
            by_labels.observe_request("/coordinator/jobs", method, status, 0.002);
            series.observe(method, status, 0.002);
            assert_eq!(by_labels.render().ok(), kept.render().ok());
        }
    }

    #[test]
    fn storage_counters_are_copied_once_per_increase() {
        use crate::db::load::Shed;
        use crate::db::QueueStats;
        let m = Metrics::new().expect("metrics");
        let stats = |shed: u64| DbStats {
            state: DbState::Failing,
            trips: 2,
            queues: vec![
                QueueStats {
                    name: "write",
                    depth: 3,
                    limit: 65,
                    standing: std::time::Duration::from_millis(3),
                    shed: vec![(Shed::Full, shed), (Shed::Unavailable, 0)],
                },
                QueueStats {
                    name: "replay_log",
                    depth: 0,
                    limit: 1024,
                    standing: std::time::Duration::ZERO,
                    shed: vec![(Shed::Full, 1)],
                },
            ],
            wal: Some((4096, 8192, 5, 1)),
        };
        m.db.observe(&stats(7));
        m.db.observe(&stats(7));
        m.db.observe(&stats(9));
        let text = m.render().expect("render");
        for line in [
            r#"coordinator_db_state{state="failing"} 1"#,
            r#"coordinator_db_state{state="healthy"} 0"#,
            "coordinator_db_trips_total 2",
            r#"coordinator_db_queue_depth{queue="write"} 3"#,
            r#"coordinator_db_queue_limit{queue="write"} 65"#,
            r#"coordinator_db_queue_standing_wait_seconds{queue="write"} 0.003"#,
            r#"coordinator_db_shed_total{queue="write",reason="full"} 9"#,
            r#"coordinator_db_queue_depth{queue="replay_log"} 0"#,
            r#"coordinator_db_shed_total{queue="replay_log",reason="full"} 1"#,
            "coordinator_sqlite_wal_bytes 4096",
            r#"coordinator_sqlite_wal_checkpoints_total{outcome="complete"} 4"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
