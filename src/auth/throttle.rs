//! Throttling of failed authentication per peer address (the TCP peer; behind a load
//! balancer that is the balancer). Only failures count. A peer over its quota still has
//! its credentials checked: valid requests are served, every further failure is
//! answered 429 with `Retry-After` instead of 401 (see the middleware). Other peers are
//! unaffected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Most peers tracked as blocked at once (bounded memory under a spray of addresses).
const MAX_BLOCKED: usize = 100_000;

pub struct Throttle {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl Throttle {
    /// `per_minute` failures per peer per minute, with the same burst.
    pub fn new(per_minute: u32) -> Self {
        let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Throttle {
            limiter: RateLimiter::keyed(Quota::per_minute(n)),
            clock: DefaultClock::default(),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds the peer must still wait, if it is blocked.
    pub fn blocked_for(&self, ip: IpAddr) -> Option<u64> {
        let mut b = self.blocked.lock().ok()?;
        let until = *b.get(&ip)?;
        let now = Instant::now();
        if until <= now {
            b.remove(&ip);
            return None;
        }
        Some((until - now).as_secs().max(1))
    }

    /// Count one failure; returns the wait in seconds when this failure went over quota.
    pub fn record_failure(&self, ip: IpAddr) -> Option<u64> {
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
        Some(wait.as_secs().max(1))
    }

    /// Drop state of peers that have been quiet (housekeeping).
    pub fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
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
