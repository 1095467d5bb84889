//! Job routes: parse the input, call one repository function off the executor, map
//! the result. No SQL, no crypto.

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};

use crate::auth::{Principal, Scope};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::JobIdParam;
use crate::http::extract::{JsonBody, RawBody};
use crate::http::idempotency::IdempotencyKey;
use crate::http::problem;
use crate::jobs::model::{Change, JobId};
use crate::jobs::queues;
use crate::jobs::repo::{self, ProgressReport};
use crate::jobs::request::{
    validate_message, BatchCreate, CancelJob, CompleteJob, CreateJob, FailJob, ListFilter,
    ProgressUpdate, QueuePatch, StatusUpdate, MAX_BATCH,
};
use crate::jobs::view::{
    BatchCreated, BatchItem, HeartbeatView, JobPage, JobView, QueueList, QueueView,
};
use crate::jobs::JobStatus;
use crate::state::AppState;

/// `POST /coordinator/jobs`
#[utoipa::path(
    post,
    path = "/coordinator/jobs",
    tag = "jobs",
    operation_id = "createJob",
    summary = "Create a job (PENDING)",
    description = "With `Idempotency-Key`, a retry with the same body returns the first \
        job as it is now (and `Idempotent-Replayed: true`; without `jobs:read`, its \
        `message`, `result`, `error` and `gateResults` are null); the same key with \
        another body is a 409.",
    params(IdempotencyKey),
    request_body(content = CreateJob, content_type = "application/json"),
    responses(
        (status = 201, description = "The job, created now or by the first request with \
            this `Idempotency-Key`.", body = JobView,
            headers(("Idempotent-Replayed" = String,
                description = "`true` when this is the answer to an earlier request"))),
        problem::WriteErrors,
    ),
)]
pub async fn create(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    RawBody(body): RawBody,
) -> ApiResult<HttpResponse> {
    let input: CreateJob = crate::http::extract::parse_json(&body)?;
    let job = input.validate()?;
    let idem = crate::http::idempotency::from_request(&req, &body)?;
    let reads = principal.has_scope(Scope::JobsRead);
    let out = state.creates.create(job, principal.caller, idem).await?;
    let mut resp = HttpResponse::build(StatusCode::CREATED);
    if out.created {
        state.notifier.row_changed(&out.job);
        state.metrics.transition(out.job.status());
    } else {
        resp.insert_header(("Idempotent-Replayed", "true"));
    }
    Ok(resp.json(replayed_view(out.job, !out.created && !reads)))
}

/// A created job's view; a replayed one (`hide`) without what was written into it
/// since, for a principal without `jobs:read` ([`JobView::without_outcome`]).
fn replayed_view(row: crate::jobs::row::JobRow, hide: bool) -> JobView {
    let view = JobView::from(row);
    if hide {
        view.without_outcome()
    } else {
        view
    }
}

