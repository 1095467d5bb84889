//! [`Worker`]: claim jobs from a queue and run a handler on each.
//!
//! While the handler runs, a heartbeat thread renews the lease (`POST …/heartbeat`
//! where the server has it, else a progress report) every `heartbeat_interval`, or
//! more often when the job's lease or token is short ([`Worker::beat_interval`]).
//! `Ok(result)` completes the job; `Err(JobError::Fail)` fails it;
//! `Err(JobError::Retry)` hands it back while attempts remain. When the server says the
//! job is no longer ours (409/401/403/404 on a heartbeat), or the lease has run out
//! without a renewal (each heartbeat is one attempt bounded by the time left; the lease
//! is timed on this host's monotonic clock from the send time of the claim or of the
//! last renewal), [`JobContext::is_cancelled`] turns true and the outcome is not
//! reported. [`JobContext::progress`] is best-effort: a transient failure is recorded
//! and answers `Ok(())`, so `job.progress(..)?` hands a job back only when it is gone.
//! Setting the [`Worker::stop_flag`] (wire it to SIGTERM, e.g. with
//! `signal_hook::flag::register`) cancels the running job, waits `shutdown_grace` for
//! the handler, and hands an unfinished job back to the queue instead of dropping it.
//! An idle worker's long poll is made of claims of at most [`Client::STOP_POLL`]
//! (2 s) each, the stop flag looked at between them: a stop ends a waiting claim within
//! that, and a job the last claim brought is handed straight back.
//!
//! A heartbeat in the second half of the job token's life gets the token's successor
//! from the server; the job's client acts with it from then on, so a job may run longer
//! than one token lives.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{Claim, Client, Job};
use crate::error::{Error, ProblemKind};

/// How a handler ends without a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// Hand the job back for another attempt (fails it after the last attempt).
    Retry(String),
    /// Fail the job (terminal).
    Fail(String),
    /// The handler stopped because the job was cancelled.
    Cancelled,
}

pub type HandlerResult = Result<Value, JobError>;

/// What a handler gets.
#[derive(Debug)]
pub struct JobContext {
    pub job: Job,
    pub id: String,
    pub attempt: i64,
    pub max_attempts: i64,
    /// Acting with the job's token; replaced when a heartbeat renews the token.
    client: RwLock<Client>,
    cancelled: Arc<AtomicBool>,
    lost: AtomicBool,
    percent: AtomicU8,
    log: Log,
    /// The lease's length (from the server's timestamps), when known.
    lease_len: Option<Duration>,
    /// When the lease runs out without a renewal, on this host's monotonic clock.
    lease_until: Mutex<Option<Instant>>,
}

/// The worker's event lines, shared with its jobs' contexts and heartbeat threads:
/// the last [`Worker::MAX_EVENTS`].
type Log = Arc<Mutex<VecDeque<String>>>;

fn note(log: &Mutex<VecDeque<String>>, line: String) {
    if let Ok(mut l) = log.lock() {
        while l.len() >= Worker::MAX_EVENTS {
            l.pop_front();
        }
        l.push_back(line);
    }
}

/// An error that says nothing about the job: no (readable) answer, or the server (or a
/// proxy in front of it) busy or failing.
fn transient(e: &Error) -> bool {
    match e {
        Error::Problem(p) => matches!(p.status, 408 | 429) || p.status >= 500,
        Error::Transport(_) | Error::Invalid(_) => true,
    }
}

/// A client error answer: sending the same request again gets the same answer.
fn refused(e: &Error) -> bool {
    e.status()
        .is_some_and(|s| (400..500).contains(&s) && !matches!(s, 408 | 409 | 429))
}

fn gone(e: &Error) -> bool {
    matches!(
        e.kind(),
        Some(
            ProblemKind::Conflict
                | ProblemKind::Unauthorized
                | ProblemKind::Forbidden
                | ProblemKind::NotFound
        )
    )
}

impl JobContext {
    /// `claimed_at`: when the claim was sent, the start of the lease's clock.
    fn new(
        claim: Claim,
        client: Client,
        cancelled: Arc<AtomicBool>,
        log: Log,
        claimed_at: Instant,
    ) -> Self {
        let int = |k: &str, d: i64| claim.job.get(k).and_then(Value::as_i64).unwrap_or(d);
        let percent = u8::try_from(int("progress", 0).clamp(0, 100)).unwrap_or(0);
        let lease_len = lease_length(&claim);
        JobContext {
            lease_len,
            lease_until: Mutex::new(lease_len.map(|l| claimed_at + l)),
            id: claim.id().to_owned(),
            attempt: int("attempts", 1),
            max_attempts: int("maxAttempts", 1),
            job: claim.job,
            client: RwLock::new(client),
            cancelled,
            lost: AtomicBool::new(false),
            percent: AtomicU8::new(percent),
            log,
        }
    }

