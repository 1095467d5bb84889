//! Request bodies: `parse_json` into every body type, then each type's validation.
//! The same bytes also go to `JobId::parse` and `DatabaseUrl::parse`.
//!
//! Input: the raw body bytes.
#![no_main]

use coordinator::db::DatabaseUrl;
use coordinator::error::ApiError;
use coordinator::http::extract::parse_json;
use coordinator::jobs::request::{CompleteJob, CreateJob, FailJob, ProgressUpdate, StatusUpdate};
use coordinator::jobs::JobId;
use coordinator::stitcher::model::{DispatchRequest, WebhookPayload};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// A body is either a value or a 400: never another kind of error. (The 400's field
/// may legitimately be `""`: an unknown key that is the empty string.)
fn parse<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    match parse_json::<T>(data) {
        Ok(v) => Some(v),
        Err(ApiError::BadRequest { field, detail }) => {
            let _ = (field, detail);
            None
        }
        Err(other) => panic!("parse_json gave a non-400 error: {other:?}"),
    }
}

fn bad_request<T: std::fmt::Debug>(r: Result<T, ApiError>) {
    match r {
        Ok(_) => {}
        Err(ApiError::BadRequest { .. }) => {}
        Err(other) => panic!("validation gave a non-400 error: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(c) = parse::<CreateJob>(data) {
        let r = c.validate();
        if let Ok(j) = &r {
            assert!(j.payload.is_object());
            assert!((1..=100).contains(&j.max_attempts));
            assert!((-1000..=1000).contains(&j.priority));
        }
        bad_request(r);
    }
    let _ = parse::<StatusUpdate>(data);
    if let Some(p) = parse::<ProgressUpdate>(data) {
        let r = p.validate();
        if let Ok(pct) = &r {
            assert!((0..=100).contains(pct));
        }
        bad_request(r);
    }
    let _ = parse::<CompleteJob>(data);
    if let Some(f) = parse::<FailJob>(data) {
        bad_request(f.validate());
    }
    if let Some(w) = parse::<WebhookPayload>(data) {
        let r = w.into_job("issues", "d");
        if let Ok(j) = &r {
            assert_eq!(j.queue, "issues");
            assert!(j.kind.starts_with("stitcher."));
        }
        bad_request(r);
    }
    if let Some(d) = parse::<DispatchRequest>(data) {
        let r = d.into_job("issues");
        if let Ok(j) = &r {
            assert_eq!(j.kind, "stitcher.dispatch");
        }
        bad_request(r);
    }

    let text = String::from_utf8_lossy(data);
    match JobId::parse(&text, "id") {
        Ok(id) => {
            let s = id.as_str();
            assert_eq!(s.len(), 36, "{s:?}");
            assert!(s
                .bytes()
                .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            let again = JobId::parse(s, "id").expect("JobId round trip");
            assert_eq!(again, id);
        }
        Err(e) => bad_request::<()>(Err(e)),
    }
    if let Ok(url) = DatabaseUrl::parse(&text) {
        assert!(!url.target().is_empty());
        let _ = (url.backend(), format!("{url:?}"));
    }
});