async fn change(
    state: &AppState,
    principal: &Principal,
    id: &str,
    change: Change,
) -> ApiResult<HttpResponse> {
    let id = JobId::parse(id, "id")?;
    principal.authorize_job(&id)?;
    let terms = state.config.terms();
    let moves = !matches!(change, Change::Progress { .. });
    let row = match change {
        Change::Progress { percent, message } => {
            let report = ProgressReport {
                id,
                percent,
                message,
                terms,
                attempt: principal.token_attempt(),
                record: None,
            };
            state.progress.report(report).await?
        }
        change => {
            let attempt = principal.token_attempt();
            state
                .db
                .write(move |conn| repo::apply(conn, &id, &change, terms, attempt))
                .await?
        }
    };
    state.notifier.row_changed(&row);
    if moves {
        state.metrics.transition(row.status());
    }
    state
        .auth
        .revocations
        .job_changed(&row, crate::db::now_millis());
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
        is a 409. A job token may change only its own job (else 403), and only to \
        QUEUED (hand a RUNNING job back; else 409), COMPLETED or FAILED (else 403: \
        cancelling is an operator's, as on `/cancel`). A job token's change applies only while the job \
        is still on the token's attempt (else 401 `revoked`).",
    params(JobIdParam),
    request_body(content = StatusUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "The job after the change.", body = JobView),
        problem::JobWriteErrors,
    ),
)]
pub async fn status(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    JsonBody(body): JsonBody<StatusUpdate>,
) -> ApiResult<HttpResponse> {
    validate_message(body.message.as_deref(), "message")?;
    // The guard lets a job token reach this route for its worker's moves: hand the job
    // back (QUEUED), complete or fail it. Cancelling is refused to it here as it is on
    // `/cancel`, and so is moving a job to RUNNING or PENDING (a claim's and an
    // operator's moves, never a worker's).
    if principal.job_id.is_some() {
        match body.status {
            JobStatus::Queued | JobStatus::Completed | JobStatus::Failed => {}
            JobStatus::Cancelled => return Err(ApiError::Forbidden("a job token cannot cancel")),
            JobStatus::Pending | JobStatus::Running => {
                return Err(ApiError::Forbidden(
                    "a job token may only hand its job back (QUEUED), complete or fail it",
                ))
            }
        }
    }
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
        problem::JobWriteErrors,
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
        problem::JobWriteErrors,
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
    description = "RUNNING → FAILED; or, with `retryable: true` while attempts are left \
        (`attempts < maxAttempts`), back to QUEUED with `runAt` = now + the job's backoff \
        (exponential with full jitter), its attempt's tokens revoked (event \
        `retry_scheduled`). A job token may change only its own job (else 403).",
    params(JobIdParam),
    request_body(content = FailJob, content_type = "application/json"),
    responses(
        (status = 200, description = "The job after the change.", body = JobView),
        problem::JobWriteErrors,
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
        retryable: body.retryable.unwrap_or(false),
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
    description = "The job and its newest events (at most 1000), oldest first \
        (`eventsTruncated` when older ones were left out or are no longer kept: the \
        first shown is not `seq` 1). A job token may read only its own job (else 403).",
    params(JobIdParam),
    responses(
        (status = 200, description = "The job with `events`.", body = JobView),
        problem::JobReadErrors,
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
    /// Long poll: hold the request up to this many seconds until a job becomes
    /// claimable (also `?wait=`; the body wins). 0 or absent: answer at once.
    #[schema(minimum = 0, maximum = 60)]
    pub wait: Option<f64>,
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
        claim (403). With `wait` (seconds, 0-60, in the body or `?wait=`) the request \
        is held until a job becomes claimable (created, requeued, due, the queue resumed, \
        a running slot freed; on any instance) or the wait ends (204; also at once when \
        the instance shuts down). Waiting claims per caller and per instance are bounded \
        (429 with `Retry-After` beyond). A job claimed for a client that has gone goes \
        back to QUEUED at once.",
    params(
        ("queue" = String, Path, description = "The queue name.",
            min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$"),
        ("wait" = Option<f64>, Query, minimum = 0, maximum = 60,
            description = "Long poll: seconds to wait for a job (the body's `wait` wins)."),
    ),
    request_body(content = ClaimRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The claimed job with its token.", body = ClaimedJob,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 204, description = "The queue has no claimable job (within `wait`)."),
        problem::InputErrors,
    ),
)]
pub async fn claim(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    queue: web::Path<String>,
    JsonBody(body): JsonBody<ClaimRequest>,
) -> ApiResult<HttpResponse> {
    if principal.job_id.is_some() {
        return Err(ApiError::Forbidden("a job token cannot claim jobs"));
    }
    let queue = queue.into_inner();
    crate::jobs::request::validate_queue(&queue, "queue")?;
    if !crate::auth::token::valid_worker(&body.worker) {
        return Err(ApiError::bad_request(
            "worker",
            "must be 1-64 characters of letters, digits, '_', '.', ':' or '-'",
        ));
    }
    let wait = crate::http::push::wait_of(&req, body.wait)?;
    let worker = body.worker;
    if !wait.is_zero() {
        // It waits by design: it gives its place at the door back (see db::admission).
        crate::db::admission::waits_by_design(&req);
        return crate::http::push::long_claim(state, queue, principal, worker, wait).await;
    }
    let caller = principal.caller;
    match claim_once(&state, queue, caller, worker).await? {
        Some(c) => claimed_response(c),
        None => Ok(HttpResponse::NoContent().finish()),
    }
}

/// One claim attempt: the job and its token, or `None` when nothing is claimable.
pub(crate) async fn claim_once(
    state: &AppState,
    queue: String,
    caller: String,
    worker: String,
) -> ApiResult<Option<crate::auth::token::Claimed>> {
    let keys = state.auth.store.token_keys().await?;
    let terms = state.config.terms();
    let ttl = state.config.token_ttl;
    let claimed = state
        .db
        .write(move |conn| {
            crate::auth::token::claim(conn, &queue, &caller, &worker, terms, &keys, ttl)
        })
        .await?;
    if let Some(c) = &claimed {
        state.auth.revocations.revoke_local_all(&c.revoked);
        state.notifier.row_changed(&c.job);
        state.metrics.transition(c.job.status());
    }
    Ok(claimed)
}

/// The 200 answer of a claim: the job with its token.
pub(crate) fn claimed_response(c: crate::auth::token::Claimed) -> ApiResult<HttpResponse> {
    let crate::auth::token::Claimed {
        job: row, token, ..
    } = c;
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

/// `GET /coordinator/jobs`
#[utoipa::path(
    get,
    path = "/coordinator/jobs",
    tag = "jobs",
    operation_id = "listJobs",
    summary = "List jobs, newest first",
    description = "Filtered by `queue`, `status` (repeatable: any of them), `kind` and \
        creation time (exclusive bounds); newest first (`createdAt`, then `id`). Keyset \
        pagination: pass `nextCursor` as `cursor` for the next page. A job is on exactly \
        one page of a walk, also while jobs are being created (they are newer than the \
        walk's position). Items carry no events. A job token cannot list (403).",
    params(
        ("queue" = Option<String>, Query, min_length = 1, max_length = 64,
            pattern = "^[A-Za-z0-9_.-]+$", description = "Only this queue."),
        ("status" = Option<Vec<JobStatus>>, Query, explode = true,
            description = "Only these statuses (repeat the parameter for several)."),
        ("kind" = Option<String>, Query, min_length = 1, max_length = 100,
            description = "Only this kind."),
        ("createdAfter" = Option<String>, Query, format = DateTime,
            description = "Only jobs created after this (RFC 3339)."),
        ("createdBefore" = Option<String>, Query, format = DateTime,
            description = "Only jobs created before this (RFC 3339)."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500,
            description = "Page size, default 50."),
        ("cursor" = Option<String>, Query,
            description = "`nextCursor` of the previous page (opaque)."),
    ),
    responses(
        (status = 200, description = "One page.", body = JobPage),
        problem::InputErrors,
    ),
)]
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request("query", format!("malformed query string ({e})")))?
        .into_inner();
    let filter = ListFilter::parse(&pairs)?;
    let (rows, next) = state.db.read(move |conn| repo::list(conn, &filter)).await?;
    Ok(HttpResponse::Ok().json(JobPage {
        items: rows.into_iter().map(JobView::from).collect(),
        next_cursor: next.map(|c| c.encode()),
    }))
}

