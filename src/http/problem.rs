//! The problem+json answers as the OpenAPI document shows them: one reusable response
//! per status (`components/responses`), and the sets a handler lists in its
//! `#[utoipa::path]` — only what the handler itself may answer. What every guarded
//! route may answer (401, 403, 429, 503, and 413 where a body is read) is added to each
//! operation from the route table (`http::openapi::document`), never repeated per
//! handler.

use std::collections::BTreeMap;

use utoipa::openapi::{Ref, RefOr, Response};

use crate::error::Problem;

/// The request is malformed; `field` names the offending field (`body` when the
/// JSON itself is malformed, `id` for a path id that is not a UUID, or a header).
#[derive(utoipa::ToResponse)]
#[response(content_type = "application/problem+json")]
pub struct BadRequest(pub Problem);

/// Missing, malformed, unknown, expired, revoked or replayed credentials, two
/// credential schemes at once, or a bad signature. `reason` says which;
/// `server_time` comes with `timestamp out of range`, `canonical` with
/// `signature mismatch`.
#[derive(utoipa::ToResponse)]
#[response(
    content_type = "application/problem+json",
    headers(("WWW-Authenticate" = String, description = "`Coordinator-HMAC-SHA256`"))
)]
pub struct Unauthorized(pub Problem);

/// Authenticated, but the caller lacks the route's scope, or a job token is used
/// for another job (or to claim).
#[derive(utoipa::ToResponse)]
#[response(content_type = "application/problem+json")]
pub struct Forbidden(pub Problem);

/// No such job.
#[derive(utoipa::ToResponse)]
#[response(content_type = "application/problem+json")]
pub struct NotFound(pub Problem);

/// The state machine refuses the change (a terminal job never changes), or an
/// `Idempotency-Key` was already used with a different request. A change to a
/// cancelled job has its own type, `urn:coordinator:problem:job-cancelled`, so a
/// worker can tell that it should stop.
#[derive(utoipa::ToResponse)]
#[response(content_type = "application/problem+json")]
pub struct Conflict(pub Problem);

/// The request body exceeds the configured limit (default 1 MiB).
#[derive(utoipa::ToResponse)]
#[response(content_type = "application/problem+json")]
pub struct TooLarge(pub Problem);

/// Too many failed authentication attempts from this address; retry later.
#[derive(utoipa::ToResponse)]
#[response(
    content_type = "application/problem+json",
    headers(("Retry-After" = String, description = "Seconds to wait"))
)]
pub struct TooManyRequests(pub Problem);

/// The database cannot be reached (the service fails closed); retry later.
#[derive(utoipa::ToResponse)]
#[response(
    content_type = "application/problem+json",
    headers(("Retry-After" = String, description = "Seconds to wait"))
)]
pub struct Unavailable(pub Problem);

/// A set of the reusable responses above, by status, for `responses(...)`.
macro_rules! response_set {
    ($( $(#[$doc:meta])* $name:ident = [$($status:literal => $response:ident),+]; )*) => {$(
        $(#[$doc])*
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                [$(($status, stringify!($response))),+]
                    .into_iter()
                    .map(|(status, name)| {
                        (status.to_owned(), RefOr::Ref(Ref::from_response_name(name)))
                    })
                    .collect()
            }
        }
    )*};
}

response_set! {
    /// What the route guard may answer on every guarded route.
    GuardErrors = ["401" => Unauthorized, "403" => Forbidden, "429" => TooManyRequests,
        "503" => Unavailable];
    /// What the guard may answer while reading a body (routes with POST or PATCH).
    BodyErrors = ["413" => TooLarge];
    /// A handler that validates its input (query, path, body).
    InputErrors = ["400" => BadRequest];
    /// A handler that reads one job by id (409 `job-cancelled`: a cancelled job's own
    /// token).
    JobReadErrors = ["400" => BadRequest, "404" => NotFound, "409" => Conflict];
    /// A handler that writes (an `Idempotency-Key` reused with another body, or a state
    /// the write refuses).
    WriteErrors = ["400" => BadRequest, "409" => Conflict];
    /// A handler that changes one job by id.
    JobWriteErrors = ["400" => BadRequest, "404" => NotFound, "409" => Conflict];
}
