//! One audit line per authenticated route request (docs/design.md §4 fields). Never a secret,
//! key, token or signature: only names, versions, key prefixes and reasons.

use serde_json::{json, Value};

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

impl AuditLine<'_> {
    pub fn to_json(&self) -> Value {
        let r = self.record;
        let outcome = if r.reason.is_some() || matches!(self.status, 401 | 403 | 429) {
            "deny"
        } else {
            "allow"
        };
        json!({
            "ts": now_rfc3339(),
            "event": "auth",
            "outcome": outcome,
            "status": self.status,
            "scheme": r.scheme.map(Scheme::as_str),
            "method": self.method,
            "route": self.route,
            "caller": r.caller.as_deref().unwrap_or("unknown"),
            "key": r.key_ref,
            "worker": r.worker,
            "peer_ip": self.peer,
            "reason": r.reason,
            "latency_ms": (self.latency_ms * 1000.0).round() / 1000.0,
            "request_id": self.request_id,
        })
    }

    pub fn write(&self) {
        log::info!(target: AUDIT_TARGET, "{}", self.to_json());
    }
}