/// `POST /coordinator/jobs/{id}/cancel`
#[utoipa::path(
    post,
    path = "/coordinator/jobs/{id}/cancel",
    tag = "jobs",
    operation_id = "cancelJob",
    summary = "Cancel a job",
    description = "Any non-terminal job → CANCELLED (event `cancelled`), its job tokens \
        revoked at once. The worker's next heartbeat, progress or other change, sent with \
        its caller credential or with its (now revoked) job token, is a 409 of type \
        `urn:coordinator:problem:job-cancelled`. A job token cannot cancel (403). An \
        empty body reads as `{}`.",
    params(JobIdParam),
    request_body(content = CancelJob, content_type = "application/json"),
    responses(
        (status = 200, description = "The cancelled job.", body = JobView),
        problem::JobWriteErrors,
    ),
)]
pub async fn cancel(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    JsonBody(body): JsonBody<CancelJob>,
) -> ApiResult<HttpResponse> {
    validate_message(body.reason.as_deref(), "reason")?;
    change(
        &state,
        &principal,
        &id,
        Change::Cancel {
            reason: body.reason,
        },
    )
    .await
}

/// `POST /coordinator/jobs/{id}/retry`
#[utoipa::path(
    post,
    path = "/coordinator/jobs/{id}/retry",
    tag = "jobs",
    operation_id = "retryJob",
    summary = "Redrive a FAILED or CANCELLED job",
    description = "FAILED or CANCELLED → QUEUED, due at once, with a fresh attempt budget: \
        `maxAttempts` becomes `attempts` plus the number of attempts the job was created \
        with (`attempts` keeps counting, so no new job token shares an attempt with a \
        revoked one). Result, error and gate results are cleared; the event `redriven` \
        records it. Any other status is a 409. A job token cannot retry (403).",
    params(JobIdParam),
    responses(
        (status = 200, description = "The job, QUEUED again.", body = JobView),
        problem::JobWriteErrors,
    ),
)]
pub async fn retry(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    change(&state, &principal, &id, Change::Redrive).await
}

