//! `coordinator-bench --soak MINUTES [--backend postgres]` (issue 14 goal 3): full-load
//! signed progress updates for MINUTES, sampling every 10 s the requests/s of the last
//! interval, the server's RSS and the replay table's row count, and on SQLite the size of
//! the `-wal` file next to the database, on PostgreSQL the size (table + indexes + TOAST)
//! and dead tuples of `jobs` and `replay_records` and the autovacuum runs (bloat).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel::{Connection, QueryDsl, QueryableByName, RunQueryDsl};

use crate::{cpu_ticks, rss_kib, running_jobs, setup_credentials, signed, start_server, CLK_TCK};

const INTERVAL: Duration = Duration::from_secs(10);

/// PostgreSQL's view of the tables a progress update writes.
#[derive(QueryableByName, Clone, Copy)]
struct PgTables {
    #[diesel(sql_type = BigInt)]
    jobs_bytes: i64,
    #[diesel(sql_type = BigInt)]
    jobs_dead: i64,
    #[diesel(sql_type = BigInt)]
    replay_bytes: i64,
    #[diesel(sql_type = BigInt)]
    replay_dead: i64,
    #[diesel(sql_type = BigInt)]
    replay_rows: i64,
    #[diesel(sql_type = BigInt)]
    events_bytes: i64,
    #[diesel(sql_type = BigInt)]
    autovacuums: i64,
}

/// The PostgreSQL sample. The replay table's row count is the statistics' live-tuple
/// count, not a `count(*)`: on a table of millions of rows that scan held a snapshot
/// for a large part of a second every 10 s, and while it did no backend could prune the
/// row versions the updates leave in `jobs` (the sampler made the bloat it measured).
const PG_TABLES: &str = "SELECT pg_total_relation_size('jobs') AS jobs_bytes, \
    coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'jobs'), 0) AS jobs_dead, \
    pg_total_relation_size('replay_records') AS replay_bytes, \
    coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'replay_records'), 0) AS replay_dead, \
    coalesce((SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'replay_records'), 0) \
        AS replay_rows, \
    pg_total_relation_size('job_events') AS events_bytes, \
    (SELECT coalesce(sum(autovacuum_count), 0)::bigint FROM pg_stat_user_tables \
        WHERE relname IN ('jobs', 'replay_records', 'job_events')) AS autovacuums";

/// Where the samples of the database come from.
enum Probe {
    Sqlite(Option<diesel::SqliteConnection>),
    Postgres(Option<diesel::PgConnection>),
}

impl Probe {
    fn replay_rows(&mut self) -> Option<i64> {
        match self {
            Probe::Sqlite(c) => c.as_mut().and_then(|c| {
                coordinator::db::schema::replay_records::table
                    .count()
                    .get_result::<i64>(c)
                    .ok()
            }),
            Probe::Postgres(_) => self.pg().map(|t| t.replay_rows),
        }
    }

    fn pg(&mut self) -> Option<PgTables> {
        match self {
            Probe::Postgres(Some(c)) => diesel::sql_query(PG_TABLES).get_result(c).ok(),
            _ => None,
        }
    }
}

struct Sample {
    at_s: f64,
    pg: Option<PgTables>,
    rps: f64,
    wal_bytes: u64,
    rss_kib: u64,
    replay_rows: Option<i64>,
    server_cpu_us: f64,
}

