//! `coordinator-bench --push` (issue 16, "measure and report"): on SQLite and on
//! PostgreSQL, against the server binary,
//!
//! 1. database work with 100 idle long-poll claims: PostgreSQL transactions per minute
//!    of the service's database (`pg_stat_database.xact_commit`, read from another
//!    database so the reads do not count) over a window with no waiter and the same
//!    window with 100 parked waiters; on SQLite, where the server has no such counter,
//!    the same comparison with the server's CPU time;
//! 2. claim-to-complete cycles per second with 32 long-polling workers (`wait` 5 s,
//!    claim, then complete with the job token), fed by one thread inserting QUEUED jobs
//!    straight into the database (so the workers are woken by the notification path,
//!    not by the HTTP producer), and the wake-up latency histogram the server exports;
//! 3. RSS of the server holding 1 000 open queue event streams (and per stream).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, RunQueryDsl};

use crate::{cpu_ticks, rss_kib, setup_credentials, start_server_env, Creds, CLK_TCK};

const IDLE_WAITERS: usize = 100;
const WORKERS: usize = 32;
const STREAMS: usize = 1000;

#[derive(diesel::QueryableByName)]
struct Commits {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn xact_commit(admin_url: &str, db: &str) -> i64 {
    let mut c = diesel::PgConnection::establish(admin_url).expect("postgres admin");
    // Statistics are flushed by each backend at most once a second: ask for a snapshot
    // that is not cached within this transaction.
    c.batch_execute("SELECT pg_stat_clear_snapshot()").ok();
    diesel::sql_query(format!(
        "SELECT xact_commit AS n FROM pg_stat_database WHERE datname = '{db}'"
    ))
    .get_result::<Commits>(&mut c)
    .expect("pg_stat_database")
    .n
}

/// A long-poll claim held open on a raw socket; the answer is never read.
fn park_claim(addr: &str, creds: &Creds, queue: &str, wait: u32) -> TcpStream {
    let body = format!(r#"{{"worker":"idle","wait":{wait}}}"#);
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST /coordinator/queues/{queue}/claim HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        creds.api_key,
        body.len()
    )
    .expect("write");
    s
}

/// An open queue event stream on a raw socket (headers read, body left unread).
fn open_stream(addr: &str, creds: &Creds, queue: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET /coordinator/queues/{queue}/events HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {}\r\n\
         Accept: text/event-stream\r\n\r\n",
        creds.api_key
    )
    .expect("write");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    assert!(line.contains(" 200 "), "stream refused: {line}");
    loop {
        line.clear();
        r.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
    }
    r
}

