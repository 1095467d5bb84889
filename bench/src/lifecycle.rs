//! `coordinator-bench --lifecycle` (issue 15, "measure and report"): on SQLite and on
//! PostgreSQL, against the server binary,
//!
//! 1. list-page latency (`GET /coordinator/jobs?limit=50`: the first page, a page
//!    filtered by queue and status, and the page after the first one's `nextCursor`)
//!    with 10 000 jobs in the table and again with 1 000 000 (or `BENCH_LC_LARGE`);
//!    the jobs are written straight into the database through the library's row type
//!    in large transactions (multi-row inserts), not through HTTP;
//! 2. claims/s with 8 concurrent claimers, each claim followed by completing the job
//!    with its job token, on a queue with no `maxRunning` and on one with
//!    `maxRunning` = 4 (how many claims answered 204 is counted);
//! 3. jobs/s creating 20 000 jobs (`BENCH_LC_CREATES`) with 1 000-job batches and
//!    with single creates, 8 connections each.
//!
//! Every request is authenticated with an API key (no replay record is written), so
//! the figures are the routes' own cost.

use std::fmt::Write as _;
use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use coordinator::db::schema::jobs;
use coordinator::db::{Db, DbConnection};
use coordinator::jobs::model::{Backoff, NewJob};
use coordinator::jobs::row::JobRow;
use coordinator::jobs::JobStatus;
use diesel::{Connection, RunQueryDsl};

use crate::{percentile, setup_credentials, start_server, Creds, FreshStore};

const CLAIMERS: usize = 8;
const CREATE_CONNECTIONS: usize = 8;
const BATCH: usize = 1000;
const LIST_REQUESTS: usize = 50;
const QUEUES: usize = 8;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The status of the `i`th loaded job: 90 % COMPLETED, 5 % FAILED, 2 % CANCELLED,
/// 3 % QUEUED.
fn loaded_status(i: u64) -> JobStatus {
    match i % 100 {
        0..=2 => JobStatus::Queued,
        3..=7 => JobStatus::Failed,
        8..=9 => JobStatus::Cancelled,
        _ => JobStatus::Completed,
    }
}

fn job_row(queue: &str, kind: &str, status: JobStatus, created_at: i64) -> JobRow {
    let new = NewJob {
        kind: kind.into(),
        queue: queue.into(),
        priority: 0,
        payload: serde_json::json!({"n": created_at}),
        max_attempts: 3,
        status: JobStatus::Queued,
        run_at: None,
        backoff: Backoff::default(),
    };
    let mut row = coordinator::jobs::repo::new_row(&new, "bench", None, created_at);
    row.status = status.as_str().to_owned();
    if status != JobStatus::Queued {
        row.attempts = 1;
        row.started_at = Some(created_at);
        row.finished_at = Some(created_at);
        row.worker = Some("loader".into());
    }
    row
}

/// Insert `rows` in one transaction, as multi-row inserts of 500.
fn insert_rows(db: &Db, rows: Vec<JobRow>) {
    db.write_sync(move |conn| {
        conn.transaction(|conn| {
            for chunk in rows.chunks(500) {
                match &mut *conn {
                    DbConnection::Postgresql(pg) => {
                        diesel::insert_into(jobs::table).values(chunk).execute(pg)?;
                    }
                    DbConnection::Sqlite(lite) => {
                        diesel::insert_into(jobs::table)
                            .values(chunk)
                            .execute(lite)?;
                    }
                }
            }
            Ok(())
        })
    })
    .expect("bulk insert");
}

/// Load `n` more list jobs (8 queues, 4 kinds, mixed statuses; one created per
/// millisecond up to now), 50 000 per transaction. Returns the seconds it took.
fn load_jobs(db: &Db, from: u64, n: u64) -> f64 {
    const TX: u64 = 50_000;
    let started = Instant::now();
    let now = coordinator::db::now_millis();
    let mut done = 0;
    while done < n {
        let take = TX.min(n - done);
        let rows = (done..done + take)
            .map(|k| {
                let i = from + k;
                job_row(
                    &format!("q{}", i % QUEUES as u64),
                    &format!("k{}", i % 4),
                    loaded_status(i),
                    now - (n - k) as i64,
                )
            })
            .collect();
        insert_rows(db, rows);
        done += take;
    }
    started.elapsed().as_secs_f64()
}

/// QUEUED jobs for the claim runs.
fn fill_queue(db: &Db, queue: &str, n: u64) {
    let now = coordinator::db::now_millis();
    let rows: Vec<JobRow> = (0..n)
        .map(|i| job_row(queue, "claim", JobStatus::Queued, now - (n - i) as i64))
        .collect();
    insert_rows(db, rows);
}

