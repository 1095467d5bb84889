//! Push over HTTP: long-poll claims, job event streams and queue event streams
//! (Server-Sent Events), all woken by `jobs::notify`. No SQL here: storage is
//! `jobs::repo`. On shutdown (`Notifier::close`) every waiting claim answers 204 and
//! every stream ends, so they do not hold the graceful shutdown for their lifetime.

use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::future::{select, Either};

use crate::auth::principal::Standing;
use crate::auth::{Principal, Scope};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::JobIdParam;
use crate::http::problem;
use crate::jobs::model::{Change, JobId};
use crate::jobs::notify::{QueueRecv, QueueSubscription, Refused, Slot, Subscription, Topic};
use crate::jobs::repo::{self, EventsAfter};
use crate::jobs::row::EventRow;
use crate::jobs::view::EventView;
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
/// Changes a queue stream reads from the database in one go.
const QUEUE_NOTES_PER_READ: usize = 100;

/// The 429 for a refused slot.
fn busy(r: Refused, stream: bool) -> ApiError {
    let what = match (stream, r) {
        (true, Refused::Caller) => "open event streams for this caller",
        (true, Refused::Instance) => "open event streams on this instance",
        (false, Refused::Caller) => "waiting claims for this caller",
        (false, Refused::Instance) => "waiting claims on this instance",
        (_, Refused::JobToken) => "open event streams for this job's tokens",
    };
    ApiError::Busy {
        what,
        retry_after_secs: BUSY_RETRY_SECS,
    }
}

/// The long-poll wait of a claim: the body's `wait`, else `?wait=`, else none.
pub fn wait_of(req: &HttpRequest, body: Option<f64>) -> ApiResult<Duration> {
    let pairs = crate::http::extract::query_params(req, &["wait"])?;
    let raw =
        match body {
            Some(w) => Some(w),
            None => match pairs.first() {
                Some((_, v)) => Some(v.parse::<f64>().map_err(|e| {
                    ApiError::bad_request("wait", format!("must be a number ({e})"))
                })?),
                None => None,
            },
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

/// Attempts of a stream's read while the database sheds load, and the first pause
/// between them (doubled each time: 50, 100, 200, 400 ms).
const STREAM_READ_TRIES: u32 = 5;
const STREAM_READ_PAUSE: Duration = Duration::from_millis(50);

/// A stream's read (with a fresh deadline), tried again while the database sheds load
/// (503 `overloaded`). A burst of changes wakes every stream at once and each reads;
/// ending every stream the shedding touches would send all their clients back at the
/// same moment, a reconnect storm made of the same burst. Other errors end at once.
async fn stream_read<T, F, Fut>(state: &AppState, mut read: F) -> ApiResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ApiResult<T>>,
{
    let mut pause = STREAM_READ_PAUSE;
    for _ in 1..STREAM_READ_TRIES {
        match fresh(state, read()).await {
            Err(ApiError::Overloaded(_)) if !state.notifier.is_closing() => {
                actix_web::rt::time::sleep(pause).await;
                pause = pause.saturating_mul(2);
            }
            other => return other,
        }
    }
    fresh(state, read()).await
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
    // The task carries the request's deferred replay record (`db::replay::carry`): a
    // replayed claim must take no job.
    actix_web::rt::spawn(crate::db::replay::carry(async move {
        let r = fresh(
            &st,
            crate::http::jobs::claim_once(&st, queue, caller, worker),
        )
        .await;
        if let Err(Ok(Some(c))) = tx.send(r) {
            give_back(&st, c.job.id, c.job.attempts).await;
        }
    }));
    rx.await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("claim task ended without answer: {e}")))?
}

