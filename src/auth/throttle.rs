//! Throttling of failed authentication per peer address (the TCP peer; behind a load
//! balancer that is the balancer; an IPv6 peer by its /64, see [`peer_key`]). Only
//! failures count. A peer over its quota still has
//! its credentials checked: valid requests are served, every further failure is
//! answered 429 with `Retry-After` instead of 401 (see the middleware). Other peers are
//! unaffected.
//!
//! Also here: the bound on bodies read before their request is verified
//! ([`Throttle::begin_body_read`]). A signed request or a webhook delivery passes its
//! header checks without any secret (a caller's name is not one), and then the server
//! waits for its body. Those waits are bounded per instance and per peer, so one peer
//! sending bodies slowly cannot take every place.
//!
//! And the count of open connections per peer ([`Connections`],
//! `COORDINATOR_MAX_CONNECTIONS_PER_PEER`), taken when a connection is accepted: by
//! `startup`'s `count_connection` on plain HTTP, by `tls::serve_connection` on HTTPS.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;

/// Most peers tracked as blocked at once (bounded memory under a spray of addresses).
const MAX_BLOCKED: usize = 100_000;

/// A peer over its failure budget may still start this many body verifications per
/// second (requests that passed the cheap header checks for a known caller), so a valid
/// caller behind the same address is served while the work a bad peer causes is bounded.
const BLOCKED_VERIFICATIONS_PER_SEC: NonZeroU32 = NonZeroU32::MIN.saturating_add(9);

/// Most bodies read at once, before their requests are verified, per instance ...
pub const MAX_BODY_READS: usize = 256;
/// ... and per peer (so one peer takes at most an eighth of them). A body of a
/// well-behaved client arrives in a moment, so even a load balancer forwarding every
/// client has few in this phase at any time.
pub const MAX_BODY_READS_PER_PEER: u32 = 32;

/// Why a body read was not started.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyReadRefused {
    /// This peer already has [`MAX_BODY_READS_PER_PEER`] bodies on their way.
    Peer,
    /// The instance has [`MAX_BODY_READS`], and no peer holds more than this one.
    All,
}

/// One body on its way, as the count sees it.
struct Reader {
    id: u64,
    since: Instant,
    shared: Arc<ReadShared>,
}

/// What a read and the count share: the signal that ends it, and when its last bytes
/// came (ms since the throttle's epoch).
struct ReadShared {
    evict: Notify,
    progress_ms: AtomicU64,
}

#[derive(Default)]
struct BodyReads {
    /// Each peer's readers, oldest first.
    per_peer: HashMap<Option<IpAddr>, Vec<Reader>>,
    total: usize,
    next_id: u64,
    evicted: u64,
}

impl BodyReads {
    /// When every place is taken: of the peers holding more places than `mine`, the
    /// read whose bytes stopped coming longest ago (ties: the oldest read). A body
    /// that keeps arriving, however slowly, is chosen only after every stalled one;
    /// choosing the oldest read instead cut honest uploads off mid-body while stalled
    /// ones, reopened at once, were always newer (review finding, 2026-12-06).
    fn victim(&self, mine: usize) -> Option<(Option<IpAddr>, u64)> {
        self.per_peer
            .iter()
            .filter(|(_, readers)| readers.len() > mine)
            .flat_map(|(key, readers)| readers.iter().map(move |r| (key, r)))
            .min_by_key(|(_, r)| (r.shared.progress_ms.load(Ordering::Relaxed), r.since))
            .map(|(key, r)| (*key, r.id))
    }
}

/// One body being read; counted until dropped, or until a peer holding fewer places
/// takes its place ([`BodyRead::evicted`]).
pub struct BodyRead<'a> {
    throttle: &'a Throttle,
    key: Option<IpAddr>,
    id: u64,
    shared: Arc<ReadShared>,
}

impl BodyRead<'_> {
    /// Resolves when this read's place was given to another peer: its body is then no
    /// longer waited for.
    pub async fn evicted(&self) {
        self.shared.evict.notified().await;
    }

    /// More of the body came: this read is not stalled.
    pub fn progressed(&self) {
        self.shared
            .progress_ms
            .store(self.throttle.ms_since_epoch(), Ordering::Relaxed);
    }
}

