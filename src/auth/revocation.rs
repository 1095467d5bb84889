//! The set of revoked job-token ids, held in memory so the common case costs no
//! database round trip. Loaded at start, kept current by an incremental poll every
//! 200 ms (on every instance) and at once on the instance that revokes. When the set is
//! not known to be current (no successful poll for `MAX_STALENESS`), each check asks
//! the database; if that fails too, the request fails closed (503).
//!
//! The incremental poll follows `revoked_tokens.seq`, a number the database assigns on
//! insert, never a timestamp written by whichever process revoked (its clock may be
//! behind ours). On SQLite there is one writer at a time, so `seq` order is commit
//! order. A PostgreSQL identity can commit out of order: a transaction that took
//! number 10 may become visible after one that took 11 has been read. So the poll does
//! not start after the newest number it has seen, but after the newest number it had
//! seen `OVERLAP` ago (by this instance's own monotonic clock), and on PostgreSQL only
//! once every transaction that was writing to the table just after that number was
//! read has ended, as a list taken before a later read shows (`db::revoked::writers`:
//! a writer takes its table lock before its number, so one that took a lower number
//! and had not committed then is on the list; once it is off a list taken before a
//! read, what it committed is in that read). Every row since is read again meanwhile.
//! A writer still open `STALL_LIMIT` after a later number was seen no longer holds the
//! cursor back; the poll remembers it, and once it is off a list, a full reload reads
//! what it committed (so does one open during the first load, whose cursor starts
//! `SEQ_MARGIN` below the newest number). Before (review, 2026-12-06) the 3 s overlap
//! alone decided, and a revocation committed more than 3 s after taking its number (a
//! slow database, a lock wait) was missed by every other instance for up to 10
//! minutes; until 2026-12-07 a stalled writer's was left to the next periodic reload.
//!
//! Memory is bounded: past `limit()` active ids (default `MAX_REVOCATIONS`) the set
//! keeps, instead of the ids, Bloom filters of every active id it knows, one per
//! 10-minute window of expiry times ([`Filter`], at most `MAX_FILTER_BITS`, 32 MiB, and
//! a second filter while one is built). An id no window holds is not revoked, answered
//! from memory as before; one a window may hold (a revoked token, or a few checks in a
//! thousand at ~10 M active revocations of 1 h) asks the database (an indexed
//! primary-key lookup). A window is dropped once its expiries
//! have passed, so what expires leaves memory without a read. A filter cannot grow, so
//! a poll builds a new one from the table, page by page, when the old one holds more
//! than one window was sized for, while incremental polls go on beside it and keep the
//! set in use current (what they read, and what is revoked here, goes into both
//! filters); a build that finds the table back under the bound goes back to the ids.
//! Past the ramp-up the windows are at their largest and no build is needed: a full
//! reload runs only to repair (a stalled writer ended, a writer open during the first
//! load ended, the wall clock went back), for a filter shrunk under half the bound, and
//! once an hour (`FULL_RELOAD`). Before (until 2026-12-07) the set was dropped past
//! the bound and every job-token check asked the database: at 1 h token lifetimes that
//! was any deployment ending more than ~28 jobs a second, and the whole-life soak lost
//! a fifth of its rate after its first half minute; then one filter was built from the
//! whole table every 10 minutes to drop what expired, 30–50 s of CPU at millions of
//! rows. No revocation is ever refused for want of room: an operator's must work most
//! when the set is full.
//!
//! Revocation lives here and in `db::revoked`, nowhere else: that module stores the
//! `revoked_tokens` table and names the ids a job's tokens are revoked under
//! (`db::revoked::attempt_key`, `job:<id>:<attempt>`), in `db` because a job change
//! writes its revocations in the job's own transaction (`jobs::repo::write_change`,
//! with `jobs::repo::token_revocation` saying which); this one holds the in-memory set,
//! checks a token against it ([`Revocations::is_revoked`]: its `jti`, its attempt's id
//! and the job-wide `job:<id>`), applies a job change's revocations at once on this
//! instance ([`Revocations::job_changed`]), revokes for the admin route
//! ([`Revocations::revoke`]) and the CLI ([`revoke_in_db`]), and owns the rules of a
//! revocation made by hand: which ids are valid ([`valid_jti`]) and when it ends
//! ([`revocation_expiry`]).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::auth::hmac::CLOCK_SKEW_MARGIN_SECS;
use crate::db::revoked::{self, attempt_key, job_key};
use crate::db::{now_millis, Db};
use crate::error::{ApiError, StoreError};
use crate::jobs::row::JobRow;

pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Past this without a successful poll, each check asks the database instead (so a
/// slow or failing poll can never stretch the 1 s promise).
pub const MAX_STALENESS: Duration = Duration::from_secs(1);
/// Rows numbered after the newest one seen this long ago are read again each poll
/// (PostgreSQL may commit a lower number after a higher one has been read).
const OVERLAP: Duration = Duration::from_secs(3);
/// A transaction still writing to the table this long after a number was seen no
/// longer holds the poll back (a session left open must not freeze it): logged, and
/// once it has ended, a full reload reads what it committed (the default; tests
/// shorten it, [`Revocations::set_stall_limit`]).
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// After the first full load, the poll starts this many numbers below the newest one,
/// for transactions that took a number before the load and commit after it (later
/// loads leave the start to the writers, as the incremental polls do; a writer open
/// during the first load is waited out and then repaired by a reload, as a stalled
/// one is).
const SEQ_MARGIN: i64 = 1024;
/// The wall clock going back more than this asks for a full reload (what was dropped
/// as expired may be active again).
const CLOCK_STEP_MS: i64 = 1000;
/// A full reload at least this often, belt and braces: no miss of the incremental poll
/// is known that the repairs do not read (before 2026-12-07, every 10 minutes, which
/// was also what dropped expired ids from the filter).
const FULL_RELOAD: Duration = Duration::from_secs(3600);
/// A filter holding fewer than half the bound is loaded again (back to the ids if the
/// table is under it) at most this often.
const SHRINK_EVERY: Duration = Duration::from_secs(600);
/// Past the bound: the filter's bits per id it is sized for (about 1 % false
/// positives in a window that holds that many, far fewer before), the width of its
/// windows of expiry times (an expired id stays in memory until its window ends, later
/// if windows were merged for room, or a build or a poll is under way), the most
/// bits one window may take (4 MiB: 3.3 M ids) and all of them together (32 MiB:
/// past that two windows are merged, and past ~27 M active revocations false
/// positives grow, each a database read, while memory stays put), the fewest ids a
/// window is sized for, and the page in which a build reads the table.
const FILTER_BITS_PER_ID: usize = 10;
const WINDOW_MS: i64 = 600_000;
const MAX_WINDOW_BITS: usize = 1 << 25;
const MAX_FILTER_BITS: usize = 1 << 28;
const MIN_FILTER_IDS: usize = 1024;
/// A paced build rests once its pages have taken this long, for as long.
const PACE_STEP: Duration = Duration::from_millis(20);
const FILTER_PAGE: i64 = 10_000;
/// The most rows one incremental poll reads (ten pages).
const MAX_POLL_ROWS: usize = 100_000;
/// Expired rows are removed from the table at most this often, bounded per pass.
const GC_EVERY: Duration = Duration::from_secs(300);
const GC_BATCH: i64 = 10_000;
/// Default bound of the in-memory set: active revocations held per instance. Job
/// tokens live at most 24 h, and so (capped) do revocations.
pub const MAX_REVOCATIONS: usize = 100_000;
/// How long a revocation made by hand lasts: 24 h (the longest a job token lives), 1 s
/// (until the revocation reaches every instance, a heartbeat there may still renew the
/// token) and the clock difference between instances that the security model tolerates
/// ([`CLOCK_SKEW_MARGIN_SECS`]): a successor renewed on an instance whose clock runs
/// ahead of the revoking one's carries an `exp` that much later (review findings,
/// 2026-12-06 and 2026-12-07).
pub const REVOCATION_MS: i64 = 24 * 3600 * 1000 + 1000 + CLOCK_SKEW_MARGIN_SECS * 1000;

/// When a revocation made by hand (`token revoke`, `POST /admin/tokens/revoke`) ends:
/// always now + [`REVOCATION_MS`]. An `expiresAt` is still checked (RFC 3339, in the
/// future; else 400 naming `field`) but cannot shorten it: a token's successors share
/// its id and each lives as long as the token was made to (up to 24 h from a renewal
/// that may come just before the revocation is seen), and the revoking operator does
/// not know that lifetime. Review findings, 2026-12-06: a revocation "until the token's
/// exp" let a renewed successor work again; then one raised only to the server's claim
/// TTL let a `token issue --ttl 10m` token work again. Nor can it lengthen it: the
/// revocation set cannot be filled with ids kept for ever.
pub fn revocation_expiry(raw: Option<&str>, field: &str) -> Result<i64, ApiError> {
    let now = now_millis();
    if let Some(s) = raw {
        let t = chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|e| {
                ApiError::bad_request(field, format!("must be an RFC 3339 timestamp ({e})"))
            })?
            .timestamp_millis();
        if t <= now {
            return Err(ApiError::bad_request(field, "must be in the future"));
        }
    }
    Ok(now.saturating_add(REVOCATION_MS))
}