/// A job claimed for a client that has gone: back to QUEUED (its token revoked), if it
/// is still on the attempt that claim made. (A job requeued and claimed again in
/// between is someone else's attempt now: it is refused as a stale attempt and kept.)
async fn give_back(state: &AppState, id: String, attempt: i32) {
    let Ok(id) = JobId::parse(&id, "id") else {
        return;
    };
    let terms = state.config.terms();
    let change = Change::Status {
        to: JobStatus::Queued,
        message: Some("the claiming client disconnected before the answer".into()),
    };
    let r = fresh(
        state,
        state
            .db
            .write(move |conn| repo::apply(conn, &id, &change, terms, Some(attempt))),
    )
    .await;
    match r {
        Ok(row) => {
            log::info!("push: job {} given back (claimer gone)", row.id);
            state
                .auth
                .revocations
                .job_changed(&row, crate::db::now_millis());
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
    principal: Principal,
    worker: String,
    wait: Duration,
) -> ApiResult<HttpResponse> {
    let caller = principal.caller.as_str();
    let _slot = state
        .notifier
        .waiting_slot(caller)
        .map_err(|r| busy(r, false))?;
    let deadline = Instant::now() + wait;
    let mut sub = state.notifier.subscribe(Topic::Claimable(queue.clone()));
    // The time of the change that woke this waiter last (None: not woken by a change).
    let mut woken_by: Option<i64> = None;
    let mut first = true;
    loop {
        sub.mark_seen();
        // The first look is right after authentication; a later one (seconds on) claims
        // only while the credential still holds.
        if !std::mem::take(&mut first) {
            fresh(&state, principal.recheck(&state.auth)).await?;
        }
        // Taken before the claim's own clock: a job that became due after the claim
        // looked is then still "next" below, and the waiter looks again at once. With
        // a clock read after the claim, a job due in between was neither claimed nor
        // next, and the waiter slept to its deadline (review finding, 2026-12-06: 3-4
        // in 100 such jobs claimed seconds late).
        let looked_at = crate::db::now_millis();
        if let Some(c) = claim_detached(&state, &queue, caller, &worker).await? {
            if let Some(at) = woken_by {
                state.metrics.wakeup("claim", at);
            }
            return crate::http::jobs::claimed_response(c);
        }
        let now = Instant::now();
        // Shutting down: answer as at the deadline instead of holding the shutdown.
        if now >= deadline || state.notifier.is_closing() {
            return Ok(HttpResponse::NoContent().finish());
        }
        let now_ms = crate::db::now_millis();
        let q = queue.clone();
        let due = fresh(
            &state,
            state.db.read(move |c| repo::next_run_at(c, &q, looked_at)),
        )
        .await?;
        let mut until = deadline;
        if let Some(at) = due {
            let ms = u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0);
            until = until.min(now + Duration::from_millis(ms));
        }
        // Woken by a change, at the deadline or the next due job, or by the shutdown or a
        // credential change: each leads to the next look, which ends the wait when the
        // credential no longer holds (401) or the instance is closing (204).
        let until = actix_web::rt::time::Instant::from_std(until);
        woken_by = match wait_for_change(&state, &principal, "waiting claim", sub.changed(), until)
            .await
        {
            Wait::Woken(at) => Some(at),
            Wait::TimeUp | Wait::End | Wait::AttemptEnded => None,
        };
    }
}

/// The end of a stream's wait: its next keep-alive.
fn keep_alive() -> actix_web::rt::time::Instant {
    actix_web::rt::time::Instant::now() + KEEP_ALIVE
}

/// `GET /coordinator/jobs/{id}/events` as JSON.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobEvents {
    /// Events after `after` (or `Last-Event-ID`), oldest first, at most 1000.
    pub events: Vec<EventView>,
    /// More events follow these: ask again with `after` set to the last one's `seq`.
    pub has_more: bool,
}

/// Where a stream starts: `Last-Event-ID`, else `?after=`, else the beginning; with the
/// name of the field it came from.
fn after_of(req: &HttpRequest) -> ApiResult<(i64, &'static str)> {
    let parse = |v: &str, field: &str| {
        crate::jobs::request::digits::<i64>(v.trim())
            .ok_or_else(|| ApiError::bad_request(field, "must be an event seq (0 or more)"))
    };
    let pairs = crate::http::extract::query_params(req, &["after"])?;
    if let Some(h) = crate::http::extract::single_header(req, "last-event-id", "Last-Event-ID")? {
        let v = h.to_str().map_err(|e| {
            ApiError::bad_request("Last-Event-ID", format!("must be an event seq ({e})"))
        })?;
        return Ok((parse(v, "Last-Event-ID")?, "Last-Event-ID"));
    }
    match pairs.first() {
        Some((_, v)) => Ok((parse(v, "after")?, "after")),
        None => Ok((0, "after")),
    }
}