impl Drop for BodyRead<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.throttle.body_reads.lock() {
            let Some(readers) = r.per_peer.get_mut(&self.key) else {
                return;
            };
            // Not there: evicted, its place already counted for another.
            let Some(at) = readers.iter().position(|x| x.id == self.id) else {
                return;
            };
            readers.remove(at);
            if readers.is_empty() {
                r.per_peer.remove(&self.key);
            }
            r.total = r.total.saturating_sub(1);
        }
    }
}

/// Whole seconds to wait, rounded up (a `Retry-After` of 1.9 s is "2"), at least 1.
pub fn ceil_secs(d: Duration) -> u64 {
    let whole = d.as_secs();
    let up = if d.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    };
    up.max(1)
}

/// The key a peer is counted under: an IPv4 address as it is (an IPv4-mapped IPv6
/// address too), an IPv6 address by its /64 prefix. One IPv6 host or subnet usually
/// holds a whole /64, so keyed by full address it could send each failure from a fresh
/// one: never throttled, and a new entry in the limiters' maps with every request.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !(u128::from(u64::MAX)),
            )),
        },
    }
}

/// Open connections per peer (keyed as [`peer_key`]), bounded so one address cannot
/// hold every connection, and with them every file descriptor, of the instance. Each
/// connection is counted from its accept (on HTTPS before its handshake) until it
/// closes; a connection past its peer's bound is closed at once, before a request is
/// read. The map has an entry only for peers holding connections now.
pub struct Connections {
    per_peer: Mutex<HashMap<IpAddr, u32>>,
    /// 0: no bound per peer (only the instance's).
    max_per_peer: u32,
    open: AtomicU64,
    refused: AtomicU64,
}

/// One counted connection; the count drops with it (it lives in the connection's data).
pub struct ConnectionHeld {
    connections: Arc<Connections>,
    key: IpAddr,
}

impl Drop for ConnectionHeld {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut m) = self.connections.per_peer.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

