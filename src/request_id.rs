//! The request id: the caller's `X-Request-Id` when it is well formed, else a fresh
//! UUIDv7; sent back on every answer and written on the request's log line. (Not on
//! the 429 of a connection past its address's bound, `startup`'s `refuse_marked`,
//! answered outside both the door and the access log.)

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of a request: the caller's `X-Request-Id` when it is well formed
/// (1–128 of `[A-Za-z0-9._-]`), else a fresh UUIDv7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl RequestId {
    pub fn from_header(v: Option<&HeaderValue>) -> RequestId {
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

    /// Put this id on a response as `X-Request-Id`.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.0) {
            headers.insert(HeaderName::from_static(REQUEST_ID_HEADER), v);
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

#[cfg(test)]
mod tests {
    use super::*;

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
