//! `POST /stitcher/webhook` and `POST /stitcher/dispatch`.

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};

use crate::auth::{webhook, Principal};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{parse_json, single_header, RawBody};
use crate::http::idempotency::IdempotencyKey;
use crate::http::problem;
use crate::jobs::model::rfc3339;
use crate::jobs::queues as jobs_queues;
use crate::jobs::row::JobRow;
use crate::state::AppState;
use crate::stitcher::model::{DispatchRequest, DispatchResult, WebhookPayload};

/// The delivery id: `webhook-id` (Standard Webhooks), else `Idempotency-Key`, else a
/// fresh id (a delivery without an id cannot be recognised when repeated). The flag
/// says whether the id is the caller's own `Idempotency-Key`: then a repeat with a
/// different body is a 409, the same rule as `/stitcher/dispatch`. A repeated
/// `webhook-id` keeps the Standard Webhooks behaviour (the first job, `duplicate`).
fn delivery_id(req: &HttpRequest) -> ApiResult<(String, bool)> {
    let h = |n: &str, field: &'static str| {
        Ok::<_, ApiError>(single_header(req, n, field)?.map(|v| v.to_str().unwrap_or("")))
    };
    let (raw, field, own_key) = match h(webhook::wire::HEADER_ID, "webhook-id")? {
        Some(v) => (Some(v), "webhook-id", false),
        None => (
            h("idempotency-key", "Idempotency-Key")?,
            "Idempotency-Key",
            true,
        ),
    };
    // `webhook-id` takes up to 256 characters; an `Idempotency-Key` follows the rule it
    // has on every route (1-255).
    let max = if own_key { 255 } else { 256 };
    match raw {
        None => Ok((uuid::Uuid::now_v7().to_string(), false)),
        Some(v) if (1..=max).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok((v.to_owned(), own_key))
        }
        Some(_) => Err(ApiError::bad_request(
            field,
            format!("must be 1-{max} printable ASCII characters"),
        )),
    }
}

async fn answer(state: &AppState, job: JobRow, duplicate: bool) -> ApiResult<HttpResponse> {
    if !duplicate {
        state.metrics.transition(job.status());
    }
    let stats = match state.estimates.get(&job.queue, job.priority) {
        Some(s) => s,
        None => {
            let queue = job.queue.clone();
            let counts = state
                .db
                .read(move |conn| jobs_queues::queue_counts(conn, &queue))
                .await?;
            let mut s = counts.for_priority(job.priority);
            // This job is counted too (it is QUEUED): it is not ahead of itself.
            if job.status() == crate::jobs::JobStatus::Queued {
                s.ahead = s.ahead.saturating_sub(1).max(0);
            }
            state.estimates.put(&job.queue, counts);
            s
        }
    };
    let now = crate::db::now_millis();
    let status = job.status();
    // A scheduled job starts no earlier than its `runAt`.
    let estimate = match stats.estimate_start(now) {
        Some(t) => Some(t.max(job.run_at)),
        None => (job.run_at > now).then_some(job.run_at),
    };
    let body = DispatchResult {
        estimated_start_time: (status == crate::jobs::JobStatus::Queued)
            .then_some(estimate)
            .flatten()
            .map(rfc3339),
        job_id: job.id,
        queue_name: job.queue,
        status,
        duplicate,
    };
    let code = if duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(HttpResponse::build(code).json(body))
}