impl Connections {
    /// `max_per_peer` connections per peer at most (0: no bound).
    pub fn new(max_per_peer: u32) -> Arc<Self> {
        Arc::new(Connections {
            per_peer: Mutex::new(HashMap::new()),
            max_per_peer,
            open: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Count a new connection from `ip`, or `None` when its peer already holds its bound
    /// (the connection is then to be closed; it is counted as refused).
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionHeld> {
        let key = peer_key(ip);
        let mut m = self.per_peer.lock().ok()?;
        let n = m.entry(key).or_insert(0);
        if self.max_per_peer > 0 && *n >= self.max_per_peer {
            if *n == 0 {
                m.remove(&key);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionHeld {
            connections: self.clone(),
            key,
        })
    }

    /// Connections counted now, and those refused so far (for `/metrics`).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.open.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Peers holding connections now (the size of the map).
    pub fn peers(&self) -> usize {
        self.per_peer.lock().map_or(0, |m| m.len())
    }
}

pub struct Throttle {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Expensive verifications (a MAC over a body) a blocked peer may still start.
    verify_budget: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    body_reads: Mutex<BodyReads>,
    /// Zero of the body reads' progress times.
    epoch: Instant,
}

impl Throttle {
    /// `per_minute` failures per peer per minute, with the same burst.
    pub fn new(per_minute: u32) -> Self {
        let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Throttle {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            verify_budget: RateLimiter::keyed(Quota::per_second(BLOCKED_VERIFICATIONS_PER_SEC)),
            clock: DefaultClock::default(),
            blocked: Mutex::new(HashMap::new()),
            body_reads: Mutex::new(BodyReads::default()),
            epoch: Instant::now(),
        }
    }

    /// Count a body about to be read for a request not yet verified, or refuse it when
    /// its peer (`None`: a peer without an address shares one count) is at its bound.
    /// When the instance is at its bound, a peer holding fewer places than another
    /// takes the oldest place of the peer holding the most, whose read then ends
    /// ([`BodyRead::evicted`]); else it is refused. So a few addresses holding every
    /// place with bodies that never finish cannot keep everyone else out. The count
    /// ends when the returned guard is dropped.
    pub fn begin_body_read(&self, ip: Option<IpAddr>) -> Result<BodyRead<'_>, BodyReadRefused> {
        let key = ip.map(peer_key);
        let mut r = self
            .body_reads
            .lock()
            .map_err(|_poisoned| BodyReadRefused::All)?;
        let mine = r.per_peer.get(&key).map_or(0, Vec::len);
        if mine >= usize::try_from(MAX_BODY_READS_PER_PEER).unwrap_or(usize::MAX) {
            return Err(BodyReadRefused::Peer);
        }
        if r.total >= MAX_BODY_READS {
            let (victim, victim_id) = r.victim(mine).ok_or(BodyReadRefused::All)?;
            if let Some(readers) = r.per_peer.get_mut(&victim) {
                if let Some(at) = readers.iter().position(|x| x.id == victim_id) {
                    readers.remove(at).shared.evict.notify_one();
                }
                if readers.is_empty() {
                    r.per_peer.remove(&victim);
                }
            }
            r.total = r.total.saturating_sub(1);
            r.evicted = r.evicted.saturating_add(1);
        }
        let id = r.next_id;
        r.next_id = r.next_id.wrapping_add(1);
        let shared = Arc::new(ReadShared {
            evict: Notify::new(),
            progress_ms: AtomicU64::new(self.ms_since_epoch()),
        });
        r.per_peer.entry(key).or_default().push(Reader {
            id,
            since: Instant::now(),
            shared: shared.clone(),
        });
        r.total += 1;
        Ok(BodyRead {
            throttle: self,
            key,
            id,
            shared,
        })
    }

    fn ms_since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bodies on their way now, and reads ended so far to give their place to a peer
    /// holding fewer (for `/metrics`).
    pub fn body_reads(&self) -> (usize, u64) {
        self.body_reads
            .lock()
            .map_or((0, 0), |r| (r.total, r.evicted))
    }

    /// Seconds the peer must still wait, if it is blocked.
    pub fn blocked_for(&self, ip: IpAddr) -> Option<u64> {
        let ip = peer_key(ip);
        let mut b = self.blocked.lock().ok()?;
        let until = *b.get(&ip)?;
        let now = Instant::now();
        if until <= now {
            b.remove(&ip);
            return None;
        }
        Some(ceil_secs(until - now))
    }

    /// May a blocked peer start one more expensive verification now?
    pub fn may_verify(&self, ip: IpAddr) -> bool {
        self.verify_budget.check_key(&peer_key(ip)).is_ok()
    }

    /// Count one failure; returns the wait in seconds when this failure went over quota.
    pub fn record_failure(&self, ip: IpAddr) -> Option<u64> {
        let ip = peer_key(ip);
        let Err(not_until) = self.limiter.check_key(&ip) else {
            return None;
        };
        let wait = not_until
            .wait_time_from(self.clock.now())
            .max(Duration::from_secs(1));
        if let Ok(mut b) = self.blocked.lock() {
            if b.len() >= MAX_BLOCKED {
                let now = Instant::now();
                b.retain(|_, until| *until > now);
            }
            if b.len() < MAX_BLOCKED {
                b.insert(ip, Instant::now() + wait);
            }
        }
        Some(ceil_secs(wait))
    }

    /// Drop state of peers that have been quiet (housekeeping).
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.verify_budget.retain_recent();
        self.verify_budget.shrink_to_fit();
        if let Ok(mut b) = self.blocked.lock() {
            let now = Instant::now();
            b.retain(|_, until| *until > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1900)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2000)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }

    #[test]
    fn blocked_peers_have_a_verification_budget() {
        let t = Throttle::new(3);
        let ip: IpAddr = "10.0.0.3".parse().expect("ip");
        let allowed = (0..100).filter(|_| t.may_verify(ip)).count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn an_ipv6_peer_counts_by_its_64_and_a_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(
            peer_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(peer_key(ip("::ffff:10.0.0.9")), ip("10.0.0.9"));
        assert_eq!(peer_key(ip("10.0.0.9")), ip("10.0.0.9"));
        // Failures from fresh addresses of one /64 share one budget...
        let t = Throttle::new(3);
        for i in 1..=3u16 {
            assert_eq!(t.record_failure(ip(&format!("2001:db8::{i:x}"))), None);
        }
        assert!(t.record_failure(ip("2001:db8::ffff")).is_some());
        assert!(t.blocked_for(ip("2001:db8::1234")).is_some());
        // ...and another /64 is not blocked.
        assert_eq!(t.blocked_for(ip("2001:db8:0:1::1")), None);
    }

    #[test]
    fn connections_are_bounded_per_peer_and_counted_until_closed() {
        let c = Connections::new(3);
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let held: Vec<ConnectionHeld> = (1..=3u16)
            .map(|i| {
                c.open(ip(&format!("2001:db8::{i:x}")))
                    .expect("within the bound")
            })
            .collect();
        // A fourth from the same /64 is refused; another peer is not affected.
        assert!(c.open(ip("2001:db8::ff")).is_none());
        let other = c.open(ip("10.0.0.1")).expect("another peer");
        assert_eq!(c.counts(), (4, 1));
        drop(other);
        drop(held);
        // Every connection closed: nothing is left, and the peer may connect again.
        assert_eq!((c.counts().0, c.peers()), (0, 0));
        assert!(c.open(ip("2001:db8::1")).is_some());
        // 0: no bound per peer.
        let c = Connections::new(0);
        let held: Vec<ConnectionHeld> = (0..1000)
            .map(|_| c.open(ip("10.0.0.1")).expect("unbounded"))
            .collect();
        assert_eq!(c.counts(), (1000, 0));
        drop(held);
    }

    #[test]
    fn bodies_read_before_verification_are_bounded_per_peer_and_in_all() {
        let t = Throttle::new(3);
        let ip = |i: u32| -> Option<IpAddr> { Some(IpAddr::from(std::net::Ipv4Addr::from(i))) };
        let mut held: Vec<BodyRead<'_>> = (0..MAX_BODY_READS_PER_PEER)
            .map(|_| t.begin_body_read(ip(1)).expect("within the peer's bound"))
            .collect();
        assert_eq!(t.begin_body_read(ip(1)).err(), Some(BodyReadRefused::Peer));
        // Another peer is not affected.
        let other = t.begin_body_read(ip(2)).expect("another peer");
        drop(other);
        // One ends: its peer may start one more.
        held.pop();
        held.push(t.begin_body_read(ip(1)).expect("a place came free"));
        // Peers together reach the instance's bound; then everyone waits.
        let per = usize::try_from(MAX_BODY_READS_PER_PEER).expect("u32 fits");
        let mut peer = 10;
        while held.len() < MAX_BODY_READS {
            for _ in 0..per.min(MAX_BODY_READS - held.len()) {
                held.push(t.begin_body_read(ip(peer)).expect("below the bound"));
            }
            peer += 1;
        }
        // The instance is full; a peer at its own bound stays refused as such.
        assert_eq!(t.begin_body_read(ip(10)).err(), Some(BodyReadRefused::Peer));
        drop(held);
        assert!(t.begin_body_read(ip(999)).is_ok(), "every count given back");
        assert!(t.body_reads.lock().expect("lock").per_peer.is_empty());
    }

    /// Peers 0.0.0.1, 0.0.0.2, … each at its bound until every place is held, oldest
    /// first.
    fn every_place_held(t: &Throttle) -> Vec<BodyRead<'_>> {
        let per = usize::try_from(MAX_BODY_READS_PER_PEER).expect("u32 fits");
        let peers = u32::try_from(MAX_BODY_READS / per).expect("fits");
        let mut held = Vec::new();
        for peer in 1..=peers {
            for _ in 0..per {
                let ip = Some(IpAddr::from(std::net::Ipv4Addr::from(peer)));
                held.push(t.begin_body_read(ip).expect("below the bound"));
            }
        }
        held
    }

    /// A body that keeps arriving is chosen only after every stalled one: a follow-up
    /// review cut honest uploads off mid-body because they were the oldest reads.
    #[test]
    fn a_read_that_keeps_arriving_is_spared() {
        let t = Throttle::new(3);
        let ip = |i: u32| -> Option<IpAddr> { Some(IpAddr::from(std::net::Ipv4Addr::from(i))) };
        let held = every_place_held(&t);
        std::thread::sleep(Duration::from_millis(5));
        held[0].progressed();
        let evicted =
            |r: &BodyRead<'_>| futures_util::FutureExt::now_or_never(r.evicted()).is_some();
        let _newcomer = t.begin_body_read(ip(1000)).expect("takes a place");
        assert!(!evicted(&held[0]), "the read that keeps arriving stays");
        assert!(evicted(&held[1]), "the stalest read goes");
    }

    /// Eight addresses holding every place (review finding, 2026-12-05) no longer keep
    /// out a peer holding fewer: it takes the oldest place of a peer holding the most.
    #[test]
    fn a_peer_holding_fewer_takes_the_place_of_one_holding_most() {
        let t = Throttle::new(3);
        let ip = |i: u32| -> Option<IpAddr> { Some(IpAddr::from(std::net::Ipv4Addr::from(i))) };
        let per = usize::try_from(MAX_BODY_READS_PER_PEER).expect("u32 fits");
        let mut held = every_place_held(&t);
        assert_eq!(t.body_reads(), (MAX_BODY_READS, 0));
        let evicted =
            |r: &BodyRead<'_>| futures_util::FutureExt::now_or_never(r.evicted()).is_some();
        assert!(!held.iter().any(evicted));
        // A peer with none takes the oldest place of the first peer (all hold 32; its
        // oldest read is the oldest).
        let newcomer = t.begin_body_read(ip(1000)).expect("takes a place");
        assert_eq!(t.body_reads(), (MAX_BODY_READS, 1));
        let gone: Vec<usize> = (0..held.len()).filter(|&i| evicted(&held[i])).collect();
        assert_eq!(gone, vec![0], "the oldest read of the peer holding most");
        // Dropping the evicted read gives nothing back twice.
        held.remove(0);
        assert_eq!(t.body_reads().0, MAX_BODY_READS);
        // Peer 1 now holds 31: it takes a place from a peer holding 32 (peer 2's oldest).
        held.push(t.begin_body_read(ip(1)).expect("fewer than peer 2"));
        assert!(evicted(&held[per - 1]), "peer 2's oldest read");
        held.remove(per - 1);
        drop(newcomer);
        drop(held);
        assert_eq!(t.body_reads().0, 0);
        assert!(t.body_reads.lock().expect("lock").per_peer.is_empty());
        // Every peer holding as many as the others: a peer that holds one is refused,
        // one that holds none still takes a place.
        let mut held: Vec<BodyRead<'_>> = (0..MAX_BODY_READS)
            .map(|i| {
                t.begin_body_read(ip(u32::try_from(i).expect("fits")))
                    .expect("one each")
            })
            .collect();
        assert_eq!(t.begin_body_read(ip(5)).err(), Some(BodyReadRefused::All));
        held.push(t.begin_body_read(ip(5000)).expect("holds none"));
        assert!(evicted(&held[0]));
    }

    #[test]
    fn only_the_failing_peer_is_blocked() {
        let t = Throttle::new(3);
        let bad: IpAddr = "10.0.0.1".parse().expect("ip");
        let good: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(t.record_failure(bad), None);
        assert_eq!(t.record_failure(bad), None);
        assert_eq!(t.record_failure(bad), None);
        assert!(t.record_failure(bad).is_some());
        assert!(t.blocked_for(bad).is_some());
        assert_eq!(t.blocked_for(good), None);
    }
}