/// `POST /coordinator/jobs/{id}/heartbeat`
#[utoipa::path(
    post,
    path = "/coordinator/jobs/{id}/heartbeat",
    tag = "jobs",
    operation_id = "heartbeatJob",
    summary = "Renew a RUNNING job's lease",
    description = "Extends the lease by `COORDINATOR_LEASE_SECS` without an event, so a \
        frequent heartbeat does not grow the job's history. Only while RUNNING: a \
        cancelled job is a 409 of type `urn:coordinator:problem:job-cancelled`, any other \
        status a 409 `conflict`. A job token may renew only its own job (else 403). Sent \
        with a job token that has less than half of its lifetime left, the answer also \
        carries the token's successor (`token`, `tokenExpiresAt`; same id, job, attempt \
        and lifetime, so a run is not capped by a token's lifetime). The body is \
        ignored.",
    params(JobIdParam),
    responses(
        (status = 200, description = "The new lease.", body = HeartbeatView),
        problem::JobWriteErrors,
    ),
)]
pub async fn heartbeat(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    use crate::auth::token;
    let id = JobId::parse(&id, "id")?;
    principal.authorize_job(&id)?;
    let lease_ms = state.config.lease_ms();
    let Some(renewal) = token::renewal_due(&principal, crate::db::now_millis()) else {
        let attempt = principal.token_attempt();
        let until = state
            .db
            .write(move |conn| repo::heartbeat(conn, &id, lease_ms, attempt))
            .await?;
        return Ok(HttpResponse::Ok().json(HeartbeatView {
            lease_expires_at: crate::jobs::model::rfc3339(until),
            cancel_requested: false,
            token: None,
            token_expires_at: None,
        }));
    };
    let keys = state.auth.store.token_keys().await?;
    renewal.signed_by_active_key(&keys, crate::db::now_millis())?;
    let (until, renewed) = state
        .db
        .write(move |conn| token::heartbeat_renewing(conn, &keys, &id, lease_ms, &renewal))
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(HeartbeatView {
            lease_expires_at: crate::jobs::model::rfc3339(until),
            cancel_requested: false,
            token: Some(renewed.token.as_str().to_owned()),
            token_expires_at: Some(crate::jobs::model::rfc3339(renewed.expires_at)),
        }))
}

/// `GET /coordinator/queues`
#[utoipa::path(
    get,
    path = "/coordinator/queues",
    tag = "jobs",
    operation_id = "listQueues",
    summary = "Every queue with its depth and controls",
    description = "Every queue that has a job not yet ended or has controls set: jobs \
        PENDING, QUEUED and RUNNING, how long its longest-waiting due job has waited \
        (since its `runAt`), whether it is paused and its running limit.",
    responses(
        (status = 200, description = "The queues, by name.", body = QueueList),
    ),
)]
pub async fn queues(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let body = state
        .queue_list
        .get(|| async {
            let now = crate::db::now_millis();
            let queues = state
                .db
                .read(move |conn| queues::list_queues(conn, now))
                .await?;
            serde_json::to_vec(&QueueList { queues })
                .map(web::Bytes::from)
                .map_err(|e| crate::error::StoreError::Internal(format!("queue list: {e}")))
        })
        .await?;
    Ok(HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(body))
}

