//! Stitcher ingestion: webhook deliveries (processed exactly once) and manual dispatch,
//! both turning into QUEUED jobs.
pub mod ingest;
pub mod model;
pub mod repo;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::jobs::repo::QueueStats;

/// Queue statistics behind `estimatedStartTime`, reused for 2 s per (queue, priority):
/// an estimate does not need an exact count per delivery, and counting a long queue on
/// every webhook would make ingestion slower the longer the queue gets.
#[derive(Default)]
pub struct EstimateCache {
    entries: Mutex<HashMap<(String, i32), (Instant, QueueStats)>>,
}

const ESTIMATE_TTL: Duration = Duration::from_secs(2);
const MAX_ESTIMATES: usize = 1024;

impl EstimateCache {
    pub fn get(&self, queue: &str, priority: i32) -> Option<QueueStats> {
        let e = self.entries.lock().ok()?;
        e.get(&(queue.to_owned(), priority))
            .filter(|(at, _)| at.elapsed() < ESTIMATE_TTL)
            .map(|(_, s)| *s)
    }

    pub fn put(&self, queue: &str, priority: i32, stats: QueueStats) {
        if let Ok(mut e) = self.entries.lock() {
            if e.len() >= MAX_ESTIMATES {
                e.retain(|_, (at, _)| at.elapsed() < ESTIMATE_TTL);
                if e.len() >= MAX_ESTIMATES {
                    e.clear();
                }
            }
            e.insert((queue.to_owned(), priority), (Instant::now(), stats));
        }
    }
}