/// Refresh planner statistics after a bulk load (PostgreSQL's autovacuum would do it
/// within a minute; SQLite keeps none unless asked).
fn analyze(db: &Db) {
    db.write_sync(|conn| {
        match conn {
            DbConnection::Postgresql(pg) => diesel::sql_query("ANALYZE").execute(pg)?,
            DbConnection::Sqlite(lite) => diesel::sql_query("ANALYZE").execute(lite)?,
        };
        Ok(())
    })
    .expect("analyze");
}

fn get_json(agent: &ureq::Agent, url: &str, creds: &Creds) -> (f64, serde_json::Value) {
    let t = Instant::now();
    let resp = agent
        .get(url)
        .set("X-API-Key", &creds.api_key)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let v: serde_json::Value = serde_json::from_reader(resp.into_reader()).expect("json");
    (t.elapsed().as_secs_f64() * 1000.0, v)
}

#[derive(Clone)]
struct Latency {
    page: &'static str,
    p50: f64,
    p99: f64,
    items: usize,
}

/// p50/p99 of 50 sequential requests (after 5 warm-up requests) of three pages.
fn list_latencies(url: &str, creds: &Creds) -> Vec<Latency> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let (_, first) = get_json(&agent, &format!("{url}/coordinator/jobs?limit=50"), creds);
    let cursor = first["nextCursor"].as_str().expect("nextCursor").to_owned();
    let pages: [(&'static str, String); 3] = [
        ("first page", "/coordinator/jobs?limit=50".into()),
        (
            "queue=q3&status=FAILED",
            "/coordinator/jobs?limit=50&queue=q3&status=FAILED".into(),
        ),
        (
            "next page (cursor)",
            format!("/coordinator/jobs?limit=50&cursor={cursor}"),
        ),
    ];
    pages
        .into_iter()
        .map(|(page, path)| {
            let full = format!("{url}{path}");
            let mut items = 0;
            for _ in 0..5 {
                items = get_json(&agent, &full, creds).1["items"]
                    .as_array()
                    .map_or(0, Vec::len);
            }
            let mut lat: Vec<f64> = (0..LIST_REQUESTS)
                .map(|_| get_json(&agent, &full, creds).0)
                .collect();
            lat.sort_by(f64::total_cmp);
            Latency {
                page,
                p50: percentile(&lat, 0.5),
                p99: percentile(&lat, 0.99),
                items,
            }
        })
        .collect()
}

struct Claims {
    claimed: u64,
    empty: u64,
    errors: u64,
    per_sec: f64,
}

