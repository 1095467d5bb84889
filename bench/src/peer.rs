//! `coordinator-bench --peer DIR` (issue 14): the service and the Node peer in
//! `DIR` (a copy of the Node peer, a reference implementation of the same API that is not
//! part of this repository, with `npm ci` done) side by side in one run, with
//! the same caller, HMAC secret and API key, the same load generator and requests.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{
    free_port, rss_kib, run_load, running_jobs, setup_credentials, start_server, Scenario, Stats,
};

struct Node {
    child: Child,
    url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_peer(dir: &str, db: &std::path::Path, creds: &crate::Creds) -> Node {
    let port = free_port();
    let child = Command::new("node")
        .arg("server.js")
        .current_dir(dir)
        .env("PORT", port.to_string())
        .env("PEER_DB", db)
        .env("PEER_CALLER", &creds.caller)
        .env("PEER_HMAC_SECRET", &creds.secret)
        .env("PEER_API_KEY", &creds.api_key)
        .env("PEER_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node peer");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{url}/livez")).call().is_err() {
        assert!(Instant::now() < deadline, "node peer did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    Node { child, url }
}

const SCENARIOS: [Scenario; 4] = [
    Scenario::Livez,
    Scenario::HealthHmac,
    Scenario::HealthApiKey,
    Scenario::Progress,
];

pub fn run(bin: &str, dir: &str, out_path: &str, conns: usize, duration: Duration) {
    let store = crate::fresh_sqlite_store("peer");
    let tmp = store.dir.clone();
    let crate::FreshStore {
        db_url,
        key_b64,
        db,
        sealer,
        ..
    } = store;
    let creds = setup_credentials(&db, &sealer);

    let server = start_server(bin, &db_url, &key_b64);
    let node = start_peer(dir, &tmp.join("peer.db"), &creds);
    let (spid, npid) = (server.child.id(), node.child.id());
    let sjobs = running_jobs(&server.url, &creds, conns);
    let njobs = running_jobs(&node.url, &creds, conns);
    std::thread::sleep(Duration::from_millis(500));

    // Each scenario: the service, then the peer, back to back; both rounds twice, so
    // neither always runs second.
    let mut results: Vec<(Scenario, Vec<Stats>, Vec<Stats>)> = Vec::new();
    for s in SCENARIOS {
        let mut svc = Vec::new();
        let mut peer = Vec::new();
        for round in 0..2 {
            let order: [bool; 2] = if round == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_svc in order {
                let (url, jobs, pid) = if is_svc {
                    (&server.url, &sjobs, spid)
                } else {
                    (&node.url, &njobs, npid)
                };
                let _ = run_load(
                    url,
                    &creds,
                    s,
                    conns,
                    Duration::from_secs(1),
                    None,
                    jobs,
                    pid,
                );
                let st = run_load(url, &creds, s, conns, duration, None, jobs, pid);
                eprintln!(
                    "peer-run {:8} {:45} {:>8.0} req/s  server {:>5.0} µs/req  errors {}",
                    if is_svc { "service" } else { "node" },
                    s.name(),
                    st.rps,
                    st.server_cpu_us,
                    st.errors
                );
                if is_svc {
                    svc.push(st);
                } else {
                    peer.push(st);
                }
            }
        }
        results.push((s, svc, peer));
    }
    let (srss, nrss) = (rss_kib(spid, "VmHWM:"), rss_kib(npid, "VmHWM:"));
    drop(node);
    drop(server);
    let _ = std::fs::remove_dir_all(&tmp);

    // Mean of the two rounds.
    let mean = |v: &[Stats], f: fn(&Stats) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let row = |s: Scenario| results.iter().find(|r| r.0 == s).unwrap();
    let rps = |s: Scenario, svc: bool| {
        let r = row(s);
        mean(if svc { &r.1 } else { &r.2 }, |x| x.rps)
    };
    let cpu = |s: Scenario, svc: bool| {
        let r = row(s);
        mean(if svc { &r.1 } else { &r.2 }, |x| x.server_cpu_us)
    };
    let errors = |s: Scenario, svc: bool| {
        let r = row(s);
        (if svc { &r.1 } else { &r.2 })
            .iter()
            .map(|x| x.errors)
            .sum::<u64>()
    };
    let met = |ok: bool| if ok { "met" } else { "**not met**" };

    let mut md = String::new();
    let _ = writeln!(md, "## Side by side with the Node peer (issue 14)\n");
    let _ = writeln!(
        md,
        "`{}` — SQLite. The service (release build, `serve` on a fresh SQLite database, \
         `COORDINATOR_WORKERS=2`, `RUST_LOG=info`) and the Node peer (`node server.js` in the directory \
         given to `--peer`, a copy of the Node peer: a reference implementation of the same API, not part \
         of this repository; Fastify 5 + better-sqlite3, `PEER_LOG_LEVEL=info`) run at the same time, \
         with the same caller, HMAC secret and API key (created through the library, as `serve --dev` \
         does). {conns} closed-loop keep-alive connections, shared out over two event-loop client threads \
         (`awc`; before 2026-12-05 09:15 a blocking client with a thread per connection, which took \
         most of what the server left of the two cores), each signed request with a fresh nonce; \
         each scenario is run service → peer → peer → service, {} s each after a 1 s warm-up, and the \
         two runs of each are averaged. Server CPU = Δ(utime+stime) of the server process ÷ requests.\n",
        crate::report::command_line(),
        duration.as_secs()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| scenario | service req/s | service CPU µs/req | peer req/s | peer CPU µs/req | service ÷ peer req/s | errors (service / peer) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
    for s in SCENARIOS {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} / {} |",
            s.name(),
            rps(s, true),
            cpu(s, true),
            rps(s, false),
            cpu(s, false),
            rps(s, true) / rps(s, false),
            errors(s, true),
            errors(s, false)
        );
    }
    let _ = writeln!(
        md,
        "| peak RSS (VmHWM) | {:.1} MiB | | {:.1} MiB | | | |",
        srss as f64 / 1024.0,
        nrss as f64 / 1024.0
    );
    let p_ratio = rps(Scenario::Progress, true) / rps(Scenario::Progress, false);
    let p_cpu = cpu(Scenario::Progress, true);
    let h = |svc: bool| rps(Scenario::HealthHmac, svc) / rps(Scenario::Livez, svc);
    let k = |svc: bool| rps(Scenario::HealthApiKey, svc) / rps(Scenario::Livez, svc);
    let _ = writeln!(md, "\n| issue 14 goal | target | service | peer | |");
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let _ = writeln!(
        md,
        "| signed progress req/s, service ÷ peer | ≥ 3.0 | {p_ratio:.2} | | {} |",
        met(p_ratio >= 3.0)
    );
    let _ = writeln!(
        md,
        "| server CPU per signed progress update | ≤ 150 µs | {p_cpu:.0} µs | {:.0} µs | {} |",
        cpu(Scenario::Progress, false),
        met(p_cpu <= 150.0)
    );
    let _ = writeln!(
        md,
        "| signed health ÷ /livez | ≥ 0.9 | {:.2} | {:.2} | {} |",
        h(true),
        h(false),
        met(h(true) >= 0.9)
    );
    let _ = writeln!(
        md,
        "| API-key health ÷ /livez | ≥ 0.95 | {:.2} | {:.2} | {} |",
        k(true),
        k(false),
        met(k(true) >= 0.95)
    );
    crate::report::splice(out_path, "peer", &md);
}