pub fn valid_jti(jti: &str) -> bool {
    (1..=128).contains(&jti.len()) && jti.bytes().all(|b| b.is_ascii_graphic())
}

/// Revoke in the database only (`coordinator token revoke`): every instance's poll
/// picks it up within a second. Unlike [`Revocations::revoke`], not bounded by the set.
pub fn revoke_in_db(db: &Db, jti: &str, expires_at: i64) -> Result<(), StoreError> {
    db.write_sync(|conn| revoked::revoke_token(conn, jti, expires_at, now_millis()))
}

struct Sync {
    /// Every row numbered up to here is taken as read; the poll reads the rows above.
    confirmed: i64,
    /// What the recent polls saw, oldest first.
    seen: VecDeque<Seen>,
    /// The transactions writing to the table just after the last poll's read (so
    /// before the next one's); `None` before the first.
    writers: Option<Vec<String>>,
    /// When the poll last said it moved on past an open writer (said at most once per
    /// `STALL_LIMIT`: while one stays open, every poll's number would say it again).
    stall_logged: Option<Instant>,
    /// How long an open writer holds the poll back ([`STALL_LIMIT`]).
    stall_limit: Duration,
    /// Writers the poll moved on past while they were still open (stalled, or open
    /// during the first load): once none of them is writing any more, a full reload
    /// reads what they committed. Before (until 2026-12-07) that was left to the next
    /// periodic reload, up to 10 minutes later.
    stalled: Vec<String>,
    /// Repairs asked for and done (a reload that started before a repair was asked for
    /// does not do it).
    repairs_due: u64,
    repairs_done: u64,
    /// The latest wall-clock time a poll saw (a clock going back asks for a repair).
    latest_now: i64,
    /// Full reads of the table so far that succeeded, by why each ran (`Reload::ALL`'s
    /// order).
    reloads: [u64; Reload::ALL.len()],
    synced_at: Option<Instant>,
    full_at: Option<Instant>,
    gc_at: Instant,
    /// The last purge removed a whole batch: purge again at the next poll.
    gc_more: bool,
}

/// Why a poll read the whole table (`revocation_reloads_total{reason}`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reload {
    /// The first load, at start.
    First,
    /// A writer the poll had moved on past ended, or the wall clock went back.
    Repair,
    /// The filter holds more ids than it was sized for.
    Outgrown,
    /// `FULL_RELOAD` passed: belt and braces.
    Periodic,
    /// The filter holds under half the bound: the ids may fit in memory again.
    Shrunk,
}

impl Reload {
    const ALL: [Reload; 5] = [
        Reload::First,
        Reload::Repair,
        Reload::Outgrown,
        Reload::Periodic,
        Reload::Shrunk,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reload::First => "first",
            Reload::Repair => "repair",
            Reload::Outgrown => "outgrown",
            Reload::Periodic => "periodic",
            Reload::Shrunk => "shrunk",
        }
    }
}

impl Sync {
    /// One more full read of the table that succeeded, for `why`.
    fn count(&mut self, why: Reload) {
        let at = Reload::ALL.iter().position(|r| *r == why);
        if let Some(n) = at.and_then(|i| self.reloads.get_mut(i)) {
            *n = n.saturating_add(1);
        }
    }
}

/// What one poll saw: when, the newest number, and the transactions that were writing
/// to the table just after it read (PostgreSQL; none on SQLite).
struct Seen {
    at: Instant,
    newest: i64,
    writers: Vec<String>,
}

#[derive(Default)]
struct Set {
    ids: HashMap<String, i64>,
    /// The width of the filter's windows of expiry times (`WINDOW_MS`).
    window_ms: i64,
    /// More active revocations than the limit: `ids` is empty and this holds every
    /// active id known (and expired ones until their window ends).
    filter: Option<Filter>,
    /// While a poll loads the table: the ids (and their expiries) this instance put in
    /// the filter meanwhile, for the new filter or the ids the load ends with (`None`
    /// when none is under way; at most `limit()`, past which the load is dropped, the
    /// old filter kept and the poll fails, `spoiled`).
    during: Option<Vec<(String, i64)>>,
    spoiled: bool,
    /// While a load builds a filter from the table: the new filter. Every active id
    /// this instance revokes or reads meanwhile goes into it too, so it misses nothing
    /// learnt during the build, however many (no list, no bound to spoil it).
    next: Option<Filter>,
}

