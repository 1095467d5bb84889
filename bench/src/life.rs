//! `coordinator-bench --life [--soak MINUTES]`: a job's whole life over HTTP
//! (docs/design.md §9: "create → QUEUED → claim → complete with its token ≥ 0.15× the
//! same server's `/livez` requests/s"), on every backend of `BENCH_BACKENDS`.
//!
//! Each closed-loop connection repeats one life: `POST /coordinator/jobs` (a PENDING
//! job), `PATCH …/status` to QUEUED, `POST /coordinator/queues/life/claim` (one queue
//! shared by every connection, as workers share one), and `POST …/complete` with the
//! claim's job token. The coordinator's three requests are authenticated with an API
//! key, and again with HMAC signatures (fresh nonce each, so each also writes its replay
//! record); the completion always with the job token. A claim that finds no job (another
//! connection took the one just queued) is counted, and its life ends there: the job it
//! queued is claimed by a later one. Jobs/s counts completions.
//!
//! Without `--soak`, `/livez` and then each life for `BENCH_DURATION_SECS` give the
//! ratio. With `--soak MINUTES` (one backend: `--backend`, default sqlite) the API-key
//! life runs for MINUTES against one server whose `jobs` table only grows (no retention
//! is set, as by default), sampling every 10 s the jobs/s, the server's RSS and CPU per
//! job, the number of jobs, and on SQLite the `-wal` file and the database file, on
//! PostgreSQL the size of `jobs` and `job_events`: a coordinator that is fast with an
//! empty table and slows as finished jobs pile up is slow.

use std::fmt::Write as _;
use std::io::Read;
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName, RunQueryDsl};

use crate::drive::{drive, status, Outcome};
use crate::{rss_kib, setup_credentials, start_server, Creds};

const INTERVAL: Duration = Duration::from_secs(10);
const QUEUE: &str = "life";

/// What a life ended with, as `drive` counts it: 200 completed, 204 the claim found no
/// job, otherwise the status (0: no answer) of the request that failed.
const EMPTY_CLAIM: u16 = 204;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    ApiKey,
    Hmac,
}

impl Auth {
    fn name(self) -> &'static str {
        match self {
            Auth::ApiKey => "API key",
            Auth::Hmac => "HMAC",
        }
    }
}

/// One request of the coordinator's or the worker's, its body read.
fn call(
    agent: &ureq::Agent,
    url: &str,
    creds: &Creds,
    auth: Auth,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), u16> {
    let r = match auth {
        Auth::ApiKey => agent
            .request(method, &format!("{url}{path}"))
            .set("X-API-Key", &creds.api_key)
            .set("content-type", "application/json")
            .send_bytes(body),
        Auth::Hmac => crate::signed_request(agent, url, creds, method, path, body),
    };
    read(r)
}

fn read(r: Result<ureq::Response, ureq::Error>) -> Result<(u16, Vec<u8>), u16> {
    match r {
        Ok(resp) => {
            let code = resp.status();
            let mut body = Vec::new();
            resp.into_reader()
                .take(1 << 20)
                .read_to_end(&mut body)
                .map_err(|_| 0u16)?;
            Ok((code, body))
        }
        Err(e) => Err(status(Err(e))),
    }
}

fn field(body: &[u8], name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get(name)?.as_str().map(str::to_owned)
}

