//! Logging: env_logger with one JSON object per line, the request id, and the access
//! log middleware. Every request that reaches it gets one line, written after the
//! response: the audit line when the auth guard ran (it carries the request's status,
//! latency and id), else the access line. The refusals outside it write none: the
//! door's 503 (`db::admission`, counted in `coordinator_db_shed_total`) and the 429 of a
//! connection past its address's bound (`startup`'s `refuse_marked`).

use std::io::Write;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage};

use crate::request_id::{RequestId, REQUEST_ID_HEADER};
use serde::Serialize;
use serde_json::json;

/// Log targets whose messages are already JSON objects.
pub const ACCESS_TARGET: &str = "access";
pub const AUDIT_TARGET: &str = "audit";

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

/// The time now as `2026-12-06T04:28:00.123Z` (RFC 3339, UTC, milliseconds).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now();
    match rfc3339_millis(now) {
        Some(text) => String::from_utf8_lossy(&text).into_owned(),
        None => chrono::DateTime::<chrono::Utc>::from(now)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

/// `t` as chrono's `to_rfc3339_opts(SecondsFormat::Millis, true)` writes it, for years
/// 1970 to 9999 (`None` outside them), without its formatting machinery: the date from
/// the day count by Howard Hinnant's `civil_from_days`, the rest by division. Each
/// request's log line carries one, and chrono's took about 900 instructions.
fn rfc3339_millis(t: std::time::SystemTime) -> Option<[u8; 24]> {
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    if year > 9_999 {
        return None;
    }
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let fields = [
        (0, 4, year),
        (5, 2, month),
        (8, 2, day),
        (11, 2, of_day / 3_600),
        (14, 2, of_day / 60 % 60),
        (17, 2, of_day % 60),
        (20, 3, u64::from(since.subsec_millis())),
    ];
    for (at, width, mut value) in fields {
        for i in (at..at + width).rev() {
            let digit = u8::try_from(value % 10).unwrap_or(0);
            *out.get_mut(i)? = b'0' + digit;
            value /= 10;
        }
    }
    Some(out)
}

/// A one-line JSON object written field by field, in the order the fields are added:
/// the same bytes `serde_json` writes for a struct with those fields, without its
/// per-field machinery (a string value is copied as it is unless it holds a byte JSON
/// must escape; then `serde_json` escapes it). Field names are static and never
/// escaped.
pub struct JsonLine {
    buf: Vec<u8>,
}

impl JsonLine {
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.push(b'{');
        JsonLine { buf }
    }

    fn key(&mut self, key: &'static str) {
        debug_assert!(!needs_escape(key), "{key}");
        if self.buf.len() > 1 {
            self.buf.push(b',');
        }
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn push_str(&mut self, value: &str) {
        if needs_escape(value) {
            // Writing into a Vec does not fail.
            let _ = serde_json::to_writer(&mut self.buf, value);
        } else {
            self.buf.push(b'"');
            self.buf.extend_from_slice(value.as_bytes());
            self.buf.push(b'"');
        }
    }

    /// A value the server wrote itself (a route pattern, a fixed word). Still checked
    /// like any string (a few bytes scanned): a log line must not be breakable even if
    /// a caller of this one day passes something else.
    pub fn plain(&mut self, key: &'static str, value: &str) -> &mut Self {
        debug_assert!(!needs_escape(value), "{value}");
        self.str(key, value)
    }

    /// The time now, as [`now_rfc3339`] writes it.
    pub fn now(&mut self, key: &'static str) -> &mut Self {
        match rfc3339_millis(std::time::SystemTime::now()) {
            Some(text) => {
                self.key(key);
                self.buf.push(b'"');
                self.buf.extend_from_slice(&text);
                self.buf.push(b'"');
            }
            None => {
                self.str(key, &now_rfc3339());
            }
        }
        self
    }

    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Self {
        self.key(key);
        self.push_str(value);
        self
    }

    /// `null` for `None`.
    pub fn opt_str(&mut self, key: &'static str, value: Option<&str>) -> &mut Self {
        self.key(key);
        match value {
            Some(v) => self.push_str(v),
            None => self.buf.extend_from_slice(b"null"),
        }
        self
    }

    pub fn u16(&mut self, key: &'static str, value: u16) -> &mut Self {
        self.key(key);
        let mut digits = [0u8; 5];
        let mut n = value;
        let mut at = digits.len();
        loop {
            at -= 1;
            if let Some(d) = digits.get_mut(at) {
                *d = b'0' + u8::try_from(n % 10).unwrap_or(0);
            }
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.buf
            .extend_from_slice(digits.get(at..).unwrap_or_default());
        self
    }

    /// As `serde_json` writes an `f64` (`null` when not finite).
    pub fn f64(&mut self, key: &'static str, value: f64) -> &mut Self {
        self.key(key);
        // Writing into a Vec does not fail.
        let _ = serde_json::to_writer(&mut self.buf, &value);
        self
    }

    /// An address as its `Display` text (`null` for `None`); IPv4 without the
    /// formatting machinery.
    pub fn ip(&mut self, key: &'static str, value: Option<std::net::IpAddr>) -> &mut Self {
        self.key(key);
        match value {
            None => self.buf.extend_from_slice(b"null"),
            Some(std::net::IpAddr::V4(v4)) => {
                self.buf.push(b'"');
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.buf.push(b'.');
                    }
                    if octet >= 100 {
                        self.buf.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.buf.push(b'0' + octet / 10 % 10);
                    }
                    self.buf.push(b'0' + octet % 10);
                }
                self.buf.push(b'"');
            }
            Some(v6) => {
                // Hex digits, colons and dots: nothing to escape. Writing into a Vec
                // does not fail.
                let _ = write!(self.buf, "\"{v6}\"");
            }
        }
        self
    }

    pub fn finish(mut self) -> String {
        self.buf.push(b'}');
        // Only `&str` values and ASCII were written, so this is valid UTF-8.
        String::from_utf8(self.buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// Whether JSON needs this text escaped (what `serde_json` escapes: the quote, the
/// backslash and control characters).
fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Put into a request's extensions by whoever wrote that request's log line (the auth
/// guard's audit line), so the access log writes none.
#[derive(Debug, Clone, Copy)]
pub struct LineWritten;

/// The route that ran (its pattern and request series), put into the request
/// extensions by that route's guard (so the access log never matches the path a second
/// time, nor looks the series up by their labels).
#[derive(Clone)]
pub struct MatchedRoute(pub std::sync::Arc<crate::metrics::RouteSeries>);

/// The route pattern of a request that has been routed (never the raw path), or
/// `unmatched`.
pub fn route_of(req: &actix_web::HttpRequest) -> &'static str {
    req.extensions()
        .get::<MatchedRoute>()
        .map_or("unmatched", |r| r.0.route())
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
    let matched = res.request().extensions().get::<MatchedRoute>().cloned();
    let (status, seconds) = (res.status().as_u16(), started.elapsed().as_secs_f64());
    let route = match &matched {
        Some(MatchedRoute(series)) => {
            series.observe(method.as_str(), status, seconds);
            series.route()
        }
        None => {
            metrics.observe_request("unmatched", method.as_str(), status, seconds);
            "unmatched"
        }
    };
    rid.stamp(res.headers_mut());
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
    fn timestamps_are_written_as_chrono_writes_them() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let chrono_text = |t: SystemTime| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        // Day boundaries around leap years and centuries, then a spread of instants up
        // to the end of year 9999 (a multiplicative walk over the seconds).
        let mut secs: Vec<u64> = vec![
            0,
            86_399,
            951_782_400,   // 2000-02-29
            951_868_800,   // 2000-03-01
            4_107_542_400, // 2100-02-28
            4_107_628_800, // 2100-03-01
            1_798_761_599, // 2026-12-31T23:59:59
            253_402_300_799,
        ];
        let mut s: u64 = 12_345;
        for _ in 0..20_000 {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1) % 253_402_300_800;
            secs.push(s);
        }
        for (i, sec) in secs.into_iter().enumerate() {
            let millis = u64::try_from(i % 1000).expect("millis");
            let t = UNIX_EPOCH + Duration::from_secs(sec) + Duration::from_millis(millis);
            let ours = rfc3339_millis(t).expect("in range");
            assert_eq!(std::str::from_utf8(&ours).expect("utf-8"), chrono_text(t));
        }
        let after = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(rfc3339_millis(after), None);
        assert_eq!(now_rfc3339().len(), 24);
    }

    /// Escaped exactly when `serde_json` would change the text, wherever the byte lies.
    #[test]
    fn needs_escape_is_what_serde_json_escapes() {
        let chars = (0u32..0x80).chain([0xe9, 0x540d, 0x1f600]);
        for c in chars.filter_map(char::from_u32) {
            for text in [
                c.to_string(),
                format!("/coordinator/{c}"),
                format!("{c}{}", "x".repeat(40)),
            ] {
                let plain = format!("\"{text}\"");
                let serde = serde_json::to_string(&text).expect("json");
                assert_eq!(needs_escape(&text), serde != plain, "{c:?}");
            }
        }
        assert!(!needs_escape(""));
    }

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
}
