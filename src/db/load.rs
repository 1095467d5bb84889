//! Load shedding in front of the pools: a bounded number of operations may wait for or
//! hold a connection (past it, 503 at once), a queue that stays slow is refused new
//! work until it drains (below), each request carries a deadline after which it is not
//! sent to the database, and work whose client has gone is dropped before it starts.
//!
//! A bound on the *number* waiting alone does not bound the *time* waiting: at twice
//! the rate a database can take, a queue of a few hundred fills and every admitted
//! request waits its full length. So each gate also watches how long operations waited
//! for their turn (a connection, or the SQLite writer), in the manner of CoDel: when
//! even the shortest wait of a whole interval was above the target, a standing queue
//! has formed, and while the queue is also at least a quarter full new arrivals are
//! refused (503, reason `queue_delay`) until an interval passes whose shortest wait is
//! below the target again. Bursts that drain within an interval are never refused, nor
//! are a few writers waiting on one hot row.
//!
//! A pool's operations wait for a *turn* (one per pooled connection, handed out in
//! arrival order by an async semaphore) before they take a blocking thread and a
//! connection. So a waiting operation holds no thread, and its wait is the real one:
//! r2d2 itself lets a new arrival take a returned connection before a waiter wakes,
//! which kept some waits near zero however long the queue. A pool's queue counts as
//! standing when every turn is taken and the shortest wait of an interval was above
//! [`TURN_DELAY_TARGET`]; a few writers behind one hot row wait holding their turns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::Error;

use crate::error::StoreError;

/// Operations that may wait for a connection, per pooled connection.
pub const QUEUE_PER_CONNECTION: usize = 32;
/// ... and at least this many, so a one-connection SQLite write pool still absorbs a
/// burst.
pub const QUEUE_MIN: usize = 64;

/// Why an operation was refused without reaching the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The queue was at its bound.
    Full,
    /// The request's deadline passed before it reached the database.
    Deadline,
    /// The database is failing (the health state refused it).
    Unavailable,
    /// The client went away before the work started.
    Gone,
    /// Operations have been waiting longer than the target for a whole interval.
    Delay,
}

impl Shed {
    pub const ALL: [Shed; 5] = [
        Shed::Full,
        Shed::Deadline,
        Shed::Unavailable,
        Shed::Gone,
        Shed::Delay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Full => "full",
            Shed::Deadline => "deadline",
            Shed::Unavailable => "unavailable",
            Shed::Gone => "client_gone",
            Shed::Delay => "queue_delay",
        }
    }
}

/// A wait every operation of a whole interval exceeded means a standing queue.
pub const DELAY_TARGET: Duration = Duration::from_millis(50);
/// The same for a pool's turns (below): their waits are first come, first served, so
/// a whole interval above this is a queue of arrivals the pool cannot serve, never a
/// few writers behind one hot row (those wait holding their turn).
pub const TURN_DELAY_TARGET: Duration = Duration::from_millis(10);
/// The interval over which the shortest wait is taken.
pub const DELAY_INTERVAL: Duration = Duration::from_millis(200);

/// The admission bound of one pool.
pub struct Gate {
    pub name: &'static str,
    limit: usize,
    /// A pool's turns, one per pooled connection, handed out in arrival order. r2d2
    /// lets a new arrival take a returned connection before a waiter wakes, and each
    /// waiter would hold a blocking thread; waiting for a turn instead is an async wait
    /// in arrival order, so the delay watch sees every operation's real wait. `None`
    /// for a queue that is not a pool's (the SQLite writer's).
    turns: Option<Arc<tokio::sync::Semaphore>>,
    /// Admitted and not finished: waiting for a connection or using one.
    depth: AtomicUsize,
    shed: [AtomicU64; 5],
    delay: DelayWatch,
}

