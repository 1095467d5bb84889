//! Job routes: parse the input, call one repository function off the executor, map
//! the result. No SQL, no crypto.

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{JsonBody, RawBody};
use crate::http::openapi::{problem, IdempotencyKey, JobIdParam};
use crate::jobs::model::{
    validate_message, Change, CompleteJob, CreateJob, FailJob, JobId, JobView, ProgressUpdate,
    StatusUpdate,
};
use crate::jobs::repo;
use crate::state::AppState;

/// `POST /coordinator/jobs`
#[utoipa::path(
    post,
    path = "/coordinator/jobs",
    tag = "jobs",
    operation_id = "createJob",
    summary = "Create a job (PENDING)",
    description = "With `Idempotency-Key`, a retry with the same body returns the first \
        result (and `Idempotent-Replayed: true`); the same key with another body is a 409.",
    params(IdempotencyKey),
    request_body(content = CreateJob, content_type = "application/json"),
    responses(
        (status = 201, description = "The job, created now or by the first request with \
            this `Idempotency-Key`.", body = JobView,
            headers(("Idempotent-Replayed" = String,
                description = "`true` when this is the answer to an earlier request"))),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 409, response = problem::Conflict),
        (status = 413, response = problem::TooLarge),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(("hmac" = ["jobs:create"]), ("apiKey" = ["jobs:create"])),
)]
pub async fn create(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    RawBody(body): RawBody,
) -> ApiResult<HttpResponse> {
    let input: CreateJob = crate::http::extract::parse_json(&body)?;
    let job = input.validate()?;
    let idem = crate::http::idempotency::from_request(&req, crate::crypto::sha256_hex(&body))?;
    let created_by = principal.caller;
    let out = state
        .db
        .write(move |conn| repo::create(conn, &job, &created_by, idem.as_ref()))
        .await?;
    let mut resp = HttpResponse::build(StatusCode::CREATED);
    if out.created {
        state.metrics.transition(out.job.status());
    } else {
        resp.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(resp.json(JobView::from(out.job)))
}

async fn change(
    state: &AppState,
    principal: &Principal,
    id: &str,
    change: Change,
) -> ApiResult<HttpResponse> {
    let id = JobId::parse(id, "id")?;
    principal.authorize_job(&id)?;
    let lease_ms = state.config.lease_ms();
    let moves = !matches!(change, Change::Progress { .. });
    let row = state
        .db
        .write(move |conn| repo::apply(conn, &id, &change, lease_ms))
        .await?;
    if moves {
        state.metrics.transition(row.status());
    }
    if let Some((key, until)) = repo::token_revocation(&row, crate::db::now_millis()) {
        state.auth.revocations.revoke_local(&key, until);
    }
    Ok(HttpResponse::Ok().json(JobView::from(row)))
}

/// `PATCH /coordinator/jobs/{id}/status`
#[utoipa::path(
    patch,
    path = "/coordinator/jobs/{id}/status",
    tag = "jobs",
    operation_id = "updateJobStatus",
    summary = "Move a job along the state machine",
    description = "`PENDING → QUEUED → RUNNING → COMPLETED | FAILED`, any non-terminal → \
        `CANCELLED`, `RUNNING → QUEUED`; anything else, and any change to a terminal job, \
        is a 409. A job token may change only its own job (else 403).",
    params(JobIdParam),
    request_body(content = StatusUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "The job after the change.", body = JobView),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 404, response = problem::NotFound),
        (status = 409, response = problem::Conflict),
        (status = 413, response = problem::TooLarge),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(
        ("hmac" = ["jobs:update"]),
        ("apiKey" = ["jobs:update"]),
        ("bearer" = ["jobs:update"])
    ),
)]
pub async fn status(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    JsonBody(body): JsonBody<StatusUpdate>,
) -> ApiResult<HttpResponse> {
    validate_message(body.message.as_deref())?;
    let c = Change::Status {
        to: body.status,
        message: body.message,
    };
    change(&state, &principal, &id, c).await
}

