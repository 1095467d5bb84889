//! Database health as one shared state per instance: healthy, failing or probing.
//!
//! The first failed connection attempt or lost connection trips the state from healthy
//! to failing. While it is not healthy, every request that needs the database is
//! refused at once (503 + `Retry-After`) instead of each one waiting out the pool's
//! connect timeout. One background probe thread per instance, with exponential backoff,
//! opens a fresh connection; when that works the state is healthy again and traffic
//! flows. Connections opened before a trip are checked once before their next use
//! (see [`DbHealth::epoch`]), so a pool full of dead sessions cannot trip it again.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::StoreError;

/// First wait before probing, doubled after each failed probe up to [`PROBE_MAX`].
pub const PROBE_MIN: Duration = Duration::from_millis(50);
/// Longest wait between probes: bounds the recovery time once the database is back.
pub const PROBE_MAX: Duration = Duration::from_millis(500);
/// A trip this soon after a recovery resumes the backoff where it stopped (a database
/// that answers a probe but fails real work must not be hammered every 50 ms).
const FLAP_WINDOW: Duration = Duration::from_secs(5);

/// The three states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    /// Requests go to the database.
    Healthy = 0,
    /// Tripped: requests are refused; the probe is waiting out its backoff.
    Failing = 1,
    /// Tripped: requests are refused; the probe is connecting right now.
    Probing = 2,
}

impl From<DbState> for u8 {
    fn from(s: DbState) -> u8 {
        match s {
            DbState::Healthy => 0,
            DbState::Failing => 1,
            DbState::Probing => 2,
        }
    }
}

impl DbState {
    fn from_u8(v: u8) -> DbState {
        match v {
            0 => DbState::Healthy,
            1 => DbState::Failing,
            _ => DbState::Probing,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DbState::Healthy => "healthy",
            DbState::Failing => "failing",
            DbState::Probing => "probing",
        }
    }
}

/// How the probe checks the database: open a fresh connection and run a query.
pub type ProbeFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

struct Timeline {
    tripped_at: Option<Instant>,
    recovered_at: Option<Instant>,
    /// The backoff the last probe sequence ended with.
    last_backoff: Duration,
}

/// The shared state (one per `Db`, so one per application instance).
pub struct DbHealth {
    state: AtomicU8,
    /// Incremented at every trip; connections remember the epoch they were opened or
    /// last checked in.
    epoch: AtomicU64,
    trips: AtomicU64,
    timeline: Mutex<Timeline>,
    probe: ProbeFn,
}

impl DbHealth {
    pub fn new(probe: ProbeFn) -> Arc<DbHealth> {
        Arc::new(DbHealth {
            state: AtomicU8::new(u8::from(DbState::Healthy)),
            epoch: AtomicU64::new(0),
            trips: AtomicU64::new(0),
            timeline: Mutex::new(Timeline {
                tripped_at: None,
                recovered_at: None,
                last_backoff: PROBE_MIN,
            }),
            probe,
        })
    }