/// `PATCH /coordinator/queues/{queue}`
#[utoipa::path(
    patch,
    path = "/coordinator/queues/{queue}",
    tag = "jobs",
    operation_id = "updateQueue",
    summary = "Pause, resume or limit a queue",
    description = "`paused: true` makes claims on the queue hand out nothing (204); \
        `maxRunning: n` hands out nothing while n of its jobs are RUNNING, exactly, also \
        with concurrent claimers on several instances; `null` removes the limit. Members \
        left out stay as they are. Jobs already RUNNING are not touched; a `PATCH …/status` \
        to RUNNING by an operator is not a claim and is not limited.",
    params(
        ("queue" = String, Path, description = "The queue name.",
            min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]+$"),
    ),
    request_body(content = QueuePatch, content_type = "application/json"),
    responses(
        (status = 200, description = "The queue after the change.", body = QueueView),
        problem::InputErrors,
    ),
)]
pub async fn patch_queue(
    state: web::Data<AppState>,
    queue: web::Path<String>,
    JsonBody(body): JsonBody<QueuePatch>,
) -> ApiResult<HttpResponse> {
    let queue = queue.into_inner();
    crate::jobs::request::validate_queue(&queue, "queue")?;
    body.validate()?;
    let q = queue.clone();
    let view = state
        .db
        .write(move |conn| queues::patch_queue(conn, &q, body.paused, body.max_running))
        .await?;
    state.notifier.queue_changed(&queue);
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /coordinator/jobs/batch`
#[utoipa::path(
    post,
    path = "/coordinator/jobs/batch",
    tag = "jobs",
    operation_id = "createJobs",
    summary = "Create up to 1000 jobs in one transaction",
    description = "All or none. Each job may carry its own `idempotencyKey` (shared with \
        the `Idempotency-Key` of single creates, per caller): a key seen before returns \
        that job (`created: false`; without `jobs:read`, its `message`, `result`, `error` \
        and `gateResults` are null), also for a repeat within the batch; the same key \
        with different contents is a 409 for the whole batch. Answered in request order. The \
        body limit applies to the whole batch.",
    request_body(content = BatchCreate, content_type = "application/json"),
    responses(
        (status = 200, description = "Every job, in request order.", body = BatchCreated),
        problem::WriteErrors,
    ),
)]
pub async fn batch(
    state: web::Data<AppState>,
    req: HttpRequest,
    principal: Principal,
    JsonBody(body): JsonBody<BatchCreate>,
) -> ApiResult<HttpResponse> {
    // A client that sends the header believes a retry is safe: it is not, here (each
    // job takes its own `idempotencyKey`), so say so instead of creating twice.
    if req
        .headers()
        .contains_key(crate::http::idempotency::IDEMPOTENCY_HEADER)
    {
        return Err(ApiError::bad_request(
            "Idempotency-Key",
            "not taken by a batch: give each job its own idempotencyKey",
        ));
    }
    if body.jobs.is_empty() || body.jobs.len() > MAX_BATCH {
        return Err(ApiError::bad_request("jobs", "must hold 1-1000 jobs"));
    }
    let mut items = Vec::with_capacity(body.jobs.len());
    for (i, job) in body.jobs.into_iter().enumerate() {
        // The item as sent, for its key's conflict check (`repo::Idempotency::for_body`).
        let item = serde_json::to_vec(&job).map_err(ApiError::internal)?;
        let (create, key) = job.into_create();
        let new = create.validate().map_err(|e| match e {
            ApiError::BadRequest { field, detail } => {
                ApiError::bad_request(format!("jobs[{i}].{field}"), detail)
            }
            other => other,
        })?;
        let idem = match key {
            Some(k) if crate::http::idempotency::valid_key(&k) => {
                Some(repo::Idempotency::for_body(k, &item))
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    format!("jobs[{i}].idempotencyKey"),
                    "must be 1-255 printable ASCII characters",
                ))
            }
            None => None,
        };
        items.push((new, idem));
    }
    let reads = principal.has_scope(Scope::JobsRead);
    let created_by = principal.caller;
    let out = state
        .db
        .write(move |conn| repo::create_batch(conn, &items, &created_by))
        .await?;
    let mut jobs = Vec::with_capacity(out.len());
    for c in out {
        if c.created {
            state.notifier.row_changed(&c.job);
            state.metrics.transition(c.job.status());
        }
        jobs.push(BatchItem {
            created: c.created,
            job: replayed_view(c.job, !c.created && !reads),
        });
    }
    Ok(HttpResponse::Ok().json(BatchCreated { jobs }))
}