/// `PATCH /coordinator/jobs/{id}/progress`
#[utoipa::path(
    patch,
    path = "/coordinator/jobs/{id}/progress",
    tag = "jobs",
    operation_id = "reportJobProgress",
    summary = "Report progress of a RUNNING job",
    description = "Only while the job is RUNNING (else 409). A job token may change only \
        its own job (else 403).",
    params(JobIdParam),
    request_body(content = ProgressUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "The job after the change.", body = JobView),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 404, response = problem::NotFound),
        (status = 409, response = problem::Conflict),
        (status = 413, response = problem::TooLarge),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(
        ("hmac" = ["jobs:update"]),
        ("apiKey" = ["jobs:update"]),
        ("bearer" = ["jobs:update"])
    ),
)]
pub async fn progress(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    JsonBody(body): JsonBody<ProgressUpdate>,
) -> ApiResult<HttpResponse> {
    let percent = body.validate()?;
    let c = Change::Progress {
        percent,
        message: body.message,
    };
    change(&state, &principal, &id, c).await
}

/// `POST /coordinator/jobs/{id}/complete`
#[utoipa::path(
    post,
    path = "/coordinator/jobs/{id}/complete",
    tag = "jobs",
    operation_id = "completeJob",
    summary = "Complete a RUNNING job",
    description = "RUNNING → COMPLETED, progress 100. A job token may change only its own \
        job (else 403).",
    params(JobIdParam),
    request_body(content = CompleteJob, content_type = "application/json",
        description = "An empty body reads as `{}`."),
    responses(
        (status = 200, description = "The job after the change.", body = JobView),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 404, response = problem::NotFound),
        (status = 409, response = problem::Conflict),
        (status = 413, response = problem::TooLarge),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(
        ("hmac" = ["jobs:update"]),
        ("apiKey" = ["jobs:update"]),
        ("bearer" = ["jobs:update"])
    ),
)]
pub async fn complete(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    JsonBody(body): JsonBody<CompleteJob>,
) -> ApiResult<HttpResponse> {
    change(
        &state,
        &principal,
        &id,
        Change::Complete {
            result: body.result,
        },
    )
    .await
}

/// `POST /coordinator/jobs/{id}/fail`
#[utoipa::path(
    post,
    path = "/coordinator/jobs/{id}/fail",
    tag = "jobs",
    operation_id = "failJob",
    summary = "Fail a RUNNING job",
    description = "RUNNING → FAILED. A job token may change only its own job (else 403).",
    params(JobIdParam),
    request_body(content = FailJob, content_type = "application/json"),
    responses(
        (status = 200, description = "The job after the change.", body = JobView),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 404, response = problem::NotFound),
        (status = 409, response = problem::Conflict),
        (status = 413, response = problem::TooLarge),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(
        ("hmac" = ["jobs:update"]),
        ("apiKey" = ["jobs:update"]),
        ("bearer" = ["jobs:update"])
    ),
)]
pub async fn fail(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    JsonBody(body): JsonBody<FailJob>,
) -> ApiResult<HttpResponse> {
    body.validate()?;
    let c = Change::Fail {
        error: body.error,
        gate_results: body.gate_results,
    };
    change(&state, &principal, &id, c).await
}