/// Bloom filters of revoked ids, one per window of expiry times: no false negatives,
/// so an id none of them holds is not revoked; one that may hold it is asked of the
/// database. An id goes into the window its revocation's expiry falls in
/// ([`WINDOW_MS`] wide), and a window is dropped as soon as every expiry in it has
/// passed ([`Filter::drop_expired`], each poll): what expired leaves memory without a
/// read of the table. Before (until 2026-12-07) one filter held every id, and only a
/// build from the whole table, every 10 minutes, dropped what had expired: at the
/// millions of revocations a busy instance's one-hour tokens leave, that read took
/// 30–50 s of a 2-core host's CPU each time, and the whole-life soak's rate halved
/// while it ran. Keyed by a random per-process hasher, so nobody can choose ids that
/// collide on every instance.
struct Filter {
    hasher: RandomState,
    /// By the end of their window (ms): every id in one expires before its end.
    windows: BTreeMap<i64, Window>,
    /// The width of a window (`WINDOW_MS`; tests shorten it).
    window_ms: i64,
    /// The ids each window is sized for (all the same, so two can be merged).
    window_ids: usize,
    /// The most bits all windows may take together (past it two are merged).
    max_bits: usize,
    /// Ids inserted into the windows still held that their window did not already seem
    /// to hold (for the gauge and the size of the next build; an id re-read by the
    /// poll's overlap is not counted twice).
    inserted: usize,
}

struct Window {
    bloom: fastbloom::BloomFilter,
    inserted: usize,
}

impl Filter {
    /// Windows sized for `ids` each (at least `MIN_FILTER_IDS`, at most what
    /// `MAX_WINDOW_BITS` holds), `MAX_FILTER_BITS` in all.
    fn sized_for(ids: usize, window_ms: i64) -> Filter {
        Filter::with_budget(ids, window_ms, MAX_FILTER_BITS)
    }

    fn with_budget(ids: usize, window_ms: i64, max_bits: usize) -> Filter {
        Filter {
            hasher: RandomState::new(),
            window_ms: window_ms.max(1),
            windows: BTreeMap::new(),
            window_ids: ids.clamp(MIN_FILTER_IDS, MAX_WINDOW_BITS / FILTER_BITS_PER_ID),
            max_bits,
            inserted: 0,
        }
    }

    fn window_bits(&self) -> usize {
        self.window_ids.saturating_mul(FILTER_BITS_PER_ID)
    }

    /// Hold `id`, revoked until `exp`; whether it is new (not already seemingly held
    /// by its window).
    fn insert(&mut self, id: &str, exp: i64) -> bool {
        let hash = self.hasher.hash_one(id);
        // The end of the window `exp` falls in: later than it, a multiple of the width.
        let end = exp
            .div_euclid(self.window_ms)
            .saturating_add(1)
            .saturating_mul(self.window_ms);
        if !self.windows.contains_key(&end) {
            if self
                .windows
                .len()
                .saturating_add(1)
                .saturating_mul(self.window_bits())
                > self.max_bits
            {
                self.merge_two();
            }
            let bloom = fastbloom::BloomFilter::with_num_bits(self.window_bits())
                .expected_items(self.window_ids);
            self.windows.insert(end, Window { bloom, inserted: 0 });
        }
        let Some(w) = self.windows.get_mut(&end) else {
            return false;
        };
        let new = !w.bloom.insert_hash(hash);
        if new {
            w.inserted = w.inserted.saturating_add(1);
            self.inserted = self.inserted.saturating_add(1);
        }
        new
    }

    /// Out of room for another window: the two neighbours holding the fewest ids
    /// together become one, kept until the later end (an id is kept longer, never
    /// dropped sooner). Far windows hold few (an operator's revocations, a day long),
    /// so memory stays bounded while the busy ones keep their own.
    fn merge_two(&mut self) {
        // Neighbours by end: (earlier end, later end, ids in both).
        let pair = self
            .windows
            .iter()
            .zip(self.windows.iter().skip(1))
            .map(|((a, wa), (b, wb))| (*a, *b, wa.inserted.saturating_add(wb.inserted)))
            .min_by_key(|p| p.2);
        let Some(pair) = pair else {
            return;
        };
        let Some(earlier) = self.windows.remove(&pair.0) else {
            return;
        };
        if let Some(later) = self.windows.get_mut(&pair.1) {
            // Same size (`window_ids`), so the union holds both sets.
            later.bloom.union(&earlier.bloom);
            later.inserted = later.inserted.saturating_add(earlier.inserted);
        }
    }

    fn may_hold(&self, id: &str) -> bool {
        let hash = self.hasher.hash_one(id);
        self.windows.values().any(|w| w.bloom.contains_hash(hash))
    }

    /// Drop every window whose expiries have all passed by `now` (an id whose
    /// expiry is not after `now` is not revoked: the ids' own rule).
    fn drop_expired(&mut self, now: i64) {
        while let Some(entry) = self.windows.first_entry() {
            if *entry.key() > now {
                break;
            }
            let w = entry.remove();
            self.inserted = self.inserted.saturating_sub(w.inserted);
        }
    }

    /// A window holds more ids than it was sized for, and larger windows would be
    /// allowed: a build from the table sizes them again.
    fn outgrown(&self) -> bool {
        self.window_ids < MAX_WINDOW_BITS / FILTER_BITS_PER_ID
            && self.windows.values().any(|w| w.inserted > self.window_ids)
    }

    /// A filter for a set about to pass the bound: its ids, room for four times as
    /// many.
    fn from_ids<'a>(
        ids: impl ExactSizeIterator<Item = (&'a String, &'a i64)>,
        window_ms: i64,
    ) -> Filter {
        let mut f = Filter::sized_for(ids.len().saturating_mul(4), window_ms);
        for (id, exp) in ids {
            f.insert(id, *exp);
        }
        f
    }
}

/// A full load under way: revocations made here meanwhile are kept in `Set::during`
/// for the filter it may build, until it is dropped (the load done or failed).
struct Building<'a>(&'a RwLock<Set>);

impl<'a> Building<'a> {
    fn start(set: &'a RwLock<Set>) -> Result<Self, StoreError> {
        let mut s = set.write().map_err(poisoned)?;
        s.during = Some(Vec::new());
        s.spoiled = false;
        Ok(Building(set))
    }
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.write() {
            s.during = None;
            s.spoiled = false;
            s.next = None;
        }
    }
}

impl Set {
    /// Past the bound: the ids go into a filter and are dropped.
    fn pass_bound(&mut self, limit: usize) {
        log::warn!(
            "more than {limit} active token revocations: holding them in a Bloom filter \
             (a possible hit asks the database) until the set shrinks"
        );
        self.filter = Some(Filter::from_ids(self.ids.iter(), self.window_ms));
        // A filter being built meanwhile needs them too (they leave `ids`).
        if let Some(during) = self.during.as_mut() {
            if during.len().saturating_add(self.ids.len()) <= limit {
                during.extend(self.ids.iter().map(|(k, e)| (k.clone(), *e)));
            } else {
                self.spoiled = true;
            }
        }
        self.ids = HashMap::new();
    }

