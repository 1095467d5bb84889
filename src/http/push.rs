//! Push over HTTP: long-poll claims and job event streams (Server-Sent Events), both
//! woken by `jobs::notify`. No SQL here: storage is `jobs::repo`.

use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::future::{select, Either};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::http::openapi::{problem, JobIdParam};
use crate::jobs::model::{Change, EventRow, EventView, JobId};
use crate::jobs::notify::{Slot, Subscription, Topic};
use crate::jobs::repo;
use crate::jobs::JobStatus;
use crate::state::AppState;

/// The longest long poll, seconds.
pub const MAX_WAIT_SECS: f64 = 60.0;
/// An idle stream gets a comment line this often (and re-reads its job then).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events sent per read of a stream.
const EVENTS_PER_CHUNK: i64 = 500;
/// `Retry-After` of a 429 at the waiting-claim or stream bound.
const BUSY_RETRY_SECS: u64 = 1;

/// The long-poll wait of a claim: the body's `wait`, else `?wait=`, else none.
pub fn wait_of(req: &HttpRequest, body: Option<f64>) -> ApiResult<Duration> {
    let raw = match body {
        Some(w) => Some(w),
        None => {
            let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
                .map_err(|e| {
                    ApiError::bad_request("query", format!("malformed query string ({e})"))
                })?
                .into_inner();
            match pairs.iter().find(|(k, _)| k == "wait") {
                Some((_, v)) => Some(v.parse::<f64>().map_err(|e| {
                    ApiError::bad_request("wait", format!("must be a number ({e})"))
                })?),
                None => None,
            }
        }
    };
    match raw {
        None => Ok(Duration::ZERO),
        Some(w) if w.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&w) => {
            Ok(Duration::from_secs_f64(w))
        }
        Some(_) => Err(ApiError::bad_request("wait", "must be 0-60 seconds")),
    }
}

/// Run a database step with a fresh request deadline: a long-poll or a stream lives
/// longer than the deadline of the request that opened it.
async fn fresh<T>(state: &AppState, f: impl std::future::Future<Output = T>) -> T {
    crate::db::load::with_deadline(Instant::now() + state.config.request_deadline, f).await
}

/// One claim attempt in a task of its own, so that a client that goes away while it
/// runs (actix drops the handler) does not take the job with it: the job goes back to
/// QUEUED at once.
async fn claim_detached(
    state: &web::Data<AppState>,
    queue: &str,
    caller: &str,
    worker: &str,
) -> ApiResult<Option<crate::auth::token::Claimed>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let st = state.clone();
    let (queue, caller, worker) = (queue.to_owned(), caller.to_owned(), worker.to_owned());
    actix_web::rt::spawn(async move {
        let r = fresh(
            &st,
            crate::http::jobs::claim_once(&st, queue, caller, worker),
        )
        .await;
        if let Err(Ok(Some(c))) = tx.send(r) {
            give_back(&st, c.job.id).await;
        }
    });
    rx.await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("claim task ended without answer: {e}")))?
}

/// A job claimed for a client that has gone: back to QUEUED (its token revoked).
async fn give_back(state: &AppState, id: String) {
    let Ok(id) = JobId::parse(&id, "id") else {
        return;
    };
    let lease_ms = state.config.lease_ms();
    let change = Change::Status {
        to: JobStatus::Queued,
        message: Some("the claiming client disconnected before the answer".into()),
    };
    let r = fresh(
        state,
        state
            .db
            .write(move |conn| repo::apply(conn, &id, &change, lease_ms)),
    )
    .await;
    match r {
        Ok(row) => {
            log::info!("push: job {} given back (claimer gone)", row.id);
            for (key, until) in repo::token_revocation(&row, crate::db::now_millis()) {
                state.auth.revocations.revoke_local(&key, until);
            }
            state.notifier.row_changed(&row);
            state.metrics.transition(row.status());
        }
        Err(e) => log::warn!("push: could not give back a job whose claimer left: {e}"),
    }
}

/// `POST /coordinator/queues/{queue}/claim` with a `wait`: claim now, else wait for a
/// wake-up of the queue (or the next scheduled job's `runAt`) and claim again, until
/// the deadline (204).
pub async fn long_claim(
    state: web::Data<AppState>,
    queue: String,
    caller: String,
    worker: String,
    wait: Duration,
) -> ApiResult<HttpResponse> {
    let Some(_slot) = state.notifier.waiting_slot() else {
        return Err(ApiError::TooManyRequests {
            retry_after_secs: BUSY_RETRY_SECS,
        });
    };
    let deadline = Instant::now() + wait;
    let mut sub = state.notifier.subscribe(Topic::Claimable(queue.clone()));
    loop {
        sub.mark_seen();
        if let Some(c) = claim_detached(&state, &queue, &caller, &worker).await? {
            return crate::http::jobs::claimed_response(c);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(HttpResponse::NoContent().finish());
        }
        let now_ms = crate::db::now_millis();
        let q = queue.clone();
        let due = fresh(
            &state,
            state.db.read(move |c| repo::next_run_at(c, &q, now_ms)),
        )
        .await?;
        let mut until = deadline;
        if let Some(at) = due {
            let ms = u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0);
            until = until.min(now + Duration::from_millis(ms));
        }
        let sleep = actix_web::rt::time::sleep(until.saturating_duration_since(now));
        select(Box::pin(sub.changed()), Box::pin(sleep)).await;
    }
}

/// `GET /coordinator/jobs/{id}/events` as JSON.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JobEvents {
    /// Events after `after` (or `Last-Event-ID`), oldest first, at most 1000.
    pub events: Vec<EventView>,
}