/// `POST /stitcher/webhook` [stitcher:webhook]
#[utoipa::path(
    post,
    path = "/stitcher/webhook",
    tag = "stitcher",
    operation_id = "stitcherWebhook",
    summary = "Ingest a bot delivery and dispatch a job",
    description = "Stored once per delivery id (`webhook-id`, else `Idempotency-Key`, else \
        a fresh id): a repeated delivery returns the job of the first (200, \
        `duplicate: true`). Signed with Standard Webhooks (`webhook-id`, \
        `webhook-timestamp`, `webhook-signature`) or any caller scheme, never both.",
    params(
        ("webhook-id" = Option<String>, Header, min_length = 1, max_length = 256,
            pattern = "^[!-~]+$", nullable = false,
            description = "Standard Webhooks delivery id (1–256 printable ASCII); also the \
                delivery id that makes repeats idempotent."),
        ("webhook-timestamp" = Option<String>, Header, pattern = "^[0-9]+$", nullable = false,
            description = "Standard Webhooks: unix seconds, within ±300 s of the server."),
        IdempotencyKey,
    ),
    request_body(content = WebhookPayload, content_type = "application/json"),
    responses(
        (status = 200, description = "A delivery seen before: the job it dispatched.",
            body = DispatchResult),
        (status = 202, description = "A new job was dispatched (QUEUED).",
            body = DispatchResult),
        problem::WriteErrors,
    ),
)]
pub async fn webhook(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    RawBody(body): RawBody,
) -> ApiResult<HttpResponse> {
    let (delivery, own_key) = delivery_id(&req)?;
    let payload: WebhookPayload = parse_json(&body)?;
    let job = payload.into_job(&state.config.webhook_queue, &delivery)?;
    // `parse_json` accepted only UTF-8 JSON, so this stores exactly the verified bytes.
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request("body", format!("must be UTF-8 ({e})")))?
        .to_owned();
    let (row, duplicate) = state
        .ingests
        .ingest(principal.caller, delivery, text, job, own_key)
        .await?;
    answer(&state, row, duplicate).await
}

/// `POST /stitcher/webhook/{caller}` [stitcher:webhook]: the same ingestion, for
/// deliveries that name their sender, so only that sender's secrets are tried.
#[utoipa::path(
    post,
    path = "/stitcher/webhook/{caller}",
    tag = "stitcher",
    operation_id = "stitcherWebhookFromSender",
    summary = "Ingest a bot delivery from a named sender",
    description = "As `POST /stitcher/webhook`, for the sender the URL names: a Standard \
        Webhooks signature is checked against that caller's webhook secrets only, and a \
        caller scheme must authenticate that same caller (403 otherwise). Needed once more \
        than one caller holds webhook secrets.",
    params(
        ("caller" = String, Path, description = "The sending caller's name."),
        ("webhook-id" = Option<String>, Header, min_length = 1, max_length = 256,
            pattern = "^[!-~]+$", nullable = false,
            description = "Standard Webhooks delivery id (1–256 printable ASCII)."),
        ("webhook-timestamp" = Option<String>, Header, pattern = "^[0-9]+$", nullable = false,
            description = "Standard Webhooks: unix seconds, within ±300 s of the server."),
        IdempotencyKey,
    ),
    request_body(content = WebhookPayload, content_type = "application/json"),
    responses(
        (status = 200, description = "A delivery seen before: the job it dispatched.",
            body = DispatchResult),
        (status = 202, description = "A new job was dispatched (QUEUED).",
            body = DispatchResult),
        problem::WriteErrors,
    ),
)]
pub async fn webhook_from_sender(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    body: RawBody,
) -> ApiResult<HttpResponse> {
    webhook(state, principal, req, body).await
}

/// `POST /stitcher/dispatch` [stitcher:dispatch]
#[utoipa::path(
    post,
    path = "/stitcher/dispatch",
    tag = "stitcher",
    operation_id = "stitcherDispatch",
    summary = "Dispatch a job by hand",
    description = "The job starts QUEUED. With `Idempotency-Key`, a retry with the same body \
        returns the first job (200, `duplicate: true`); the same key with another body is \
        a 409.",
    params(IdempotencyKey),
    request_body(content = DispatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "A retry with the same `Idempotency-Key`: the first job.",
            body = DispatchResult),
        (status = 202, description = "A new job was dispatched (QUEUED).",
            body = DispatchResult),
        problem::WriteErrors,
    ),
)]
pub async fn dispatch(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    RawBody(body): RawBody,
) -> ApiResult<HttpResponse> {
    let input: DispatchRequest = parse_json(&body)?;
    let job = input.into_job(&state.config.webhook_queue)?;
    let idem = crate::http::idempotency::from_request(&req, &body)?;
    let out = state.creates.create(job, principal.caller, idem).await?;
    answer(&state, out.job, !out.created).await
}
