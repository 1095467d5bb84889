//! Stitcher ingestion: webhook deliveries (processed exactly once) and manual dispatch,
//! both turning into QUEUED jobs. The HTTP handlers are in `http::stitcher`; here are
//! the request bodies, the answer and the delivery row (`model`), delivery storage and
//! its deduplication on the `(caller, delivery_id)` key (`repo`), the group commit of
//! deliveries on PostgreSQL (`ingest`), and the cache behind `estimatedStartTime`
//! ([`EstimateCache`]).
pub mod ingest;
pub mod model;
pub mod repo;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::jobs::queues::{QueueCounts, QueueStats};

/// Queue statistics behind `estimatedStartTime`, reused for 2 s per queue: an estimate
/// does not need an exact count per delivery, and counting a long queue on every webhook
/// would make ingestion slower the longer the queue gets.
///
/// Per queue, not per (queue, priority): an entry holds the queued jobs counted by
/// priority, and any priority's figure is a sum over it. Keyed by priority too, a
/// dispatch caller cycling through the 2,001 priorities missed every time (and past
/// 1,024 entries the cache was emptied): each dispatch counted the queue again, 19.8 ms
/// at the median over 100,000 queued jobs instead of 0.6 ms (review finding,
/// 2026-12-06).
///
/// One delivery at a time refreshes an entry: the first to find it stale gets `None`
/// (it counts and [`EstimateCache::put`]s), and the entry counts as fresh again for
/// everyone else meanwhile, who get the stale figures. Without that, every delivery
/// arriving while the count ran counted too: at 6 000 deliveries/s every 2 s a burst
/// of up to one count per connection over a queue of 100 000 jobs, which took the
/// half-load p99 of webhooks to 100–300 ms. A refresh that fails leaves the stale
/// figures for one more period, so an estimate is at most two periods old.
pub struct EstimateCache {
    entries: Mutex<HashMap<String, (Instant, std::sync::Arc<QueueCounts>)>>,
    ttl: Duration,
    refreshes: std::sync::atomic::AtomicU64,
}

const ESTIMATE_TTL: Duration = Duration::from_secs(2);
const MAX_ESTIMATES: usize = 1024;

impl Default for EstimateCache {
    fn default() -> Self {
        EstimateCache::with_ttl(ESTIMATE_TTL)
    }
}

impl EstimateCache {
    pub fn with_ttl(ttl: Duration) -> Self {
        EstimateCache {
            entries: Mutex::default(),
            ttl,
            refreshes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The cached figures; `None` when there are none, or when they are stale and this
    /// caller is the one to refresh them.
    pub fn get(&self, queue: &str, priority: i32) -> Option<QueueStats> {
        let mut e = self.entries.lock().ok()?;
        let (at, counts) = e.get_mut(queue)?;
        if at.elapsed() >= self.ttl {
            // This caller refreshes; the others keep the stale figures meanwhile.
            *at = Instant::now();
            return None;
        }
        Some(counts.for_priority(priority))
    }

    /// Counts read so far (each a read of the queue).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn put(&self, queue: &str, counts: QueueCounts) {
        self.refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let counts = std::sync::Arc::new(counts);
        if let Ok(mut e) = self.entries.lock() {
            if e.len() >= MAX_ESTIMATES {
                let ttl = self.ttl;
                e.retain(|_, (at, _)| at.elapsed() < ttl);
                if e.len() >= MAX_ESTIMATES {
                    e.clear();
                }
            }
            e.insert(queue.to_owned(), (Instant::now(), counts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ahead` jobs queued at priority 0.
    fn stats(ahead: i64) -> QueueCounts {
        QueueCounts {
            by_priority: vec![(0, ahead)],
            running: 0,
            avg_run_ms: None,
        }
    }

    /// A stale entry is refreshed by one caller: the first to find it stale gets
    /// `None`, everyone after it the stale figures, until the refresh is put.
    #[test]
    fn one_caller_refreshes_a_stale_estimate_while_the_others_use_it() {
        let cache = EstimateCache::with_ttl(Duration::from_millis(50));
        assert!(cache.get("q", 0).is_none(), "nothing cached yet");
        cache.put("q", stats(1));
        assert_eq!(cache.get("q", 0).map(|s| s.ahead), Some(1));
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get("q", 0).is_none(), "the first caller refreshes");
        assert_eq!(
            cache.get("q", 0).map(|s| s.ahead),
            Some(1),
            "the others use the stale figures meanwhile"
        );
        cache.put("q", stats(2));
        assert_eq!(cache.get("q", 0).map(|s| s.ahead), Some(2));
        // Every priority from the one entry: those above 0 have nothing ahead.
        assert_eq!(cache.get("q", 1).map(|s| s.ahead), Some(0));
        assert_eq!(cache.get("q", -5).map(|s| s.ahead), Some(2));
        assert!(cache.get("other", 0).is_none(), "per queue");
    }
}