/// The shortest wait of the current interval, and whether the last complete interval's
/// shortest wait was above the target.
struct DelayWatch {
    epoch: Instant,
    /// Start of the current interval, µs since `epoch`.
    window_start: AtomicU64,
    /// Shortest wait recorded in it, µs (`u64::MAX`: none yet).
    min_wait: AtomicU64,
    /// The last complete interval's shortest wait, µs (0: none, or no waits in it).
    last_min: AtomicU64,
    congested: AtomicBool,
    target: Duration,
}

impl DelayWatch {
    fn new(target: Duration) -> Self {
        DelayWatch {
            target,
            epoch: Instant::now(),
            window_start: AtomicU64::new(0),
            min_wait: AtomicU64::new(u64::MAX),
            last_min: AtomicU64::new(0),
            congested: AtomicBool::new(false),
        }
    }

    fn micros(d: Duration) -> u64 {
        u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
    }

    /// Close the interval when it is over: congested when it saw waits and the
    /// shortest was above the target. An interval without any (everything was refused
    /// or idle) ends congestion.
    fn tick(&self) {
        let now = Self::micros(self.epoch.elapsed());
        let start = self.window_start.load(Ordering::Acquire);
        if now.saturating_sub(start) < Self::micros(DELAY_INTERVAL) {
            return;
        }
        if self
            .window_start
            .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let min = self.min_wait.swap(u64::MAX, Ordering::AcqRel);
            // Samples of an interval that ended long ago say nothing about the queue now.
            let stale = now.saturating_sub(start) >= 2 * Self::micros(DELAY_INTERVAL);
            let min = if stale || min == u64::MAX { 0 } else { min };
            self.last_min.store(min, Ordering::Release);
            self.congested
                .store(min > Self::micros(self.target), Ordering::Release);
        }
    }

    fn record(&self, waited: Duration) {
        self.tick();
        self.min_wait
            .fetch_min(Self::micros(waited), Ordering::AcqRel);
    }

    fn congested(&self) -> bool {
        self.tick();
        self.congested.load(Ordering::Acquire)
    }

    /// The shortest wait of the last complete interval; zero when it saw no waits or
    /// ended long ago (nothing has waited since).
    fn standing(&self) -> Duration {
        self.tick();
        Duration::from_micros(self.last_min.load(Ordering::Acquire))
    }
}

/// One admitted operation; leaving drops the depth.
pub struct Permit {
    gate: Arc<Gate>,
    admitted: Instant,
}