    pub fn payload(&self) -> &Value {
        self.job.get("payload").unwrap_or(&Value::Null)
    }

    /// A client acting with this job's token (its latest renewal).
    pub fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Act with `token` from now on (the successor a heartbeat handed out).
    fn renew(&self, token: &str) {
        let mut c = self.client.write().unwrap_or_else(PoisonError::into_inner);
        *c = c.with_token(token);
    }

    /// How long until the lease runs out without a renewal (zero: it has); `None` when
    /// the lease's length is unknown. Timed on this host's monotonic clock from the
    /// send time of the claim or of the last renewal.
    pub fn lease_left(&self) -> Option<Duration> {
        let until = *self
            .lease_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.map(|u| u.saturating_duration_since(Instant::now()))
    }

    fn lease_expired(&self) -> bool {
        self.lease_left().is_some_and(|l| l.is_zero())
    }

    /// A request sent at `sent` renewed the lease.
    fn renewed(&self, sent: Instant) {
        let Some(len) = self.lease_len else { return };
        let mut until = self
            .lease_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if until.is_none_or(|u| u < sent + len) {
            *until = Some(sent + len);
        }
    }

    /// True once the job is no longer ours or the worker is stopping.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Report progress (renews the lease too). Best-effort: a transient failure (no
    /// answer, 408, 429, 5xx, an unreadable answer) is recorded in the worker's
    /// [`Worker::events`] and answers `Ok(())` — the heartbeat keeps the lease, so `?`
    /// on it never hands a job back for a blip. `Err(JobError::Cancelled)` when the
    /// job is no longer ours; `Err(JobError::Retry)` for any other error answer (e.g. a
    /// 400).
    pub fn progress(&self, percent: u8, message: Option<&str>) -> Result<(), JobError> {
        let sent = Instant::now();
        match self.client().report_progress(&self.id, percent, message) {
            Ok(_) => {
                self.percent.store(percent, Ordering::SeqCst);
                self.renewed(sent);
                Ok(())
            }
            Err(e) if gone(&e) => {
                self.lose();
                Err(JobError::Cancelled)
            }
            Err(e) if transient(&e) => {
                note(
                    &self.log,
                    format!("{}: progress report failed: {e} (carrying on)", self.id),
                );
                Ok(())
            }
            Err(e) => Err(JobError::Retry(e.to_string())),
        }
    }