    /// Put `id` (an active revocation) into the filter being built, if one is.
    fn next_insert(&mut self, id: &str, exp: i64) {
        if let Some(next) = self.next.as_mut() {
            next.insert(id, exp);
        }
    }

    /// Hold `id` in the filter (and for one being built); whether it is new.
    fn filter_insert(&mut self, id: &str, exp: i64, limit: usize) -> bool {
        if let Some(during) = self.during.as_mut() {
            if during.len() < limit {
                during.push((id.to_owned(), exp));
            } else {
                self.spoiled = true;
            }
        }
        self.filter.as_mut().is_some_and(|f| f.insert(id, exp))
    }
}

/// How a job token stands against the revocations ([`Revocations::token_revoked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRevoked {
    No,
    /// Under its attempt's id only (`job:<id>:<attempt>`).
    AttemptOnly,
    /// Under its own `jti` or the job-wide id.
    Yes,
}

pub struct Revocations {
    db: Db,
    set: RwLock<Set>,
    sync: Mutex<Sync>,
    limit: AtomicUsize,
    /// Rows per read when a filter is built from the table.
    build_page: AtomicI64,
    /// Woken when an id the set did not hold is added (open streams check their
    /// credential again then, not at their next keep-alive).
    added: tokio::sync::Notify,
}

/// Hold `jti` until `exp` (the later of two expiries); whether it is new to the set.
fn hold(ids: &mut HashMap<String, i64>, jti: String, exp: i64) -> bool {
    match ids.entry(jti) {
        std::collections::hash_map::Entry::Occupied(mut e) => {
            let held = e.get_mut();
            *held = (*held).max(exp);
            false
        }
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(exp);
            true
        }
    }
}

fn poisoned<T>(e: std::sync::PoisonError<T>) -> StoreError {
    StoreError::Internal(format!("revocation lock: {e}"))
}

fn cap(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)
}

impl Revocations {
    pub fn new(db: Db) -> Self {
        Revocations {
            db,
            set: RwLock::new(Set {
                window_ms: WINDOW_MS,
                ..Set::default()
            }),
            sync: Mutex::new(Sync {
                confirmed: 0,
                seen: VecDeque::new(),
                writers: None,
                stall_logged: None,
                stall_limit: STALL_LIMIT,
                stalled: Vec::new(),
                repairs_due: 0,
                repairs_done: 0,
                latest_now: 0,
                reloads: [0; Reload::ALL.len()],
                synced_at: None,
                full_at: None,
                gc_at: Instant::now(),
                gc_more: false,
            }),
            limit: AtomicUsize::new(MAX_REVOCATIONS),
            build_page: AtomicI64::new(FILTER_PAGE),
            added: tokio::sync::Notify::new(),
        }
    }