/// The events a job has after `after`, checked against its newest: a `seq` the job has
/// not reached was never sent by any instance (an event is sent only once committed),
/// so it names some other job's stream or a made-up position. Waiting for the job to
/// get there would silently skip every event up to it; the request is refused instead.
fn not_past_newest(read: EventsAfter, after: i64, field: &str) -> ApiResult<EventsAfter> {
    if after > read.newest {
        return Err(ApiError::bad_request(
            field,
            format!(
                "is past the job's newest event ({}): resume from a seq this job has sent",
                read.newest
            ),
        ));
    }
    Ok(read)
}

fn wants_sse(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(actix_web::http::header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .any(accepts_sse)
}

/// Whether an `Accept` value names `text/event-stream` (media types are
/// case-insensitive) without refusing it (`q=0`).
fn accepts_sse(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("q")
                    && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
            })
        });
        media.eq_ignore_ascii_case("text/event-stream") && !refused
    })
}

/// One SSE event per job event: `id:` seq, `event:` type, `data:` the event as JSON.
fn sse_event(out: &mut String, e: EventRow) {
    let seq = e.seq;
    let kind = e.event_type.clone();
    let data = serde_json::to_string(&EventView::from(e)).unwrap_or_else(|_| "null".into());
    out.push_str(&format!("id: {seq}\nevent: {kind}\ndata: {data}\n\n"));
}

/// A job's `seq` has no holes, so a first event past `last + 1` means the ones
/// between are no longer kept (`COORDINATOR_EVENTS_PER_JOB`: the stream resumed, or
/// fell, further behind than the job keeps). The stream says so in one SSE comment
/// (`EventSource` ignores it; a raw reader sees it) and goes on from the oldest event
/// kept: the jump in `id:` says the same to any client.
fn gap_comment(last: i64, first: i64) -> Option<String> {
    (first > last.saturating_add(1)).then(|| {
        format!(
            ": gap: events {} to {} are no longer kept\n\n",
            last.saturating_add(1),
            first.saturating_sub(1)
        )
    })
}

/// How a wait for a change ended.
enum Wait<T> {
    /// What it waited for came.
    Woken(T),
    /// Nothing until the wait's end (a stream's keep-alive, a claim's deadline or the
    /// next due job).
    TimeUp,
    /// The instance is shutting down, or the credential no longer holds.
    End,
    /// The credential is a job token revoked only under its attempt's id
    /// ([`Standing::AttemptEnded`]): the next look decides.
    AttemptEnded,
}

/// Wait for `next` (a stream's next change, a claimable job), at most until `until`. A
/// credential change (any instance's, seen by the credential store's or the revocation
/// set's poll) is checked at once: the wait ends if its credential no longer holds,
/// else goes on. So an idle stream or a waiting claim ends within a poll of a
/// revocation rather than at its next keep-alive or deadline; each check first waits a
/// random moment of up to a poll interval, so the waiters a change wakes together do
/// not all read at once.
async fn wait_for_change<T>(
    state: &AppState,
    principal: &Principal,
    what: &str,
    next: impl std::future::Future<Output = T>,
    until: actix_web::rt::time::Instant,
) -> Wait<T> {
    let mut next = Box::pin(next);
    let mut changed = Box::pin(Principal::credentials_changed(&state.auth));
    loop {
        let sleep = actix_web::rt::time::sleep_until(until);
        let closed = state.notifier.closed();
        match select(
            select(next.as_mut(), changed.as_mut()),
            select(Box::pin(sleep), Box::pin(closed)),
        )
        .await
        {
            Either::Left((Either::Left((got, _)), _)) => return Wait::Woken(got),
            Either::Left((Either::Right(_), _)) => {
                // Registered before the check: a change while it runs is not missed.
                changed = Box::pin(Principal::credentials_changed(&state.auth));
                let spread = rand::Rng::gen_range(&mut rand::thread_rng(), 0..CHECK_SPREAD_MS);
                actix_web::rt::time::sleep(Duration::from_millis(spread)).await;
                match standing(state, principal, what).await {
                    Some(Standing::Holds) => {}
                    Some(Standing::AttemptEnded) => return Wait::AttemptEnded,
                    None => return Wait::End,
                }
            }
            Either::Right((Either::Left(_), _)) => return Wait::TimeUp,
            Either::Right((Either::Right(_), _)) => return Wait::End,
        }
    }
}

