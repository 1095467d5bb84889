//! Database health as one shared state per instance: healthy, failing or probing.
//!
//! The first failed connection attempt or lost connection trips the state from healthy
//! to failing. While it is not healthy, every request that needs the database is
//! refused at once (503 + `Retry-After`) instead of each one waiting out the pool's
//! connect timeout. One background probe thread per instance, with exponential backoff,
//! opens a fresh connection; when that works the state is healthy again and traffic
//! flows. Connections opened before a trip are checked once before their next use
//! (see [`DbHealth::epoch`]), so a pool full of dead sessions cannot trip it again.
//!
//! A database can also stop answering without refusing anything (a network partition,
//! a hung host): connections stay open and every query waits. On PostgreSQL a watch
//! thread ([`DbHealth::watch_for_stalls`]) counts the operations under way (request
//! work and the group-commit threads, not housekeeping). When operations have been under
//! way for [`STALL_AFTER`] without one of them finishing, it asks the probe: a fresh
//! connection that answers within [`SUSPECT_WAIT`] means the database is up and the
//! work waits on something else (another session's lock), and nothing changes; one that
//! fails or does not answer trips the state.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::StoreError;

/// First wait before probing, doubled after each failed probe up to [`PROBE_MAX`].
pub const PROBE_MIN: Duration = Duration::from_millis(50);
/// Longest wait between probes: bounds the recovery time once the database is back.
pub const PROBE_MAX: Duration = Duration::from_millis(500);
/// Operations under way this long with none finishing: the database may have stopped
/// answering, and the probe is asked.
pub const STALL_AFTER: Duration = Duration::from_secs(1);
/// How long the probe may take to answer when a stall is suspected; no answer trips
/// the state. With [`STALL_AFTER`], a stall is found within about 2 s, before the
/// default per-request deadline (3 s) of the requests waiting behind it.
pub const SUSPECT_WAIT: Duration = Duration::from_secs(1);
/// How often the watch thread looks.
const WATCH_EVERY: Duration = Duration::from_millis(100);

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

/// At most one ERROR line a minute says the database is damaged.
const DAMAGE_LINE_EVERY_MS: u64 = 60_000;

/// The shared state (one per `Db`, so one per application instance).
pub struct DbHealth {
    state: AtomicU8,
    /// Incremented at every trip; connections remember the epoch they were opened or
    /// last checked in.
    epoch: AtomicU64,
    trips: AtomicU64,
    timeline: Mutex<Timeline>,
    probe: ProbeFn,
    /// A probe started on a suspected stall has not returned yet.
    suspect_probing: std::sync::atomic::AtomicBool,
    /// Out of service until a restart ([`DbHealth::retire`]): the probe never lets
    /// traffic through again.
    retired: std::sync::atomic::AtomicBool,
    /// Operations under way ([`DbHealth::under_way`]).
    under_way: AtomicU64,
    /// When one last finished, or started with none under way (ms since `born`).
    last_sign_ms: AtomicU64,
    /// When an ERROR line last said the database is damaged (ms since `born`, plus 1:
    /// 0 is never), see [`DbHealth::damage_line_due`].
    damage_said_ms: AtomicU64,
    born: Instant,
}