    /// The most active revocations held in memory (and accepted by the admin route).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Change the bound (embedding and tests; the next poll applies it).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(1), Ordering::Relaxed);
    }

    /// Change the width of the filter's windows of expiry times, for filters made from
    /// now on (tests: expiries seconds apart in windows of their own).
    pub fn set_window(&self, width: Duration) {
        if let Ok(mut s) = self.set.write() {
            s.window_ms = i64::try_from(width.as_millis()).unwrap_or(WINDOW_MS).max(1);
        }
    }

    /// Change how long an open writer holds the poll back (tests: a stall).
    pub fn set_stall_limit(&self, limit: Duration) {
        if let Ok(mut s) = self.sync.lock() {
            s.stall_limit = limit;
        }
    }

    /// Change the rows per read of a filter's build (tests: a slow build).
    pub fn set_build_page(&self, rows: i64) {
        self.build_page.store(rows.max(1), Ordering::Relaxed);
    }

    /// Full reads of the table so far, by why each ran (for the
    /// `revocation_reloads_total` counter): an operator sees how often the set read
    /// the whole table, and why.
    pub fn reloads(&self) -> [(&'static str, u64); Reload::ALL.len()] {
        let counts = self.sync.lock().map(|s| s.reloads).unwrap_or_default();
        let mut out = [("", 0); Reload::ALL.len()];
        for ((slot, why), n) in out.iter_mut().zip(Reload::ALL).zip(counts) {
            *slot = (why.as_str(), n);
        }
        out
    }

    /// Number of active revocations known (for the `revoked_tokens` gauge). Past the
    /// bound, the ids the filter's windows hold (some of them expired, until their
    /// window ends).
    pub fn len(&self) -> usize {
        self.set
            .read()
            .map(|s| s.filter.as_ref().map_or(s.ids.len(), |f| f.inserted))
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids held in memory now (at most [`Self::limit`]; none past it, when the filter
    /// holds them).
    pub fn held(&self) -> usize {
        self.set.read().map(|s| s.ids.len()).unwrap_or(0)
    }

    /// Whether the set holds `id` now, in its ids or (past the bound) possibly in its
    /// filter: the property tests check, that no revocation known is missing.
    pub fn holds(&self, id: &str) -> bool {
        self.set.read().is_ok_and(|s| {
            s.ids.contains_key(id) || s.filter.as_ref().is_some_and(|f| f.may_hold(id))
        })
    }

    /// Woken when a revocation new to this instance is held (by a poll or locally), in
    /// the ids or in the filter past the bound.
    pub fn added(&self) -> &tokio::sync::Notify {
        &self.added
    }

    /// Record a revocation made by this instance (effective at once here). Its row is
    /// already committed, so past the bound the ids go into the filter here and then,
    /// as a poll would: memory stays bounded even while no poll completes, now that
    /// the admin route is never refused for want of room.
    pub fn revoke_local(&self, jti: &str, expires_at: i64) {
        let limit = self.limit();
        let mut set = self.set.write();
        if let Ok(s) = set.as_mut() {
            s.next_insert(jti, expires_at);
        }
        let added = match set {
            Ok(mut s) if s.filter.is_some() => s.filter_insert(jti, expires_at, limit),
            Ok(mut s) => match s.ids.get_mut(jti) {
                Some(held) => {
                    *held = (*held).max(expires_at);
                    false
                }
                None => {
                    if s.ids.len() >= limit {
                        let now = now_millis();
                        s.ids.retain(|_, e| *e > now);
                    }
                    if s.ids.len() >= limit {
                        s.pass_bound(limit);
                        s.filter_insert(jti, expires_at, limit)
                    } else {
                        hold(&mut s.ids, jti.to_owned(), expires_at)
                    }
                }
            },
            Err(_) => false,
        };
        if added {
            self.added.notify_waiters();
        }
    }

    /// Apply at once, on this instance, revocations a job change wrote to the database
    /// in its own transaction (`jobs::repo::token_revocation`).
    pub fn revoke_local_all(&self, revoked: &[(String, i64)]) {
        for (key, until) in revoked {
            self.revoke_local(key, *until);
        }
    }

    /// After `row` changed (and its transaction committed): its revoked tokens, at once.
    pub fn job_changed(&self, row: &JobRow, now: i64) {
        self.revoke_local_all(&crate::jobs::repo::token_revocation(row, now));
    }

    /// Revoke in the database and locally (the admin route). Never refused for want of
    /// room: past the bound the filter holds it, as for a job's own revocations.
    pub async fn revoke(&self, jti: String, expires_at: i64) -> Result<(), StoreError> {
        let id = jti.clone();
        self.db
            .write(move |conn| revoked::revoke_token(conn, &id, expires_at, now_millis()))
            .await?;
        self.revoke_local(&jti, expires_at);
        Ok(())
    }

    fn fresh(&self) -> bool {
        self.sync
            .lock()
            .ok()
            .and_then(|s| s.synced_at)
            .is_some_and(|t| t.elapsed() < MAX_STALENESS)
    }

    /// Is this token (or its job) revoked? Errors mean the state cannot be known.
    pub async fn is_revoked(
        &self,
        jti: &str,
        job_id: &str,
        attempt: i32,
    ) -> Result<bool, StoreError> {
        let now = now_millis();
        let jk = job_key(job_id);
        let ak = attempt_key(job_id, attempt);
        if self.fresh() {
            let s = self.set.read().map_err(poisoned)?;
            match &s.filter {
                None => {
                    let hit = |k: &str| s.ids.get(k).is_some_and(|e| *e > now);
                    return Ok(hit(jti) || hit(&jk) || hit(&ak));
                }
                // No false negatives: none of the three held is an answer. A possible
                // hit is asked of the database below.
                Some(f)
                    if ![jti, jk.as_str(), ak.as_str()]
                        .iter()
                        .any(|k| f.may_hold(k)) =>
                {
                    return Ok(false)
                }
                Some(_) => {}
            }
        }
        let jti = jti.to_owned();
        self.db
            .read(move |conn| {
                revoked::any_revoked(conn, &[jti.as_str(), jk.as_str(), ak.as_str()], now)
            })
            .await
    }

    /// Which of a token's ids is revoked, for what outlives its request (an event
    /// stream): its attempt's id alone is what a job change writes when that attempt
    /// ends (`jobs::repo::token_revocation`: the job's end, a requeue, a lease expiry),
    /// though an operator may write it by hand too; its `jti` or the job-wide id only an
    /// operator writes. Errors mean the state cannot be known.
    pub async fn token_revoked(
        &self,
        jti: &str,
        job_id: &str,
        attempt: i32,
    ) -> Result<TokenRevoked, StoreError> {
        let now = now_millis();
        let jk = job_key(job_id);
        let ak = attempt_key(job_id, attempt);
        let (by_hand, attempt_ended) = 'known: {
            if self.fresh() {
                let s = self.set.read().map_err(poisoned)?;
                match &s.filter {
                    None => {
                        let hit = |k: &str| s.ids.get(k).is_some_and(|e| *e > now);
                        break 'known (hit(jti) || hit(&jk), hit(&ak));
                    }
                    Some(f)
                        if ![jti, jk.as_str(), ak.as_str()]
                            .iter()
                            .any(|k| f.may_hold(k)) =>
                    {
                        break 'known (false, false)
                    }
                    Some(_) => {}
                }
            }
            let jti = jti.to_owned();
            self.db
                .read(move |conn| {
                    Ok((
                        revoked::any_revoked(conn, &[jti.as_str(), jk.as_str()], now)?,
                        revoked::any_revoked(conn, &[ak.as_str()], now)?,
                    ))
                })
                .await?
        };
        Ok(match (by_hand, attempt_ended) {
            (true, _) => TokenRevoked::Yes,
            (false, true) => TokenRevoked::AttemptOnly,
            (false, false) => TokenRevoked::No,
        })
    }

    /// Was this job cancelled? Asked only once a token for it turned out revoked, so
    /// that its worker learns "cancelled" (409) rather than a bare "revoked" (401).
    pub async fn job_cancelled(&self, job_id: &crate::jobs::JobId) -> Result<bool, StoreError> {
        let id = job_id.clone();
        match self
            .db
            .read(move |conn| crate::jobs::repo::find(conn, &id))
            .await
        {
            Ok(row) => Ok(row.status() == crate::jobs::JobStatus::Cancelled),
            Err(StoreError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One poll: drop the filter's windows that expired, read incrementally (after a
    /// full reload when one is due: the filter outgrown, a stalled writer ended, the
    /// filter shrunk under half the bound, or `FULL_RELOAD` passed), and the
    /// occasional bounded purge of the table.
    pub async fn poll(&self) -> Result<(), StoreError> {
        let limit = self.limit();
        let now = now_millis();
        // What expired leaves memory here, without a read; a filter past the ids it
        // was sized for is built again, larger, at once; one under half the bound may
        // go back to the ids.
        let (outgrown, shrunk) = {
            let mut set = self.set.write().map_err(poisoned)?;
            if let Some(f) = set.filter.as_mut() {
                f.drop_expired(now);
            }
            if let Some(f) = set.next.as_mut() {
                f.drop_expired(now);
            }
            set.filter
                .as_ref()
                .map_or((false, false), |f| (f.outgrown(), f.inserted < limit / 2))
        };
        let (first, full, gc, repair) = {
            let mut s = self.sync.lock().map_err(poisoned)?;
            // The wall clock went back: what a poll dropped as expired (a window, an
            // id) may be active again, and a token it revoked valid again. A reload
            // reads them back (review, 2026-12-07: a forward step, even a brief one,
            // dropped every window it passed until the hourly reload).
            if now < s.latest_now.saturating_sub(CLOCK_STEP_MS) {
                log::warn!(
                    "the wall clock went back {} ms: reloading the token revocations",
                    s.latest_now.saturating_sub(now)
                );
                s.repairs_due = s.repairs_due.saturating_add(1);
            }
            s.latest_now = s.latest_now.max(now);
            let repair = (s.repairs_due > s.repairs_done).then_some(s.repairs_due);
            let why = match s.full_at {
                None => Some(Reload::First),
                Some(_) if repair.is_some() => Some(Reload::Repair),
                Some(_) if outgrown => Some(Reload::Outgrown),
                Some(t) if t.elapsed() >= FULL_RELOAD => Some(Reload::Periodic),
                Some(t) if shrunk && t.elapsed() >= SHRINK_EVERY => Some(Reload::Shrunk),
                Some(_) => None,
            };
            (
                s.full_at.is_none(),
                why,
                s.gc_more || s.gc_at.elapsed() >= GC_EVERY,
                repair,
            )
        };
        if first {
            // The first load sets the cursor; nothing is current before it ends. A
            // writer open during it may have taken a number below where the cursor
            // starts: once it ends, a reload reads what it committed.
            let (newest, writers, asked) = self.reload(now, limit, false, false).await?;
            {
                let mut s = self.sync.lock().map_err(poisoned)?;
                for w in &writers {
                    if !s.stalled.contains(w) {
                        s.stalled.push(w.clone());
                    }
                }
            }
            self.advance(Some(newest), Some(writers), asked, true)?;
            self.sync.lock().map_err(poisoned)?.count(Reload::First);
        } else {
            if let Some(why) = full {
                // Later loads keep the set current meanwhile: incremental polls run
                // beside a filter's build (`reload`), and the cursor stays theirs.
                // Paced unless it repairs (`read_into_next`).
                let started = Instant::now();
                self.reload(now, limit, true, repair.is_none()).await?;
                // Done, whatever the incremental read below does (before, review
                // 2026-12-07: stamped at the poll's end only, so a failed read after it
                // made every following poll load the whole table again).
                let mut s = self.sync.lock().map_err(poisoned)?;
                s.full_at = Some(Instant::now());
                if let Some(due) = repair {
                    s.repairs_done = s.repairs_done.max(due);
                }
                // Counted once it succeeded: a failing one is tried again every poll.
                s.count(why);
                log::info!(
                    "token revocations: read the whole table ({}) in {} ms",
                    why.as_str(),
                    started.elapsed().as_millis()
                );
            }
            self.incremental(now, limit).await?;
        }
        // The set is as current as the read just made, however long the purge below
        // takes (`advance` stamped it with the read's time): a purge held up for
        // seconds (a slow database, a row lock) cannot make a set that old count as
        // fresh for another second. Nor does a failed purge fail the poll whose read
        // succeeded.
        let at = Instant::now();
        // A purge that removed a whole batch leaves more: the next poll purges again
        // (before, one batch per `GC_EVERY` fell behind any deployment ending more than
        // 33 jobs a second, and the table grew for as long as it ran).
        let mut gc_more = false;
        if gc {
            match self
                .db
                .write(move |conn| revoked::purge_revoked(conn, now, GC_BATCH))
                .await
            {
                Ok(0) => {}
                Ok(purged) => {
                    gc_more = i64::try_from(purged).unwrap_or(i64::MAX) >= GC_BATCH;
                    log::debug!("purged {purged} expired token revocations");
                }
                Err(e) => log::warn!("token revocation purge failed: {e}"),
            }
        }
        let mut s = self.sync.lock().map_err(poisoned)?;
        if full.is_some() {
            s.full_at = Some(at);
        }
        if gc {
            s.gc_at = at;
            s.gc_more = gc_more;
        }
        Ok(())
    }

    /// Read every row numbered after the cursor, page by page (up to `MAX_POLL_ROWS`),
    /// into the set (and into a filter being built), then move the cursor.
    async fn incremental(&self, now: i64, limit: usize) -> Result<(), StoreError> {
        let low = self.sync.lock().map_err(poisoned)?.confirmed;
        let mut added = false;
        // The writers after the rows: one that took a number below a row read here
        // and had not committed is still among them. Every row above `low`, page by
        // page, up to `MAX_POLL_ROWS`: a set that did not read them all is not as
        // current as its read and is not stamped so. And when the read was asked (on
        // the connection, after any wait for one): the set is as current as that
        // moment, not the moment the answer came. An answer held up on its way back
        // (a congested or hostile path from the database) must not make a set that
        // old count as fresh for another `MAX_STALENESS` (third security review,
        // 2026-12-07: a token revoked while the answer was on its way was accepted
        // again).
        let (asked, rows, complete, writers) = self
            .db
            .read(move |conn| {
                let asked = Instant::now();
                let mut rows = Vec::new();
                let mut after = low;
                let complete = loop {
                    let page = revoked::revoked_after(conn, after, FILTER_PAGE)?;
                    let last = page.len() < usize::try_from(FILTER_PAGE).unwrap_or(0);
                    after = page.last().map_or(after, |r| r.2);
                    rows.extend(page);
                    if last {
                        break true;
                    }
                    if rows.len() >= MAX_POLL_ROWS {
                        break false;
                    }
                };
                Ok((asked, rows, complete, revoked::writers(conn)?))
            })
            .await?;
        if !complete {
            log::warn!(
                "more than {MAX_POLL_ROWS} token revocations in one poll: each token \
                 is checked against the database until the poll catches up"
            );
        }
        let newest = rows.iter().map(|r| r.2).max();
        let mut set = self.set.write().map_err(poisoned)?;
        for (jti, exp, _) in rows {
            if exp > now {
                set.next_insert(&jti, exp);
                added |= if set.filter.is_some() {
                    set.filter_insert(&jti, exp, limit)
                } else {
                    hold(&mut set.ids, jti, exp)
                };
            }
        }
        if set.filter.is_none() && set.ids.len() > limit {
            set.ids.retain(|_, e| *e > now);
            if set.ids.len() > limit {
                set.pass_bound(limit);
            }
        }
        drop(set);
        if added {
            self.added.notify_waiters();
        }
        self.advance(newest, Some(writers), asked, complete)
    }

    /// After a read: move the start of the next read up to the newest number seen
    /// `OVERLAP` ago, once no transaction writing just after it was read still was at
    /// the end of the previous read (that list was taken before this read, so what
    /// those transactions committed is in it); remember this read (`newest`, the
    /// transactions writing after it); and, when it read everything (`stamp`), count
    /// the set as current as the moment the read was `asked`.
    fn advance(
        &self,
        newest: Option<i64>,
        writers_now: Option<Vec<String>>,
        asked: Instant,
        stamp: bool,
    ) -> Result<(), StoreError> {
        let at = Instant::now();
        let mut s = self.sync.lock().map_err(poisoned)?;
        let before = if writers_now.is_some() {
            std::mem::replace(&mut s.writers, writers_now.clone())
        } else {
            s.writers.clone()
        };
        let s = &mut *s;
        while let Some(front) = s.seen.front() {
            let age = at.duration_since(front.at);
            if age < OVERLAP {
                break;
            }
            let open = match &before {
                Some(w) => front.writers.iter().any(|x| w.contains(x)),
                None => !front.writers.is_empty(),
            };
            if open && age < s.stall_limit {
                break;
            }
            if open {
                // Moving on past it: once it has ended, a reload reads what it
                // committed (it may have taken a number the cursor passes now).
                for w in &front.writers {
                    let still = before.as_ref().is_none_or(|b| b.contains(w));
                    if still && !s.stalled.contains(w) {
                        s.stalled.push(w.clone());
                    }
                }
                if s.stall_logged
                    .is_none_or(|t| at.duration_since(t) >= s.stall_limit)
                {
                    s.stall_logged = Some(at);
                    log::warn!(
                        "a transaction writing token revocations has been open for over \
                         {} s: the poll moves on, and reloads the table once it has ended",
                        s.stall_limit.as_secs()
                    );
                }
            }
            // A read that stopped at its cap covered the numbers up to its newest only:
            // what the writers gone since committed above that is not read yet, so the
            // cursor moves no further (before, review 2026-12-07: it moved to the
            // front's newest, past rows no read had covered).
            let reach = if stamp {
                front.newest
            } else {
                front.newest.min(newest.unwrap_or(s.confirmed))
            };
            s.confirmed = s.confirmed.max(reach);
            if reach < front.newest {
                break;
            }
            s.seen.pop_front();
        }
        // A writer moved on past that is no longer writing after this read has ended
        // before the next read starts: that read, a full reload, finds what it
        // committed. Each one that ends asks for one (repairs asked for during a reload
        // are done by the next): before (review, 2026-12-07) only the last of them did,
        // so a session left open held back every other's repair until the hourly reload.
        if let Some(now_writing) = &writers_now {
            let was = s.stalled.len();
            s.stalled.retain(|w| now_writing.contains(w));
            if s.stalled.len() < was {
                s.repairs_due = s.repairs_due.saturating_add(1);
            }
        }
        if let Some(n) = newest {
            s.seen.push_back(Seen {
                at,
                newest: n,
                writers: writers_now.unwrap_or_default(),
            });
        }
        if stamp {
            // Never back: a load's read may have been asked before the incremental
            // reads that ran beside it.
            s.synced_at = Some(s.synced_at.map_or(asked, |t| t.max(asked)));
        }
        Ok(())
    }

    /// Load every active revocation: the ids, or past the limit a filter built from
    /// the table page by page; returns the newest number assigned before the load, the
    /// transactions writing to the table right after it was read (before the rows), and
    /// when the load was asked (on the connection). The set is as current as that moment: a row committed before it is
    /// in every page read after it, and a revocation this instance makes or reads while
    /// the filter is built goes into it too (`Set::during` until the build starts,
    /// `Set::next` from then on). With `keep_fresh`, incremental polls run while the
    /// filter is built, so the set in use stays current (before, 2026-12-07: a build
    /// of millions of rows held the poll for tens of seconds, during which every
    /// job-token check asked the database, and revocations made here meanwhile past the
    /// bound dropped the build, which then started again at the next poll). With
    /// `paced` too, the build rests between its pages (`read_into_next`).
    async fn reload(
        &self,
        now: i64,
        limit: usize,
        keep_fresh: bool,
        paced: bool,
    ) -> Result<(i64, Vec<String>, Instant), StoreError> {
        // From here on, a revocation this instance makes is kept for a filter this load
        // may build (until the guard goes, on every way out).
        let _building = Building::start(&self.set)?;
        // The writers are listed right after the newest number and before the rows are
        // read: a number up to the newest was either committed before the list (so it
        // is in the rows) or its writer is on it (so the first load waits it out and
        // repairs it). Listed after the rows (review, 2026-12-07), a writer that
        // committed in between was on neither, below where the first load starts the
        // cursor, and missed until the next periodic reload.
        let (asked, max_seq, count, rows, writers) = self
            .db
            .read(move |conn| {
                let asked = Instant::now();
                let max_seq = revoked::max_revocation_seq(conn)?;
                let writers = revoked::writers(conn)?;
                let count = revoked::count_revoked_active(conn, now)?;
                let rows = if usize::try_from(count).is_ok_and(|c| c <= limit) {
                    revoked::revoked_active(conn, now, cap(limit))?
                } else {
                    Vec::new()
                };
                Ok((asked, max_seq, count, rows, writers))
            })
            .await?;
        let past_bound = rows.len() > limit || usize::try_from(count).map_or(true, |c| c > limit);
        if past_bound {
            self.build_filter(now, count, limit, keep_fresh, keep_fresh && paced)
                .await?;
        }
        let mut added = false;
        {
            let mut set = self.set.write().map_err(poisoned)?;
            // The new filter leaves `next` under the lock that puts it in place. Taken
            // under a lock of its own (review, 2026-12-07), an id revoked here between
            // the two went only into the set about to be replaced (neither `next` nor
            // `during` was there to keep it) and was answered "not revoked" from a set
            // stamped fresh until a poll read its row again.
            let filter = if past_bound {
                Some(set.next.take().ok_or_else(|| {
                    StoreError::Internal("the filter being built was dropped".into())
                })?)
            } else {
                None
            };
            let during = set.during.take().unwrap_or_default();
            if std::mem::take(&mut set.spoiled) {
                // More revocations here than the bound while the table was read: the
                // filter in place holds them all and stays, but it lacks what other
                // instances revoked since the last poll, and the cursor has not moved
                // past them. Not a refresh (fourth security review, 2026-12-07: the
                // set was stamped as current as this read, and the cursor moved past
                // rows it never read, for up to 10 minutes).
                return Err(StoreError::Internal(format!(
                    "token revocations reloaded while more than {limit} were revoked \
                     here: kept the filter in place, the next poll loads again"
                )));
            }
            if let Some(filter) = filter {
                if set.filter.is_none() {
                    log::warn!(
                        "more than {limit} active token revocations: holding them in a \
                         Bloom filter (a possible hit asks the database) until the set \
                         shrinks"
                    );
                }
                // What this instance held, revoked or read meanwhile is in it already
                // (`build_filter`).
                set.ids = HashMap::new();
                set.filter = Some(filter);
                added = true;
            } else {
                if set.filter.take().is_some() {
                    log::info!("token revocations back under {limit}: held in memory again");
                }
                set.ids.retain(|_, e| *e > now);
                // What this instance revoked during the read went into the filter just
                // dropped (fourth security review, 2026-12-07: it was lost, answered
                // "not revoked" here until a poll read its row).
                for (jti, exp) in during
                    .into_iter()
                    .chain(rows.into_iter().map(|(jti, exp, _)| (jti, exp)))
                {
                    if exp > now && hold(&mut set.ids, jti, exp) {
                        added = true;
                    }
                }
            }
        }
        if added {
            self.added.notify_waiters();
        }
        let mut s = self.sync.lock().map_err(poisoned)?;
        // Only the first load starts the cursor just below the newest number. A later
        // one leaves it to the poll's writers (`seen`): a transaction that took a
        // number before the load and commits after it is read by the next polls
        // (fourth security review, 2026-12-07: every load moved the cursor to
        // `SEQ_MARGIN` below the newest, past any writer still open; with a filter
        // rebuilt whenever it is outgrown, a revocation that committed after a
        // rebuild, with more than 1 024 numbered after its own, was missed here until
        // the next load).
        if s.full_at.is_none() {
            s.confirmed = s.confirmed.max(max_seq.saturating_sub(SEQ_MARGIN));
        }
        Ok((max_seq, writers, asked))
    }

    /// A filter of every active revocation in the table, room for four times the
    /// `count` there now, read page by page in number order (each page its own short
    /// read, so no connection is held for the whole table). It starts with the ids
    /// held now and those revoked here since the load began (`Set::during`), and
    /// every id this instance revokes or reads until it is done goes into it as well
    /// (`Set::next`): rows another instance commits during the build with a number
    /// the build has passed are read by the incremental polls, which run beside it
    /// with `keep_fresh` and otherwise right after it. The filter is left in `next`,
    /// for the caller to take under the lock that puts it in place.
    async fn build_filter(
        &self,
        now: i64,
        count: i64,
        limit: usize,
        keep_fresh: bool,
        paced: bool,
    ) -> Result<(), StoreError> {
        {
            let mut set = self.set.write().map_err(poisoned)?;
            let mut next = Filter::sized_for(
                usize::try_from(count)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(4),
                set.window_ms,
            );
            // `during` ends here (nothing more can spoil this build): from now on the
            // ids go straight into the new filter.
            for (id, exp) in set.during.take().iter().flatten() {
                next.insert(id, *exp);
            }
            for (id, exp) in &set.ids {
                next.insert(id, *exp);
            }
            set.next = Some(next);
        }
        let pages = self.read_into_next(now, paced);
        if keep_fresh {
            let fresh = async {
                loop {
                    actix_web::rt::time::sleep(POLL_INTERVAL).await;
                    if let Err(e) = self.incremental(now_millis(), limit).await {
                        log::warn!("revocation poll during a filter build failed: {e}");
                    }
                }
            };
            tokio::select! {
                done = pages => done?,
                () = fresh => {}
            }
        } else {
            pages.await?;
        }
        Ok(())
    }

    /// Read the table into `Set::next`, page by page in number order; `paced`, resting
    /// after each stretch of pages as long as they took, so a build of millions of rows
    /// takes about half of a core for twice as long rather than all of one (the
    /// 70-minute whole-life soak, 2026-12-07: each full read of ~9 M rows halved the
    /// rate for 30–50 s). A repair is not paced: a revocation may be missing meanwhile.
    async fn read_into_next(&self, now: i64, paced: bool) -> Result<(), StoreError> {
        let page_rows = self.build_page.load(Ordering::Relaxed).max(1);
        let mut after = 0;
        let mut owed = Duration::ZERO;
        loop {
            let started = Instant::now();
            let page = self
                .db
                .read(move |conn| revoked::revoked_after(conn, after, page_rows))
                .await?;
            let last = page.len() < usize::try_from(page_rows).unwrap_or(0);
            after = page.last().map_or(after, |r| r.2);
            {
                let mut set = self.set.write().map_err(poisoned)?;
                let next = set.next.as_mut().ok_or_else(|| {
                    StoreError::Internal("the filter being built was dropped".into())
                })?;
                for (id, exp, _) in &page {
                    if *exp > now {
                        next.insert(id, *exp);
                    }
                }
            }
            if last {
                return Ok(());
            }
            if paced {
                owed += started.elapsed();
                if owed >= PACE_STEP {
                    actix_web::rt::time::sleep(std::mem::take(&mut owed)).await;
                }
            }
        }
    }

    pub async fn run_poller(self: Arc<Self>) {
        let mut tick = actix_web::rt::time::interval(POLL_INTERVAL);
        loop {
            tick.tick().await;
            if let Err(e) = self.poll().await {
                log::warn!("revocation poll failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: usize) -> i64 {
        i64::try_from(i).expect("a small index")
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("job:{i}:1")).collect()
    }

    #[test]
    fn a_window_is_dropped_once_its_expiries_have_passed_and_no_other_is() {
        let mut f = Filter::sized_for(1024, 1000);
        let all = ids(0..3000);
        // Expiries 500..3499: windows ending at 1000, 2000, 3000 and 4000.
        for (i, id) in all.iter().enumerate() {
            f.insert(id, 500 + n(i));
        }
        assert_eq!(f.windows.len(), 4);
        // Less the few a window seemed to hold already (about 1 % when full).
        assert!(f.inserted > 2950, "{} inserted", f.inserted);
        for now in [999, 1000, 1999, 2000, 2500, 3000, 3499] {
            f.drop_expired(now);
            // No false negative: every id still revoked at `now` is held.
            let lost: Vec<&String> = all
                .iter()
                .enumerate()
                .filter(|(i, id)| 500 + n(*i) > now && !f.may_hold(id))
                .map(|(_, id)| id)
                .collect();
            assert!(lost.is_empty(), "at {now}: {lost:?}");
        }
        // At 3499 the windows ending at 1000, 2000 and 3000 are gone, with their ids.
        assert_eq!(f.windows.len(), 1);
        assert!((490..=500).contains(&f.inserted), "{} inserted", f.inserted);
        let kept = all[..2500].iter().filter(|id| f.may_hold(id)).count();
        assert!(kept < 25, "{kept} of 2 500 expired ids still seem held");
        f.drop_expired(4000);
        assert!(f.windows.is_empty());
        assert_eq!(f.inserted, 0);
    }

    #[test]
    fn out_of_room_the_windows_holding_fewest_merge_and_nothing_active_is_lost() {
        // Room for three windows of 1 024 ids.
        let mut f = Filter::with_budget(1024, 1000, 3 * 1024 * FILTER_BITS_PER_ID);
        let all = ids(0..1200);
        let exp = |i: usize| -> i64 {
            // Two busy windows (ending at 1000 and 2000), then one id in each of ten
            // windows far out (an operator's revocations).
            match i {
                0..=599 => 100 + n(i),
                600..=1189 => 1000 + (n(i) - 600),
                _ => 100_000 + 1000 * (n(i) - 1190),
            }
        };
        for (i, id) in all.iter().enumerate() {
            f.insert(id, exp(i));
        }
        assert!(f.windows.len() <= 3, "{} windows", f.windows.len());
        assert!(f.windows.len() * f.window_bits() <= 3 * 1024 * FILTER_BITS_PER_ID);
        for now in [0, 500, 1000, 1500, 2000, 50_000, 100_500, 104_500, 109_000] {
            f.drop_expired(now);
            let lost: Vec<&String> = all
                .iter()
                .enumerate()
                .filter(|(i, id)| exp(*i) > now && !f.may_hold(id))
                .map(|(_, id)| id)
                .collect();
            assert!(lost.is_empty(), "at {now}: {lost:?}");
        }
        // The far ones merged with each other, not with the busy windows: those were
        // still dropped when they expired.
        f.drop_expired(2000);
        let kept = all[..1190].iter().filter(|id| f.may_hold(id)).count();
        assert!(kept < 24, "{kept} of 1 190 expired ids still seem held");
    }

    #[test]
    fn a_filter_is_outgrown_past_its_windows_size_until_they_are_the_largest() {
        let mut f = Filter::sized_for(1024, 1000);
        let mut n = 0;
        for id in ids(0..2000) {
            if f.outgrown() {
                break;
            }
            assert!(f.inserted <= 1024, "not outgrown at {}", f.inserted);
            f.insert(&id, 500);
            n += 1;
        }
        assert!(f.outgrown(), "never outgrown");
        assert_eq!(f.inserted, 1025);
        assert!(n < 1050, "{n} ids for 1 025 new ones");
        let mut largest = Filter::sized_for(usize::MAX, 1000);
        assert_eq!(largest.window_ids, MAX_WINDOW_BITS / FILTER_BITS_PER_ID);
        assert!(largest.window_bits() <= MAX_WINDOW_BITS);
        largest.inserted = usize::MAX;
        assert!(!largest.outgrown(), "no larger filter is allowed");
    }
}