/// `GET /coordinator/jobs/{id}`
#[utoipa::path(
    get,
    path = "/coordinator/jobs/{id}",
    tag = "jobs",
    operation_id = "getJob",
    summary = "Read a job with its events",
    description = "The job and its newest events, oldest first (`eventsTruncated` when \
        older ones were left out). A job token may read only its own job (else 403).",
    params(JobIdParam),
    responses(
        (status = 200, description = "The job with `events`.", body = JobView),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 404, response = problem::NotFound),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(
        ("hmac" = ["jobs:read"]),
        ("apiKey" = ["jobs:read"]),
        ("bearer" = ["jobs:read"])
    ),
)]
pub async fn get(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = JobId::parse(&id, "id")?;
    principal.authorize_job(&id)?;
    let (job, events, truncated) = state
        .db
        .read(move |conn| repo::find_with_events(conn, &id))
        .await?;
    let mut view = JobView::from(job);
    view.events = Some(events.into_iter().map(Into::into).collect());
    view.events_truncated = truncated;
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /coordinator/queues/{queue}/claim`: who is claiming.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRequest {
    /// The worker's name; it becomes the job token's `sub` (the audit line's
    /// `worker`; its `caller` is the authenticated claimer).
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.:-]+$")]
    pub worker: String,
}

// For the OpenAPI document only: `claim` builds this from a `JobView`.
/// The claimed job, now RUNNING, with a job token for it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedJob {
    #[serde(flatten)]
    pub job: JobView,
    /// A JWT job token (`jobs:update`/`jobs:read` on this job only), sent as
    /// `Authorization: Bearer <token>`.
    pub token: String,
    #[schema(format = DateTime)]
    pub token_expires_at: String,
}

/// `POST /coordinator/queues/{queue}/claim` [jobs:update]: the best QUEUED job moves to
/// RUNNING and comes back with a job token; 204 when the queue is empty.
#[utoipa::path(
    post,
    path = "/coordinator/queues/{queue}/claim",
    tag = "jobs",
    operation_id = "claimJob",
    summary = "Claim the next job of a queue",
    description = "The best QUEUED job of the queue (highest priority, then oldest) moves \
        to RUNNING under a lease and comes back with a job token. A job token cannot \
        claim (403).",
    params(
        ("queue" = String, Path, description = "The queue name.",
            min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$"),
    ),
    request_body(content = ClaimRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The claimed job with its token.", body = ClaimedJob,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 204, description = "The queue has no QUEUED job."),
        (status = 400, response = problem::BadRequest),
        (status = 401, response = problem::Unauthorized),
        (status = 403, response = problem::Forbidden),
        (status = 413, response = problem::TooLarge),
        (status = 429, response = problem::TooManyRequests),
        (status = 503, response = problem::Unavailable),
    ),
    security(("hmac" = ["jobs:update"]), ("apiKey" = ["jobs:update"])),
)]
pub async fn claim(
    state: web::Data<AppState>,
    principal: Principal,
    queue: web::Path<String>,
    JsonBody(body): JsonBody<ClaimRequest>,
) -> ApiResult<HttpResponse> {
    if principal.job_id.is_some() {
        return Err(ApiError::Forbidden("a job token cannot claim jobs"));
    }
    let queue = queue.into_inner();
    crate::jobs::model::validate_queue(&queue, "queue")?;
    if !crate::auth::token::valid_worker(&body.worker) {
        return Err(ApiError::bad_request(
            "worker",
            "must be 1-64 characters of letters, digits, '_', '.', ':' or '-'",
        ));
    }
    let keys = state.auth.store.token_keys().await?;
    let lease_ms = state.config.lease_ms();
    let ttl = state.config.token_ttl;
    let (worker, caller) = (body.worker, principal.caller);
    let claimed = state
        .db
        .write(move |conn| {
            crate::auth::token::claim(conn, &queue, &caller, &worker, lease_ms, &keys, ttl)
        })
        .await?;
    let Some(crate::auth::token::Claimed {
        job: row,
        token,
        revoked,
    }) = claimed
    else {
        return Ok(HttpResponse::NoContent().finish());
    };
    if let Some((key, until)) = revoked {
        state.auth.revocations.revoke_local(&key, until);
    }
    state.metrics.transition(row.status());
    let mut v = serde_json::to_value(JobView::from(row)).map_err(ApiError::internal)?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("token".into(), token.token.as_str().into());
        obj.insert(
            "tokenExpiresAt".into(),
            crate::jobs::model::rfc3339(token.expires_at).into(),
        );
    }
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(v))
}
