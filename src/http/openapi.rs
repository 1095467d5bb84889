//! The OpenAPI 3 document, `GET /openapi.json`, generated from the code: the operations
//! of the route table (`http::routes::RouteDoc`, each handler's `#[utoipa::path]`),
//! the `ToSchema` derives of the request and response types, the reusable problem+json
//! responses (`http::problem`), and — from each route's `Access` in the table — its
//! security requirements and the answers of its guard. `tests/api/openapi.rs` checks
//! real responses against it.

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

use crate::auth::{Access, RouteSpec};
use crate::error::ApiError;
use crate::http::problem::{self, BodyErrors, GuardErrors};
use crate::http::routes::{RouteDoc, ROUTES};
use crate::jobs::JobStatus;

/// The document's description, shared schemas, responses and tags; the operations come
/// from the route table ([`document`]).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "coordinator",
        description = "Jobs and stitcher ingestion behind signed-request authentication. \
            Every route except `/livez`, `/readyz`, `/metrics`, `/openapi.json` and the \
            dashboard's static files under `/ui/` needs one \
            credential scheme (HMAC signature, API key, job token, Standard Webhooks on \
            `/stitcher/webhook`, or on an HTTPS listener with a client CA a client \
            certificate verified in the handshake) and the route's scope, listed in each operation's security \
            requirements: a missing or bad credential is a 401, a missing scope a 403. \
            Errors are RFC 9457 problem+json documents (`Problem`). JSON field names are \
            camelCase."
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
    tags(
        (name = "jobs", description = "Coordinator jobs: create, update, read, claim."),
        (name = "stitcher", description = "Bot webhooks and manual dispatch."),
        (name = "admin", description = "Credential administration."),
        (name = "probes", description = "Liveness, readiness, health, metrics, this document."),
        (name = "ui", description = "The operator dashboard: static files, open, holding no data."),
    )
)]
pub struct ApiDoc;

/// The whole document: [`ApiDoc`], the route table's operations, then what every
/// operation gets from its route: security requirements, guard answers, `X-Request-Id`.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(RouteDoc::openapi());
    SecuritySchemes.modify(&mut doc);
    RouteAccess.modify(&mut doc);
    RequestIdHeader.modify(&mut doc);
    doc
}

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
        None => match document().to_json() {
            Ok(text) => DOCUMENT.get_or_init(|| text),
            Err(e) => return ApiError::internal(e).error_response(),
        },
    };
    HttpResponse::Ok()
        .content_type("application/json")
        .body(text.as_str())
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
    }
}

/// Each operation's security requirements and guard answers, from its route's `Access`:
/// a scoped route accepts an HMAC signature, an API key or a client certificate whose
/// caller holds the scope; a job token too where the access is `Access::Job`; Standard
/// Webhooks on the webhook routes. Any guarded route may answer 401, 403, 429 and 503,
/// and 413 where the guard reads a body (POST and PATCH).
struct RouteAccess;

impl RouteAccess {
    fn requirements(route: &RouteSpec) -> Vec<SecurityRequirement> {
        let Some(scope) = route.access.scope() else {
            return Vec::new();
        };
        let mut schemes = Vec::new();
        if route.accepts_webhooks() {
            schemes.push("standardWebhooks");
        }
        schemes.extend(["hmac", "apiKey"]);
        if route.accepts_job_tokens() {
            schemes.push("bearer");
        }
        schemes.push("mutualTLS");
        schemes
            .into_iter()
            .map(|name| SecurityRequirement::new(name, [scope.as_str()]))
            .collect()
    }
}

