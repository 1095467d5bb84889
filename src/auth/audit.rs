//! One audit line per authenticated route request (docs/design.md §4 fields). Never a secret,
//! key, token or signature: only names, versions, key prefixes and reasons.

use serde::Serialize;

use super::model::Scheme;
use crate::telemetry::{now_rfc3339, AUDIT_TARGET};

/// Filled in by the middleware as authentication proceeds.
#[derive(Debug, Default, Clone)]
pub struct AuditRecord {
    pub scheme: Option<Scheme>,
    pub caller: Option<String>,
    pub key_ref: Option<String>,
    pub reason: Option<&'static str>,
    pub worker: Option<String>,
}

pub struct AuditLine<'a> {
    pub record: &'a AuditRecord,
    pub method: &'a str,
    pub route: &'a str,
    pub peer: Option<String>,
    pub status: u16,
    pub latency_ms: f64,
    pub request_id: Option<&'a str>,
}

/// The line as written (field order is the line's).
#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    event: &'static str,
    outcome: &'static str,
    status: u16,
    scheme: Option<&'static str>,
    method: &'a str,
    route: &'a str,
    caller: &'a str,
    key: Option<&'a str>,
    worker: Option<&'a str>,
    peer_ip: Option<&'a str>,
    reason: Option<&'static str>,
    latency_ms: f64,
    request_id: Option<&'a str>,
}

impl AuditLine<'_> {
    /// The JSON line (serialized straight from borrowed fields: no intermediate map).
    pub fn to_json(&self) -> String {
        let r = self.record;
        let outcome = if r.reason.is_some() || matches!(self.status, 401 | 403 | 429) {
            "deny"
        } else {
            "allow"
        };
        serde_json::to_string(&Line {
            ts: now_rfc3339(),
            event: "auth",
            outcome,
            status: self.status,
            scheme: r.scheme.map(Scheme::as_str),
            method: self.method,
            route: self.route,
            caller: r.caller.as_deref().unwrap_or("unknown"),
            key: r.key_ref.as_deref(),
            worker: r.worker.as_deref(),
            peer_ip: self.peer.as_deref(),
            reason: r.reason,
            latency_ms: (self.latency_ms * 1000.0).round() / 1000.0,
            request_id: self.request_id,
        })
        .unwrap_or_default()
    }

    pub fn write(&self) {
        log::info!(target: AUDIT_TARGET, "{}", self.to_json());
    }
}