impl Permit {
    /// The operation got its turn: record how long it waited since admission.
    pub fn started(&self) {
        self.gate.record_wait(self.admitted.elapsed());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.depth.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn new(name: &'static str, connections: u32) -> Arc<Gate> {
        let per = usize::try_from(connections).unwrap_or(1).max(1);
        Arc::new(Gate {
            name,
            limit: per
                .saturating_mul(QUEUE_PER_CONNECTION)
                .max(QUEUE_MIN)
                .saturating_add(per),
            turns: Some(Arc::new(tokio::sync::Semaphore::new(per))),
            depth: AtomicUsize::new(0),
            shed: Default::default(),
            delay: DelayWatch::new(TURN_DELAY_TARGET),
        })
    }

    /// A gate with an explicit bound (a queue that is not a pool's).
    pub fn bounded(name: &'static str, limit: usize) -> Arc<Gate> {
        Arc::new(Gate {
            name,
            limit,
            turns: None,
            depth: AtomicUsize::new(0),
            shed: Default::default(),
            delay: DelayWatch::new(DELAY_TARGET),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The pool's turns (see the field), if this gate is a pool's.
    pub fn turns(&self) -> Option<&Arc<tokio::sync::Semaphore>> {
        self.turns.as_ref()
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    fn shed_counter(&self, why: Shed) -> &AtomicU64 {
        let [full, deadline, unavailable, gone, delay] = &self.shed;
        match why {
            Shed::Full => full,
            Shed::Deadline => deadline,
            Shed::Unavailable => unavailable,
            Shed::Gone => gone,
            Shed::Delay => delay,
        }
    }

    /// How many operations were refused for this reason.
    pub fn shed_count(&self, why: Shed) -> u64 {
        self.shed_counter(why).load(Ordering::Relaxed)
    }

    pub fn count_shed(&self, why: Shed) {
        self.shed_counter(why).fetch_add(1, Ordering::Relaxed);
    }

    /// How long an admitted operation waited for its turn (a connection, or the
    /// SQLite writer).
    pub fn record_wait(&self, waited: Duration) {
        self.delay.record(waited);
    }

    /// The standing queue: the shortest wait for a turn over the last interval (zero
    /// when nothing waited), for `/metrics`.
    pub fn standing_wait(&self) -> Duration {
        self.delay.standing()
    }

    /// Admit one operation, or refuse it at once when the bound is reached or a
    /// standing queue has formed.
    pub fn enter(self: &Arc<Self>) -> Result<Permit, StoreError> {
        // A slow queue alone is not overload (one hot row makes a few writers wait):
        // refuse only while it is also a quarter full, or for a pool's turns, while
        // every turn is taken (its waits are for a turn, never behind a row).
        let queued = match &self.turns {
            Some(t) => t.available_permits() == 0,
            None => self.depth() >= self.limit / 4,
        };
        if queued && self.delay.congested() {
            self.count_shed(Shed::Delay);
            return Err(StoreError::Overloaded("database queue too slow"));
        }
        let mut cur = self.depth.load(Ordering::Acquire);
        loop {
            if cur >= self.limit {
                self.count_shed(Shed::Full);
                return Err(StoreError::Overloaded("database queue full"));
            }
            match self.depth.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Permit {
                        gate: self.clone(),
                        admitted: Instant::now(),
                    })
                }
                Err(now) => cur = now,
            }
        }
    }
}

tokio::task_local! {
    /// The instant after which the current request is no longer sent to the database.
    static DEADLINE: std::cell::Cell<Instant>;
}

/// The current request's deadline, if the request runs under [`deadline`].
pub fn current_deadline() -> Option<Instant> {
    DEADLINE.try_with(std::cell::Cell::get).ok()
}

/// Run `f` with this deadline (tests and callers outside a request).
pub async fn with_deadline<F: std::future::Future>(at: Instant, f: F) -> F::Output {
    DEADLINE.scope(std::cell::Cell::new(at), f).await
}

/// Move the current request's deadline later by `by`: the time its body took to arrive
/// before the request could be verified. A body on its way is no work of the server's,
/// so a slow upload must not use up the budget meant for waiting on the database (a
/// review saw every signed 200 KB create at 50 KB/s answered 503 `overloaded`, which a
/// client retries on the same slow link for ever).
pub fn extend_deadline(by: Duration) {
    let _ = DEADLINE.try_with(|d| d.set(d.get() + by));
}

/// Middleware (outermost): stamp the request with `now + request_deadline`, measured
/// from its arrival, so time spent queued in front of authentication counts too.
pub async fn deadline(
    budget: Duration,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    DEADLINE
        .scope(
            std::cell::Cell::new(Instant::now() + budget),
            next.call(req),
        )
        .await
}

/// Set when the future awaiting a database operation is dropped (the client went away
/// and actix dropped the handler): the blocking side then skips work not yet started.
pub struct CancelOnDrop {
    gone: Arc<AtomicBool>,
    done: bool,
}

impl CancelOnDrop {
    pub fn new() -> (CancelOnDrop, Arc<AtomicBool>) {
        let gone = Arc::new(AtomicBool::new(false));
        (
            CancelOnDrop {
                gone: gone.clone(),
                done: false,
            },
            gone,
        )
    }

    pub fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.gone.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_refuses_past_its_bound_and_counts() {
        let g = Gate::new("write", 1);
        assert_eq!(g.limit(), QUEUE_MIN + 1);
        let permits: Vec<Permit> = (0..g.limit())
            .map(|_| g.enter().expect("admitted"))
            .collect();
        assert_eq!(g.depth(), g.limit());
        assert!(matches!(g.enter(), Err(StoreError::Overloaded(_))));
        assert_eq!(g.shed_count(Shed::Full), 1);
        drop(permits);
        assert_eq!(g.depth(), 0);
        assert!(g.enter().is_ok());
    }

    #[test]
    fn a_standing_queue_refuses_arrivals_until_an_interval_drains_it() {
        let g = Gate::bounded("write", QUEUE_MIN);
        // A burst: one long wait among short ones never congests.
        g.record_wait(DELAY_TARGET * 4);
        g.record_wait(Duration::from_millis(1));
        std::thread::sleep(DELAY_INTERVAL + Duration::from_millis(20));
        assert!(g.enter().is_ok(), "a burst that drained was refused");
        // A whole interval of waits above the target, with a queue a quarter full:
        // refused, counted as queue_delay.
        let queued: Vec<Permit> = (0..g.limit() / 4)
            .map(|_| g.enter().expect("room"))
            .collect();
        g.record_wait(DELAY_TARGET * 2);
        g.record_wait(DELAY_TARGET + Duration::from_millis(1));
        std::thread::sleep(DELAY_INTERVAL + Duration::from_millis(20));
        assert!(matches!(g.enter(), Err(StoreError::Overloaded(_))));
        assert_eq!(g.shed_count(Shed::Delay), 1);
        // The same slow interval with a nearly empty queue (a hot row, not overload).
        drop(queued);
        assert!(g.enter().is_ok(), "refused with an empty queue");
        // The queue drained: an interval with only short waits (or none) admits again.
        let _queued: Vec<Permit> = (0..g.limit() / 4)
            .map(|_| g.enter().expect("room"))
            .collect();
        g.record_wait(Duration::from_millis(2));
        std::thread::sleep(DELAY_INTERVAL + Duration::from_millis(20));
        assert!(g.enter().is_ok(), "still refused after the queue drained");
        std::thread::sleep(DELAY_INTERVAL + Duration::from_millis(20));
        assert!(g.enter().is_ok(), "an interval without waits kept refusing");
    }

    #[test]
    fn a_pools_slow_turns_refuse_arrivals_only_while_every_turn_is_taken() {
        let g = Gate::new("pool", 2);
        let turns = g.turns().expect("a pool's gate has turns").clone();
        assert_eq!(turns.available_permits(), 2);
        // Whole intervals of waits for a turn above its target ...
        let slow = || {
            g.record_wait(TURN_DELAY_TARGET * 3);
            g.record_wait(TURN_DELAY_TARGET + Duration::from_millis(1));
            std::thread::sleep(DELAY_INTERVAL + Duration::from_millis(20));
        };
        slow();
        // ... with a turn free: nobody would wait behind the queue, admitted.
        let held = turns.clone().try_acquire_owned().expect("a free turn");
        assert!(g.enter().is_ok(), "refused with a turn free");
        // Every turn taken: refused, counted as queue_delay, whatever the depth.
        let held2 = turns.clone().try_acquire_owned().expect("a free turn");
        slow();
        assert_eq!(g.depth(), 0);
        assert!(matches!(g.enter(), Err(StoreError::Overloaded(_))));
        assert_eq!(g.shed_count(Shed::Delay), 1);
        // Waits at the writer's 50 ms target would be far over a turn's 10 ms one.
        assert!(TURN_DELAY_TARGET < DELAY_TARGET);
        drop((held, held2));
        assert!(g.enter().is_ok(), "refused with every turn free");
    }

    #[test]
    fn cancel_flag_is_set_only_when_dropped_unfinished() {
        let (c, gone) = CancelOnDrop::new();
        c.finish();
        assert!(!gone.load(Ordering::Acquire));
        let (c, gone) = CancelOnDrop::new();
        drop(c);
        assert!(gone.load(Ordering::Acquire));
    }
}