/// One whole life; see `EMPTY_CLAIM` for what it answers.
fn one_life(agent: &ureq::Agent, url: &str, creds: &Creds, auth: Auth, worker: usize) -> u16 {
    let life = || -> Result<u16, u16> {
        let body = format!(r#"{{"kind":"life","queue":"{QUEUE}"}}"#);
        let (code, created) = call(
            agent,
            url,
            creds,
            auth,
            "POST",
            "/coordinator/jobs",
            body.as_bytes(),
        )?;
        let id = match (code, field(&created, "id")) {
            (201, Some(id)) => id,
            _ => return Err(code),
        };
        let (code, _) = call(
            agent,
            url,
            creds,
            auth,
            "PATCH",
            &format!("/coordinator/jobs/{id}/status"),
            br#"{"status":"QUEUED"}"#,
        )?;
        if code != 200 {
            return Err(code);
        }
        let body = format!(r#"{{"worker":"w{worker}"}}"#);
        let (code, claimed) = call(
            agent,
            url,
            creds,
            auth,
            "POST",
            &format!("/coordinator/queues/{QUEUE}/claim"),
            body.as_bytes(),
        )?;
        let (id, token) = match (code, field(&claimed, "id"), field(&claimed, "token")) {
            (200, Some(id), Some(token)) => (id, token),
            (204, _, _) => return Ok(EMPTY_CLAIM),
            _ => return Err(code),
        };
        let (code, _) = read(
            agent
                .post(&format!("{url}/coordinator/jobs/{id}/complete"))
                .set("Authorization", &format!("Bearer {token}"))
                .set("content-type", "application/json")
                .send_string("{}"),
        )?;
        Ok(code)
    };
    life().unwrap_or_else(|code| code)
}

/// Jobs completed per second in a run of lives.
fn jobs_per_sec(o: &Outcome) -> f64 {
    o.rps * o.count(200) as f64 / o.requests.max(1) as f64
}

/// Server CPU per completed job, µs (empty claims' and failures' CPU included).
fn cpu_per_job(o: &Outcome) -> f64 {
    o.server_cpu_us * o.requests as f64 / o.count(200).max(1) as f64
}

fn store_for(backend: &str, admin_url: &str) -> crate::FreshStore {
    match backend {
        "sqlite" => crate::fresh_sqlite_store("life"),
        "postgres" => crate::fresh_postgres_store("life", admin_url),
        other => panic!("unknown backend {other}: sqlite or postgres"),
    }
}

fn drop_store(backend: &str, store: crate::FreshStore, admin_url: &str) {
    if backend == "postgres" {
        crate::drop_postgres_store(store, admin_url);
    } else {
        let dir = store.dir.clone();
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub fn run(bin: &str, out: &str, conns: usize, duration: Duration, backends: &str, admin: &str) {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## A job's whole life over HTTP (docs/design.md §9: ≥ 0.15× `/livez`)\n"
    );
    let _ = writeln!(
        md,
        "`{}` — {conns} closed-loop connections, {} s per measure. A life is four requests: \
         create (PENDING), `PATCH …/status` to QUEUED, a claim from one queue all connections \
         share, and the completion with the claim's job token. The coordinator's three requests \
         are authenticated with an API key, then with HMAC signatures (each also writes its \
         replay record). Jobs/s counts completions; a claim that found no job (another \
         connection took the one just queued) ends its life without one.\n",
        crate::report::command_line(),
        duration.as_secs()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| backend | `/livez` req/s | auth | jobs/s | ÷ `/livez` (≥ 0.15) | requests/s | p50 / p99 per life, ms | server CPU per job, µs | empty claims | failed lives |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---|---:|---:|---|");
    for backend in backends.split(',') {
        let store = store_for(backend, admin);
        let creds = setup_credentials(&store.db, &store.sealer);
        let server = start_server(bin, &store.db_url, &store.key_b64);
        let (url, pid) = (server.url.clone(), server.child.id());
        let livez = |d| {
            drive(conns, d, pid, |a, _, _| {
                status(a.get(&format!("{url}/livez")).call())
            })
        };
        let _ = livez(Duration::from_secs(1));
        let base = livez(duration);
        eprintln!(
            "{backend:8} /livez {:.0} req/s, {:.0} µs",
            base.rps, base.server_cpu_us
        );
        for auth in [Auth::ApiKey, Auth::Hmac] {
            let lives = |d| drive(conns, d, pid, |a, c, _| one_life(a, &url, &creds, auth, c));
            let _ = lives(Duration::from_secs(1));
            let o = lives(duration);
            let jobs = jobs_per_sec(&o);
            let failed: Vec<String> = o
                .statuses
                .iter()
                .filter(|(s, _)| **s != 200 && **s != EMPTY_CLAIM)
                .map(|(s, n)| format!("{s} × {n}"))
                .collect();
            eprintln!(
                "{backend:8} life ({}): {jobs:.0} jobs/s = {:.3} × /livez, {:.0} µs per job, p99 {:.1} ms, empty claims {}, failed {:?}",
                auth.name(),
                jobs / base.rps.max(1e-9),
                cpu_per_job(&o),
                o.p99_ms,
                o.count(EMPTY_CLAIM),
                failed
            );
            let _ = writeln!(
                md,
                "| {backend} | {:.0} | {} | {jobs:.0} | **{:.3}** | {:.0} | {:.1} / {:.1} | {:.0} | {} | {} |",
                base.rps,
                auth.name(),
                jobs / base.rps.max(1e-9),
                // Every completed life is four requests, an empty claim's three.
                (o.count(200) * 4 + o.count(EMPTY_CLAIM) * 3) as f64 / o.requests.max(1) as f64
                    * o.rps,
                o.p50_ms,
                o.p99_ms,
                cpu_per_job(&o),
                o.count(EMPTY_CLAIM),
                if failed.is_empty() {
                    "none".to_owned()
                } else {
                    failed.join(", ")
                }
            );
        }
        drop(server);
        drop_store(backend, store, admin);
    }
    crate::report::splice(out, "life", &md);
}

/// The size of what a life leaves behind on PostgreSQL.
#[derive(QueryableByName, Clone, Copy, Default)]
struct PgSizes {
    #[diesel(sql_type = BigInt)]
    jobs_rows: i64,
    #[diesel(sql_type = BigInt)]
    jobs_bytes: i64,
    #[diesel(sql_type = BigInt)]
    events_bytes: i64,
    #[diesel(sql_type = BigInt)]
    jobs_dead: i64,
}

const PG_SIZES: &str = "SELECT \
    coalesce((SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'jobs'), 0) AS jobs_rows, \
    pg_total_relation_size('jobs') AS jobs_bytes, \
    pg_total_relation_size('job_events') AS events_bytes, \
    coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'jobs'), 0) AS jobs_dead";

struct Sample {
    at_s: f64,
    jobs_per_s: f64,
    p99_ms: f64,
    cpu_per_job_us: f64,
    rss_kib: u64,
    /// SQLite: the jobs completed so far (no scan of a growing table; the few a claim
    /// missed wait queued); PostgreSQL: the statistics' live tuples of `jobs`.
    jobs: i64,
    /// SQLite: the database and the `-wal` file; PostgreSQL: `jobs` and `job_events`
    /// with their indexes.
    bytes: (u64, u64),
    other: Vec<(u16, u64)>,
}

pub fn soak(bin: &str, out: &str, conns: usize, minutes: f64, backend: &str, admin: &str) {
    let postgres = backend == "postgres";
    let store = store_for(backend, admin);
    let creds = setup_credentials(&store.db, &store.sealer);
    let server = start_server(bin, &store.db_url, &store.key_b64);
    let (url, pid) = (server.url.clone(), server.child.id());
    let db_path = store.dir.join("bench.db");
    let wal_path = store.dir.join("bench.db-wal");
    let mut pg = postgres
        .then(|| diesel::PgConnection::establish(&store.db_url).ok())
        .flatten();
    let total = Duration::from_secs_f64(minutes * 60.0);
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut completed = 0i64;
    while started.elapsed() < total {
        let o = drive(conns, INTERVAL, pid, |a, c, _| {
            one_life(a, &url, &creds, Auth::ApiKey, c)
        });
        completed += o.count(200) as i64;
        let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let sizes = pg
            .as_mut()
            .and_then(|c| diesel::sql_query(PG_SIZES).get_result::<PgSizes>(c).ok());
        let s = Sample {
            at_s: started.elapsed().as_secs_f64(),
            jobs_per_s: jobs_per_sec(&o),
            p99_ms: o.p99_ms,
            cpu_per_job_us: cpu_per_job(&o),
            rss_kib: rss_kib(pid, "VmRSS:"),
            jobs: sizes.map_or(completed, |s| s.jobs_rows),
            bytes: match sizes {
                Some(s) => (s.jobs_bytes as u64, s.events_bytes as u64),
                None => (len(&db_path), len(&wal_path)),
            },
            other: o
                .statuses
                .iter()
                .filter(|(s, _)| **s != 200)
                .map(|(s, n)| (*s, *n))
                .collect(),
        };
        eprintln!(
            "life soak {:>5.0} s  {:>6.0} jobs/s  p99 {:>6.1} ms  {:>5.0} µs/job  RSS {:>6.1} MiB  jobs {:>9}  {} {:>7.1} / {:>6.1} MiB{}  other {:?}",
            s.at_s,
            s.jobs_per_s,
            s.p99_ms,
            s.cpu_per_job_us,
            s.rss_kib as f64 / 1024.0,
            s.jobs,
            if postgres { "jobs/events" } else { "db/WAL" },
            s.bytes.0 as f64 / 1048576.0,
            s.bytes.1 as f64 / 1048576.0,
            sizes.map_or(String::new(), |s| format!("  jobs dead {}", s.jobs_dead)),
            s.other
        );
        samples.push(s);
    }
    drop(server);
    drop(pg);
    drop_store(backend, store, admin);

    let mean = |from: f64, to: f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_s > from + 1.0 && s.at_s <= to + 1.0)
            .map(|s| s.jobs_per_s)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let end = samples.last().map_or(0.0, |s| s.at_s);
    let (first, last) = (mean(0.0, 60.0), mean(end - 60.0, end));
    let rss0 = samples.first().map_or(0, |s| s.rss_kib);
    let rss1 = samples.last().map_or(0, |s| s.rss_kib);
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let jobs = samples.last().map_or(0, |s| s.jobs);
    let refusals: u64 = samples
        .iter()
        .flat_map(|s| s.other.iter())
        .filter(|(s, _)| *s != EMPTY_CLAIM)
        .map(|(_, n)| n)
        .sum();
    let name = if postgres { "PostgreSQL" } else { "SQLite" };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Soak: whole job lives on {name}, the table growing\n"
    );
    let _ = writeln!(
        md,
        "`{}` — {minutes} minutes, {conns} closed-loop connections each repeating a job's \
         whole life (API key; create, queue, claim from one shared queue, complete with the \
         job token) against one server whose `jobs` table only grows (no retention set, the \
         default). Every 10 s: the jobs/s and p99 per life of the interval, the server's CPU \
         per job and RSS, {}. Failed lives over the soak: {refusals}.\n",
        crate::report::command_line(),
        if postgres {
            "and the live rows and sizes (with indexes) of `jobs` and `job_events`"
        } else {
            "the jobs written so far, and the sizes of the database and its `-wal` file"
        }
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(md, "| measure | target | measured |");
    let _ = writeln!(md, "|---|---:|---:|");
    let _ = writeln!(
        md,
        "| jobs/s, first minute → last minute | last ≥ 0.9 × first | {first:.0} → {last:.0} (**{:.2}**) |",
        last / first.max(1e-9)
    );
    let _ = writeln!(md, "| jobs in the table at the end | | {jobs} |");
    let _ = writeln!(
        md,
        "| RSS start → end (max) | flat within 10 % | {:.1} → {:.1} MiB ({:.1}) |\n",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        rss_max as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| t s | jobs/s | p99 per life ms | server CPU µs/job | RSS MiB | jobs | {} |",
        if postgres {
            "`jobs` MiB | `job_events` MiB"
        } else {
            "database MiB | WAL MiB"
        }
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &samples {
        let _ = writeln!(
            md,
            "| {:.0} | {:.0} | {:.1} | {:.0} | {:.1} | {} | {:.1} | {:.1} |",
            s.at_s,
            s.jobs_per_s,
            s.p99_ms,
            s.cpu_per_job_us,
            s.rss_kib as f64 / 1024.0,
            s.jobs,
            s.bytes.0 as f64 / 1048576.0,
            s.bytes.1 as f64 / 1048576.0
        );
    }
    crate::report::splice(out, &format!("life-soak-{backend}"), &md);
}
