//! `--overload`: signed progress updates on SQLite and PostgreSQL at 0.5×, 1× and 2× the
//! sustainable rate (issue 20). The sustainable rate is the closed-loop peak at the
//! usual connection count; the three loads are then offered open-loop by many more
//! connections than that, each request sent at its scheduled time whatever happened
//! to the ones before, so past capacity the server's queues fill and its bounds decide
//! between queueing (latency grows) and refusing (503/429 at once). Latency is counted
//! from each request's scheduled start and reported for admitted (2xx) requests only;
//! the refused fraction is reported beside it. A second p99 leaves out the generator's
//! own lateness: for a request whose connection was idle at its scheduled time, it
//! counts from the moment the request was sent (the generator's timer wakes in whole
//! milliseconds, late by up to one and more under its own load), and from the
//! scheduled start, as the first, when the previous request was still unanswered then.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::{
    percentile, run_load, running_jobs, setup_credentials, start_server, Creds, FreshStore,
    Scenario,
};

/// Open-loop connections: enough that the offered rate never waits on a connection.
const OPEN_CONNECTIONS: usize = 512;

struct Level {
    factor: f64,
    offered: f64,
    admitted_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// p99 with the generator's own lateness left out (see the module docs).
    p99_sent_ms: f64,
    shed: u64,
    total: u64,
    other: BTreeMap<u16, u64>,
    /// p99 of how late the generator sent a request after its scheduled time (ms):
    /// past a few ms the generator, not the server, is what queues.
    late_p99_ms: f64,
    /// Refusals counted by the server, by where (`/metrics`, `coordinator_db_shed_total`).
    server_shed: BTreeMap<String, u64>,
}

/// One connection's results: admitted latencies (from the scheduled start, and with the
/// generator's lateness left out), send lateness (ms), answers by status.
type Connection = (Vec<f64>, Vec<f64>, Vec<f64>, BTreeMap<u16, u64>);

/// `coordinator_db_shed_total` by `queue/reason`, read from `/metrics`.
fn shed_counters(url: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(resp) = ureq::get(&format!("{url}/metrics")).call() else {
        return out;
    };
    let text = resp.into_string().unwrap_or_default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("coordinator_db_shed_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        out.insert(format!("{}/{}", label("queue"), label("reason")), n);
    }
    out
}