pub fn run(bin: &str, out_path: &str, conns: usize, minutes: f64, backend: &str, admin_url: &str) {
    let postgres = match backend {
        "sqlite" => false,
        "postgres" => true,
        other => panic!("--backend {other}: sqlite or postgres"),
    };
    let store = if postgres {
        crate::fresh_postgres_store("soak", admin_url)
    } else {
        crate::fresh_sqlite_store("soak")
    };
    let tmp = store.dir.clone();
    let db_path = tmp.join("bench.db");
    let wal_path = tmp.join("bench.db-wal");
    let creds = setup_credentials(&store.db, &store.sealer);
    let server = start_server(bin, &store.db_url, &store.key_b64);
    let pid = server.child.id();
    let jobs = running_jobs(&server.url, &creds, conns);
    // A connection of its own for the samples (SQLite in WAL mode: it never blocks the
    // writer).
    let mut probe = if postgres {
        Probe::Postgres(diesel::PgConnection::establish(&store.db_url).ok())
    } else {
        Probe::Sqlite(diesel::SqliteConnection::establish(&db_path.display().to_string()).ok())
    };

    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    // Each kind of error ("status 503", a transport error), with its count.
    let kinds: std::sync::Mutex<std::collections::BTreeMap<String, u64>> = Default::default();
    let wal_max = AtomicU64::new(0);
    let total = Duration::from_secs_f64(minutes * 60.0);
    let mut samples: Vec<Sample> = Vec::new();
    std::thread::scope(|s| {
        for c in 0..conns {
            let (stop, done, errors, creds, url) = (&stop, &done, &errors, &creds, &server.url);
            let kinds = &kinds;
            let job = jobs[c % jobs.len()].clone();
            s.spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .max_idle_connections_per_host(1)
                    .timeout(Duration::from_secs(10))
                    .build();
                let path = format!("/coordinator/jobs/{job}/progress");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!(r#"{{"percent":{}}}"#, n % 101);
                    match signed(&agent, url, creds, "PATCH", &path, body.as_bytes()) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if let Ok(mut k) = kinds.lock() {
                                *k.entry(e.chars().take(80).collect()).or_default() += 1;
                            }
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    n += 1;
                }
            });
        }
        // The WAL between samples: its largest size, polled every 100 ms.
        if !postgres {
            let (stop, wal_max, wal_path) = (&stop, &wal_max, &wal_path);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let len = std::fs::metadata(wal_path).map(|m| m.len()).unwrap_or(0);
                    wal_max.fetch_max(len, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let started = Instant::now();
        let mut last = (0u64, cpu_ticks(&pid.to_string()));
        let mut next = started + INTERVAL;
        while started.elapsed() < total {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += INTERVAL;
            let d = done.load(Ordering::Relaxed);
            let t = cpu_ticks(&pid.to_string());
            let reqs = d - last.0;
            let pg = probe.pg();
            let sample = Sample {
                pg,
                at_s: started.elapsed().as_secs_f64(),
                rps: reqs as f64 / INTERVAL.as_secs_f64(),
                wal_bytes: std::fs::metadata(&wal_path).map(|m| m.len()).unwrap_or(0),
                rss_kib: rss_kib(pid, "VmRSS:"),
                replay_rows: pg.map(|t| t.replay_rows).or_else(|| probe.replay_rows()),
                server_cpu_us: t.saturating_sub(last.1) as f64 / CLK_TCK * 1e6 / reqs.max(1) as f64,
            };
            last = (d, t);
            eprintln!(
                "soak {:>5.0} s  {:>7.0} req/s  WAL {:>8.1} MiB  RSS {:>6.1} MiB  replay rows {}  server {:>4.0} µs/req{}",
                sample.at_s,
                sample.rps,
                sample.wal_bytes as f64 / 1048576.0,
                sample.rss_kib as f64 / 1024.0,
                sample.replay_rows.map_or("?".into(), |n| n.to_string()),
                sample.server_cpu_us,
                pg.map_or(String::new(), |t| format!(
                    "  jobs {:.1} MiB ({} dead)  replay {:.1} MiB ({} dead)  events {:.1} MiB  autovacuums {}",
                    t.jobs_bytes as f64 / 1048576.0,
                    t.jobs_dead,
                    t.replay_bytes as f64 / 1048576.0,
                    t.replay_dead,
                    t.events_bytes as f64 / 1048576.0,
                    t.autovacuums
                ))
            );
            samples.push(sample);
        }
        stop.store(true, Ordering::Relaxed);
    });
    drop(server);
    drop(probe);
    if postgres {
        crate::drop_postgres_store(store, admin_url);
    } else {
        drop(store);
        let _ = std::fs::remove_dir_all(&tmp);
    }

    let minute = |from: f64, to: f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_s > from + 1.0 && s.at_s <= to + 1.0)
            .map(|s| s.rps)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let end = samples.last().map_or(0.0, |s| s.at_s);
    let first = minute(0.0, 60.0);
    let lastm = minute(end - 60.0, end);
    let max_wal = samples
        .iter()
        .map(|s| s.wal_bytes)
        .max()
        .unwrap_or(0)
        .max(wal_max.load(Ordering::Relaxed));
    let rss0 = samples.first().map_or(0, |s| s.rss_kib);
    let rss1 = samples.last().map_or(0, |s| s.rss_kib);
    let rss_max = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let replay_max = samples.iter().filter_map(|s| s.replay_rows).max();
    let mib = |b: u64| b as f64 / 1048576.0;
    let met = |ok: bool| if ok { "met" } else { "**not met**" };

    let mut md = String::new();
    let name = if postgres { "PostgreSQL" } else { "SQLite" };
    let _ = writeln!(
        md,
        "## Soak: signed progress updates on {name} (issue 14 goal 3)\n"
    );
    let _ = writeln!(
        md,
        "`{}` — {minutes} minutes{}, {conns} \
         closed-loop connections send signed `PATCH …/progress` (fresh \
         nonce each) to the release server for the whole time; every 10 s the last interval's \
         requests/s, {}, the server's VmRSS, the `replay_records` row count (on PostgreSQL its statistics' live-tuple count) \
         and the server CPU per update are sampled. Errors over the soak: {}{}.\n",
        crate::report::command_line(),
        if minutes < 10.0 {
            " (**not the 10 the goal asks for**)"
        } else {
            ""
        },
        if postgres {
            "the size (`pg_total_relation_size`: table, indexes, TOAST) and dead tuples of `jobs` \
             and `replay_records`, the size of `job_events` (one row per update, each job keeping its \
             newest `COORDINATOR_EVENTS_PER_JOB`) and the autovacuum runs of the three"
        } else {
            "the size of `bench.db-wal`"
        },
        errors.load(Ordering::Relaxed),
        error_kinds(&kinds)
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(md, "| measure | target | measured | |");
    let _ = writeln!(md, "|---|---:|---:|---|");
    let _ = writeln!(
        md,
        "| req/s, first minute → last minute | last ≥ 0.9 × first | {first:.0} → {lastm:.0} (**{:.2}**) | {} |",
        lastm / first.max(1e-9),
        met(lastm >= 0.9 * first)
    );
    let pg: Vec<PgTables> = samples.iter().filter_map(|s| s.pg).collect();
    if postgres {
        let range = |f: fn(&PgTables) -> i64| {
            let v: Vec<i64> = pg.iter().map(f).collect();
            (
                v.first().copied().unwrap_or(0),
                v.last().copied().unwrap_or(0),
                v.iter().copied().max().unwrap_or(0),
            )
        };
        let mibi = |b: i64| b as f64 / 1048576.0;
        for (what, f) in [
            (
                "`jobs` size (32 rows)",
                (|t: &PgTables| t.jobs_bytes) as fn(&PgTables) -> i64,
            ),
            ("`replay_records` size", |t: &PgTables| t.replay_bytes),
        ] {
            let (a, b, m) = range(f);
            let _ = writeln!(
                md,
                "| {what}, first → last sample (max) | bounded (autovacuum keeps up) | {:.1} → {:.1} MiB ({:.1}) | see samples |",
                mibi(a),
                mibi(b),
                mibi(m)
            );
        }
        let (_, _, jd) = range(|t| t.jobs_dead);
        let (_, _, rd) = range(|t| t.replay_dead);
        let (a0, a1, _) = range(|t| t.autovacuums);
        let _ = writeln!(
            md,
            "| dead tuples, largest sample: `jobs` / `replay_records` | bounded | {jd} / {rd} | autovacuum ran {} times on the three tables |",
            a1 - a0
        );
    } else {
        let _ = writeln!(
            md,
            "| largest WAL file (polled every 100 ms) | ≤ 64 MiB | **{:.1} MiB** | {} |",
            mib(max_wal),
            met(max_wal <= 64 << 20)
        );
    }
    let _ = writeln!(
        md,
        "| RSS start → end (max) | flat within 10 % | {:.1} → {:.1} MiB ({:.1}) | {} |",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        met(rss_max as f64 <= rss0 as f64 * 1.1 && rss1 as f64 >= rss0 as f64 * 0.9)
    );
    let _ = writeln!(
        md,
        "| replay rows, largest sample | bounded by the window | {} | {} |",
        replay_max.map_or("?".into(), |n| n.to_string()),
        if minutes * 60.0 > 360.0 {
            "see samples"
        } else {
            "not shown: a replay record lives the signature window (300 s by default) plus a \
             margin, longer than this soak, so none expired yet"
        }
    );
    if postgres {
        let _ = writeln!(
            md,
            "\nRSS start is the first sample (10 s into the load). Sizes are \
             `pg_total_relation_size` (table, indexes and TOAST); dead tuples from \
             `pg_stat_user_tables`."
        );
        let _ = writeln!(
            md,
            "\n| t s | req/s | RSS MiB | replay rows | `jobs` MiB | `jobs` dead | `replay_records` MiB | replay dead | `job_events` MiB | autovacuums | server CPU µs/update |"
        );
        let _ = writeln!(
            md,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for s in &samples {
            let t = s.pg;
            let cell = |f: fn(&PgTables) -> i64, bytes: bool| {
                t.map_or("?".into(), |t| {
                    if bytes {
                        format!("{:.1}", f(&t) as f64 / 1048576.0)
                    } else {
                        f(&t).to_string()
                    }
                })
            };
            let _ = writeln!(
                md,
                "| {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
                s.at_s,
                s.rps,
                s.rss_kib as f64 / 1024.0,
                s.replay_rows.map_or("?".into(), |n| n.to_string()),
                cell(|t| t.jobs_bytes, true),
                cell(|t| t.jobs_dead, false),
                cell(|t| t.replay_bytes, true),
                cell(|t| t.replay_dead, false),
                cell(|t| t.events_bytes, true),
                cell(|t| t.autovacuums, false),
                s.server_cpu_us
            );
        }
        crate::report::splice(out_path, "soak-postgres", &md);
        return;
    }
    let _ = writeln!(
        md,
        "\nRSS start is the first sample (10 s into the load). The WAL column is the file's size \
         at each sample; the largest-WAL row also polls it every 100 ms in between."
    );
    let _ = writeln!(
        md,
        "\n| t s | req/s | WAL MiB | RSS MiB | replay rows | server CPU µs/update |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
    for s in &samples {
        let _ = writeln!(
            md,
            "| {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.0} |",
            s.at_s,
            s.rps,
            mib(s.wal_bytes),
            s.rss_kib as f64 / 1024.0,
            s.replay_rows.map_or("?".into(), |n| n.to_string()),
            s.server_cpu_us
        );
    }
    crate::report::splice(out_path, "soak", &md);
}

/// " (status 503 × 60, …)", or nothing when there were no errors.
fn error_kinds(kinds: &std::sync::Mutex<std::collections::BTreeMap<String, u64>>) -> String {
    let Ok(k) = kinds.lock() else {
        return String::new();
    };
    if k.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = k.iter().map(|(e, n)| format!("{e} × {n}")).collect();
    format!(" ({})", parts.join(", "))
}
