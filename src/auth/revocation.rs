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
//! read, what it committed is in that read). Every row since is read again meanwhile. A revocation is only missed if its transaction stays open
//! for `STALL_LIMIT` after a later one committed, which the full reload
//! (`FULL_RELOAD`) then repairs. Before (review, 2026-12-06) the 3 s overlap alone
//! decided, and a revocation committed more than 3 s after taking its number (a slow
//! database, a lock wait) was missed by every other instance for up to 10 minutes.
//!
//! Memory is bounded: past `limit()` active ids (default `MAX_REVOCATIONS`) the set
//! keeps, instead of the ids, a Bloom filter of every active id it knows ([`Filter`],
//! at most `MAX_FILTER_BITS`, 16 MiB). An id the filter does not hold is not revoked,
//! answered from memory as before; one it may hold (a revoked token, or about one
//! check in a hundred or fewer) asks the database (an indexed primary-key lookup). The
//! filter only grows between builds, so a poll builds a new one from the table, page
//! by page, when the old one is past the ids it was sized for and every `FULL_RELOAD`
//! (dropping what expired), while incremental polls go on beside it and keep the set in
//! use current (what they read, and what is revoked here, goes into both filters); a
//! build that finds the table back under the bound goes back to the ids. Before (until 2026-12-07) the set was dropped past the bound and
//! every job-token check asked the database: at 1 h token lifetimes that was any
//! deployment ending more than ~28 jobs a second, and the whole-life soak lost a
//! fifth of its rate after its first half minute. No revocation is ever refused for
//! want of room: an operator's must work most when the set is full.
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
use std::collections::{HashMap, VecDeque};
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
/// left to the full reload.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// After the first full load, the poll starts this many numbers below the newest one,
/// for transactions that took a number before the load and commit after it (later
/// loads leave the start to the writers, as the incremental polls do).
const SEQ_MARGIN: i64 = 1024;
/// A full reload this often catches anything the incremental poll could not.
const FULL_RELOAD: Duration = Duration::from_secs(600);
/// Past the bound: the filter's bits per id it is sized for (about 1 % false
/// positives when it holds that many, far fewer before), the most bits it may take
/// (16 MiB: past ~13 M active revocations its false positives grow, each a database
/// read, and memory stays put), the fewest ids it is sized for, and the page in which a
/// build reads the table.
const FILTER_BITS_PER_ID: usize = 10;
const MAX_FILTER_BITS: usize = 1 << 27;
const MIN_FILTER_IDS: usize = 1024;
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
    synced_at: Option<Instant>,
    full_at: Option<Instant>,
    gc_at: Instant,
    /// The last purge removed a whole batch: purge again at the next poll.
    gc_more: bool,
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
    /// More active revocations than the limit: `ids` is empty and this holds every
    /// active id known (and some expired ones, until the next build).
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

/// A Bloom filter of revoked ids: no false negatives, so an id it does not hold is
/// not revoked; one it may hold is asked of the database. Keyed by a random
/// per-process hasher, so nobody can choose ids that collide on every instance.
struct Filter {
    bloom: fastbloom::BloomFilter<RandomState>,
    /// The ids it was sized for (past them its false positives grow).
    capacity: usize,
    /// Ids inserted that it did not already seem to hold (for the gauge and the
    /// capacity; an id re-read by the poll's overlap is not counted twice).
    inserted: usize,
}

impl Filter {
    /// Sized for `ids` (at least `MIN_FILTER_IDS`, at most what `MAX_FILTER_BITS` holds).
    fn sized_for(ids: usize) -> Filter {
        let capacity = ids.clamp(MIN_FILTER_IDS, MAX_FILTER_BITS / FILTER_BITS_PER_ID);
        Filter {
            bloom: fastbloom::BloomFilter::with_num_bits(capacity * FILTER_BITS_PER_ID)
                .hasher(RandomState::new())
                .expected_items(capacity),
            capacity,
            inserted: 0,
        }
    }

    /// Hold `id`; whether it is new (not already seemingly held).
    fn insert(&mut self, id: &str) -> bool {
        let had = self.bloom.insert(id);
        if !had {
            self.inserted = self.inserted.saturating_add(1);
        }
        !had
    }

    fn may_hold(&self, id: &str) -> bool {
        self.bloom.contains(id)
    }

    /// Past the ids it was sized for, and a larger one would be allowed.
    fn outgrown(&self) -> bool {
        self.inserted > self.capacity && self.capacity < MAX_FILTER_BITS / FILTER_BITS_PER_ID
    }

