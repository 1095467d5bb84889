//! `Idempotency-Key`: the caller's own key for a write, with the hash of the body it
//! came with (the same key with another body is a 409, on every route that takes one).

use actix_web::HttpRequest;

use crate::error::{ApiError, ApiResult};
use crate::http::extract::single_header;
use crate::jobs::repo::Idempotency;

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// 1–255 printable ASCII characters.
pub fn valid_key(k: &str) -> bool {
    (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

/// The request's `Idempotency-Key`, if it has one, with the body it came with (kept as
/// its hash, [`Idempotency::for_body`]).
pub fn from_request(req: &HttpRequest, body: &[u8]) -> ApiResult<Option<Idempotency>> {
    let Some(v) = single_header(req, IDEMPOTENCY_HEADER, "Idempotency-Key")? else {
        return Ok(None);
    };
    let key = v.to_str().ok().filter(|k| valid_key(k)).ok_or_else(|| {
        ApiError::bad_request(
            "Idempotency-Key",
            "must be 1-255 printable ASCII characters",
        )
    })?;
    Ok(Some(Idempotency::for_body(key.to_owned(), body)))
}

/// The `Idempotency-Key` request header.
#[derive(utoipa::IntoParams)]
#[into_params(names("Idempotency-Key"), parameter_in = Header)]
pub struct IdempotencyKey(
    /// Makes retries return the first result: 1–255 printable ASCII characters, unique
    /// per caller.
    #[param(
        min_length = 1,
        max_length = 255,
        pattern = "^[!-~]+$",
        nullable = false
    )]
    pub Option<String>,
);