    fn lose_lease(&self) {
        if !self.lost.load(Ordering::SeqCst) {
            note(
                &self.log,
                format!(
                    "{}: the lease ran out without a renewal; cancelling the handler",
                    self.id
                ),
            );
            self.lose();
        }
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

const ROUTE_UNKNOWN: u8 = 0;
const ROUTE_YES: u8 = 1;
const ROUTE_NO: u8 = 2;

/// Claims jobs of a queue and runs a handler on each.
pub struct Worker {
    client: Client,
    queue: String,
    pub name: String,
    pub heartbeat_interval: Duration,
    pub poll_min: Duration,
    pub poll_max: Duration,
    /// How long each claim waits on the server for a job (long poll); zero: ask and
    /// back off between empty answers (`poll_min`..`poll_max`).
    pub long_poll: Duration,
    pub shutdown_grace: Duration,
    stop: Arc<AtomicBool>,
    heartbeat_route: Arc<AtomicU8>,
    log: Log,
}

impl Worker {
    /// How many event lines [`Worker::events`] keeps (the latest).
    pub const MAX_EVENTS: usize = 1000;

    pub fn new(client: Client, queue: &str) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
        let name: String = format!("{host}-{}", std::process::id())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.:-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        Worker {
            // The stop flag also ends its pauses between retries, and stops its retries.
            client: client.with_stop(stop.clone()),
            queue: queue.to_owned(),
            name,
            heartbeat_interval: Duration::from_secs(30),
            poll_min: Duration::from_millis(500),
            poll_max: Duration::from_secs(10),
            long_poll: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(10),
            stop,
            heartbeat_route: Arc::new(AtomicU8::new(ROUTE_UNKNOWN)),
            log: Log::default(),
        }
    }

    /// `heartbeat_interval`, shortened for this job so that its lease (a third of it)
    /// and its job token (a quarter of its lifetime) are renewed in time. Both lengths
    /// come from the server's own timestamps (`startedAt` to `leaseExpiresAt` and to
    /// `tokenExpiresAt`), so this host's clock does not matter.
    pub fn beat_interval(&self, claim: &Claim) -> Duration {
        let mut interval = self.heartbeat_interval;
        let token = span(claim, Some(claim.token_expires_at.as_str()));
        for (length, share) in [(lease_length(claim), 3), (token, 4)] {
            if let Some(len) = length {
                interval = interval.min((len / share).max(Duration::from_millis(100)));
            }
        }
        interval
    }

    /// Set it to stop the loop (what SIGTERM should do).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// `Some(true)` once a heartbeat went through the heartbeat route, `Some(false)` when
    /// the server lacks it (progress reports renew the lease instead).
    pub fn heartbeat_route(&self) -> Option<bool> {
        match self.heartbeat_route.load(Ordering::SeqCst) {
            ROUTE_YES => Some(true),
            ROUTE_NO => Some(false),
            _ => None,
        }
    }

    /// What happened, one line per event (for logs and tests): the last
    /// [`Worker::MAX_EVENTS`], oldest first.
    pub fn events(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn note(&self, line: String) {
        note(&self.log, line);
    }

    /// Claim and process jobs until stopped, `max_jobs` are done, or (with
    /// `stop_when_idle`) the queue is empty. Returns the number processed. A claim
    /// refused with a client error (400, 401, 403, 404, 422, …: a bad queue or worker
    /// name, a credential that may not claim) is returned as an error; transient claim
    /// errors (no answer, 408, 409, 429, 5xx) back off and retry.
    pub fn run<F>(
        &self,
        handler: F,
        max_jobs: Option<usize>,
        stop_when_idle: bool,
    ) -> Result<usize, Error>
    where
        F: Fn(&JobContext) -> HandlerResult + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let mut processed = 0;
        let mut delay = self.poll_min;
        // A worker that stops when idle asks once; otherwise each claim long-polls.
        let wait = (!stop_when_idle && !self.long_poll.is_zero()).then_some(self.long_poll);
        while !self.stopping() && max_jobs.is_none_or(|m| processed < m) {
            let started = Instant::now();
            let asked = match wait {
                Some(w) => self.client.claim_wait(&self.queue, &self.name, w),
                None => self.client.claim(&self.queue, &self.name),
            };
            let claim = match asked {
                Ok(c) => c,
                // Asking again would be refused again: not the worker's to fix.
                Err(e) if refused(&e) => return Err(e),
                Err(e) => {
                    self.note(format!("claim failed: {e}"));
                    None
                }
            };
            if let (Some(c), true) = (&claim, self.stopping()) {
                // Stopped during the long poll: hand the job straight back.
                let back = self.client.with_token(&c.token).set_status(
                    c.id(),
                    "QUEUED",
                    Some("worker shutting down"),
                );
                self.note(format!("handed {} back on stop: {back:?}", c.id()));
                break;
            }
            let Some(claim) = claim else {
                if stop_when_idle {
                    break;
                }
                if wait.is_some_and(|w| started.elapsed() >= w / 2) {
                    continue; // the server held the claim open: ask again at once
                }
                self.idle(delay.mul_f64(0.75 + rand::random::<f64>() / 2.0));
                delay = (delay * 2).min(self.poll_max);
                continue;
            };
            delay = self.poll_min;
            // The lease starts when the server hands the job out: for a long poll that
            // may be long after the claim was sent, and at most the answer's travel
            // (taken as up to 1 s) before it came.
            let claimed_at = Instant::now()
                .checked_sub(Duration::from_secs(1))
                .map_or(started, |t| t.max(started));
            self.process_claimed(claim, handler.clone(), claimed_at);
            processed += 1;
        }
        Ok(processed)
    }

    fn idle(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopping() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
    }

    /// Run the handler on one claimed job and report its outcome. The lease is timed
    /// from now: once it has run out without a renewal the job is no longer ours (the
    /// handler is cancelled, its outcome never reported).
    pub fn process<F>(&self, claim: Claim, handler: Arc<F>)
    where
        F: Fn(&JobContext) -> HandlerResult + Send + Sync + 'static,
    {
        self.process_claimed(claim, handler, Instant::now());
    }

    /// [`Worker::process`] with the lease timed from `claimed_at`, when the claim was
    /// sent.
    pub fn process_claimed<F>(&self, claim: Claim, handler: Arc<F>, claimed_at: Instant)
    where
        F: Fn(&JobContext) -> HandlerResult + Send + Sync + 'static,
    {
        let cancelled = Arc::new(AtomicBool::new(false));
        let interval = self.beat_interval(&claim);
        let token_client = self.client.with_token(&claim.token);
        let ctx = Arc::new(JobContext::new(
            claim,
            token_client,
            cancelled.clone(),
            self.log.clone(),
            claimed_at,
        ));

        let (beat_stop, beat_rx) = mpsc::channel::<()>();
        let beat = {
            let ctx = ctx.clone();
            let route = self.heartbeat_route.clone();
            let log = self.log.clone();
            std::thread::spawn(move || heartbeat(&ctx, interval, &route, &beat_rx, &log))
        };
        let (done_tx, done_rx) = mpsc::channel::<HandlerResult>();
        {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                let _ = done_tx.send(handler(&ctx));
            });
        }
        let mut deadline: Option<Instant> = None;
        let outcome = loop {
            match done_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => break Some(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Some(Err(JobError::Fail("the handler panicked".into())))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if ctx.lease_expired() {
                // Also when the heartbeat thread is stuck in a request.
                ctx.lose_lease();
            }
            if self.stopping() && deadline.is_none() {
                cancelled.store(true, Ordering::SeqCst);
                deadline = Some(Instant::now() + self.shutdown_grace);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break None;
            }
        };
        if ctx.lease_expired() {
            ctx.lose_lease();
        }
        self.settle(&ctx, outcome);
        drop(beat_stop);
        // Not waited for when busy: a heartbeat in flight ends within the time that was
        // left on the lease, and the thread then sees the stop.
        if beat.is_finished() {
            let _ = beat.join();
        }
    }

