//! `POST /stitcher/webhook` and `POST /stitcher/dispatch`.

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};

use super::model::{DispatchRequest, DispatchResult, WebhookPayload};
use super::repo;
use crate::auth::{webhook_sig, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_json, RawBody};
use crate::jobs::model::{rfc3339, JobRow};
use crate::jobs::repo as jobs_repo;
use crate::startup::AppState;

/// The delivery id: `webhook-id` (Standard Webhooks), else `Idempotency-Key`, else a
/// fresh id (a delivery without an id cannot be recognised when repeated).
fn delivery_id(req: &HttpRequest) -> ApiResult<String> {
    let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap_or(""));
    let raw = h(webhook_sig::HEADER_ID).or_else(|| h("idempotency-key"));
    match raw {
        None => Ok(uuid::Uuid::now_v7().to_string()),
        Some(v) if (1..=256).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(v.to_owned())
        }
        Some(_) => Err(ApiError::bad_request(
            "webhook-id",
            "must be 1-256 printable ASCII characters",
        )),
    }
}

async fn answer(state: &AppState, job: JobRow, duplicate: bool) -> ApiResult<HttpResponse> {
    if !duplicate {
        state.metrics.transition(job.status());
    }
    let (queue, priority, id) = (job.queue.clone(), job.priority, job.id.clone());
    let stats = state
        .db
        .read(move |conn| jobs_repo::queue_stats(conn, &queue, priority, &id))
        .await?;
    let now = crate::db::now_millis();
    let status = job.status();
    let body = DispatchResult {
        estimated_start_time: (status == crate::jobs::JobStatus::Queued)
            .then(|| stats.estimate_start(now))
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
pub async fn webhook(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    RawBody(body): RawBody,
) -> ApiResult<HttpResponse> {
    let delivery = delivery_id(&req)?;
    let payload: WebhookPayload = parse_json(&body)?;
    let job = payload.into_job(&state.config.webhook_queue, &delivery)?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let caller = principal.caller;
    let (row, duplicate) = state
        .db
        .write(move |conn| repo::ingest(conn, &caller, &delivery, &text, &job))
        .await?;
    answer(&state, row, duplicate).await
}

/// `POST /stitcher/dispatch` [stitcher:dispatch]
pub async fn dispatch(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    RawBody(body): RawBody,
) -> ApiResult<HttpResponse> {
    let input: DispatchRequest = parse_json(&body)?;
    let job = input.into_job(&state.config.webhook_queue)?;
    let idem = crate::jobs::routes::idempotency(&req, crate::crypto::sha256_hex(&body))?;
    let caller = principal.caller;
    let out = state
        .db
        .write(move |conn| jobs_repo::create(conn, &job, &caller, idem.as_ref()))
        .await?;
    answer(&state, out.job, !out.created).await
}