    /// A filter for a set about to pass the bound: its ids, room for four times as
    /// many.
    fn from_ids<'a>(ids: impl ExactSizeIterator<Item = &'a String>) -> Filter {
        let mut f = Filter::sized_for(ids.len().saturating_mul(4));
        for id in ids {
            f.insert(id);
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
        self.filter = Some(Filter::from_ids(self.ids.keys()));
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
    fn next_insert(&mut self, id: &str) {
        if let Some(next) = self.next.as_mut() {
            next.insert(id);
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
        self.filter.as_mut().is_some_and(|f| f.insert(id))
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
            set: RwLock::new(Set::default()),
            sync: Mutex::new(Sync {
                confirmed: 0,
                seen: VecDeque::new(),
                writers: None,
                stall_logged: None,
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

    /// Change the rows per read of a filter's build (tests: a slow build).
    pub fn set_build_page(&self, rows: i64) {
        self.build_page.store(rows.max(1), Ordering::Relaxed);
    }

    /// Number of active revocations known (for the `revoked_tokens` gauge). Past the
    /// bound, the ids the filter holds: those it was built with and added since (some
    /// of them expired since its build).
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
            s.next_insert(jti);
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

    /// One poll: incremental (after a full reload every `FULL_RELOAD`, or when the
    /// filter is outgrown), and the occasional bounded purge of the table.
    pub async fn poll(&self) -> Result<(), StoreError> {
        let limit = self.limit();
        // A filter past the ids it was sized for is built again, larger, at once.
        let outgrown = self
            .set
            .read()
            .map_err(poisoned)?
            .filter
            .as_ref()
            .is_some_and(Filter::outgrown);
        let (first, full, gc) = {
            let s = self.sync.lock().map_err(poisoned)?;
            (
                s.full_at.is_none(),
                outgrown || s.full_at.is_none_or(|t| t.elapsed() >= FULL_RELOAD),
                s.gc_more || s.gc_at.elapsed() >= GC_EVERY,
            )
        };
        let now = now_millis();
        if first {
            // The first load sets the cursor; nothing is current before it ends.
            let (newest, writers, asked) = self.reload(now, limit, false).await?;
            self.advance(Some(newest), Some(writers), asked, true)?;
        } else {
            if full {
                // Later loads keep the set current meanwhile: incremental polls run
                // beside a filter's build (`reload`), and the cursor stays theirs.
                self.reload(now, limit, true).await?;
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
        if full {
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
                set.next_insert(&jti);
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
            if open && age < STALL_LIMIT {
                break;
            }
            if open
                && s.stall_logged
                    .is_none_or(|t| at.duration_since(t) >= STALL_LIMIT)
            {
                s.stall_logged = Some(at);
                log::warn!(
                    "a transaction writing token revocations has been open for over {} s: \
                     the poll moves on, and the next full reload reads what it commits",
                    STALL_LIMIT.as_secs()
                );
            }
            s.confirmed = s.confirmed.max(front.newest);
            s.seen.pop_front();
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
    /// transactions writing to the table after it, and when the load was asked (on the
    /// connection). The set is as current as that moment: a row committed before it is
    /// in every page read after it, and a revocation this instance makes or reads while
    /// the filter is built goes into it too (`Set::during` until the build starts,
    /// `Set::next` from then on). With `keep_fresh`, incremental polls run while the
    /// filter is built, so the set in use stays current (before, 2026-12-07: a build
    /// of millions of rows held the poll for tens of seconds, during which every
    /// job-token check asked the database, and revocations made here meanwhile past the
    /// bound dropped the build, which then started again at the next poll).
    async fn reload(
        &self,
        now: i64,
        limit: usize,
        keep_fresh: bool,
    ) -> Result<(i64, Vec<String>, Instant), StoreError> {
        // From here on, a revocation this instance makes is kept for a filter this load
        // may build (until the guard goes, on every way out).
        let _building = Building::start(&self.set)?;
        let (asked, max_seq, count, rows, writers) = self
            .db
            .read(move |conn| {
                let asked = Instant::now();
                let max_seq = revoked::max_revocation_seq(conn)?;
                let count = revoked::count_revoked_active(conn, now)?;
                let rows = if usize::try_from(count).is_ok_and(|c| c <= limit) {
                    revoked::revoked_active(conn, now, cap(limit))?
                } else {
                    Vec::new()
                };
                Ok((asked, max_seq, count, rows, revoked::writers(conn)?))
            })
            .await?;
        let past_bound = rows.len() > limit || usize::try_from(count).map_or(true, |c| c > limit);
        if past_bound {
            self.build_filter(now, count, limit, keep_fresh).await?;
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
    ) -> Result<(), StoreError> {
        {
            let mut set = self.set.write().map_err(poisoned)?;
            let mut next = Filter::sized_for(
                usize::try_from(count)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(4),
            );
            // `during` ends here (nothing more can spoil this build): from now on the
            // ids go straight into the new filter.
            for (id, _) in set.during.take().iter().flatten() {
                next.insert(id);
            }
            for id in set.ids.keys() {
                next.insert(id);
            }
            set.next = Some(next);
        }
        let pages = self.read_into_next(now);
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

    /// Read the table into `Set::next`, page by page in number order.
    async fn read_into_next(&self, now: i64) -> Result<(), StoreError> {
        let page_rows = self.build_page.load(Ordering::Relaxed).max(1);
        let mut after = 0;
        loop {
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
                        next.insert(id);
                    }
                }
            }
            if last {
                return Ok(());
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