    fn settle(&self, ctx: &JobContext, outcome: Option<HandlerResult>) {
        let c = &ctx.client();
        let id = ctx.id.as_str();
        if ctx.lost.load(Ordering::SeqCst) {
            self.note(format!("{id}: no longer ours; outcome not reported"));
            return;
        }
        let stopping = self.stopping();
        let result = match outcome {
            None => c.set_status(id, "QUEUED", Some("worker shutting down")),
            Some(Err(_)) if stopping => c.set_status(id, "QUEUED", Some("worker shutting down")),
            Some(Ok(v)) => c.complete_job(id, Some(&v)),
            Some(Err(JobError::Cancelled)) => c.set_status(id, "QUEUED", Some("handler cancelled")),
            Some(Err(JobError::Retry(why))) if ctx.attempt < ctx.max_attempts => {
                c.set_status(id, "QUEUED", Some(&why))
            }
            Some(Err(JobError::Retry(why) | JobError::Fail(why))) => {
                let why = if why.trim().is_empty() {
                    "failed".to_owned()
                } else {
                    why
                };
                c.fail_job(id, &why, None)
            }
        };
        match result {
            Ok(job) => self.note(format!(
                "{id}: {}",
                job.get("status").and_then(Value::as_str).unwrap_or("?")
            )),
            Err(e) => self.note(format!("{id}: reporting failed: {e}")),
        }
    }
}

fn heartbeat(
    ctx: &JobContext,
    interval: Duration,
    route: &AtomicU8,
    stop: &mpsc::Receiver<()>,
    log: &Mutex<VecDeque<String>>,
) {
    loop {
        let wait = ctx.lease_left().map_or(interval, |left| left.min(interval));
        if !matches!(
            stop.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Timeout)
        ) || ctx.lost.load(Ordering::SeqCst)
        {
            return;
        }
        // One attempt, with no more time than is left on the lease.
        let timeout = match ctx.lease_left() {
            Some(left) if left.is_zero() => {
                ctx.lose_lease();
                return;
            }
            Some(left) => left.min(ctx.client().timeout()),
            None => ctx.client().timeout(),
        };
        let sent = Instant::now();
        let mut result = Err(Error::Invalid("no heartbeat sent".into()));
        if route.load(Ordering::SeqCst) != ROUTE_NO {
            result = ctx.client().heartbeat_once(&ctx.id, timeout).map(|beat| {
                if let Some(token) = beat.token.as_deref() {
                    ctx.renew(token);
                }
            });
            match &result {
                Ok(()) => route.store(ROUTE_YES, Ordering::SeqCst),
                Err(e)
                    if route.load(Ordering::SeqCst) == ROUTE_UNKNOWN
                        && matches!(
                            e.kind(),
                            Some(ProblemKind::NotFound | ProblemKind::MethodNotAllowed)
                        ) =>
                {
                    route.store(ROUTE_NO, Ordering::SeqCst);
                }
                Err(_) => {}
            }
        }
        if route.load(Ordering::SeqCst) == ROUTE_NO {
            let percent = ctx.percent.load(Ordering::SeqCst);
            result = ctx
                .client()
                .report_progress_once(&ctx.id, percent, timeout)
                .map(|_| ());
        }
        match result {
            Ok(()) => ctx.renewed(sent),
            Err(e) if gone(&e) => {
                note(log, format!("{}: {e}; cancelling the handler", ctx.id));
                ctx.lose();
                return;
            }
            Err(e) => note(log, format!("{}: heartbeat failed: {e}", ctx.id)),
        }
    }
}