fn offer(url: &str, creds: &Creds, jobs: &[String], rate: f64, duration: Duration) -> Level {
    let interval = Duration::from_secs_f64(OPEN_CONNECTIONS as f64 / rate);
    let before = shed_counters(url);
    // One thread, one task per connection: the generator's cost per request stays far
    // below the server's, so it can offer twice what the server takes.
    let (per, started): (Vec<Connection>, Instant) = actix_rt::System::new().block_on(async {
        let client = awc::Client::builder()
            .connector(awc::Connector::new().limit(OPEN_CONNECTIONS))
            .timeout(Duration::from_secs(30))
            .finish();
        // Open every connection first (one unmeasured `/livez` each, all at once), so
        // the measured run does not start with 512 connects and first requests in its
        // first interval: that transient alone is more than 1 % of a 5 s run's requests
        // at half load, and so would be its p99.
        let warm: Vec<_> = (0..OPEN_CONNECTIONS)
            .map(|_| {
                let (client, livez) = (client.clone(), format!("{url}/livez"));
                actix_rt::spawn(async move {
                    if let Ok(mut r) = client.get(&livez).send().await {
                        let _ = r.body().await;
                    }
                })
            })
            .collect();
        for w in warm {
            let _ = w.await;
        }
        // The run (and its admitted rate) starts here, after the warm-up.
        let started = Instant::now();
        let until = started + duration;
        let tasks: Vec<_> = (0..OPEN_CONNECTIONS)
            .map(|c| {
                let client = client.clone();
                let job = jobs[c % jobs.len()].clone();
                let (url, creds) = (url.to_owned(), creds.clone());
                actix_rt::spawn(async move {
                    let path = format!("/coordinator/jobs/{job}/progress");
                    let full = format!("{url}{path}");
                    // Spread the connections' schedules over one interval.
                    let t0 = Instant::now() + interval.mul_f64(c as f64 / OPEN_CONNECTIONS as f64);
                    let mut lat = Vec::new();
                    let mut lat_sent = Vec::new();
                    let mut late = Vec::new();
                    let mut statuses = BTreeMap::new();
                    let mut n = 0u64;
                    loop {
                        let at = t0 + interval.mul_f64(n as f64);
                        if at >= until {
                            break;
                        }
                        // Idle: the previous answer came before this request was due.
                        let idle = Instant::now() < at;
                        actix_rt::time::sleep_until(at.into()).await;
                        let sent = Instant::now();
                        late.push(at.elapsed().as_secs_f64() * 1000.0);
                        let body = format!(r#"{{"percent":{}}}"#, n % 101);
                        let mut req = client
                            .patch(&full)
                            .insert_header(("content-type", "application/json"));
                        for (k, v) in crate::v1(&creds, "PATCH", &path, body.as_bytes()) {
                            req = req.insert_header((k, v));
                        }
                        let code = match req.send_body(body).await {
                            Ok(mut resp) => {
                                let _ = resp.body().await;
                                resp.status().as_u16()
                            }
                            Err(_) => 0,
                        };
                        if (200..300).contains(&code) {
                            lat.push(at.elapsed().as_secs_f64() * 1000.0);
                            let from = if idle { sent } else { at };
                            lat_sent.push(from.elapsed().as_secs_f64() * 1000.0);
                        }
                        *statuses.entry(code).or_insert(0u64) += 1;
                        n += 1;
                    }
                    (lat, lat_sent, late, statuses)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        (out, started)
    });
    let wall = started.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let mut lat_sent = Vec::new();
    let mut late = Vec::new();
    let mut statuses = BTreeMap::new();
    for (l, ls, lt, st) in per {
        lat.extend(l);
        lat_sent.extend(ls);
        late.extend(lt);
        for (k, v) in st {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat_sent.sort_by(|a, b| a.partial_cmp(b).unwrap());
    late.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let server_shed = shed_counters(url)
        .into_iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(&k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    let shed = statuses.get(&503).copied().unwrap_or(0) + statuses.get(&429).copied().unwrap_or(0);
    let total = statuses.values().sum();
    let other = statuses
        .into_iter()
        .filter(|(k, _)| !(200..300).contains(k) && *k != 503 && *k != 429)
        .collect();
    Level {
        factor: 0.0,
        offered: rate,
        admitted_rps: lat.len() as f64 / wall,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        p99_sent_ms: percentile(&lat_sent, 0.99),
        shed,
        total,
        other,
        late_p99_ms: percentile(&late, 0.99),
        server_shed,
    }
}

pub fn run(
    bin: &str,
    out_path: &str,
    conns: usize,
    duration: Duration,
    stores: Vec<(&'static str, FreshStore)>,
    admin_url: &str,
) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Overload: 0.5×, 1× and 2× the sustainable rate (issue 20)\n"
    );
    let _ = writeln!(
        md,
        "`{}`. Signed `PATCH …/progress` (fresh nonce each). The sustainable rate is the \
         closed-loop peak at {conns} connections ({}s); each load is then offered open-loop for \
         {}s by {OPEN_CONNECTIONS} connections (opened beforehand with one unmeasured \
         `/livez` each), every request sent at its scheduled time. \
         Latency counts from the scheduled start, for admitted (2xx) requests; refused means \
         answered 503 or 429, and the server's own count says where (`coordinator_db_shed_total`: \
         `http/in_flight` is the door, refused before authentication at a worker's adaptive \
         in-flight limit; the others are database queues). *Sent late* is the p99 of how long \
         after its scheduled time the generator sent a request (its previous request on the \
         same connection included); *p99 from send* leaves that lateness out where the \
         connection was idle at the scheduled time (it counts from the send then, and from the \
         scheduled start when the previous request was still unanswered). The generator is async, one thread; {}. Default settings \
         (`serve`, no tuning).\n",
        crate::report::command_line(),
        duration.as_secs(),
        duration.as_secs(),
        match std::env::var("BENCH_SERVER_CPUS") {
            Ok(c) => format!(
                "the server ran on CPU {c} (`BENCH_SERVER_CPUS={c}`) and the generator under \
                 `taskset` on the other, so neither takes the other's CPU (PostgreSQL's own \
                 processes are not pinned)"
            ),
            Err(_) => "server and generator shared the CPUs".to_owned(),
        }
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| backend | load | offered req/s | admitted req/s | p50 ms | p99 ms | p99 ms from send | refused | refused by (server count) | sent late p99 ms | other answers |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|");
    let mut verdicts = Vec::new();
    for (backend, store) in stores {
        let creds = setup_credentials(&store.db, &store.sealer);
        let server = start_server(bin, &store.db_url, &store.key_b64);
        let pid = server.child.id();
        let jobs = running_jobs(&server.url, &creds, OPEN_CONNECTIONS);
        std::thread::sleep(Duration::from_millis(500));
        let _ = run_load(
            &server.url,
            &creds,
            Scenario::Progress,
            conns,
            Duration::from_secs(1),
            None,
            &jobs,
            pid,
        );
        let peak = run_load(
            &server.url,
            &creds,
            Scenario::Progress,
            conns,
            duration,
            None,
            &jobs,
            pid,
        );
        eprintln!(
            "overload {backend}: closed-loop peak {:.0} req/s, p99 {:.1} ms",
            peak.rps, peak.p99_ms
        );
        let mut levels = Vec::new();
        for factor in [0.5, 1.0, 2.0] {
            let mut l = offer(&server.url, &creds, &jobs, peak.rps * factor, duration);
            l.factor = factor;
            eprintln!(
                "overload {backend} {factor}×: offered {:.0}, admitted {:.0} req/s, p99 {:.1} ms, refused {}/{} {:?}, sent late p99 {:.1} ms",
                l.offered, l.admitted_rps, l.p99_ms, l.shed, l.total, l.server_shed, l.late_p99_ms
            );
            levels.push(l);
            std::thread::sleep(Duration::from_secs(1));
        }
        for l in &levels {
            let other = l
                .other
                .iter()
                .map(|(k, v)| {
                    if *k == 0 {
                        format!("no answer × {v}")
                    } else {
                        format!("{k} × {v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {backend} | {}× | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} % ({}) | {} | {:.1} | {} |",
                l.factor,
                l.offered,
                l.admitted_rps,
                l.p50_ms,
                l.p99_ms,
                l.p99_sent_ms,
                l.shed as f64 * 100.0 / l.total.max(1) as f64,
                l.shed,
                if l.server_shed.is_empty() {
                    "—".to_owned()
                } else {
                    l.server_shed
                        .iter()
                        .map(|(k, v)| format!("{k} × {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                l.late_p99_ms,
                if other.is_empty() {
                    "—".into()
                } else {
                    other
                }
            );
        }
        if let (Some(half), Some(double)) = (levels.first(), levels.last()) {
            verdicts.push(format!(
                "{backend}: p99 of admitted requests at 2× ÷ at 0.5× = **{:.2}** (goal ≤ 2; from send: {:.1} ÷ {:.1} ms = {:.2}); refused at 2×: {:.1} %",
                double.p99_ms / half.p99_ms.max(1e-9),
                double.p99_sent_ms,
                half.p99_sent_ms,
                double.p99_sent_ms / half.p99_sent_ms.max(1e-9),
                double.shed as f64 * 100.0 / double.total.max(1) as f64
            ));
        }
        drop(server);
        if backend == "postgres" {
            crate::drop_postgres_store(store, admin_url);
        } else {
            let _ = std::fs::remove_dir_all(&store.dir);
        }
    }
    let _ = writeln!(md);
    for v in verdicts {
        let _ = writeln!(md, "- {v}");
    }
    crate::report::splice(out_path, "overload", &md);
}
