//! One audit line per authenticated route request (docs/design.md §4 fields). Never a secret,
//! key, token or signature: only names, versions, key prefixes and reasons.

use std::net::IpAddr;
use std::sync::Arc;

use super::model::Scheme;
use crate::telemetry::{JsonLine, AUDIT_TARGET};

/// Filled in by the middleware as authentication proceeds.
#[derive(Debug, Default, Clone)]
pub struct AuditRecord {
    pub scheme: Option<Scheme>,
    /// Shared with the credential cache or the principal (no copy per request).
    pub caller: Option<Arc<str>>,
    pub key_ref: Option<Arc<str>>,
    pub reason: Option<&'static str>,
    pub worker: Option<String>,
}

pub struct AuditLine<'a> {
    pub record: &'a AuditRecord,
    pub method: &'a str,
    pub route: &'a str,
    pub peer: Option<IpAddr>,
    pub status: u16,
    pub latency_ms: f64,
    pub request_id: Option<&'a str>,
}

impl AuditLine<'_> {
    /// The JSON line, fields in this order: ts, event, outcome, status, scheme, method,
    /// route, caller, key, worker, peer_ip, reason, latency_ms, request_id (written
    /// field by field: the serde-derived struct it replaced cost several thousand
    /// instructions per request, most of them in its per-field machinery).
    pub fn to_json(&self) -> String {
        let r = self.record;
        let outcome = if r.reason.is_some() || matches!(self.status, 401 | 403 | 429) {
            "deny"
        } else {
            "allow"
        };
        let mut line = JsonLine::with_capacity(320);
        line.now("ts")
            .plain("event", "auth")
            .plain("outcome", outcome)
            .u16("status", self.status)
            .opt_str("scheme", r.scheme.map(Scheme::as_str))
            .str("method", self.method)
            .plain("route", self.route)
            .str("caller", r.caller.as_deref().unwrap_or("unknown"))
            .opt_str("key", r.key_ref.as_deref())
            .opt_str("worker", r.worker.as_deref())
            .ip("peer_ip", self.peer)
            .opt_str("reason", r.reason)
            .f64("latency_ms", (self.latency_ms * 1000.0).round() / 1000.0)
            .opt_str("request_id", self.request_id);
        line.finish()
    }

    pub fn write(&self) {
        log::info!(target: AUDIT_TARGET, "{}", self.to_json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// The serde-derived line `to_json` replaced: the same bytes.
    #[derive(Serialize)]
    struct Line<'a> {
        ts: &'a str,
        event: &'static str,
        outcome: &'static str,
        status: u16,
        scheme: Option<&'static str>,
        method: &'a str,
        route: &'a str,
        caller: &'a str,
        key: Option<&'a str>,
        worker: Option<&'a str>,
        peer_ip: Option<String>,
        reason: Option<&'static str>,
        latency_ms: f64,
        request_id: Option<&'a str>,
    }

    #[test]
    fn the_line_is_what_serde_would_write() {
        let records = [
            (AuditRecord::default(), None),
            (
                AuditRecord {
                    scheme: Some(Scheme::ApiKey),
                    caller: Some("dev".into()),
                    key_ref: Some("cok_AbCd".into()),
                    reason: None,
                    worker: None,
                },
                Some("0199-ab"),
            ),
            (
                AuditRecord {
                    scheme: Some(Scheme::Token),
                    caller: Some("we\"ird\\\u{1}名前".into()),
                    key_ref: Some("jti".into()),
                    reason: Some("revoked"),
                    worker: Some("w-1".to_owned()),
                },
                Some("a\"b"),
            ),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        let cases = [
            (None, 200, 0.0),
            (ip("127.0.0.1"), 401, 1.23456),
            (ip("10.200.3.45"), 7, 1e-9),
            (ip("::1"), 65535, 12345.6789),
            (ip("::ffff:192.0.2.1"), 10, 1e21),
        ];
        for (record, request_id) in &records {
            for (peer, status, latency_ms) in cases {
                let line = AuditLine {
                    record,
                    method: "GET",
                    route: "/coordinator/jobs/{id}",
                    peer,
                    status,
                    latency_ms,
                    request_id: *request_id,
                };
                let got: serde_json::Value = serde_json::from_str(&line.to_json()).expect("json");
                let ts = got["ts"].as_str().expect("ts").to_owned();
                let outcome = got["outcome"].as_str().expect("outcome");
                let expected = serde_json::to_string(&Line {
                    ts: &ts,
                    event: "auth",
                    outcome: if outcome == "deny" { "deny" } else { "allow" },
                    status: line.status,
                    scheme: record.scheme.map(Scheme::as_str),
                    method: line.method,
                    route: line.route,
                    caller: record.caller.as_deref().unwrap_or("unknown"),
                    key: record.key_ref.as_deref(),
                    worker: record.worker.as_deref(),
                    peer_ip: peer.map(|p| p.to_string()),
                    reason: record.reason,
                    latency_ms: (line.latency_ms * 1000.0).round() / 1000.0,
                    request_id: line.request_id,
                })
                .expect("serialize");
                let written = line.to_json();
                // The same bytes, apart from the clock.
                let written_ts = serde_json::from_str::<serde_json::Value>(&written).expect("json")
                    ["ts"]
                    .as_str()
                    .expect("ts")
                    .to_owned();
                assert_eq!(written.replacen(&written_ts, &ts, 1), expected);
            }
        }
    }
}