/// The streams a credential change wakes check their credential within this many
/// milliseconds of it (the credential store's poll interval).
const CHECK_SPREAD_MS: u64 = 250;

/// Does the credential a stream was opened with still hold? Checked before each read
/// of a stream after its first, so a disabled caller or a revoked credential gets no
/// event written after that (within the credential store's 250 ms poll).
async fn still_holds(state: &AppState, principal: &Principal, what: &str) -> bool {
    match standing(state, principal, what).await {
        Some(Standing::Holds) => true,
        Some(Standing::AttemptEnded) => {
            ended(principal, what);
            false
        }
        None => false,
    }
}

/// How far that credential holds; `None` (logged) when it does not.
async fn standing(state: &AppState, principal: &Principal, what: &str) -> Option<Standing> {
    // Tried again while the database sheds load, as a read is: a burst of rechecks
    // must not end the streams it touches.
    match stream_read(state, || principal.standing(&state.auth)).await {
        Ok(s) => Some(s),
        Err(e) => {
            log::info!("push: {what} of caller {} ended: {e}", principal.caller);
            None
        }
    }
}

fn ended(principal: &Principal, what: &str) {
    log::info!(
        "push: {what} of caller {} ended: revoked (its attempt ended)",
        principal.caller
    );
}

/// The state of one open stream.
struct Stream {
    state: web::Data<AppState>,
    /// Who opened it, checked again before every read after the first.
    principal: Principal,
    id: JobId,
    last: i64,
    sub: Subscription,
    /// A read already made (the first, done before answering so a 404 is a 404).
    pending: Option<EventsAfter>,
    /// Past the first read: what is sent now is live (counted in the wake-up metric).
    live: bool,
    done: bool,
    _slot: Slot,
}

/// Has the attempt a job token was issued for ended, as this read of its job shows?
/// The same rule as the revocations a job change writes (`jobs::repo::token_revocation`):
/// the job moved on to a later attempt, or it is terminal or back in the queue on this
/// one (attempt 0, before any claim, ends when the first attempt starts).
fn attempt_over(read: &EventsAfter, attempt: i32) -> bool {
    read.attempts > attempt
        || (read.attempts == attempt
            && (read.status.is_terminal() || (attempt > 0 && read.status == JobStatus::Queued)))
}

/// What of a read a stream sends, and whether more is left to read before the job's
/// end (`None`: as usual, a full chunk says). Events written after the job's status was
/// read (`seq` past its `version`) wait for the next read, which their own wake-up
/// brings: so the status describes every event sent with it.
///
/// A job token's attempt ends with a change whose revocation the stream may not hold
/// yet when it reads (the check comes before the read, and another instance's
/// revocation arrives by poll), or whose revocation it holds
/// ([`Standing::AttemptEnded`]). Either way the read decides: if the job has ended
/// (terminal) on the token's own attempt, that end revoked the token and the stream
/// still sends what was committed up to it, then ends; otherwise (a requeue or a lease
/// expiry with attempts left, the job on a later attempt, or the attempt's id revoked
/// by hand while it runs) `None`: the stream ends without sending more. A revocation of
/// that id by hand is not told apart from the job's end, and need not be: once the job
/// has ended on that attempt, its end has revoked the id too.
fn to_send(
    principal: &Principal,
    standing: Standing,
    mut read: EventsAfter,
) -> Option<(EventsAfter, Option<bool>)> {
    let newest = read.newest;
    read.events.retain(|e| e.seq <= newest);
    let Some(attempt) = principal.token_attempt() else {
        return Some((read, None));
    };
    if standing == Standing::Holds && !attempt_over(&read, attempt) {
        return Some((read, None));
    }
    if !read.status.is_terminal() || read.attempts != attempt {
        return None;
    }
    let more = read.events.last().is_some_and(|e| e.seq < newest);
    Some((read, Some(more)))
}

