//! The door: refuse work the server has no room for, before it costs anything.
//!
//! The database queues (`db::load`) bound what waits for a connection or the writer.
//! When the CPU is what runs out, the queue forms earlier, where no counter of those
//! sees it: requests wait in an HTTP worker's run queue while the worker verifies the
//! signatures of the ones ahead of them, and every admitted request waits for all of
//! that at each of its awaits. So each worker bounds the requests it has in progress:
//! past its limit a request is answered 503 + `Retry-After` at once, before routing,
//! authentication or the access line, so a refusal costs a small fraction of admitted
//! work and the excess is answered instead of queued.
//!
//! The limit adapts (additive increase, multiplicative decrease, as TCP does with its
//! window) to the worker's event-loop lag: a probe task sleeps [`PROBE_EVERY`] and
//! records how late it woke. A worker with CPU to spare wakes on time; one with a
//! backlog wakes only after running every task ahead of it. Per [`INTERVAL`] the
//! shortest lag counts (as in CoDel: one wake-up on time proves there is no standing
//! backlog).
//!
//! The lag does not see a backlog further in: on PostgreSQL at twice its rate the
//! database's own processes are what is saturated, every request waits inside it, and
//! the workers' event loops stay idle. So the second signal is how much slower than
//! usual the *shortest* admitted request of the interval was (door to reply). One fast
//! request proves there is no standing queue in front of it; a request waiting on a row
//! lock or a slow query makes only itself slow, not the fastest one. The usual time is
//! the lowest seen, drifting up slowly so that a database further away sets its own
//! baseline instead of counting as backlog (see [`Door::slower_than_usual`]). The
//! larger of the two signals is the interval's delay.
//!
//! When the delay is above the target, the limit shrinks by 30 % (not
//! below [`MIN_LIMIT`]); when it is below half the target and the limit was reached in
//! the interval, it grows by a quarter (at least 2), up to the configured ceiling. A
//! zero target keeps the limit at the ceiling. A refusal keeps the connection open
//! when the request's body has already arrived (see [`door`]). The probes (`/livez`, `/readyz`) and
//! `/metrics` are never refused and never counted: they are how operators see an
//! overload.

use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage};

use crate::error::ApiError;

/// How often the probe wakes.
pub const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How often the limit is adjusted, from the shortest lag seen in it.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// The lowest a worker's limit goes: some requests always get through, so the lag
/// reflects real work and the limit can grow back.
pub const MIN_LIMIT: usize = 2;
/// How fast the usual request time drifts up towards a slower interval's shortest
/// request: 1/`n` of the difference per interval, `n` this while the limit held
/// requests back (overload: the usual time stays what it was before it) ...
const DRIFT_WHEN_LIMITED: u32 = 1024;
/// ... and this otherwise (a database that became slower for good).
const DRIFT_WHEN_FREE: u32 = 16;
/// Workers the metrics report (more are served, not reported).
const SLOTS: usize = 64;

/// What the workers' doors share: settings, and what `/metrics` reports.
pub struct DoorStats {
    /// Delay above which a worker's limit shrinks; zero: the limit stays at `ceiling`.
    target: Duration,
    /// The most requests one worker may have in progress.
    ceiling: usize,
    shed: AtomicU64,
    next_slot: AtomicUsize,
    /// Each worker's current limit (`u32::MAX`: slot unused).
    limits: [AtomicU32; SLOTS],
    /// Each worker's shortest lag of its last interval, µs.
    delays_us: [AtomicU32; SLOTS],
    /// Each worker's shortest admitted request of its last interval, µs.
    took_us: [AtomicU32; SLOTS],
}

impl DoorStats {
    pub fn new(target: Duration, ceiling: usize) -> Arc<DoorStats> {
        Arc::new(DoorStats {
            target,
            ceiling: ceiling.max(1),
            shed: AtomicU64::new(0),
            next_slot: AtomicUsize::new(0),
            limits: std::array::from_fn(|_| AtomicU32::new(u32::MAX)),
            delays_us: std::array::from_fn(|_| AtomicU32::new(0)),
            took_us: std::array::from_fn(|_| AtomicU32::new(0)),
        })
    }

