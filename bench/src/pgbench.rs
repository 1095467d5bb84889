//! `coordinator-bench --pgbench` (issue 14 goal 5): signed progress updates on
//! PostgreSQL against what `pgbench` does for the same write on the same server, with the
//! same number of clients, in one run: the replay record, the job update (version bump,
//! progress, lease) and its event, one transaction each (`-M prepared`). The service is
//! measured, then pgbench, then the service again and pgbench again, so that neither
//! gets the warmer cache; the ratio uses the mean of each pair.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::drive::{drive, status};
use crate::{
    drop_postgres_store, fresh_postgres_store, running_jobs, setup_credentials, signed_request,
    start_server,
};

/// One pgbench script per job (pgbench picks one at random per transaction), so the
/// job row is a literal as the service's statement has it.
fn scripts(dir: &std::path::Path, jobs: &[String]) -> Vec<String> {
    jobs.iter()
        .enumerate()
        .map(|(i, job)| {
            let path = dir.join(format!("progress-{i}.sql"));
            let sql = format!(
                "\\set p random(0, 100)\n\
                 BEGIN;\n\
                 INSERT INTO replay_records (caller, signature_hash, expires_at, signed_at) \
                 VALUES ('bench', md5(random()::text) || md5(random()::text), \
                 (extract(epoch from now()) * 1000)::bigint + 360000, \
                 extract(epoch from now())::bigint);\n\
                 UPDATE jobs SET version = version + 1, progress = :p, \
                 updated_at = (extract(epoch from now()) * 1000)::bigint, \
                 lease_expires_at = (extract(epoch from now()) * 1000)::bigint + 300000 \
                 WHERE id = '{job}' RETURNING version AS v \\gset\n\
                 INSERT INTO job_events (job_id, seq, event_type, data, created_at) VALUES \
                 ('{job}', :v, 'progress', '{{\"percent\":' || :p || '}}', \
                 (extract(epoch from now()) * 1000)::bigint);\n\
                 COMMIT;\n"
            );
            std::fs::write(&path, sql).expect("pgbench script");
            format!("{}@1", path.display())
        })
        .collect()
}

/// pgbench's transactions/s (without the initial connection time).
fn pgbench(db_url: &str, scripts: &[String], clients: usize, duration: Duration) -> f64 {
    let mut cmd = Command::new("pgbench");
    cmd.args([
        "-n",
        "-M",
        "prepared",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        &duration.as_secs().max(1).to_string(),
    ]);
    for s in scripts {
        cmd.args(["-f", s]);
    }
    let out = cmd.arg(db_url).output().expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("pgbench tps line")
}

pub fn run(bin: &str, out_path: &str, conns: usize, duration: Duration, admin_url: &str) {
    let store = fresh_postgres_store("pgbench", admin_url);
    let creds = setup_credentials(&store.db, &store.sealer);
    let server = start_server(bin, &store.db_url, &store.key_b64);
    let pid = server.child.id();
    let jobs = running_jobs(&server.url, &creds, conns);
    let dir = std::env::temp_dir().join(format!(
        "coordinator-pgbench-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let scripts = scripts(&dir, &jobs);

    let service = || {
        let o = drive(conns, duration, pid, |agent, c, n| {
            let body = format!(r#"{{"percent":{}}}"#, n % 101);
            let path = format!("/coordinator/jobs/{}/progress", jobs[c % jobs.len()]);
            // The status of each answer (0 only when there was none): a refusal is a 503.
            status(signed_request(
                agent,
                &server.url,
                &creds,
                "PATCH",
                &path,
                body.as_bytes(),
            ))
        });
        eprintln!(
            "service: {:.0} updates/s committed ({:.0} answers/s), p99 {:.1} ms, {:.0} µs server CPU per committed update, {}",
            o.succeeded_rps(),
            o.rps,
            o.p99_ms,
            o.cpu_per_success_us(),
            o.statuses()
        );
        o
    };
    let bench = || {
        let tps = pgbench(&store.db_url, &scripts, conns, duration);
        eprintln!("pgbench: {tps:.0} tps");
        tps
    };
    let s1 = service();
    let p1 = bench();
    let s2 = service();
    let p2 = bench();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    drop_postgres_store(store, admin_url);

    // Only committed updates count: a closed-loop client answered 503 at the door sends
    // its next request at once, so answers per second would count refusals as work.
    let svc = (s1.succeeded_rps() + s2.succeeded_rps()) / 2.0;
    let pg = (p1 + p2) / 2.0;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## PostgreSQL progress updates against pgbench (issue 14 goal 5)\n"
    );
    let _ = writeln!(
        md,
        "`{}` — {conns} clients each: the release server (`serve`, PostgreSQL) receiving signed \
         `PATCH …/progress` from {conns} closed-loop keep-alive connections (fresh nonce each), \
         then `pgbench -n -M prepared -c {conns} -j 2` running the same write directly (replay \
         record + job version/progress/lease update + event row, one transaction, over the same \
         {conns} jobs), {} s each, twice, alternating. The service also verifies the signature, \
         checks the scope, sends the job's notification after the commit and answers HTTP; pgbench only writes.\n",
        crate::report::command_line(),
        duration.as_secs()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| round | service updates/s (2xx) | refused (503) | service p99 ms (all answers) | server CPU µs per committed update | pgbench tps |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for (i, (s, p)) in [(&s1, p1), (&s2, p2)].into_iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} of {} | {:.1} | {:.0} | {:.0} |",
            i + 1,
            s.succeeded_rps(),
            s.count(503),
            s.requests,
            s.p99_ms,
            s.cpu_per_success_us(),
            p
        );
    }
    let _ = writeln!(
        md,
        "\n**Service ÷ pgbench: {:.2}** (mean {svc:.0} vs {pg:.0}; target ≥ 1.0: {}).",
        svc / pg.max(1e-9),
        if svc >= pg { "met" } else { "**not met**" }
    );
    crate::report::splice(out_path, "pgbench", &md);
}