async fn read_after(state: &AppState, id: &JobId, after: i64) -> ApiResult<EventsAfter> {
    stream_read(state, || {
        let id = id.clone();
        async move {
            Ok(state
                .db
                .read(move |c| repo::events_after(c, &id, after, EVENTS_PER_CHUNK))
                .await?)
        }
    })
    .await
}

async fn step(mut s: Stream) -> Option<(Result<Bytes, actix_web::Error>, Stream)> {
    loop {
        if s.done || s.state.notifier.is_closing() {
            // Shutting down: the client reconnects elsewhere with Last-Event-ID.
            return None;
        }
        let (read, standing) = match s.pending.take() {
            // Checked by the guard a moment ago.
            Some(p) => (p, Standing::Holds),
            None => {
                let standing = standing(&s.state, &s.principal, "event stream").await?;
                s.live = true;
                s.sub.mark_seen();
                match read_after(&s.state, &s.id, s.last).await {
                    Ok(p) => (p, standing),
                    Err(e) => {
                        // The client reconnects with Last-Event-ID and misses nothing.
                        log::warn!("push: event stream of {} ended: {e}", s.id);
                        return None;
                    }
                }
            }
        };
        let Some((EventsAfter { status, events, .. }, full)) =
            to_send(&s.principal, standing, read)
        else {
            ended(&s.principal, "event stream");
            return None;
        };
        // More to read before the end: a read to its job's end says; else a full chunk.
        let full = full
            .unwrap_or_else(|| i64::try_from(events.len()).unwrap_or(i64::MAX) >= EVENTS_PER_CHUNK);
        if let Some(first) = events.first() {
            let mut out = String::new();
            if let Some(gap) = gap_comment(s.last, first.seq) {
                out.push_str(&gap);
            }
            for e in events {
                s.last = e.seq;
                if s.live {
                    s.state.metrics.wakeup("job_stream", e.created_at);
                }
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
        let woken = match wait_for_change(
            &s.state,
            &s.principal,
            "event stream",
            s.sub.changed(),
            keep_alive(),
        )
        .await
        {
            // Its token's attempt ended: the next look reads, and ends the stream unless
            // the job ended on that attempt.
            Wait::Woken(_) | Wait::AttemptEnded => true,
            Wait::TimeUp => false,
            Wait::End => return None,
        };
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
        the job is terminal (the stream then ends; also when the instance shuts down: \
        reconnect with `Last-Event-ID`). The credential is checked again before every \
        read: once its caller is disabled or it is revoked or expired, the stream ends \
        without sending more. A job token is revoked when its job ends: its own job's \
        stream still sends every event up to the terminal one, then ends. An idle \
        stream gets a `: keep-alive` comment \
        every 15 s. Open streams per caller and per instance are bounded (429 with \
        `Retry-After` beyond). A job keeps only its newest events \
        (`COORDINATOR_EVENTS_PER_JOB`, default 1000): a `Last-Event-ID` (or `after`) older \
        than the oldest one kept resumes at that one, the stream saying so first with a \
        comment `: gap: events A to B are no longer kept` (`seq` otherwise has no \
        holes); one past the job's newest event is a 400. Otherwise the events after \
        `after` as JSON (at most \
        1000; `hasMore` when more follow: ask again with `after` = the last `seq`). A \
        job token may read only its own job (else 403).",
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
        problem::JobReadErrors,
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
    let (after, field) = after_of(&req)?;
    if !wants_sse(&req) {
        // One more than a page: whether it is there says if more follow.
        let read = state
            .db
            .read(move |c| repo::events_after(c, &id, after, repo::EVENTS_PER_READ + 1))
            .await?;
        let mut events = not_past_newest(read, after, field)?.events;
        let page = usize::try_from(repo::EVENTS_PER_READ).unwrap_or(usize::MAX);
        let has_more = events.len() > page;
        events.truncate(page);
        return Ok(HttpResponse::Ok().json(JobEvents {
            events: events.into_iter().map(Into::into).collect(),
            has_more,
        }));
    }
    // A job token's streams count against its caller and, within that, its job.
    let token_of = principal.job_id.as_ref().map(JobId::as_str);
    let slot = state
        .notifier
        .stream_slot(&principal.caller, token_of)
        .map_err(|r| busy(r, true))?;
    let mut sub = state.notifier.subscribe(Topic::Job(id.to_string()));
    sub.mark_seen();
    let first = not_past_newest(read_after(&state, &id, after).await?, after, field)?;
    let stream = Stream {
        state: state.clone(),
        principal,
        id,
        last: after,
        sub,
        pending: Some(first),
        live: false,
        done: false,
        _slot: slot,
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(futures_util::stream::unfold(stream, step)))
}

/// One event of a queue stream (`data:`): the job event with its job's id and status.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct QueueEvent {
    queue: String,
    job_id: String,
    /// The job's status after this change, when known.
    status: Option<&'static str>,
    #[serde(flatten)]
    event: EventView,
}

/// The state of one open queue stream.
struct QueueStream {
    state: web::Data<AppState>,
    /// Who opened it, checked again before every read.
    principal: Principal,
    /// Whether events carry their `data` (the opener holds `jobs:read`).
    with_data: bool,
    queue: String,
    sub: QueueSubscription,
    /// When the stream opened (ms): a job first seen is read from its events since.
    since: i64,
    /// The last seq sent per job (bounded: see [`QUEUE_JOBS_TRACKED`]), so each job's
    /// events go out once and in order however their wake-ups arrive.
    sent: std::collections::HashMap<String, i64>,
    done: bool,
    _slot: Slot,
}

/// Jobs whose last sent event a queue stream remembers; past it the map is cleared
/// (a job then seen again may have events since the stream opened sent twice).
const QUEUE_JOBS_TRACKED: usize = 10_000;

/// `event: dropped` then the end: the consumer fell too far behind (`slow consumer`),
/// or the server could not read what changed (`server busy`).
fn dropped(reason: &str, missed: u64) -> Bytes {
    let data = serde_json::json!({"reason": reason, "missed": missed});
    Bytes::from(format!("event: dropped\ndata: {data}\n\n"))
}

async fn queue_step(mut s: QueueStream) -> Option<(Result<Bytes, actix_web::Error>, QueueStream)> {
    if s.done || s.state.notifier.is_closing() {
        return None;
    }
    let got = match wait_for_change(
        &s.state,
        &s.principal,
        "queue stream",
        s.sub.recv(),
        keep_alive(),
    )
    .await
    {
        Wait::Woken(r) => Some(r),
        // Not the queue stream's to settle: `still_holds` below ends it.
        Wait::TimeUp | Wait::AttemptEnded => None,
        Wait::End => return None,
    };
    if !still_holds(&s.state, &s.principal, "queue stream").await {
        return None;
    }
    let Some(first) = got else {
        return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), s));
    };
    // Take what else has queued up, so one read serves a burst.
    let mut notes = Vec::new();
    let mut lagged = None;
    let mut next = Some(first);
    while let Some(r) = next.take() {
        match r {
            QueueRecv::Note(n) => notes.push(n),
            QueueRecv::Lagged(n) => {
                lagged = Some(n);
                break;
            }
        }
        if notes.len() < QUEUE_NOTES_PER_READ {
            next = s.sub.try_recv();
        }
    }
    if let Some(n) = lagged {
        log::info!("push: queue stream of {} dropped (slow consumer)", s.queue);
        s.done = true;
        return Some((Ok(dropped("slow consumer", n)), s));
    }
    let mut out = String::new();
    // One range per job: up to its newest change named here, after what was sent.
    let mut ranges: Vec<repo::EventRange> = Vec::new();
    for n in notes.iter().filter(|n| n.seq > 0) {
        let after = s.sent.get(&n.job_id).copied();
        if after.is_some_and(|a| a >= n.seq) {
            continue; // sent already (read with an earlier range)
        }
        match ranges.iter_mut().find(|r| r.job_id == n.job_id) {
            Some(r) => r.upto = r.upto.max(n.seq),
            None => ranges.push(repo::EventRange {
                job_id: n.job_id.clone(),
                after,
                upto: n.seq,
                since: s.since,
            }),
        }
    }
    let mut wide: Vec<&str> = notes
        .iter()
        .filter(|n| n.seq == 0)
        .map(|n| n.queue.as_str())
        .collect();
    wide.sort_unstable();
    wide.dedup();
    for queue in wide {
        // A queue-wide change (controls, a batch of new jobs): re-read the queue.
        let data = serde_json::json!({ "queue": queue });
        out.push_str(&format!("event: queue\ndata: {data}\n\n"));
    }
    if !ranges.is_empty() {
        let state = s.state.clone();
        let read = stream_read(&s.state, || {
            let (state, ranges) = (state.clone(), ranges.clone());
            async move {
                Ok(state
                    .db
                    .read(move |c| repo::events_in_ranges(c, &ranges, EVENTS_PER_CHUNK))
                    .await?)
            }
        })
        .await;
        let events = match read {
            Ok(e) => e,
            Err(e) => {
                // Said, not silent: the consumer re-reads the queue (no replay here).
                log::warn!("push: queue stream of {} ended: {e}", s.queue);
                s.done = true;
                return Some((Ok(dropped("server busy", 0)), s));
            }
        };
        if s.sent.len() + events.len() > QUEUE_JOBS_TRACKED {
            s.sent.clear();
        }
        for (job_id, e) in events {
            let last = s.sent.entry(job_id.clone()).or_insert(0);
            *last = (*last).max(e.seq);
            let note = notes.iter().find(|n| n.job_id == job_id && n.seq == e.seq);
            let status = note.and_then(|n| n.status).map(JobStatus::as_str);
            let queue = note.map_or_else(|| s.queue.clone(), |n| n.queue.clone());
            s.state.metrics.wakeup("queue_stream", e.created_at);
            let kind = e.event_type.clone();
            let mut event = EventView::from(e);
            if !s.with_data {
                // What changed (messages, results, errors) is `jobs:read`'s to see.
                event.data = serde_json::Value::Null;
            }
            let data = serde_json::to_string(&QueueEvent {
                queue,
                job_id,
                status,
                event,
            })
            .unwrap_or_else(|_| "null".into());
            out.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
        }
    }
    if out.is_empty() {
        // Every change named was gone already: say nothing, but keep the stream going.
        out.push_str(": changed\n\n");
    }
    Some((Ok(Bytes::from(out)), s))
}

