//! Prometheus metrics, one registry per application instance (no global state).
//!
//! Label values are bounded: route *patterns* (never raw paths), methods, status codes,
//! scheme and reason strings from fixed sets, job statuses; queue names are validated
//! at creation and at most `MAX_QUEUE_SERIES` of them are exported (the rest summed
//! into `_other`).

use std::collections::BTreeMap;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub const MAX_QUEUE_SERIES: usize = 100;

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_latency: HistogramVec,
    pub auth_outcomes: IntCounterVec,
    pub job_transitions: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub pool_connections: IntGaugeVec,
    pub revoked_tokens: IntGauge,
}

impl Metrics {
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
                "Jobs per queue and non-terminal status (at scrape time, at most 1 s old)",
            ),
            &["queue", "status"],
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
        Ok(Metrics {
            registry,
            http_requests,
            http_latency,
            auth_outcomes,
            job_transitions,
            queue_depth,
            pool_connections,
            revoked_tokens,
        })
    }

    pub fn observe_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        // Methods outside the usual set are folded so a client cannot mint series.
        let method = match method {
            "GET" | "POST" | "PATCH" | "PUT" | "DELETE" | "HEAD" | "OPTIONS" => method,
            _ => "OTHER",
        };
        self.http_requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.http_latency
            .with_label_values(&[route])
            .observe(seconds);
    }

    pub fn auth_outcome(&self, scheme: &str, outcome: &str, reason: &str) {
        self.auth_outcomes
            .with_label_values(&[scheme, outcome, reason])
            .inc();
    }

    pub fn transition(&self, to: crate::jobs::JobStatus) {
        self.job_transitions.with_label_values(&[to.as_str()]).inc();
    }

    /// Replace the queue-depth series with this snapshot.
    pub fn set_queue_depths(&self, queues: &BTreeMap<String, BTreeMap<String, i64>>) {
        self.queue_depth.reset();
        for (i, (queue, statuses)) in queues.iter().enumerate() {
            let name = if i < MAX_QUEUE_SERIES {
                queue.as_str()
            } else {
                "_other"
            };
            for (status, n) in statuses {
                self.queue_depth.with_label_values(&[name, status]).add(*n);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new().expect("metrics");
        m.observe_request("/livez", "GET", 200, 0.001);
        m.observe_request("/livez", "BREW", 200, 0.001);
        m.auth_outcome("hmac", "deny", "signature mismatch");
        let mut q = BTreeMap::new();
        q.insert("ci".to_owned(), BTreeMap::from([("QUEUED".to_owned(), 3)]));
        m.set_queue_depths(&q);
        let text = m.render().expect("render");
        assert!(text.contains(
            r#"coordinator_http_requests_total{method="GET",route="/livez",status="200"} 1"#
        ));
        assert!(text.contains(r#"method="OTHER""#));
        assert!(text.contains(r#"coordinator_queue_depth{queue="ci",status="QUEUED"} 3"#));
        assert!(text.contains("coordinator_auth_outcomes_total"));
    }
}