/// Duration from the job's `startedAt` to `until` (server timestamps both).
fn span(claim: &Claim, until: Option<&str>) -> Option<Duration> {
    let at = |v: Option<&str>| {
        v.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_millis())
    };
    let started = at(claim.job.get("startedAt").and_then(Value::as_str))?;
    let ms = u64::try_from(at(until)? - started).ok()?;
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The job's lease length (`startedAt` to `leaseExpiresAt`, both the server's, so this
/// host's clock does not matter).
fn lease_length(claim: &Claim) -> Option<Duration> {
    span(
        claim,
        claim.job.get("leaseExpiresAt").and_then(Value::as_str),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;
    use serde_json::json;

    #[test]
    fn a_worker_heartbeats_often_enough_for_a_short_lease_or_token() {
        let client = Client::new("http://127.0.0.1:9", Credentials::ApiKey("k".into()));
        let mut w = Worker::new(client, "q");
        let job = json!({
            "id": "j",
            "startedAt": "2026-12-06T01:00:00.000Z",
            "leaseExpiresAt": "2026-12-06T01:00:30.000Z",
        });
        let claim = |token_expires_at: &str| Claim {
            job: job.clone(),
            token: "t".into(),
            token_expires_at: token_expires_at.into(),
        };
        // A quarter of the token's 6 s; a third of the 30 s lease; never above the
        // configured interval; only that when the times do not parse.
        assert_eq!(
            w.beat_interval(&claim("2026-12-06T01:00:06.000Z")),
            Duration::from_millis(1500)
        );
        assert_eq!(
            w.beat_interval(&claim("2026-12-06T02:00:00.000Z")),
            Duration::from_secs(10)
        );
        w.heartbeat_interval = Duration::from_secs(2);
        assert_eq!(
            w.beat_interval(&claim("2026-12-06T02:00:00.000Z")),
            Duration::from_secs(2)
        );
        let odd = Claim {
            job: json!({"id": "j"}),
            token: "t".into(),
            token_expires_at: "not a time".into(),
        };
        assert_eq!(w.beat_interval(&odd), Duration::from_secs(2));
    }

    #[test]
    fn the_event_log_keeps_the_last_lines_only() {
        let client = Client::new("http://127.0.0.1:9", Credentials::ApiKey("k".into()));
        let w = Worker::new(client, "q");
        for i in 0..Worker::MAX_EVENTS + 500 {
            w.note(format!("line {i}"));
        }
        let events = w.events();
        assert_eq!(events.len(), Worker::MAX_EVENTS);
        assert_eq!(events.first().map(String::as_str), Some("line 500"));
        assert_eq!(events.last().map(String::as_str), Some("line 1499"));
    }

    #[test]
    fn a_transient_progress_failure_is_recorded_not_fatal() {
        // Nothing listens on the port: a transport error.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(9);
        let client = Client::new(
            &format!("http://127.0.0.1:{port}"),
            Credentials::Bearer("t".into()),
        );
        let log = Log::default();
        let claim = Claim {
            job: json!({"id": "j1", "progress": 5}),
            token: "t".into(),
            token_expires_at: String::new(),
        };
        let ctx = JobContext::new(claim, client, Arc::default(), log.clone(), Instant::now());
        assert_eq!(ctx.progress(50, Some("half")), Ok(()));
        assert!(!ctx.is_cancelled());
        assert_eq!(ctx.percent.load(Ordering::SeqCst), 5);
        let lines: Vec<String> = log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        assert!(
            lines.iter().any(|l| l.contains("progress report failed")),
            "{lines:?}"
        );
    }
}