/// `GET /coordinator/queues/{queue}/events`
#[utoipa::path(
    get,
    path = "/coordinator/queues/{queue}/events",
    tag = "jobs",
    operation_id = "queueEvents",
    summary = "A live stream of every job event of a queue",
    description = "Server-Sent Events (always; `Accept: text/event-stream` is expected): \
        every job event of the queue (of every queue for `*`) from now on, as it happens \
        on any instance — `event:` the event type, `data:` \
        `{queue, jobId, status, seq, type, data, createdAt}`, where `data` (what \
        changed: messages, results, errors) is null unless the caller holds \
        `jobs:read` — \
        and `event: queue` (`data: {queue}`) when the queue changed as a whole (paused, \
        resumed, a batch of jobs created): re-read it then. There is no replay: events \
        carry no `id:`, and a client that (re)connects reads the queue and its jobs first \
        (a job's own stream replays exactly). A consumer that falls 256 changes behind \
        gets `event: dropped` (`data: {reason, missed}`) and the stream ends. An idle \
        stream gets a `: keep-alive` comment every 15 s; the stream ends when the \
        instance shuts down, and once its credential no longer holds (caller disabled, \
        key or secret revoked or expired; checked before every read). Open streams per caller and per instance are bounded (429 \
        with `Retry-After` beyond).",
    params(
        ("queue" = String, Path, description = "The queue name, or `*` for every queue.",
            min_length = 1, max_length = 64, pattern = "^([A-Za-z0-9_.-]+|\\*)$"),
    ),
    responses(
        (status = 200, description = "The stream.", content((String = "text/event-stream"))),
        problem::InputErrors,
    ),
)]
pub async fn queue_events(
    state: web::Data<AppState>,
    principal: Principal,
    queue: web::Path<String>,
) -> ApiResult<HttpResponse> {
    // A query string is refused by the guard (this route declares no parameter).
    let queue = queue.into_inner();
    if queue != crate::jobs::notify::ALL_QUEUES {
        crate::jobs::request::validate_queue(&queue, "queue")?;
    }
    let slot = state
        .notifier
        .stream_slot(&principal.caller, None)
        .map_err(|r| busy(r, true))?;
    let sub = state.notifier.subscribe_queue(&queue);
    let stream = QueueStream {
        state: state.clone(),
        with_data: principal.has_scope(Scope::JobsRead),
        principal,
        queue,
        sub,
        since: crate::db::now_millis(),
        sent: std::collections::HashMap::new(),
        done: false,
        _slot: slot,
    };
    // A first comment, so the client sees the stream open (and subscribed) at once.
    let hello = futures_util::stream::once(async {
        Ok::<_, actix_web::Error>(Bytes::from_static(b": open\n\n"))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(futures_util::StreamExt::chain(
            hello,
            futures_util::stream::unfold(stream, queue_step),
        )))
}

#[cfg(test)]
mod tests {
    use super::{accepts_sse, attempt_over, EventsAfter, JobStatus};

    #[test]
    fn a_tokens_attempt_is_over_as_its_revocation_says() {
        let read = |status, attempts| EventsAfter {
            status,
            attempts,
            newest: 0,
            events: Vec::new(),
        };
        use JobStatus::*;
        // Attempt 2's token: over once the job ended or was requeued on attempt 2, or
        // moved on; not while it runs on it.
        for (status, attempts, over) in [
            (Running, 2, false),
            (Completed, 2, true),
            (Failed, 2, true),
            (Cancelled, 2, true),
            (Queued, 2, true),
            (Running, 3, true),
            (Queued, 3, true),
        ] {
            assert_eq!(
                attempt_over(&read(status, attempts), 2),
                over,
                "{status:?} {attempts}"
            );
        }
        // A token issued before any claim (attempt 0): over when the first attempt
        // starts, or the job ends unclaimed; not while it waits in the queue.
        for (status, attempts, over) in [
            (Pending, 0, false),
            (Queued, 0, false),
            (Cancelled, 0, true),
            (Running, 1, true),
        ] {
            assert_eq!(
                attempt_over(&read(status, attempts), 0),
                over,
                "{status:?} {attempts}"
            );
        }
    }

    #[test]
    fn accept_names_the_stream_case_insensitively_and_not_refused() {
        for yes in [
            "text/event-stream",
            "TEXT/Event-Stream",
            "application/json, text/event-stream;q=0.5",
            " text/event-stream ; charset=utf-8",
        ] {
            assert!(accepts_sse(yes), "{yes}");
        }
        for no in [
            "",
            "application/json",
            "text/event-stream;q=0",
            "text/event-stream; Q=0.0",
            "text/event-streams",
            "x-text/event-stream",
            "*/*",
        ] {
            assert!(!accepts_sse(no), "{no}");
        }
    }
}