/// 8 claimers for `run`: claim (no wait), complete with the job token.
fn claim_run(url: &str, creds: &Creds, queue: &str, run: Duration) -> Claims {
    let (claimed, empty, errors) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for i in 0..CLAIMERS {
            let (claimed, empty, errors) = (&claimed, &empty, &errors);
            s.spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let body = format!(r#"{{"worker":"w{i}"}}"#);
                while started.elapsed() < run {
                    let r = agent
                        .post(&format!("{url}/coordinator/queues/{queue}/claim"))
                        .set("X-API-Key", &creds.api_key)
                        .set("content-type", "application/json")
                        .send_string(&body);
                    let r = match r {
                        Ok(r) if r.status() == 200 => r,
                        Ok(r) if r.status() == 204 => {
                            empty.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let v: serde_json::Value =
                        serde_json::from_reader(r.into_reader()).expect("claimed job");
                    let (id, token) = (v["id"].as_str().unwrap(), v["token"].as_str().unwrap());
                    let done = agent
                        .post(&format!("{url}/coordinator/jobs/{id}/complete"))
                        .set("Authorization", &format!("Bearer {token}"))
                        .set("content-type", "application/json")
                        .send_string("{}");
                    match done {
                        Ok(r) => {
                            let _ = r.into_reader().read_to_end(&mut Vec::new());
                            claimed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let claimed = claimed.into_inner();
    Claims {
        claimed,
        empty: empty.into_inner(),
        errors: errors.into_inner(),
        per_sec: claimed as f64 / secs,
    }
}

struct Creates {
    jobs: u64,
    requests: u64,
    errors: u64,
    per_sec: f64,
}

/// Create `total` jobs over 8 connections, `per` jobs a request (1: single creates).
fn create_run(url: &str, creds: &Creds, total: usize, per: usize) -> Creates {
    let requests = total.div_ceil(per);
    let next = AtomicUsize::new(0);
    let (jobs_made, errors) = (AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..CREATE_CONNECTIONS {
            let (next, jobs_made, errors) = (&next, &jobs_made, &errors);
            s.spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(60))
                    .build();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        break;
                    }
                    let count = per.min(total - n * per);
                    let (path, body) = if per == 1 {
                        (
                            "/coordinator/jobs",
                            r#"{"kind":"create","queue":"create-single"}"#.to_owned(),
                        )
                    } else {
                        let one = r#"{"kind":"create","queue":"create-batch"}"#;
                        (
                            "/coordinator/jobs/batch",
                            format!(r#"{{"jobs":[{}]}}"#, vec![one; count].join(",")),
                        )
                    };
                    let r = agent
                        .post(&format!("{url}{path}"))
                        .set("X-API-Key", &creds.api_key)
                        .set("content-type", "application/json")
                        .send_string(&body);
                    match r {
                        Ok(r) if (200..300).contains(&r.status()) => {
                            let _ = r.into_reader().read_to_end(&mut Vec::new());
                            jobs_made.fetch_add(count as u64, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let jobs_made = jobs_made.into_inner();
    Creates {
        jobs: jobs_made,
        requests: requests as u64,
        errors: errors.into_inner(),
        per_sec: jobs_made as f64 / secs,
    }
}

struct Row {
    backend: &'static str,
    small: u64,
    large: u64,
    load_secs: f64,
    claim_jobs: u64,
    list_small: Vec<Latency>,
    list_large: Vec<Latency>,
    free: Claims,
    limited: Claims,
    batch: Creates,
    single: Creates,
}

fn run_backend(backend: &'static str, bin: &str, store: &FreshStore) -> Row {
    let small = env_num("BENCH_LC_SMALL", 10_000);
    let large = env_num("BENCH_LC_LARGE", 1_000_000);
    let run = Duration::from_secs(env_num("BENCH_DURATION_SECS", 10));
    let creates = env_num("BENCH_LC_CREATES", 20_000) as usize;
    let creds = setup_credentials(&store.db, &store.sealer);

    // 1a. Lists at the small size (nothing else in the table yet).
    let secs = load_jobs(&store.db, 0, small);
    analyze(&store.db);
    eprintln!("lifecycle[{backend}] loaded {small} jobs in {secs:.1}s");
    let server = start_server(bin, &store.db_url, &store.key_b64);
    let list_small = list_latencies(&server.url, &creds);

    // 2. Claims: two queues filled with more QUEUED jobs than a run can take.
    let per_queue = env_num("BENCH_LC_CLAIM_JOBS", 40_000);
    fill_queue(&store.db, "claim-free", per_queue);
    fill_queue(&store.db, "claim-limited", per_queue);
    // Statistics that know these queues (autovacuum's analyze would bring them within a
    // minute; without them PostgreSQL plans the claim for an empty queue).
    analyze(&store.db);
    let agent = ureq::AgentBuilder::new().build();
    let limit = agent
        .request(
            "PATCH",
            &format!("{}/coordinator/queues/claim-limited", server.url),
        )
        .set("X-API-Key", &creds.api_key)
        .set("content-type", "application/json")
        .send_string(r#"{"maxRunning":4}"#)
        .expect("set maxRunning");
    assert_eq!(limit.status(), 200);
    let free = claim_run(&server.url, &creds, "claim-free", run);
    eprintln!(
        "lifecycle[{backend}] claims, no maxRunning: {:.0}/s ({} claimed, {} empty, {} errors)",
        free.per_sec, free.claimed, free.empty, free.errors
    );
    let limited = claim_run(&server.url, &creds, "claim-limited", run);
    eprintln!(
        "lifecycle[{backend}] claims, maxRunning 4: {:.0}/s ({} claimed, {} empty, {} errors)",
        limited.per_sec, limited.claimed, limited.empty, limited.errors
    );

    // 3. Batch vs single creates.
    let batch = create_run(&server.url, &creds, creates, BATCH);
    eprintln!(
        "lifecycle[{backend}] batch creates: {:.0} jobs/s",
        batch.per_sec
    );
    let single = create_run(&server.url, &creds, creates, 1);
    eprintln!(
        "lifecycle[{backend}] single creates: {:.0} jobs/s",
        single.per_sec
    );
    drop(server);

    // 1b. Lists at the large size: the list jobs topped up to `large` (the claim and
    // create jobs above stay in the table as well).
    let secs = load_jobs(&store.db, small, large.saturating_sub(small));
    analyze(&store.db);
    eprintln!(
        "lifecycle[{backend}] loaded {} more jobs in {secs:.1}s",
        large.saturating_sub(small)
    );
    let server = start_server(bin, &store.db_url, &store.key_b64);
    let list_large = list_latencies(&server.url, &creds);
    drop(server);
    Row {
        backend,
        small,
        large,
        load_secs: secs,
        claim_jobs: per_queue,
        list_small,
        list_large,
        free,
        limited,
        batch,
        single,
    }
}

pub fn run(bin: &str, out: &str, admin_url: &str) {
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let mut rows = Vec::new();
    for backend in backends.split(',') {
        match backend {
            "sqlite" => {
                let store = crate::fresh_sqlite_store("lifecycle");
                rows.push(run_backend("sqlite", bin, &store));
                let _ = std::fs::remove_dir_all(&store.dir);
            }
            "postgres" => {
                let store = crate::fresh_postgres_store("lifecycle", admin_url);
                rows.push(run_backend("postgres", bin, &store));
                crate::drop_postgres_store(store, admin_url);
            }
            other => panic!("unknown backend {other}"),
        }
    }
    let run = env_num("BENCH_DURATION_SECS", 10);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Job lifecycle: list pages, claims with and without maxRunning, batch creates (issue 15)\n"
    );
    let _ = writeln!(
        md,
        "`{}` against `{bin}` (the server binary as built by the caller; 2 HTTP workers; \
         every request authenticated with an API key, so no replay record is written).\n",
        crate::report::command_line()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(md, "### List-page latency\n");
    let _ = writeln!(
        md,
        "`GET /coordinator/jobs?limit=50`, {LIST_REQUESTS} sequential requests per page after \
         5 warm-up requests, one keep-alive connection. The jobs were written straight into \
         the database by the bench through the library's `JobRow` (multi-row inserts of 500, \
         50 000 rows per transaction, no `created` events: list items carry none), then \
         `ANALYZE`; 8 queues, 4 kinds, 90 % COMPLETED, 5 % FAILED, 2 % CANCELLED, 3 % QUEUED, \
         one created per millisecond. The large size also holds the ~{}k jobs of the claim \
         and create runs below.\n",
        (2 * env_num("BENCH_LC_CLAIM_JOBS", 40_000) + 2 * env_num("BENCH_LC_CREATES", 20_000))
            / 1000
    );
    let _ = writeln!(
        md,
        "| backend | page | items | p50 ms (small) | p99 ms (small) | p50 ms (large) | p99 ms (large) | large p50 ÷ small p50 |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        for (s, l) in r.list_small.iter().zip(&r.list_large) {
            let _ = writeln!(
                md,
                "| {} ({} → {} jobs) | `{}` | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                r.backend,
                r.small,
                r.large,
                s.page,
                l.items,
                s.p50,
                s.p99,
                l.p50,
                l.p99,
                l.p50 / s.p50
            );
        }
    }
    let _ = writeln!(md);
    for r in &rows {
        let _ = writeln!(
            md,
            "- {}: loading the {} jobs from {} to {} took {:.0} s ({:.0} rows/s).",
            r.backend,
            r.large.saturating_sub(r.small),
            r.small,
            r.large,
            r.load_secs,
            r.large.saturating_sub(r.small) as f64 / r.load_secs.max(0.001)
        );
    }
    let _ = writeln!(md, "\n### Claims/s, 8 concurrent claimers\n");
    let _ = writeln!(
        md,
        "Each claimer loops for {run} s: `POST /coordinator/queues/{{queue}}/claim` (no wait), \
         then `POST …/complete` with the job token it got. The queue holds {} QUEUED jobs \
         beforehand, inserted like the list jobs and followed by `ANALYZE` (more than a run takes; a run that empties it anyway is marked \"queue ran dry\"). A claim answered 204 (nothing claimable: with \
         `maxRunning` = 4, four of the eight claimers' jobs are running) is counted and \
         retried at once.\n",
        env_num("BENCH_LC_CLAIM_JOBS", 40_000)
    );
    let _ = writeln!(
        md,
        "| backend | queue | claims/s (claimed and completed) | claimed | 204 answers | errors |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
    for r in &rows {
        for (name, c) in [("no maxRunning", &r.free), ("maxRunning = 4", &r.limited)] {
            let dry = if c.claimed >= r.claim_jobs {
                " (queue ran dry)"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {} | {name} | {:.0}{dry} | {} | {} | {} |",
                r.backend, c.per_sec, c.claimed, c.empty, c.errors
            );
        }
    }
    let _ = writeln!(md, "\n### Batch vs single creates, 8 connections\n");
    let _ = writeln!(
        md,
        "| backend | how | jobs created | requests | jobs/s | errors | batch ÷ single |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let ratio = r.batch.per_sec / r.single.per_sec.max(0.001);
        let _ = writeln!(
            md,
            "| {} | `POST /coordinator/jobs/batch`, {BATCH} a request | {} | {} | {:.0} | {} | **{ratio:.1}×** |",
            r.backend, r.batch.jobs, r.batch.requests, r.batch.per_sec, r.batch.errors
        );
        let _ = writeln!(
            md,
            "| {} | `POST /coordinator/jobs`, one a request | {} | {} | {:.0} | {} | |",
            r.backend, r.single.jobs, r.single.requests, r.single.per_sec, r.single.errors
        );
    }
    crate::report::splice(out, "lifecycle", &md);
}