impl Modify for RouteAccess {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::IntoResponses;
        for route in ROUTES {
            let Some(op) = openapi
                .paths
                .paths
                .get_mut(route.path)
                .and_then(|item| operation(item, route.method))
            else {
                continue;
            };
            if route.access == Access::Open {
                op.security = None;
                continue;
            }
            op.security = Some(Self::requirements(route));
            let mut answers = GuardErrors::responses();
            if matches!(route.method, "POST" | "PATCH") {
                answers.extend(BodyErrors::responses());
            }
            for (status, response) in answers {
                op.responses.responses.entry(status).or_insert(response);
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

/// The operation of a path item for an upper-case method of the route table.
fn operation<'a>(
    item: &'a mut utoipa::openapi::PathItem,
    method: &str,
) -> Option<&'a mut Operation> {
    match method {
        "GET" => item.get.as_mut(),
        "POST" => item.post.as_mut(),
        "PATCH" => item.patch.as_mut(),
        _ => None,
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
        serde_json::to_value(document()).expect("document serializes")
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

/// The OpenAPI document against the route table, without a server: it lists exactly the
/// routes of `ROUTES` (method + pattern, both directions) with the access each requires.
#[cfg(test)]
mod against_the_route_table {
    #![allow(
        clippy::indexing_slicing,
        clippy::expect_used,
        reason = "test code: a missing key is the failed assertion"
    )]
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    use crate::auth::Scope;
    use crate::http::routes::ROUTES;

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn document() -> Value {
        serde_json::to_value(super::document()).expect("document")
    }

    /// (METHOD, path pattern) of every operation in the document.
    fn documented(doc: &Value) -> BTreeSet<(String, String)> {
        let paths = doc["paths"].as_object().expect("paths");
        let mut out = BTreeSet::new();
        for (path, item) in paths {
            for method in METHODS {
                if item.get(method).is_some() {
                    out.insert((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} is not documented");
        op
    }

    /// Follow a local `$ref` (`#/components/...`).
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').expect("local $ref");
                let target = doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling {r}"));
                resolve(doc, target)
            }
            None => v,
        }
    }

    #[test]
    fn document_lists_every_registered_route() {
        let doc = document();
        let registered: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        let documented = documented(&doc);
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        let unregistered: Vec<_> = documented.difference(&registered).collect();
        assert!(
            undocumented.is_empty(),
            "registered routes missing from the document: {undocumented:?}"
        );
        assert!(
            unregistered.is_empty(),
            "documented operations that no route serves: {unregistered:?}"
        );
        // Operation ids are unique, and every `{param}` of a pattern is a path parameter.
        let mut ids = BTreeSet::new();
        for r in ROUTES {
            let op = operation(&doc, r.method, r.path);
            let id = op["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            let params: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| resolve(&doc, p))
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            let in_pattern: BTreeSet<&str> = r
                .path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(
                params, in_pattern,
                "path parameters of {} {}",
                r.method, r.path
            );
        }
    }

    #[test]
    fn operations_require_the_routes_access() {
        let doc = document();
        assert!(
            doc.get("security").is_none(),
            "no document-wide requirement"
        );
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("securitySchemes");
        for name in ["hmac", "apiKey", "bearer", "standardWebhooks", "mutualTLS"] {
            assert!(schemes.contains_key(name), "security scheme {name}");
        }
        assert_eq!(schemes["hmac"]["in"], "header");
        assert_eq!(schemes["hmac"]["name"], "X-Coordinator-Signature");
        assert_eq!(schemes["apiKey"]["name"], "X-API-Key");
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["standardWebhooks"]["name"], "webhook-signature");
        assert_eq!(schemes["mutualTLS"]["type"], "mutualTLS");

        for r in ROUTES {
            let op = operation(&doc, r.method, r.path);
            let requirements = op["security"].as_array().cloned().unwrap_or_default();
            let Some(scope) = r.access.scope() else {
                assert!(
                    requirements.is_empty(),
                    "open route {} {} lists security",
                    r.method,
                    r.path
                );
                continue;
            };
            let mut names = BTreeSet::new();
            for req in &requirements {
                let req = req.as_object().expect("requirement");
                assert_eq!(req.len(), 1, "one scheme per alternative: {req:?}");
                for (name, scopes) in req {
                    assert!(schemes.contains_key(name), "unknown scheme {name}");
                    assert_eq!(
                        scopes,
                        &json!([scope.as_str()]),
                        "{} {} requires {}",
                        r.method,
                        r.path,
                        scope.as_str()
                    );
                    names.insert(name.as_str());
                }
            }
            assert!(
                names.contains("hmac") && names.contains("apiKey") && names.contains("mutualTLS"),
                "{}",
                r.path
            );
            // Job tokens carry jobs:read / jobs:update only; Standard Webhooks is accepted
            // on the webhook route only.
            assert_eq!(
                names.contains("bearer"),
                r.accepts_job_tokens(),
                "{}",
                r.path
            );
            if names.contains("bearer") {
                assert!(
                    matches!(scope, Scope::JobsRead | Scope::JobsUpdate) && r.path.contains("{id}"),
                    "{}",
                    r.path
                );
            }
            assert_eq!(
                names.contains("standardWebhooks"),
                r.accepts_webhooks(),
                "{}",
                r.path
            );
            let responses = op["responses"].as_object().expect("responses");
            for status in ["401", "403", "429", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{} {} documents no {status}",
                    r.method,
                    r.path
                );
            }
        }
    }
}
