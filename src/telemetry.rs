//! Logging: env_logger with one JSON object per line, the request id, and the access
//! log middleware. Every request gets one line, written after the response: the audit
//! line when the auth guard ran (it carries the request's status, latency and id), else
//! the access line.

use std::io::Write;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage};
use serde::Serialize;
use serde_json::json;

/// Log targets whose messages are already JSON objects.
pub const ACCESS_TARGET: &str = "access";
pub const AUDIT_TARGET: &str = "audit";

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Build the logger (default level `info`, `RUST_LOG` overrides). Call `init` once in
/// `main`; tests use `try_init`.
pub fn logger(test_writer: bool) -> env_logger::Builder {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // JSON lines carry no colour: env_logger is built without its colour support, so
    // lines are written as they are, never scanned for escapes.
    b.format(|buf, record| {
        let target = record.target();
        if target == ACCESS_TARGET || target == AUDIT_TARGET {
            writeln!(buf, "{}", record.args())
        } else {
            let msg = record.args().to_string();
            let line = json!({
                "ts": now_rfc3339(),
                "level": level_of(record.level(), target, &msg),
                "target": target,
                "msg": msg,
            });
            writeln!(buf, "{line}")
        }
    });
    if test_writer {
        b.is_test(true);
    }
    b
}

/// The level a line is written with. actix logs a request it cannot parse (a bad
/// header, duplicate `Content-Length`, garbage) at ERROR, once per connection, before
/// any route or credential is looked at: that is a client's fault, so it is written as
/// WARN and an alert on ERROR lines stays meaningful. Its message names the kind of
/// fault only, never the bytes sent.
fn level_of(level: log::Level, target: &str, msg: &str) -> &'static str {
    if level == log::Level::Error
        && target == "actix_http::h1::dispatcher"
        && msg.starts_with("stream error: request parse error")
    {
        return log::Level::Warn.as_str();
    }
    level.as_str()
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The request id of a request: the caller's `X-Request-Id` when it is well formed
/// (1–128 of `[A-Za-z0-9._-]`), else a fresh UUIDv7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    fn from_header(v: Option<&HeaderValue>) -> RequestId {
        let ok = |s: &str| {
            (1..=128).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        match v.and_then(|v| v.to_str().ok()) {
            Some(s) if ok(s) => RequestId(s.to_owned()),
            _ => RequestId(fresh_v7().to_string()),
        }
    }
}

/// A UUIDv7 from the clock and the thread's RNG: no `getrandom` system call per request
/// (what `Uuid::now_v7` makes). A request id needs to be unique and ordered by time, not
/// unpredictable.
fn fresh_v7() -> uuid::Uuid {
    use rand::RngCore;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// Put into a request's extensions by whoever wrote that request's log line (the auth
/// guard's audit line), so the access log writes none.
#[derive(Debug, Clone, Copy)]
pub struct LineWritten;

/// The pattern of the route that ran, put into the request extensions by that route's
/// guard (so the access log never matches the path a second time).
#[derive(Debug, Clone, Copy)]
pub struct MatchedRoute(pub &'static str);

/// The route pattern of a request that has been routed (never the raw path), or
/// `unmatched`.
pub fn route_of(req: &actix_web::HttpRequest) -> &'static str {
    req.extensions()
        .get::<MatchedRoute>()
        .map_or("unmatched", |r| r.0)
}

/// An access line (field order is the line's).
#[derive(Serialize)]
struct AccessLine<'a> {
    ts: String,
    event: &'static str,
    method: &'a str,
    route: &'a str,
    status: u16,
    latency_ms: f64,
    peer: Option<&'a str>,
    request_id: &'a str,
}

/// Access log + request id middleware (use with `middleware::from_fn`, handing it the
/// instance's metrics). Request metrics for every request; the access line only for a
/// request whose line nobody else wrote ([`LineWritten`]).
pub async fn access_log(
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, Error> {
    let started = Instant::now();
    let rid = RequestId::from_header(req.headers().get(REQUEST_ID_HEADER));
    req.extensions_mut().insert(rid.clone());
    let method = req.method().clone();
    let mut res = next.call(req).await?;
    let route = route_of(res.request());
    metrics.observe_request(
        route,
        method.as_str(),
        res.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    if let Ok(v) = HeaderValue::from_str(&rid.0) {
        res.headers_mut()
            .insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
    }
    if res.request().extensions().contains::<LineWritten>() {
        return Ok(res.map_into_boxed_body());
    }
    let peer = res.request().peer_addr().map(|a| a.ip().to_string());
    let line = serde_json::to_string(&AccessLine {
        ts: now_rfc3339(),
        event: "access",
        method: method.as_str(),
        route,
        status: res.status().as_u16(),
        latency_ms: (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        peer: peer.as_deref(),
        request_id: &rid.0,
    })
    .unwrap_or_default();
    log::info!(target: ACCESS_TARGET, "{line}");
    Ok(res.map_into_boxed_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_actix_cannot_parse_is_a_warning() {
        use log::Level::{Error, Info, Warn};
        let parse = "stream error: request parse error: invalid Header provided";
        assert_eq!(level_of(Error, "actix_http::h1::dispatcher", parse), "WARN");
        // Anything else keeps its level.
        assert_eq!(
            level_of(Error, "actix_http::h1::dispatcher", "other"),
            "ERROR"
        );
        assert_eq!(level_of(Error, "coordinator::db", parse), "ERROR");
        assert_eq!(level_of(Warn, "actix_http::h1::dispatcher", parse), "WARN");
        assert_eq!(level_of(Info, "coordinator::cli", "listening"), "INFO");
    }

    #[test]
    fn a_fresh_request_id_is_a_v7_of_now_and_never_repeats() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis();
        let ids: std::collections::HashSet<uuid::Uuid> = (0..1000).map(|_| fresh_v7()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            let (secs, nanos) = id.get_timestamp().expect("v7 timestamp").to_unix();
            let millis = u128::from(secs * 1000 + u64::from(nanos) / 1_000_000);
            assert!(
                millis >= before && millis < before + 60_000,
                "{millis} vs {before}"
            );
        }
    }

    #[test]
    fn a_caller_request_id_is_kept_only_when_well_formed() {
        let id =
            |v: &str| RequestId::from_header(Some(&HeaderValue::from_str(v).expect("value"))).0;
        assert_eq!(id("abc-1.2_3"), "abc-1.2_3");
        for bad in ["", "a b", "x/y", &"a".repeat(129)] {
            let got = RequestId::from_header(HeaderValue::from_str(bad).ok().as_ref()).0;
            assert_ne!(got, bad);
            assert!(uuid::Uuid::parse_str(&got).is_ok());
        }
    }
}