/// One database operation under way; finished when dropped.
pub struct UnderWay<'a>(&'a DbHealth);

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0
            .last_sign_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.under_way.fetch_sub(1, Ordering::AcqRel);
    }
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
            suspect_probing: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::atomic::AtomicBool::new(false),
            under_way: AtomicU64::new(0),
            last_sign_ms: AtomicU64::new(0),
            damage_said_ms: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Count one operation as under way until the guard is dropped (it should hold a
    /// connection and be doing the work, not waiting for a turn).
    pub fn under_way(&self) -> UnderWay<'_> {
        if self.under_way.fetch_add(1, Ordering::AcqRel) == 0 {
            // The first after a quiet spell: the quiet was no stall.
            self.last_sign_ms.store(self.now_ms(), Ordering::Release);
        }
        UnderWay(self)
    }

    /// How long operations have been under way without one finishing, when that is
    /// [`STALL_AFTER`] or more while healthy.
    fn stalled_for(&self) -> Option<(Duration, u64)> {
        if !self.is_healthy() {
            return None;
        }
        let n = self.under_way.load(Ordering::Acquire);
        if n == 0 {
            return None;
        }
        let quiet = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_sign_ms.load(Ordering::Acquire)),
        );
        (quiet >= STALL_AFTER).then_some((quiet, n))
    }

    /// One look of the watch thread: on a suspected stall, ask the probe.
    fn look_for_a_stall(self: &Arc<Self>) {
        let Some((quiet, n)) = self.stalled_for() else {
            return;
        };
        let stalled = format!(
            "no database operation finished for {:.1} s while {n} were under way",
            quiet.as_secs_f64()
        );
        match self.probe_within(SUSPECT_WAIT) {
            Some(Ok(())) => {
                // The database answers: the work waits on something else. Look again
                // after another full period.
                log::debug!("{stalled}, but a fresh connection answers");
                self.last_sign_ms.store(self.now_ms(), Ordering::Release);
            }
            Some(Err(e)) => self.trip(None, &format!("{stalled}, and the probe failed: {e}")),
            None => self.trip(
                None,
                &format!(
                    "{stalled}, and the probe did not answer within {} s",
                    SUSPECT_WAIT.as_secs()
                ),
            ),
        }
    }

    /// Run the probe on its own thread and wait at most `wait` for it; `None` when it
    /// did not answer in time (its thread is left to finish; while it has not, the
    /// next suspicion gets `None` at once, so hung probes never pile up).
    fn probe_within(self: &Arc<Self>, wait: Duration) -> Option<Result<(), String>> {
        if self.suspect_probing.swap(true, Ordering::AcqRel) {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let h = self.clone();
        let spawned = std::thread::Builder::new()
            .name("db-suspect".into())
            .spawn(move || {
                let r = (h.probe)();
                h.suspect_probing.store(false, Ordering::Release);
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            self.suspect_probing.store(false, Ordering::Release);
            return Some(Err(format!("cannot start the probe: {e}")));
        }
        rx.recv_timeout(wait).ok()
    }

    /// Start the watch thread (see the module documentation). It ends with the last
    /// reference to this state.
    pub fn watch_for_stalls(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("db-watch".into())
            .spawn(move || loop {
                std::thread::sleep(WATCH_EVERY);
                let Some(h) = weak.upgrade() else { return };
                h.look_for_a_stall();
            });
        if let Err(e) = spawned {
            log::error!("cannot start the database stall watch: {e}");
        }
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

    /// Take the instance out of service until a restart: trip the state (every
    /// request refused at once, `/readyz` 503) and never recover, whatever the probe
    /// says (a damaged SQLite file answers the probe's query on its first page while
    /// the pages it cannot read stay damaged). `true` the first time.
    pub fn retire(self: &Arc<Self>, why: &str) -> bool {
        let first = !self.retired.swap(true, Ordering::AcqRel);
        self.trip(None, why);
        // Also when a probe is under way (a trip before), whose success would otherwise
        // let traffic through again: `recover` only moves a probing state to healthy.
        self.state
            .store(u8::from(DbState::Failing), Ordering::Release);
        first
    }

    /// Whether to say at ERROR that the database is damaged: when `always` (what the
    /// service does about it follows), else at most once a minute per instance, so that
    /// the operator sees it without a line per request.
    pub fn damage_line_due(&self, always: bool) -> bool {
        let now = self.now_ms().saturating_add(1);
        if always {
            self.damage_said_ms.store(now, Ordering::Release);
            return true;
        }
        let last = self.damage_said_ms.load(Ordering::Acquire);
        (last == 0 || now >= last.saturating_add(DAMAGE_LINE_EVERY_MS))
            && self
                .damage_said_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// See [`DbHealth::retire`].
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
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
        // Operations stuck since before the trip get a full period again before they
        // count as a new stall.
        self.last_sign_ms.store(self.now_ms(), Ordering::Release);
        // From probing only: a retirement since the probe looked (`retire`) has set it
        // failing, and stays.
        if self
            .state
            .compare_exchange(
                u8::from(DbState::Probing),
                u8::from(DbState::Healthy),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return;
        }
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
        if h.is_retired() {
            // Out of service until a restart: failing for good, nothing to probe.
            h.state.store(u8::from(DbState::Failing), Ordering::Release);
            return;
        }
        h.state.store(u8::from(DbState::Probing), Ordering::Release);
        match (h.probe)() {
            Ok(()) if h.is_retired() => {
                h.state.store(u8::from(DbState::Failing), Ordering::Release);
                return;
            }
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

    /// Retired (a damaged SQLite file): refused from then on, though the probe
    /// answers, also when it was already failing for another reason.
    #[test]
    fn a_retired_state_never_recovers() {
        let probes = Arc::new(AtomicU64::new(0));
        let p = probes.clone();
        let h = DbHealth::new(Box::new(move || {
            p.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        assert!(h.retire("damaged"));
        assert!(!h.retire("damaged again"), "the first time only");
        assert!(h.admit().is_err());
        std::thread::sleep(PROBE_MAX * 3);
        assert_eq!(h.state(), DbState::Failing);
        assert!(h.admit().is_err(), "still refused: retired until a restart");
        assert_eq!(h.trips(), 1);

        // Already failing (an outage) when the damage is found: it stays failing too.
        let h = DbHealth::new(Box::new(|| Ok(())));
        let e = h.epoch();
        h.trip(Some(e), "outage");
        h.retire("damaged");
        std::thread::sleep(PROBE_MAX * 3);
        assert!(h.admit().is_err());
    }

    /// Retired while a probe (after an outage) is under way, after the probe looked
    /// and before its success lets traffic through: it stays refused.
    #[test]
    fn a_retirement_during_a_successful_probe_holds() {
        let h = DbHealth::new(Box::new(|| Ok(())));
        // As `probe_loop` leaves it while its probe runs, once the probe has answered and
        // `is_retired` said no.
        h.state.store(u8::from(DbState::Probing), Ordering::Release);
        assert!(h.retire("damaged"));
        h.recover(PROBE_MIN);
        assert_eq!(h.state(), DbState::Failing);
        assert!(h.admit().is_err(), "a retired instance let traffic through");
    }

    /// The once-a-minute damage line is each instance's own (it was a process-wide
    /// static: one server's line kept another's quiet, as two in one test process).
    #[test]
    fn the_damage_line_is_due_once_a_minute_per_instance() {
        let a = DbHealth::new(Box::new(|| Ok(())));
        let b = DbHealth::new(Box::new(|| Ok(())));
        assert!(a.damage_line_due(false), "the first is said");
        assert!(
            !a.damage_line_due(false),
            "then not again within the minute"
        );
        assert!(b.damage_line_due(false), "another instance says its own");
        assert!(
            a.damage_line_due(true),
            "what the service does about it is always said"
        );
        assert!(!a.damage_line_due(false));
        // A minute on: an instance born 61 s ago whose last line was at its birth.
        let mut c = DbHealth::new(Box::new(|| Ok(())));
        let born = Instant::now()
            .checked_sub(Duration::from_secs(61))
            .expect("an uptime over a minute");
        Arc::get_mut(&mut c).expect("one owner").born = born;
        c.damage_said_ms.store(1, Ordering::Release);
        assert!(c.damage_line_due(false), "said again after a minute");
        assert!(!c.damage_line_due(false));
    }

    #[test]
    fn operations_under_way_with_none_finishing_trip_the_state() {
        let up = Arc::new(AtomicBool::new(true));
        let u = up.clone();
        let h = DbHealth::new(Box::new(move || {
            if u.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("down".into())
            }
        }));
        h.watch_for_stalls();
        // Work that keeps finishing is no stall, however long the load lasts.
        let until = Instant::now() + STALL_AFTER + Duration::from_millis(500);
        let long = h.under_way();
        while Instant::now() < until {
            drop(h.under_way());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(h.is_healthy(), "another operation finished meanwhile");
        assert_eq!(h.trips(), 0);
        // Nothing finishes any more, but a fresh connection answers (the work waits on
        // a lock): not tripped.
        std::thread::sleep(STALL_AFTER * 2 + WATCH_EVERY * 2);
        assert!(h.is_healthy(), "the database answers the probe");
        // The probe fails too: tripped within the period and one look.
        up.store(false, Ordering::SeqCst);
        let stuck_at = Instant::now();
        assert!(wait_for(&h, DbState::Failing) || h.state() == DbState::Probing);
        let took = stuck_at.elapsed();
        assert!(took <= STALL_AFTER * 2 + WATCH_EVERY * 3, "{took:?}");
        assert!(h.admit().is_err());
        // The probe decides when it is over, not the stuck operation.
        drop(long);
        std::thread::sleep(PROBE_MAX);
        assert!(!h.is_healthy());
        up.store(true, Ordering::SeqCst);
        assert!(wait_for(&h, DbState::Healthy));
        // Quiet (nothing under way) is no stall.
        std::thread::sleep(STALL_AFTER + WATCH_EVERY * 2);
        assert!(h.is_healthy());
        assert_eq!(h.trips(), 1);
    }

    #[test]
    fn a_probe_that_does_not_answer_trips_a_suspected_stall() {
        let h = DbHealth::new(Box::new(|| {
            std::thread::sleep(SUSPECT_WAIT * 3);
            Ok(())
        }));
        h.watch_for_stalls();
        let _stuck = h.under_way();
        let started = Instant::now();
        let until = started + STALL_AFTER + SUSPECT_WAIT + Duration::from_secs(2);
        while h.is_healthy() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !h.is_healthy(),
            "a hung probe means the database does not answer"
        );
        let took = started.elapsed();
        assert!(took >= STALL_AFTER + SUSPECT_WAIT - WATCH_EVERY, "{took:?}");
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
