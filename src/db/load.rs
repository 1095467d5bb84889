//! Load shedding in front of the pools: a bounded number of operations may wait for or
//! hold a connection (past it, 503 at once), each request carries a deadline after
//! which it is not sent to the database, and work whose client has gone is dropped
//! before it starts.

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
}

impl Shed {
    pub const ALL: [Shed; 4] = [Shed::Full, Shed::Deadline, Shed::Unavailable, Shed::Gone];

    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Full => "full",
            Shed::Deadline => "deadline",
            Shed::Unavailable => "unavailable",
            Shed::Gone => "client_gone",
        }
    }
}

/// The admission bound of one pool.
pub struct Gate {
    pub name: &'static str,
    limit: usize,
    /// Admitted and not finished: waiting for a connection or using one.
    depth: AtomicUsize,
    shed: [AtomicU64; 4],
}

/// One admitted operation; leaving drops the depth.
pub struct Permit(Arc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.depth.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn new(name: &'static str, connections: u32) -> Arc<Gate> {
        let per = usize::try_from(connections).unwrap_or(1);
        Arc::new(Gate {
            name,
            limit: per
                .saturating_mul(QUEUE_PER_CONNECTION)
                .max(QUEUE_MIN)
                .saturating_add(per),
            depth: AtomicUsize::new(0),
            shed: Default::default(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    fn shed_counter(&self, why: Shed) -> &AtomicU64 {
        let [full, deadline, unavailable, gone] = &self.shed;
        match why {
            Shed::Full => full,
            Shed::Deadline => deadline,
            Shed::Unavailable => unavailable,
            Shed::Gone => gone,
        }
    }

    /// How many operations were refused for this reason.
    pub fn shed_count(&self, why: Shed) -> u64 {
        self.shed_counter(why).load(Ordering::Relaxed)
    }

    pub fn count_shed(&self, why: Shed) {
        self.shed_counter(why).fetch_add(1, Ordering::Relaxed);
    }

    /// Admit one operation, or refuse it at once when the bound is reached.
    pub fn enter(self: &Arc<Self>) -> Result<Permit, StoreError> {
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
                Ok(_) => return Ok(Permit(self.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

tokio::task_local! {
    /// The instant after which the current request is no longer sent to the database.
    static DEADLINE: Instant;
}

/// The current request's deadline, if the request runs under [`deadline`].
pub fn current_deadline() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Run `f` with this deadline (tests and callers outside a request).
pub async fn with_deadline<F: std::future::Future>(at: Instant, f: F) -> F::Output {
    DEADLINE.scope(at, f).await
}

/// Middleware (outermost): stamp the request with `now + request_deadline`, measured
/// from its arrival, so time spent queued in front of authentication counts too.
pub async fn deadline(
    budget: Duration,
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    DEADLINE
        .scope(Instant::now() + budget, next.call(req))
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
    fn cancel_flag_is_set_only_when_dropped_unfinished() {
        let (c, gone) = CancelOnDrop::new();
        c.finish();
        assert!(!gone.load(Ordering::Acquire));
        let (c, gone) = CancelOnDrop::new();
        drop(c);
        assert!(gone.load(Ordering::Acquire));
    }
}