fn metric(url: &str, prefix: &str) -> f64 {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("metrics body");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn until_metric(url: &str, prefix: &str, want: f64) {
    let end = Instant::now() + Duration::from_secs(60);
    while metric(url, prefix) < want {
        assert!(Instant::now() < end, "{prefix} never reached {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// p50/p99 (ms) from a Prometheus histogram's cumulative buckets (upper bounds).
fn histogram_quantiles(url: &str, kind: &str) -> (u64, String, String) {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("metrics body");
    let prefix = "coordinator_push_wakeup_seconds_bucket{kind=\"".to_owned() + kind + "\",le=\"";
    let mut buckets: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, n) = rest.split_once("\"} ")?;
            Some((le.to_owned(), n.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| {
        let f = |s: &str| s.parse::<f64>().unwrap_or(f64::INFINITY);
        f(&a.0).total_cmp(&f(&b.0))
    });
    let total = buckets.last().map_or(0, |b| b.1);
    let q = |p: f64| {
        let want = (total as f64 * p).ceil() as u64;
        buckets
            .iter()
            .find(|b| b.1 >= want.max(1))
            .map_or("—".to_owned(), |b| match b.0.parse::<f64>() {
                Ok(s) => format!("≤ {} ms", s * 1000.0),
                Err(_) => "> 5 s".to_owned(),
            })
    };
    (total, q(0.5), q(0.99))
}

struct Row {
    backend: &'static str,
    idle: String,
    cycles: f64,
    completed: u64,
    claim_wake: (u64, String, String),
    rss_base_mib: f64,
    rss_streams_mib: f64,
}

fn run_backend(backend: &'static str, bin: &str, db_url: &str, pg: Option<(&str, &str)>) -> Row {
    let store_cfg = coordinator::config::DbConfig {
        url: coordinator::db::DatabaseUrl::parse(db_url).unwrap(),
        pool_size: 4,
        timeout: Duration::from_secs(5),
        sqlite_busy_timeout: Duration::from_secs(5),
        sqlite_synchronous_full: false,
        allow_newer_schema: false,
    };
    coordinator::db::migrate::run_pending(&store_cfg).expect("migrate");
    let db = coordinator::db::Db::new(&store_cfg);
    let master = coordinator::crypto::seal::MasterKey::generate();
    let key_b64 = master.to_base64().to_string();
    let sealer = coordinator::crypto::seal::Sealer::new(master, None).unwrap();
    let creds = setup_credentials(&db, &sealer);
    let limit = (STREAMS + 100).to_string();
    let server = start_server_env(
        bin,
        db_url,
        &key_b64,
        &[
            ("COORDINATOR_MAX_STREAMS", &limit),
            ("COORDINATOR_MAX_WAITING_CLAIMS", &limit),
            ("COORDINATOR_MAX_STREAMS_PER_CALLER", &limit),
            ("COORDINATOR_MAX_WAITING_CLAIMS_PER_CALLER", &limit),
        ],
    );
    let url = server.url.clone();
    let addr = url.trim_start_matches("http://").to_owned();
    let pid = server.child.id().to_string();
    std::thread::sleep(Duration::from_secs(2)); // start-up work settles

    // 1. Idle: the same window with no waiter, then with 100 parked on an empty queue.
    let window = Duration::from_secs(
        std::env::var("BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    let measure = || -> f64 {
        // PostgreSQL backends report their transactions lazily (an idle one after up to
        // 10 s): let what came before the window be counted before it starts.
        std::thread::sleep(Duration::from_secs(15));
        match pg {
            Some((admin, name)) => {
                let a = xact_commit(admin, name);
                std::thread::sleep(window);
                let b = xact_commit(admin, name);
                (b - a) as f64 * 60.0 / window.as_secs_f64()
            }
            None => {
                let a = cpu_ticks(&pid);
                std::thread::sleep(window);
                let b = cpu_ticks(&pid);
                (b - a) as f64 / CLK_TCK * 1000.0 * 60.0 / window.as_secs_f64()
            }
        }
    };
    let none = measure();
    // Ten at a time: a burst of 100 first claim attempts (each a write) would be shed
    // in part by the database queue bound (503), which is not what is measured here.
    let mut parked: Vec<TcpStream> = Vec::new();
    while parked.len() < IDLE_WAITERS {
        parked.extend((0..10).map(|_| park_claim(&addr, &creds, "idle", 60)));
        until_metric(
            &url,
            "coordinator_push_open{kind=\"claims\"}",
            parked.len() as f64,
        );
    }
    let hundred = measure();
    drop(parked);
    let idle = match pg {
        Some(_) => format!(
            "{none:.0} transactions/min with no waiter, {hundred:.0} with {IDLE_WAITERS} \
             (difference {:+.2} per waiter per minute)",
            (hundred - none) / IDLE_WAITERS as f64
        ),
        None => format!(
            "server CPU {none:.0} ms/min with no waiter, {hundred:.0} ms/min with {IDLE_WAITERS}"
        ),
    };
    eprintln!("push[{backend}] idle: {idle}");

    // 2. 32 long-polling workers; one thread inserts QUEUED jobs into the database.
    let stop = AtomicBool::new(false);
    let completed = AtomicU64::new(0);
    let run = Duration::from_secs(
        std::env::var("BENCH_DURATION_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let elapsed = std::thread::scope(|s| {
        for i in 0..WORKERS {
            let (stop, completed, url, creds) = (&stop, &completed, &url, &creds);
            s.spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                let body = format!(r#"{{"worker":"w{i}","wait":5}}"#);
                while !stop.load(Ordering::Relaxed) {
                    let r = agent
                        .post(&format!("{url}/coordinator/queues/cycle/claim"))
                        .set("X-API-Key", &creds.api_key)
                        .set("content-type", "application/json")
                        .send_string(&body);
                    let Ok(r) = r else { continue };
                    if r.status() != 200 {
                        continue;
                    }
                    let v: serde_json::Value =
                        serde_json::from_str(&r.into_string().expect("body")).expect("claimed job");
                    let (id, token) = (v["id"].as_str().unwrap(), v["token"].as_str().unwrap());
                    let done = agent
                        .post(&format!("{url}/coordinator/jobs/{id}/complete"))
                        .set("Authorization", &format!("Bearer {token}"))
                        .set("content-type", "application/json")
                        .send_string("{}");
                    if done.is_ok() {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        until_metric(
            &url,
            "coordinator_push_open{kind=\"claims\"}",
            WORKERS as f64,
        );
        let started = Instant::now();
        let job = coordinator::jobs::model::NewJob {
            kind: "cycle".into(),
            queue: "cycle".into(),
            priority: 0,
            payload: serde_json::json!({}),
            max_attempts: 3,
            status: coordinator::jobs::JobStatus::Queued,
            run_at: None,
            backoff: coordinator::jobs::model::Backoff::default(),
        };
        let mut inserted = 0u64;
        while started.elapsed() < run {
            // Keep the backlog small: the workers are woken, not fed from a long queue.
            if inserted >= completed.load(Ordering::Relaxed) + WORKERS as u64 {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            inserted += 1;
            db.write_sync(|conn| {
                let row = coordinator::jobs::repo::new_row(
                    &job,
                    "bench",
                    None,
                    coordinator::db::now_millis(),
                );
                coordinator::jobs::repo::insert(conn, &row)
            })
            .expect("insert job");
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        elapsed
    });
    let done = completed.load(Ordering::Relaxed);
    let cycles = done as f64 / elapsed.as_secs_f64();
    let claim_wake = histogram_quantiles(&url, "claim");
    eprintln!("push[{backend}] {done} cycles in {elapsed:?}: {cycles:.0}/s; wake {claim_wake:?}");

    // 3. RSS with 1 000 open queue streams.
    std::thread::sleep(Duration::from_secs(1));
    let base = rss_kib(server.child.id(), "VmRSS:");
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| open_stream(&addr, &creds, &format!("s{}", i % 50)))
        .collect();
    until_metric(
        &url,
        "coordinator_push_open{kind=\"streams\"}",
        STREAMS as f64,
    );
    std::thread::sleep(Duration::from_secs(1));
    let with = rss_kib(server.child.id(), "VmRSS:");
    drop(streams);
    eprintln!("push[{backend}] RSS {base} KiB, with {STREAMS} streams {with} KiB");
    Row {
        backend,
        idle,
        cycles,
        completed: done,
        claim_wake,
        rss_base_mib: base as f64 / 1024.0,
        rss_streams_mib: with as f64 / 1024.0,
    }
}

pub fn run(bin: &str, out: &str, admin_url: &str) {
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let mut rows = Vec::new();
    for backend in backends.split(',') {
        match backend {
            "sqlite" => {
                let store = crate::fresh_sqlite_store("push");
                rows.push(run_backend("sqlite", bin, &store.db_url, None));
                let _ = std::fs::remove_dir_all(&store.dir);
            }
            "postgres" => {
                let name = format!("coord_push_{}", uuid::Uuid::now_v7().simple());
                let mut admin = diesel::PgConnection::establish(admin_url).expect("admin");
                admin
                    .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                    .unwrap();
                let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
                let url = format!("{base}/{name}");
                rows.push(run_backend(
                    "postgres",
                    bin,
                    &url,
                    Some((admin_url, name.as_str())),
                ));
                let _ = admin.batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"));
            }
            other => panic!("unknown backend {other}"),
        }
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Push: idle waiters, long-poll cycles, open streams (issue 16)\n"
    );
    let _ = writeln!(
        md,
        "`{}` against `{bin}` (the server binary as built by the caller; 2 HTTP workers). \
         Idle: a 30 s window with no waiter, then 30 s with {IDLE_WAITERS} long-poll \
         claims parked on an empty queue (PostgreSQL: `xact_commit` of the service's \
         database, which includes the instance's own background work — housekeeping, \
         pollers, the listener's ping). Cycles: {WORKERS} workers each long-poll \
         (`wait` 5) and complete what they get with its job token; one thread inserts \
         QUEUED jobs straight into the database, so every job reaches a worker through \
         the notification path (PostgreSQL `NOTIFY`, SQLite watcher). Streams: \
         {STREAMS} queue event streams held open on raw sockets.\n",
        crate::report::command_line()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| backend | idle database work | cycles/s (32 long-polling workers) | jobs completed | claim wake-up p50 / p99 (histogram bucket) | RSS idle | RSS with {STREAMS} streams | per stream |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} / {} (of {}) | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
            r.backend,
            r.idle,
            r.cycles,
            r.completed,
            r.claim_wake.1,
            r.claim_wake.2,
            r.claim_wake.0,
            r.rss_base_mib,
            r.rss_streams_mib,
            (r.rss_streams_mib - r.rss_base_mib) * 1024.0 / STREAMS as f64
        );
    }
    crate::report::splice(out, "push", &md);
}
