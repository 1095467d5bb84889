//! A closed-loop driver for requests that are not the fixed scenarios: each connection
//! calls `one(agent, connection, n)` until the time is up; answers are counted per status
//! (0 = no HTTP answer), with the server's CPU over the run.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{cpu_ticks, percentile, CLK_TCK};

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub statuses: BTreeMap<u16, u64>,
    /// Server CPU (utime + stime) per request, µs.
    pub server_cpu_us: f64,
}

impl Outcome {
    pub fn statuses(&self) -> String {
        self.statuses
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("no answer × {n}")
                } else {
                    format!("{s} × {n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// Answers with a 2xx status: work done (a refusal is an answer, not work).
    pub fn succeeded(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// Succeeded requests per second.
    pub fn succeeded_rps(&self) -> f64 {
        self.rps * self.succeeded() as f64 / self.requests.max(1) as f64
    }

    /// Server CPU per succeeded request, µs (refusals' CPU included in the cost).
    pub fn cpu_per_success_us(&self) -> f64 {
        self.server_cpu_us * self.requests as f64 / self.succeeded().max(1) as f64
    }

    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// The status of an answer (0 when there was none), its body drained.
pub fn status(r: Result<ureq::Response, ureq::Error>) -> u16 {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(_) => return 0,
    };
    let code = resp.status();
    let mut sink = Vec::new();
    let _ = resp.into_reader().read_to_end(&mut sink);
    code
}

pub fn drive<F>(conns: usize, duration: Duration, pid: u32, one: F) -> Outcome
where
    F: Fn(&ureq::Agent, usize, u64) -> u16 + Sync,
{
    let stop = AtomicBool::new(false);
    let server0 = cpu_ticks(&pid.to_string());
    let started = Instant::now();
    let results: Vec<(Vec<f64>, BTreeMap<u16, u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|c| {
                let (stop, one) = (&stop, &one);
                s.spawn(move || {
                    let agent = ureq::AgentBuilder::new()
                        .max_idle_connections_per_host(1)
                        .timeout(Duration::from_secs(30))
                        .build();
                    let mut lat = Vec::new();
                    let mut statuses = BTreeMap::new();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let code = one(&agent, c, n);
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                        *statuses.entry(code).or_insert(0) += 1;
                        n += 1;
                    }
                    (lat, statuses)
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let server = cpu_ticks(&pid.to_string()).saturating_sub(server0) as f64 / CLK_TCK;
    let mut lat = Vec::new();
    let mut statuses = BTreeMap::new();
    for (l, st) in results {
        lat.extend(l);
        for (k, v) in st {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let requests = lat.len() as u64;
    Outcome {
        requests,
        rps: requests as f64 / wall,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        statuses,
        server_cpu_us: server * 1e6 / requests.max(1) as f64,
    }
}