/// Where a stream starts: `Last-Event-ID`, else `?after=`, else the beginning.
fn after_of(req: &HttpRequest) -> ApiResult<i64> {
    let parse = |v: &str, field: &str| {
        v.trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::bad_request(field, "must be an event seq (0 or more)"))
    };
    if let Some(h) = req.headers().get("last-event-id") {
        let v = h.to_str().map_err(|e| {
            ApiError::bad_request("Last-Event-ID", format!("must be an event seq ({e})"))
        })?;
        return parse(v, "Last-Event-ID");
    }
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request("query", format!("malformed query string ({e})")))?
        .into_inner();
    match pairs.iter().find(|(k, _)| k == "after") {
        Some((_, v)) => parse(v, "after"),
        None => Ok(0),
    }
}

fn wants_sse(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// One SSE event per job event: `id:` seq, `event:` type, `data:` the event as JSON.
fn sse_event(out: &mut String, e: EventRow) {
    let seq = e.seq;
    let kind = e.event_type.clone();
    let data = serde_json::to_string(&EventView::from(e)).unwrap_or_else(|_| "null".into());
    out.push_str(&format!("id: {seq}\nevent: {kind}\ndata: {data}\n\n"));
}

/// The state of one open stream.
struct Stream {
    state: web::Data<AppState>,
    id: JobId,
    last: i64,
    sub: Subscription,
    /// A read already made (the first, done before answering so a 404 is a 404).
    pending: Option<(JobStatus, Vec<EventRow>)>,
    done: bool,
    _slot: Slot,
}

async fn read_after(
    state: &AppState,
    id: &JobId,
    after: i64,
) -> ApiResult<(JobStatus, Vec<EventRow>)> {
    let id = id.clone();
    Ok(fresh(
        state,
        state
            .db
            .read(move |c| repo::events_after(c, &id, after, EVENTS_PER_CHUNK)),
    )
    .await?)
}

async fn step(mut s: Stream) -> Option<(Result<Bytes, actix_web::Error>, Stream)> {
    loop {
        if s.done {
            return None;
        }
        let (status, events) = match s.pending.take() {
            Some(p) => p,
            None => {
                s.sub.mark_seen();
                match read_after(&s.state, &s.id, s.last).await {
                    Ok(p) => p,
                    Err(e) => {
                        // The client reconnects with Last-Event-ID and misses nothing.
                        log::warn!("push: event stream of {} ended: {e}", s.id);
                        return None;
                    }
                }
            }
        };
        let full = i64::try_from(events.len()).unwrap_or(i64::MAX) >= EVENTS_PER_CHUNK;
        if !events.is_empty() {
            let mut out = String::new();
            for e in events {
                s.last = e.seq;
                sse_event(&mut out, e);
            }
            // The status was read before the events: terminal means these were the last.
            if status.is_terminal() && !full {
                s.done = true;
            }
            return Some((Ok(Bytes::from(out)), s));
        }
        if status.is_terminal() {
            return None;
        }
        let sleep = actix_web::rt::time::sleep(KEEP_ALIVE);
        let woken = matches!(
            select(Box::pin(s.sub.changed()), Box::pin(sleep)).await,
            Either::Left(_)
        );
        if !woken {
            // Idle: keep proxies from closing the stream; the next step re-reads, which
            // also catches a change whose wake-up was lost.
            return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), s));
        }
    }
}

/// `GET /coordinator/jobs/{id}/events`
#[utoipa::path(
    get,
    path = "/coordinator/jobs/{id}/events",
    tag = "jobs",
    operation_id = "jobEvents",
    summary = "A job's events, or a live stream of them",
    description = "With `Accept: text/event-stream`: Server-Sent Events, one per job event \
        (`id:` its `seq`, `event:` its type, `data:` the event as JSON), starting after \
        `Last-Event-ID` (or `?after=`), then live as they happen on any instance, until \
        the job is terminal (the stream then ends). An idle stream gets a `: keep-alive` \
        comment every 15 s. Open streams per instance are bounded (429 with \
        `Retry-After` beyond). Otherwise the events after `after` as JSON (at most 1000). \
        A job token may read only its own job (else 403).",
    params(
        JobIdParam,
        ("after" = Option<i64>, Query, minimum = 0,
            description = "Only events with a greater `seq` (`Last-Event-ID` wins)."),
        ("Last-Event-ID" = Option<i64>, Header,
            description = "The last event seen; the stream resumes after it."),
    ),
    responses(
        (status = 200, description = "The events (JSON), or their stream (SSE).",
            content(
                (JobEvents = "application/json"),
                (String = "text/event-stream"),
            )),
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
pub async fn job_events(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let id = JobId::parse(&id, "id")?;
    principal.authorize_job(&id)?;
    let after = after_of(&req)?;
    if !wants_sse(&req) {
        let (_, events) = state
            .db
            .read(move |c| repo::events_after(c, &id, after, repo::EVENTS_PER_READ))
            .await?;
        return Ok(HttpResponse::Ok().json(JobEvents {
            events: events.into_iter().map(Into::into).collect(),
        }));
    }
    let Some(slot) = state.notifier.stream_slot() else {
        return Err(ApiError::TooManyRequests {
            retry_after_secs: BUSY_RETRY_SECS,
        });
    };
    let mut sub = state.notifier.subscribe(Topic::Job(id.to_string()));
    sub.mark_seen();
    let first = read_after(&state, &id, after).await?;
    let stream = Stream {
        state: state.clone(),
        id,
        last: after,
        sub,
        pending: Some(first),
        done: false,
        _slot: slot,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(futures_util::stream::unfold(stream, step)))
}