    /// Requests refused at the door since start.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// The instance's limit: the sum of its workers' (0 before the first worker).
    pub fn limit(&self) -> u64 {
        self.limits
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&a| a != u32::MAX)
            .map(u64::from)
            .sum()
    }

    /// The largest of the workers' last-interval shortest lags.
    pub fn delay(&self) -> Duration {
        Self::largest(&self.delays_us)
    }

    /// The largest of the workers' last-interval shortest admitted requests.
    pub fn shortest_request(&self) -> Duration {
        Self::largest(&self.took_us)
    }

    fn largest(slots: &[AtomicU32; SLOTS]) -> Duration {
        let us = slots
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Duration::from_micros(u64::from(us))
    }
}

/// One HTTP worker's door (single-threaded: the worker's middleware and its probe).
pub struct Door {
    stats: Arc<DoorStats>,
    slot: Option<usize>,
    limit: Cell<usize>,
    in_flight: Cell<usize>,
    /// The limit was reached in the current interval.
    reached: Cell<bool>,
    interval_start: Cell<Instant>,
    min_lag: Cell<Option<Duration>>,
    /// The shortest admitted request of the current interval (door to reply).
    min_took: Cell<Option<Duration>>,
    /// What the shortest request of an interval usually takes (see
    /// [`Door::slower_than_usual`]).
    usual_took: Cell<Option<Duration>>,
    /// The last interval's shortest request was slower than usual by over the target.
    was_slow: Cell<bool>,
    probing: Cell<bool>,
}

/// One admitted request's place in its worker's count, given back when the request
/// ends or, for a waiting claim, when it starts to wait ([`waits_by_design`]).
struct Place {
    door: Rc<Door>,
    entered: Cell<Instant>,
    released: Cell<bool>,
}

impl Place {
    /// Take the place again after [`step_out`]; `false` (counted as shed) when the
    /// worker is at its limit now. A place never given back is simply kept.
    fn back_in(&self) -> bool {
        if !self.released.get() {
            return true;
        }
        if !self.door.take() {
            return false;
        }
        self.entered.set(Instant::now());
        self.released.set(false);
        true
    }

    /// Give the place back; `false` when it already was. The time since entry counts
    /// as a request's time for the door's "shortest request" signal.
    fn release(&self) -> bool {
        if !self.give_back() {
            return false;
        }
        let d = &self.door;
        let took = self.entered.get().elapsed();
        d.min_took
            .set(Some(d.min_took.get().map_or(took, |m| m.min(took))));
        true
    }

    /// Give the place back without counting a request's time (the request is not done).
    fn give_back(&self) -> bool {
        if self.released.replace(true) {
            return false;
        }
        let d = &self.door;
        d.in_flight.set(d.in_flight.get().saturating_sub(1));
        true
    }
}

/// In the request's extensions, for [`waits_by_design`].
#[derive(Clone)]
struct PlaceRef(Rc<Place>);

