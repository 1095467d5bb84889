//! The OpenAPI 3 document, `GET /openapi.json`, generated from the code: the handlers'
//! `#[utoipa::path]` attributes, the `ToSchema` derives of the request and response
//! types, and the reusable problem+json responses below. `tests/api/openapi.rs`
//! compares its operations (and their scopes) with `startup::ROUTES`, both directions.

use std::borrow::Cow;
use std::sync::OnceLock;

use actix_web::{HttpResponse, ResponseError};
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{Components, HeaderBuilder, RefOr, Required, Response};
use utoipa::{Modify, OpenApi};

use crate::error::ApiError;
use crate::http::{admin, health, jobs, stitcher, ui};
use crate::jobs::JobStatus;

/// The document's operations, schemas, responses and security schemes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "coordinator",
        description = "Jobs and stitcher ingestion behind signed-request authentication. \
            Every route except `/livez`, `/readyz`, `/metrics`, `/openapi.json` and the \
            dashboard's static files under `/ui/` needs one \
            credential scheme (HMAC signature, API key, job token, or Standard Webhooks on \
            `/stitcher/webhook`) and the route's scope, listed in each operation's security \
            requirements: a missing or bad credential is a 401, a missing scope a 403. \
            Errors are RFC 9457 problem+json documents (`Problem`). JSON field names are \
            camelCase."
    ),
    paths(
        health::livez,
        health::readyz,
        health::metrics,
        openapi_json,
        health::health,
        jobs::create,
        jobs::list,
        jobs::batch,
        jobs::get,
        jobs::status,
        jobs::progress,
        jobs::heartbeat,
        jobs::complete,
        jobs::fail,
        jobs::cancel,
        jobs::retry,
        jobs::queues,
        jobs::patch_queue,
        jobs::claim,
        crate::http::push::job_events,
        crate::http::push::queue_events,
        stitcher::webhook,
        stitcher::webhook_from_sender,
        stitcher::dispatch,
        admin::revoke_token,
        ui::index,
        ui::script,
        ui::style,
    ),
    components(
        schemas(crate::error::Problem, crate::jobs::model::EventType),
        responses(
            problem::BadRequest,
            problem::Unauthorized,
            problem::Forbidden,
            problem::NotFound,
            problem::Conflict,
            problem::TooLarge,
            problem::TooManyRequests,
            problem::Unavailable,
        )
    ),
    modifiers(&SecuritySchemes, &RequestIdHeader),
    tags(
        (name = "jobs", description = "Coordinator jobs: create, update, read, claim."),
        (name = "stitcher", description = "Bot webhooks and manual dispatch."),
        (name = "admin", description = "Credential administration."),
        (name = "probes", description = "Liveness, readiness, health, metrics, this document."),
        (name = "ui", description = "The operator dashboard: static files, open, holding no data."),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`: this document (built once per process; it depends on the code
/// only, never on configuration or state).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "probes",
    operation_id = "openapi",
    summary = "This OpenAPI document",
    responses(
        (status = 200, description = "The OpenAPI 3 document.", body = Object,
            content_type = "application/json"),
    ),
)]
pub async fn openapi_json() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = match DOCUMENT.get() {
        Some(text) => text,
        None => match ApiDoc::openapi().to_json() {
            Ok(text) => DOCUMENT.get_or_init(|| text),
            Err(e) => return ApiError::internal(e).error_response(),
        },
    };
    HttpResponse::Ok()
        .content_type("application/json")
        .body(text.as_str())
}

/// The `{id}` path parameter of the job routes.
#[derive(utoipa::IntoParams)]
#[into_params(names("id"), parameter_in = Path)]
pub struct JobIdParam(
    /// The job id (a UUID).
    #[param(format = "uuid")]
    pub String,
);

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

/// The problem+json responses the operations refer to (`components/responses`).
pub mod problem {
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
}

/// `JobStatus` reads and writes as the strings of [`JobStatus::as_str`].
impl utoipa::PartialSchema for JobStatus {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "`PENDING → QUEUED → RUNNING → COMPLETED | FAILED`, any non-terminal → \
                 `CANCELLED`, and `RUNNING → QUEUED` when a job is handed back.",
            ))
            .enum_values(Some(JobStatus::ALL.iter().map(|s| s.as_str())))
            .into()
    }
}

impl utoipa::ToSchema for JobStatus {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("JobStatus")
    }
}

const HMAC_DESCRIPTION: &str = "HMAC-SHA256 request signature, 64 lower-case hex \
characters, keyed by the UTF-8 bytes of the caller's whole HMAC secret (`coh_…`). It goes \
with `X-Coordinator-Caller` (the caller name), `X-Coordinator-Timestamp` (unix seconds, \
within ±300 s of the server), optionally `X-Coordinator-Nonce` (1–64 of `[A-Za-z0-9_-]`) \
and `X-Coordinator-Key-Version` (which secret version signed). The signed string is these \
lines joined by `\\n`, no trailing newline: `v1`, the upper-case method, the request target \
(path and `?query` exactly as sent), the caller, the timestamp, the nonce (empty when \
absent), and the lower-case hex SHA-256 of the raw body. A (caller, signature) pair seen \
again within the window is a replay. Any `X-Coordinator-*` signature header selects this \
scheme, with no fallback to another.";

const API_KEY_DESCRIPTION: &str = "A caller's API key (`cok_…`). Refused when the server \
requires signatures (`COORDINATOR_REQUIRE_SIGNATURE=true`).";

const BEARER_DESCRIPTION: &str = "A job token (JWT HS256) from a claim or `coordinator token \
issue`: `jobs:read`/`jobs:update` on its own job only.";

const WEBHOOK_DESCRIPTION: &str = "Standard Webhooks signature, on `/stitcher/webhook` only: \
a space-separated list of `v1,<base64 HMAC-SHA256>` over `webhook-id.webhook-timestamp.body`, \
keyed by the base64-decoded webhook secret after `whsec_`; `webhook-timestamp` within ±300 s.";

/// The five security schemes the operations refer to.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Components::new);
        let header = |name: &str, description: &str| {
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                name,
                description,
            )))
        };
        components.add_security_scheme("hmac", header("X-Coordinator-Signature", HMAC_DESCRIPTION));
        components.add_security_scheme("apiKey", header("X-API-Key", API_KEY_DESCRIPTION));
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(BEARER_DESCRIPTION))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "standardWebhooks",
            header("webhook-signature", WEBHOOK_DESCRIPTION),
        );
        components.add_security_scheme(
            "mutualTLS",
            SecurityScheme::MutualTls {
                description: Some(MTLS_DESCRIPTION.to_owned()),
                extensions: None,
            },
        );
        // A client certificate names a caller and carries that caller's scopes: it is an
        // alternative wherever an HMAC signature is, with the same scopes.
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.put,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                let Some(security) = op.security.as_mut() else {
                    continue;
                };
                let hmac_scopes = serde_json::to_value(&*security)
                    .ok()
                    .and_then(|v| v.as_array()?.iter().find_map(|r| r.get("hmac").cloned()))
                    .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok());
                if let Some(scopes) = hmac_scopes {
                    security.push(SecurityRequirement::new("mutualTLS", scopes));
                }
            }
        }
    }
}

const MTLS_DESCRIPTION: &str = "A client certificate verified in the TLS handshake (servers started with `COORDINATOR_TLS_CLIENT_CA`); its subject CN (or a configured SAN) names the caller, whose scopes apply. Optional: callers without one use another scheme.";

/// `X-Request-Id`, accepted and answered by every route (the access-log middleware).
struct RequestIdHeader;

const REQUEST_ID_DESCRIPTION: &str = "Correlates logs: a well-formed `X-Request-Id` (1–128 of \
`[A-Za-z0-9._-]`) is kept, anything else replaced by a fresh UUIDv7.";

impl Modify for RequestIdHeader {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let string = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(128))
                .pattern(Some("^[A-Za-z0-9._-]+$"))
        };
        let param = ParameterBuilder::new()
            .name("X-Request-Id")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(REQUEST_ID_DESCRIPTION))
            .schema(Some(string()))
            .build();
        let answered = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some("The request id: the caller's, or a fresh UUIDv7."))
            .build();
        let add_header = |r: &mut Response| {
            r.headers
                .insert("X-Request-Id".to_owned(), answered.clone());
        };
        for item in openapi.paths.paths.values_mut() {
            for op in operations(item) {
                op.parameters
                    .get_or_insert_with(Vec::new)
                    .push(param.clone());
                for r in op.responses.responses.values_mut() {
                    if let RefOr::T(r) = r {
                        add_header(r);
                    }
                }
            }
        }
        if let Some(c) = openapi.components.as_mut() {
            for r in c.responses.values_mut() {
                if let RefOr::T(r) = r {
                    add_header(r);
                }
            }
        }
    }
}

/// The operations of a path item (the methods the route table uses).
fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.post.as_mut(),
        item.patch.as_mut(),
        item.put.as_mut(),
        item.delete.as_mut(),
    ]
    .into_iter()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("document serializes")
    }

    #[test]
    fn job_status_schema_lists_every_status_as_serialized() {
        let d = doc();
        let values = d["components"]["schemas"]["JobStatus"]["enum"]
            .as_array()
            .expect("enum");
        let wire: Vec<Value> = JobStatus::ALL
            .iter()
            .map(|s| serde_json::to_value(s).expect("status serializes"))
            .collect();
        assert_eq!(values, &wire);
    }

    #[test]
    fn problem_schema_describes_every_member_an_error_writes() {
        let d = doc();
        let schema = &d["components"]["schemas"]["Problem"];
        let props = schema["properties"].as_object().expect("properties");
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        required.sort_unstable();
        assert_eq!(required, ["detail", "status", "title", "type"]);
        let errors = [
            ApiError::bad_request("priority", "must be between -1000 and 1000"),
            ApiError::unauthorized(
                crate::error::AuthFailure::new("timestamp out of range")
                    .with("server_time", 1_700_000_000),
            ),
            ApiError::unauthorized(
                crate::error::AuthFailure::new("signature mismatch").with("canonical", "v1\nGET"),
            ),
            ApiError::Forbidden("missing scope for this route"),
            ApiError::NotFound,
            ApiError::Conflict("job is COMPLETED and can no longer change".into()),
            ApiError::JobCancelled,
            ApiError::TooLarge,
            ApiError::TooManyRequests {
                retry_after_secs: 3,
            },
            ApiError::Unavailable("down".into()),
        ];
        for e in errors {
            let body = e.problem();
            for key in body.as_object().expect("object").keys() {
                assert!(
                    props.contains_key(key),
                    "{key} is not in the Problem schema"
                );
            }
        }
    }

    #[test]
    fn request_bodies_refuse_unknown_fields() {
        let d = doc();
        for name in [
            "CreateJob",
            "StatusUpdate",
            "ProgressUpdate",
            "CompleteJob",
            "FailJob",
            "ClaimRequest",
            "CancelJob",
            "QueuePatch",
            "BatchCreate",
            "BatchJob",
            "RetryBackoff",
            "WebhookPayload",
            "DispatchRequest",
            "RevokeToken",
        ] {
            assert_eq!(
                d["components"]["schemas"][name]["additionalProperties"],
                Value::Bool(false),
                "{name}"
            );
        }
    }
}