    pub fn state(&self) -> DbState {
        DbState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn is_healthy(&self) -> bool {
        self.state() == DbState::Healthy
    }

    /// The current epoch (see the module documentation).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// How many times the state has left healthy since start.
    pub fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// `Ok` when requests may use the database; the fast 503 otherwise.
    pub fn admit(&self) -> Result<(), StoreError> {
        match self.state() {
            DbState::Healthy => Ok(()),
            s => Err(StoreError::Unavailable(format!(
                "database {} (refused without trying)",
                s.as_str()
            ))),
        }
    }

    /// Report a failure seen on a connection of `seen_epoch` (`None`: a connection
    /// attempt, always current). A failure on a connection older than the last trip says
    /// nothing new and is ignored. The first report trips the state and starts the probe.
    pub fn trip(self: &Arc<Self>, seen_epoch: Option<u64>, why: &str) {
        if seen_epoch.is_some_and(|e| e != self.epoch()) {
            return;
        }
        if self
            .state
            .compare_exchange(
                u8::from(DbState::Healthy),
                u8::from(DbState::Failing),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return;
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.trips.fetch_add(1, Ordering::Relaxed);
        let start = match self.timeline.lock() {
            Ok(mut t) => {
                t.tripped_at = Some(Instant::now());
                match t.recovered_at {
                    Some(r) if r.elapsed() < FLAP_WINDOW => t.last_backoff,
                    _ => PROBE_MIN,
                }
            }
            Err(_) => PROBE_MIN,
        };
        log::warn!("database marked failing, probing in the background: {why}");
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("db-probe".into())
            .spawn(move || probe_loop(&weak, start));
        if let Err(e) = spawned {
            // Without a probe nothing would ever let traffic through again.
            log::error!("cannot start the database probe ({e}); staying healthy");
            self.state
                .store(u8::from(DbState::Healthy), Ordering::Release);
        }
    }

    /// Mark healthy (the probe succeeded).
    fn recover(&self, backoff: Duration) {
        let down_for = match self.timeline.lock() {
            Ok(mut t) => {
                t.recovered_at = Some(Instant::now());
                t.last_backoff = backoff;
                t.tripped_at.map(|a| a.elapsed())
            }
            Err(_) => None,
        };
        self.state
            .store(u8::from(DbState::Healthy), Ordering::Release);
        log::info!(
            "database reachable again after {:.3} s; letting traffic through",
            down_for.unwrap_or_default().as_secs_f64()
        );
    }
}

/// The one probe of a trip: sleep, try, double the sleep, until the database answers.
/// Ends early when the `Db` is gone (the application stopped during an outage).
fn probe_loop(health: &Weak<DbHealth>, start: Duration) {
    let mut backoff = start;
    loop {
        std::thread::sleep(backoff);
        let Some(h) = health.upgrade() else { return };
        h.state.store(u8::from(DbState::Probing), Ordering::Release);
        match (h.probe)() {
            Ok(()) => {
                h.recover(backoff);
                return;
            }
            Err(e) => {
                log::debug!("database probe failed: {e}");
                h.state.store(u8::from(DbState::Failing), Ordering::Release);
                backoff = (backoff * 2).min(PROBE_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn wait_for(h: &DbHealth, want: DbState) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if h.state() == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn trips_once_probes_and_recovers() {
        let up = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicU64::new(0));
        let (u, p) = (up.clone(), probes.clone());
        let h = DbHealth::new(Box::new(move || {
            p.fetch_add(1, Ordering::SeqCst);
            if u.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("down".into())
            }
        }));
        assert!(h.admit().is_ok());
        let e0 = h.epoch();
        h.trip(Some(e0), "test");
        assert!(h.admit().is_err(), "refused at once after the trip");
        // A second report of the same outage, and one from a stale connection, change
        // nothing.
        h.trip(Some(e0), "again");
        h.trip(None, "connect");
        assert_eq!(h.trips(), 1);
        assert_eq!(h.epoch(), e0 + 1);
        // The probe keeps trying while the database is down.
        let until = Instant::now() + Duration::from_secs(10);
        while probes.load(Ordering::SeqCst) < 2 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(probes.load(Ordering::SeqCst) >= 2);
        assert!(h.admit().is_err());
        up.store(true, Ordering::SeqCst);
        assert!(
            wait_for(&h, DbState::Healthy),
            "recovers once the probe works"
        );
        assert!(h.admit().is_ok());
        // A failure on a connection from before the trip does not trip again.
        h.trip(Some(e0), "stale");
        assert!(h.is_healthy());
        assert_eq!(h.trips(), 1);
    }

    #[test]
    fn probe_stops_when_the_owner_is_gone() {
        let probes = Arc::new(AtomicU64::new(0));
        let p = probes.clone();
        let h = DbHealth::new(Box::new(move || {
            p.fetch_add(1, Ordering::SeqCst);
            Err("down".into())
        }));
        h.trip(None, "test");
        drop(h);
        std::thread::sleep(PROBE_MIN * 4);
        let n = probes.load(Ordering::SeqCst);
        std::thread::sleep(PROBE_MAX * 2);
        assert_eq!(probes.load(Ordering::SeqCst), n, "no probes after the drop");
    }
}