/// Gives the place back if the request is dropped unfinished (its client went away).
struct ReleaseOnDrop(Rc<Place>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A request about to wait for its body before it is authenticated steps out: a body
/// still on its way costs no CPU, and a peer that sends bodies slowly (it needs no
/// secret to get that far) must not hold the places verified requests need. What bounds
/// those waits instead is `auth::throttle`'s count of bodies being read. The request
/// takes a place again with [`back_in`] once its body is there.
pub fn step_out(req: &actix_web::HttpRequest) {
    // Not `release`: the header checks alone are no request's time, and would read as
    // the shortest request of the interval, hiding a backlog further in.
    if let Some(PlaceRef(place)) = req.extensions().get::<PlaceRef>() {
        place.give_back();
    }
}

/// Take a place again after [`step_out`]: `false` when the worker is at its limit, and
/// the request is refused like any other over it. A request that never had a place (a
/// probe, or no door in front) passes.
pub fn back_in(req: &actix_web::HttpRequest) -> bool {
    match req.extensions().get::<PlaceRef>() {
        Some(PlaceRef(place)) => place.back_in(),
        None => true,
    }
}

/// A request that from here on waits by design (a long-poll claim): it no longer
/// counts as in progress.
pub fn waits_by_design(req: &actix_web::HttpRequest) {
    if let Some(PlaceRef(place)) = req.extensions().get::<PlaceRef>() {
        place.release();
    }
}

impl Door {
    pub fn new(stats: Arc<DoorStats>) -> Rc<Door> {
        let slot = stats.next_slot.fetch_add(1, Ordering::Relaxed);
        let slot = (slot < SLOTS).then_some(slot);
        let door = Door {
            limit: Cell::new(stats.ceiling),
            stats,
            slot,
            in_flight: Cell::new(0),
            reached: Cell::new(false),
            interval_start: Cell::new(Instant::now()),
            min_lag: Cell::new(None),
            min_took: Cell::new(None),
            usual_took: Cell::new(None),
            was_slow: Cell::new(false),
            probing: Cell::new(false),
        };
        door.publish(Duration::ZERO);
        Rc::new(door)
    }

    /// Requests this worker may have in progress now.
    pub fn limit(&self) -> usize {
        self.limit.get()
    }

    /// One probe sample taken at `now`: how late the probe woke.
    pub fn record_lag(&self, lag: Duration, now: Instant) {
        let min = self.min_lag.get().map_or(lag, |m| m.min(lag));
        self.min_lag.set(Some(min));
        self.maybe_adjust(now);
    }

    /// At the end of an interval: adjust the limit from its shortest lag and how much
    /// slower than usual its shortest request was.
    fn maybe_adjust(&self, now: Instant) {
        if now.saturating_duration_since(self.interval_start.get()) < INTERVAL {
            return;
        }
        self.interval_start.set(now);
        let lag = self.min_lag.take().unwrap_or(Duration::ZERO);
        let took = self.min_took.take();
        let reached = self.reached.replace(false);
        // Slowness counts from its second interval in a row: a stall shorter than that
        // (the SQLite writer's WAL checkpoint) passes without refusing anyone.
        let slow = self.slower_than_usual(took, reached);
        let slow = if self.was_slow.replace(slow > self.stats.target) {
            slow
        } else {
            Duration::ZERO
        };
        let delay = lag.max(slow);
        let (target, ceiling) = (self.stats.target, self.stats.ceiling);
        let limit = self.limit.get();
        let limit = if target.is_zero() {
            ceiling
        } else if delay > target {
            limit
                .saturating_sub((limit * 3 / 10).max(1))
                .max(MIN_LIMIT)
                .min(ceiling)
        } else if delay < target / 2 && reached {
            limit.saturating_add((limit / 4).max(2)).min(ceiling)
        } else {
            limit
        };
        self.limit.set(limit);
        self.publish_lag(lag);
        self.publish_took(took.unwrap_or(Duration::ZERO));
    }

    /// How much slower than usual this interval's shortest request was: when even the
    /// fastest request took longer than it usually does, every request waited behind
    /// a backlog further in (the database's own CPU, or its locks) that neither the lag
    /// nor the pool queues see. The usual time is the lowest seen, drifting up slowly
    /// (fast while the limit held nobody back), so a database that is simply further
    /// away sets its own usual time instead of counting as backlog.
    fn slower_than_usual(&self, took: Option<Duration>, limited: bool) -> Duration {
        let Some(took) = took else {
            return Duration::ZERO;
        };
        let usual = match self.usual_took.get() {
            Some(u) if u < took => {
                let n = if limited {
                    DRIFT_WHEN_LIMITED
                } else {
                    DRIFT_WHEN_FREE
                };
                u + (took - u) / n
            }
            _ => took,
        };
        self.usual_took.set(Some(usual));
        took.saturating_sub(usual)
    }

    fn publish(&self, delay: Duration) {
        self.publish_took(Duration::ZERO);
        self.publish_lag(delay);
    }

    fn publish_took(&self, took: Duration) {
        let Some(i) = self.slot else { return };
        if let Some(t) = self.stats.took_us.get(i) {
            t.store(
                u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
                Ordering::Relaxed,
            );
        }
    }

    fn publish_lag(&self, delay: Duration) {
        let Some(i) = self.slot else { return };
        if let (Some(l), Some(d)) = (self.stats.limits.get(i), self.stats.delays_us.get(i)) {
            l.store(
                u32::try_from(self.limit.get()).unwrap_or(u32::MAX - 1),
                Ordering::Relaxed,
            );
            d.store(
                u32::try_from(delay.as_micros()).unwrap_or(u32::MAX),
                Ordering::Relaxed,
            );
        }
    }

    /// Count one more request in progress, or `false` (counted as shed) at the limit.
    fn take(&self) -> bool {
        if self.in_flight.get() >= self.limit.get() {
            self.reached.set(true);
            self.stats.shed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.in_flight.set(self.in_flight.get() + 1);
        if self.in_flight.get() >= self.limit.get() {
            self.reached.set(true);
        }
        true
    }

    /// Take a place for a new request, or `None` (counted as shed) at the limit.
    fn enter(self: &Rc<Self>) -> Option<Rc<Place>> {
        if !self.take() {
            return None;
        }
        Some(Rc::new(Place {
            door: self.clone(),
            entered: Cell::new(Instant::now()),
            released: Cell::new(false),
        }))
    }
}

/// The probe: sleeps, measures how late it woke, feeds the door. Ends with the door.
async fn probe(door: Weak<Door>) {
    loop {
        let start = Instant::now();
        actix_web::rt::time::sleep(PROBE_EVERY).await;
        let Some(door) = door.upgrade() else { return };
        let now = Instant::now();
        let late = now
            .saturating_duration_since(start)
            .saturating_sub(PROBE_EVERY);
        door.record_lag(late, now);
    }
}

/// Paths never refused at the door: the probes and the metrics.
fn exempt(path: &str) -> bool {
    matches!(path, "/livez" | "/readyz" | "/metrics")
}

/// Middleware (outermost: before routing, authentication and the access line, so a
/// refusal costs no MAC, no body read and no log write; it is counted in
/// `coordinator_db_shed_total{queue="http"}`).
pub async fn door<B: MessageBody + 'static>(
    door: Rc<Door>,
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    if exempt(req.path()) {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    }
    if !door.stats.target.is_zero() && !door.probing.replace(true) {
        // First request on this worker: its runtime is running, start the probe here.
        actix_web::rt::spawn(probe(Rc::downgrade(&door)));
    }
    let Some(place) = door.enter() else {
        // Answer on the next poll, not this one: by then the connection has taken in
        // the rest of a request body that already arrived. A response sent while the
        // body is unread makes actix close the connection, and a client that has to
        // reconnect after every refusal costs both sides a TCP handshake, more than
        // the refusal itself. (A body still on its way still closes it.)
        actix_web::rt::task::yield_now().await;
        // The refusal carries a request id as every other answer does (the access
        // middleware, which stamps the others, runs inside the door).
        let rid = crate::request_id::RequestId::from_header(
            req.headers().get(crate::request_id::REQUEST_ID_HEADER),
        );
        let mut res = req.error_response(ApiError::Overloaded("server busy"));
        rid.stamp(res.headers_mut());
        return Ok(res);
    };
    req.extensions_mut().insert(PlaceRef(place.clone()));
    let _place = ReleaseOnDrop(place);
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::dev::Service;
    use actix_web::test as atest;
    use actix_web::{middleware, web, App, HttpRequest, HttpResponse};
    use tokio::sync::Notify;

    const TARGET: Duration = Duration::from_millis(10);

    /// Feed `n` intervals whose delay is `d`, the limit reached in each or not.
    fn intervals(door: &Door, n: usize, d: Duration, reached: bool, t: &mut Instant) {
        for _ in 0..n {
            door.reached.set(reached);
            *t += INTERVAL;
            door.record_lag(d, *t);
        }
    }

    #[test]
    fn limit_shrinks_while_delayed_and_grows_back_when_reached() {
        let stats = DoorStats::new(TARGET, 32);
        let door = Door::new(stats.clone());
        let mut t = Instant::now();
        intervals(&door, 3, Duration::from_millis(1), true, &mut t);
        assert_eq!(door.limit(), 32, "never above the ceiling");
        intervals(&door, 1, TARGET * 3, true, &mut t);
        assert_eq!(door.limit(), 23, "32 less 30 %");
        intervals(&door, 50, TARGET * 3, true, &mut t);
        assert_eq!(door.limit(), MIN_LIMIT, "floor");
        assert_eq!(stats.limit(), 2);
        assert_eq!(stats.delay(), TARGET * 3);
        // Between half the target and the target: held.
        intervals(&door, 5, TARGET * 3 / 4, true, &mut t);
        assert_eq!(door.limit(), MIN_LIMIT);
        // Fast, but the limit was not what held requests back: no reason to grow.
        intervals(&door, 5, Duration::ZERO, false, &mut t);
        assert_eq!(door.limit(), MIN_LIMIT);
        intervals(&door, 3, Duration::ZERO, true, &mut t);
        assert_eq!(door.limit(), 8, "2 → 4 → 6 → 8");
        intervals(&door, 20, Duration::ZERO, true, &mut t);
        assert_eq!(door.limit(), 32);
    }

    /// Feed `n` intervals without lag whose shortest admitted request took `took`.
    fn requests(door: &Door, n: usize, took: Duration, reached: bool, t: &mut Instant) {
        for _ in 0..n {
            door.min_took.set(Some(took));
            door.reached.set(reached);
            *t += INTERVAL;
            door.record_lag(Duration::ZERO, *t);
        }
    }

    #[test]
    fn every_request_slower_than_usual_shrinks_the_limit_and_a_farther_database_does_not() {
        let stats = DoorStats::new(TARGET, 32);
        let door = Door::new(stats.clone());
        let mut t = Instant::now();
        let usual = Duration::from_millis(2);
        requests(&door, 5, usual, true, &mut t);
        assert_eq!(door.limit(), 32);
        // One interval where even the fastest request waited longer than usual: a
        // stall, not yet a backlog.
        requests(&door, 1, usual + TARGET * 3, true, &mut t);
        assert_eq!(door.limit(), 32, "one slow interval refused");
        requests(&door, 1, usual, true, &mut t);
        // Two in a row (a backlog inside the database; the event loop is idle):
        // shrink, as for lag.
        requests(&door, 2, usual + TARGET * 3, true, &mut t);
        assert_eq!(door.limit(), 23, "32 less 30 %");
        assert_eq!(stats.shortest_request(), usual + TARGET * 3);
        // While overloaded (the limit reached), the usual time barely moves: a few
        // seconds of slow intervals keep shrinking the limit to the floor.
        requests(&door, 30, usual + TARGET * 3, true, &mut t);
        assert_eq!(door.limit(), MIN_LIMIT);
        // Back to the usual time: grows again.
        requests(&door, 20, usual, true, &mut t);
        assert_eq!(door.limit(), 32);
        // A database that became farther away for good, while nothing was held back:
        // the usual time follows within a few seconds (the limit, unused meanwhile,
        // shrinks and grows back), and from then on it is not backlog.
        let farther = usual + TARGET * 4;
        requests(&door, 100, farther, false, &mut t);
        requests(&door, 20, farther, true, &mut t);
        assert_eq!(door.limit(), 32);
        requests(&door, 50, farther, true, &mut t);
        assert_eq!(door.limit(), 32, "a slower baseline counted as backlog");
        // An interval without a finished request says nothing.
        door.min_took.set(None);
        t += INTERVAL;
        door.record_lag(Duration::ZERO, t);
        assert_eq!(door.limit(), 32);
    }

    #[test]
    fn one_fast_wakeup_in_an_interval_means_no_backlog() {
        let door = Door::new(DoorStats::new(TARGET, 32));
        let mut t = Instant::now();
        for i in 0..9 {
            door.record_lag(TARGET * 5, t + Duration::from_millis(i * 10));
        }
        t += INTERVAL;
        door.record_lag(TARGET * 5, t);
        assert_eq!(door.limit(), 23, "a whole interval late: shrink");
        for i in 0..9 {
            door.record_lag(TARGET * 5, t + Duration::from_millis(i * 10));
        }
        door.record_lag(Duration::from_millis(1), t + Duration::from_millis(95));
        t += INTERVAL;
        door.record_lag(TARGET * 5, t);
        assert_eq!(
            door.limit(),
            23,
            "one wake-up on time in the interval: no backlog"
        );
    }

    #[test]
    fn a_zero_target_keeps_the_ceiling() {
        let door = Door::new(DoorStats::new(Duration::ZERO, 5));
        let mut t = Instant::now();
        intervals(&door, 60, Duration::from_secs(1), true, &mut t);
        assert_eq!(door.limit(), 5);
    }

    /// (status, Retry-After, body) of an answer.
    async fn parts(resp: ServiceResponse) -> (u16, Option<String>, String) {
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = String::from_utf8_lossy(&atest::read_body(resp).await).into_owned();
        (status, retry, body)
    }

    /// With a ceiling of 2: two requests held in a handler, the third is refused at
    /// once (503 problem, `Retry-After`, never reaching the handler) while the probes
    /// still answer; a claim that waits by design gives its place back; once the held
    /// requests end, requests are admitted again.
    #[test]
    fn a_request_waiting_for_its_body_holds_no_place_and_takes_one_again() {
        let stats = DoorStats::new(TARGET, 2);
        let door = Door::new(stats.clone());
        let slow = door.enter().expect("first place");
        let _other = door.enter().expect("second place");
        assert!(door.enter().is_none(), "at the limit");
        // Waiting for its body: the place is free for another request, and the
        // header checks alone do not count as the interval's shortest request.
        assert!(slow.give_back());
        assert_eq!(door.in_flight.get(), 1);
        assert_eq!(door.min_took.get(), None);
        let third = door.enter().expect("the freed place");
        // The body arrived while the worker is full: refused, counted as shed.
        let shed = stats.shed.load(Ordering::Relaxed);
        assert!(!slow.back_in());
        assert_eq!(stats.shed.load(Ordering::Relaxed), shed + 1);
        // Room again: it takes a place, and giving it back counts its time.
        assert!(third.release());
        assert!(slow.back_in());
        assert_eq!(door.in_flight.get(), 2);
        assert!(slow.back_in(), "holding a place already: kept");
        assert_eq!(door.in_flight.get(), 2);
        assert!(slow.release());
        assert!(!slow.release(), "given back once");
        assert_eq!(door.in_flight.get(), 1);
    }

    #[actix_web::test]
    async fn past_the_limit_a_request_is_refused_at_once_before_the_handler() {
        let stats = DoorStats::new(TARGET, 2);
        let door = Door::new(stats.clone());
        let gate = Rc::new(Notify::new());
        let hits = Rc::new(Cell::new(0u32));
        let (g1, g2, h) = (gate.clone(), gate.clone(), hits.clone());
        let app = Rc::new(
            atest::init_service(
                App::new()
                    .route(
                        "/hold",
                        web::get().to(move || {
                            let g = g1.clone();
                            async move {
                                g.notified().await;
                                HttpResponse::Ok().finish()
                            }
                        }),
                    )
                    .route(
                        "/wait",
                        web::get().to(move |req: HttpRequest| {
                            let g = g2.clone();
                            async move {
                                waits_by_design(&req);
                                g.notified().await;
                                HttpResponse::Ok().finish()
                            }
                        }),
                    )
                    .route(
                        "/work",
                        web::get().to(move || {
                            h.set(h.get() + 1);
                            async { HttpResponse::Ok().finish() }
                        }),
                    )
                    .route("/livez", web::get().to(HttpResponse::Ok))
                    .wrap(middleware::from_fn(move |req, next| {
                        super::door(door.clone(), req, next)
                    })),
            )
            .await,
        );
        let get = |path: &str| atest::TestRequest::get().uri(path).to_request();
        // A waiting claim first: it leaves the count as soon as it starts waiting.
        let waiting = {
            let app = app.clone();
            let req = get("/wait");
            actix_web::rt::spawn(async move { app.call(req).await.map(|r| r.status()) })
        };
        let held: Vec<_> = (0..2)
            .map(|_| {
                let app = app.clone();
                let req = get("/hold");
                actix_web::rt::spawn(async move { app.call(req).await.map(|r| r.status()) })
            })
            .collect();
        // Let the three reach their handlers.
        for _ in 0..10 {
            actix_web::rt::task::yield_now().await;
        }
        let (status, retry, body) = parts(app.call(get("/work")).await.expect("answer")).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(body.contains("overloaded"), "{body}");
        assert_eq!(hits.get(), 0, "a refused request reached its handler");
        assert_eq!(stats.shed(), 1);
        for _ in 0..5 {
            let (status, _, _) = parts(app.call(get("/livez")).await.expect("answer")).await;
            assert_eq!(status, 200, "a probe was refused");
        }
        gate.notify_waiters();
        for h in held {
            assert_eq!(h.await.expect("task").expect("answer").as_u16(), 200);
        }
        assert_eq!(waiting.await.expect("task").expect("answer").as_u16(), 200);
        for _ in 0..5 {
            let (status, _, _) = parts(app.call(get("/work")).await.expect("answer")).await;
            assert_eq!(status, 200);
        }
        assert_eq!(hits.get(), 5);
        assert_eq!(stats.shed(), 1);
    }
}
