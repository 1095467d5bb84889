//! Crash safety with the real binary: SIGKILL the server while four threads write, then
//! restart it on the same database and check that every acknowledged write survived.
//!
//! The workers create jobs (with an `Idempotency-Key`), move them QUEUED → RUNNING and
//! send progress updates with a unique message each. Every write that got a 2xx back
//! (and its whole body) is acknowledged and must be found after the restart: the job
//! exists, each acknowledged status change and progress message appears exactly once
//! as an event, and each job's event `seq`s run 1..n without a gap. Writes that got no
//! answer may or may not be there; those that are, are counted. After the restart the
//! workers carry on to 1000 attempted writes in total, so the restarted server is also
//! shown to keep writing to the jobs that were open when it died.
//!
//! Run with `cargo test --test api crash -- --nocapture` to see the counts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic on a missing value or an out-of-range index is the failed assertion"
)]

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use coordinator::crypto::seal::MasterKey;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");
/// Writes attempted in all (before and after the crash).
const TARGET_ATTEMPTS: usize = 1000;
/// The server is killed once this many writes have been acknowledged.
const KILL_AFTER_ACKS: usize = 500;
/// Writer threads.
const THREADS: usize = 4;
/// Progress updates per job before a worker starts the next job.
const PROGRESS_PER_JOB: usize = 25;

// ---- databases -----------------------------------------------------------------------

use crate::helpers::{postgres_admin_url, replace_db_name};

/// A throwaway database: a SQLite file in the temp dir, or a fresh PostgreSQL database
/// dropped (`WITH (FORCE)`) when this goes out of scope, whatever the test's outcome.
struct CrashDb {
    url: String,
    sqlite_path: Option<PathBuf>,
    pg: Option<(String, String)>,
}

impl CrashDb {
    fn sqlite(dir: &Path) -> CrashDb {
        let path = dir.join("crash.db");
        CrashDb {
            url: format!("sqlite://{}", path.display()),
            sqlite_path: Some(path),
            pg: None,
        }
    }

    fn postgres() -> Option<CrashDb> {
        let admin = postgres_admin_url()?;
        let name = format!("coord_crash_{}", uuid::Uuid::now_v7().simple());
        let mut c = diesel::PgConnection::establish(&admin).expect("admin connection");
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create crash database");
        Some(CrashDb {
            url: replace_db_name(&admin, &name),
            sqlite_path: None,
            pg: Some((admin, name)),
        })
    }
}

impl Drop for CrashDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.pg {
            if let Ok(mut c) = diesel::PgConnection::establish(admin) {
                let _ =
                    c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
            }
        }
    }
}

// ---- the server process --------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A `coordinator serve` child process; killed (SIGKILL) and reaped when dropped.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, db_url: &str, master_key: &str, api_key: &str, n: usize) -> Server {
        let port = free_port();
        let log = dir.join(format!("server-{n}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let bind = format!("127.0.0.1:{port}");
        // A clean environment, run in the temp dir: no `.env` of the repository leaks in.
        let child = Command::new(BIN)
            .env_clear()
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .env("COORDINATOR_MASTER_KEY", master_key)
            .env("COORDINATOR_API_KEY", api_key)
            .args(["serve", "--bind", &bind, "--database-url", db_url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn coordinator serve");
        let mut s = Server {
            child,
            base: format!("http://{bind}"),
            log,
        };
        s.wait_ready();
        s
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn wait_ready(&mut self) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "coordinator exited before it was ready ({status})\n{}",
                    self.log_text()
                );
            }
            if let Ok(r) = agent.get(&format!("{}/readyz", self.base)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "coordinator not ready after 30 s\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (what `Child::kill` sends on Unix) and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- the writers ---------------------------------------------------------------------

#[derive(Debug, Clone)]
enum What {
    /// A create, identified by its `Idempotency-Key` (the id is known once acknowledged).
    Create {
        key: String,
        body: String,
    },
    Status {
        to: &'static str,
    },
    Progress {
        percent: i64,
        message: String,
    },
}

#[derive(Debug, Clone)]
struct Write {
    /// The job written to (for a create: its id once acknowledged).
    job: Option<String>,
    what: What,
    acked: bool,
    /// Written after the restart.
    after_restart: bool,
}

enum Reply {
    /// 2xx with its whole body read.
    Ack(Value),
    /// Any other status (not acknowledged, the server is alive).
    Refused(u16, String),
    /// No answer (connection refused or reset, or the body cut short).
    Transport(String),
}

fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    api_key: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = agent
        .request(method, url)
        .set("X-API-Key", api_key)
        .set("content-type", "application/json");
    for (k, v) in extra {
        req = req.set(k, v);
    }
    match req.send_string(body) {
        Ok(r) => match r.into_string() {
            Ok(text) => match serde_json::from_str(&text) {
                Ok(v) => Reply::Ack(v),
                Err(e) => Reply::Refused(0, format!("2xx without JSON ({e}): {text}")),
            },
            Err(e) => Reply::Transport(format!("body cut short: {e}")),
        },
        Err(ureq::Error::Status(code, r)) => {
            Reply::Refused(code, r.into_string().unwrap_or_default())
        }
        Err(ureq::Error::Transport(t)) => Reply::Transport(t.to_string()),
    }
}

/// Shared by the writer threads of one run.
struct Shared {
    base: String,
    api_key: String,
    attempted: AtomicUsize,
    acked: AtomicUsize,
    after_restart: bool,
    refusals: Mutex<Vec<String>>,
    transport: Mutex<Vec<String>>,
}

/// What a worker carries across the restart: the RUNNING job it was writing to.
#[derive(Default)]
struct WorkerState {
    running: Option<String>,
    jobs: usize,
    progress_sent: usize,
}

enum Step {
    Acked(Value),
    Refused,
    Stop,
}

impl Shared {
    /// One write: counted, sent, recorded. `Stop` when the target is reached or the
    /// server gave no answer.
    fn write(
        &self,
        agent: &ureq::Agent,
        log: &mut Vec<Write>,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        mut w: Write,
    ) -> Step {
        if self.attempted.fetch_add(1, Ordering::SeqCst) >= TARGET_ATTEMPTS {
            self.attempted.fetch_sub(1, Ordering::SeqCst);
            return Step::Stop;
        }
        let body = match &w.what {
            What::Create { body, .. } => body.clone(),
            What::Status { to } => json!({ "status": to }).to_string(),
            What::Progress { percent, message } => {
                json!({ "percent": percent, "message": message }).to_string()
            }
        };
        let url = format!("{}{path}", self.base);
        w.after_restart = self.after_restart;
        let step = match call(agent, method, &url, &self.api_key, extra, &body) {
            Reply::Ack(v) => {
                w.acked = true;
                if let What::Create { .. } = w.what {
                    w.job = v["id"].as_str().map(str::to_owned);
                }
                self.acked.fetch_add(1, Ordering::SeqCst);
                Step::Acked(v)
            }
            Reply::Refused(code, text) => {
                self.refusals
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path}: {code} {text}"));
                Step::Refused
            }
            Reply::Transport(e) => {
                self.transport
                    .lock()
                    .unwrap()
                    .push(format!("{method} {path}: {e}"));
                Step::Stop
            }
        };
        log.push(w);
        step
    }
}

/// A writer: continue the RUNNING job it had, else create a job, move it to RUNNING and
/// send progress updates; repeat until the target is reached or the server is gone.
fn worker(t: usize, s: &Shared, st: &mut WorkerState) -> Vec<Write> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let mut log = Vec::new();
    loop {
        let id = match st.running.take() {
            Some(id) => id,
            None => {
                st.jobs += 1;
                let key = format!("crash-{t}-{}-{}", st.jobs, uuid::Uuid::now_v7().simple());
                let body = json!({"kind": "crash-test", "payload": {"thread": t, "job": st.jobs}})
                    .to_string();
                let w = Write {
                    job: None,
                    what: What::Create {
                        key: key.clone(),
                        body,
                    },
                    acked: false,
                    after_restart: false,
                };
                let id = match s.write(
                    &agent,
                    &mut log,
                    "POST",
                    "/coordinator/jobs",
                    &[("Idempotency-Key", &key)],
                    w,
                ) {
                    Step::Acked(v) => v["id"].as_str().expect("created job id").to_owned(),
                    Step::Refused => continue,
                    Step::Stop => return log,
                };
                let path = format!("/coordinator/jobs/{id}/status");
                let mut running = true;
                for to in ["QUEUED", "RUNNING"] {
                    let w = Write {
                        job: Some(id.clone()),
                        what: What::Status { to },
                        acked: false,
                        after_restart: false,
                    };
                    match s.write(&agent, &mut log, "PATCH", &path, &[], w) {
                        Step::Acked(_) => {}
                        Step::Refused => {
                            running = false;
                            break;
                        }
                        Step::Stop => return log,
                    }
                }
                if !running {
                    continue;
                }
                id
            }
        };
        let path = format!("/coordinator/jobs/{id}/progress");
        let mut sent_here = 0;
        while sent_here < PROGRESS_PER_JOB {
            st.progress_sent += 1;
            sent_here += 1;
            let message = format!(
                "t{t}-p{}-{}",
                st.progress_sent,
                uuid::Uuid::now_v7().simple()
            );
            let w = Write {
                job: Some(id.clone()),
                what: What::Progress {
                    percent: i64::try_from(st.progress_sent % 101).unwrap_or(0),
                    message,
                },
                acked: false,
                after_restart: false,
            };
            match s.write(&agent, &mut log, "PATCH", &path, &[], w) {
                Step::Acked(_) => {}
                Step::Refused => break,
                Step::Stop => {
                    // The job may well still be RUNNING: carry on with it after a restart.
                    st.running = Some(id);
                    return log;
                }
            }
        }
    }
}

/// Run the writers against `base` until the target is reached, they all stop, or (with
/// `kill`) the server is killed after `KILL_AFTER_ACKS` acknowledged writes.
fn run_writers(
    s: &Shared,
    states: &mut [WorkerState],
    kill: Option<&mut Server>,
) -> (Vec<Write>, bool) {
    let done = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    let logs: Vec<Vec<Write>> = std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .iter_mut()
            .enumerate()
            .map(|(t, st)| {
                let done = &done;
                scope.spawn(move || {
                    let log = worker(t, s, st);
                    done.fetch_add(1, Ordering::SeqCst);
                    log
                })
            })
            .collect();
        if let Some(server) = kill {
            loop {
                if s.acked.load(Ordering::SeqCst) >= KILL_AFTER_ACKS {
                    server.kill();
                    killed.store(true, Ordering::SeqCst);
                    break;
                }
                if done.load(Ordering::SeqCst) == THREADS {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    });
    (
        logs.into_iter().flatten().collect(),
        killed.load(Ordering::SeqCst),
    )
}

// ---- verification --------------------------------------------------------------------

fn json_of(r: ureq::Response) -> Option<Value> {
    serde_json::from_str(&r.into_string().ok()?).ok()
}

fn get_json(agent: &ureq::Agent, base: &str, api_key: &str, path: &str) -> (u16, Value) {
    match agent
        .get(&format!("{base}{path}"))
        .set("X-API-Key", api_key)
        .call()
    {
        Ok(r) => (r.status(), json_of(r).expect("JSON body")),
        Err(ureq::Error::Status(code, r)) => (code, json_of(r).unwrap_or(Value::Null)),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

#[derive(Debug, Default)]
struct Counts {
    attempted: usize,
    acknowledged: usize,
    verified: usize,
    unacked: usize,
    unacked_present: usize,
}

/// Check every acknowledged write against the restarted server; count the rest.
fn verify(base: &str, api_key: &str, writes: &[Write]) -> Counts {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let mut c = Counts {
        attempted: writes.len(),
        acknowledged: writes.iter().filter(|w| w.acked).count(),
        ..Counts::default()
    };
    c.unacked = c.attempted - c.acknowledged;
    let mut failures: Vec<String> = Vec::new();

    // Creates: acknowledged ones must exist; a repeat with the same Idempotency-Key must
    // return the same job. An unacknowledged create is present exactly when its repeat
    // is answered as a replay of an earlier request.
    let mut jobs: Vec<String> = Vec::new();
    for w in writes {
        let What::Create { key, body } = &w.what else {
            continue;
        };
        let reply = agent
            .post(&format!("{base}/coordinator/jobs"))
            .set("X-API-Key", api_key)
            .set("content-type", "application/json")
            .set("Idempotency-Key", key)
            .send_string(body)
            .unwrap_or_else(|e| panic!("repeat create {key}: {e}"));
        let replayed = reply.header("Idempotent-Replayed") == Some("true");
        let v: Value = json_of(reply).expect("create JSON");
        let id = v["id"].as_str().expect("id").to_owned();
        if w.acked {
            let acked_id = w.job.clone().expect("acknowledged create has an id");
            if replayed && id == acked_id {
                c.verified += 1;
            } else {
                failures.push(format!(
                    "acknowledged create {acked_id} lost: the repeat of its Idempotency-Key made {id} (replayed: {replayed})"
                ));
            }
            jobs.push(acked_id);
        } else if replayed {
            c.unacked_present += 1;
            jobs.push(id);
        }
    }

    // Per job: what was attempted and what was acknowledged.
    let mut attempted_msgs: HashMap<String, HashSet<String>> = HashMap::new();
    for w in writes {
        if let (Some(job), What::Progress { message, .. }) = (&w.job, &w.what) {
            attempted_msgs
                .entry(job.clone())
                .or_default()
                .insert(message.clone());
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut views: HashMap<String, Value> = HashMap::new();
    for id in jobs
        .iter()
        .chain(writes.iter().filter_map(|w| w.job.as_ref()))
    {
        if !seen.insert(id.clone()) {
            continue;
        }
        let (status, v) = get_json(&agent, base, api_key, &format!("/coordinator/jobs/{id}"));
        if status != 200 {
            failures.push(format!("job {id}: GET answered {status}: {v}"));
            continue;
        }
        let events = v["events"].as_array().cloned().unwrap_or_default();
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| e["seq"].as_i64().unwrap_or(-1))
            .collect();
        let want: Vec<i64> = (1..=i64::try_from(events.len()).unwrap_or(0)).collect();
        if seqs != want {
            failures.push(format!("job {id}: event seqs are not 1..n: {seqs:?}"));
        }
        if v["eventsTruncated"] == true {
            failures.push(format!("job {id}: events truncated"));
        }
        if events.first().map(|e| &e["type"]) != Some(&json!("created")) {
            failures.push(format!("job {id}: first event is not `created`"));
        }
        let progress: Vec<&Value> = events.iter().filter(|e| e["type"] == "progress").collect();
        // No phantom writes: every progress event is one a worker sent.
        let sent = attempted_msgs.get(id).cloned().unwrap_or_default();
        for e in &progress {
            let m = e["data"]["message"].as_str().unwrap_or("");
            if !sent.contains(m) {
                failures.push(format!("job {id}: progress event nobody sent: {e}"));
            }
        }
        // The row agrees with its newest event.
        if let Some(last) = progress.last() {
            if v["progress"] != last["data"]["percent"] || v["message"] != last["data"]["message"] {
                failures.push(format!(
                    "job {id}: row (progress {}, message {}) disagrees with its last progress event {last}",
                    v["progress"], v["message"]
                ));
            }
        }
        views.insert(id.clone(), v);
    }

    for w in writes {
        let (Some(id), false) = (&w.job, matches!(w.what, What::Create { .. })) else {
            continue;
        };
        let Some(v) = views.get(id) else {
            if w.acked {
                failures.push(format!(
                    "acknowledged write to missing job {id}: {:?}",
                    w.what
                ));
            }
            continue;
        };
        let events = v["events"].as_array().cloned().unwrap_or_default();
        let found = match &w.what {
            What::Progress { message, percent } => {
                let hits: Vec<&Value> = events
                    .iter()
                    .filter(|e| e["type"] == "progress" && e["data"]["message"] == json!(message))
                    .collect();
                if hits.len() > 1 {
                    failures.push(format!(
                        "job {id}: progress {message} applied {} times",
                        hits.len()
                    ));
                }
                if let Some(e) = hits.first() {
                    if e["data"]["percent"] != json!(percent) {
                        failures.push(format!("job {id}: progress {message} stored as {e}"));
                    }
                }
                hits.len()
            }
            What::Status { to } => events
                .iter()
                .filter(|e| e["type"] == "status" && e["data"]["to"] == json!(to))
                .count(),
            What::Create { .. } => unreachable!(),
        };
        match (w.acked, found > 0) {
            (true, true) => c.verified += 1,
            (true, false) => failures.push(format!(
                "acknowledged write lost on job {id}: {:?} (after restart: {})",
                w.what, w.after_restart
            )),
            (false, true) => c.unacked_present += 1,
            (false, false) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s) after the crash:\n{}",
        failures.len(),
        failures.join("\n")
    );
    c
}

fn integrity_check(path: &Path) {
    #[derive(diesel::QueryableByName)]
    struct Check {
        #[diesel(sql_type = diesel::sql_types::Text)]
        integrity_check: String,
    }
    use diesel::RunQueryDsl;
    let mut conn =
        diesel::SqliteConnection::establish(&path.display().to_string()).expect("open SQLite file");
    let rows: Vec<Check> = diesel::sql_query("PRAGMA integrity_check")
        .load(&mut conn)
        .expect("integrity_check");
    let text: Vec<String> = rows.into_iter().map(|r| r.integrity_check).collect();
    assert_eq!(text, ["ok"], "PRAGMA integrity_check");
}

// ---- the test ------------------------------------------------------------------------

fn crash_and_restart(label: &str, db: &CrashDb, dir: &Path) {
    let started = Instant::now();
    let master_key = MasterKey::generate().to_base64().to_string();
    let api_key = format!("crash-bootstrap-{}", uuid::Uuid::now_v7().simple());
    assert!(api_key.len() >= 32);

    let mut first = Server::start(dir, &db.url, &master_key, &api_key, 1);
    let mut states: Vec<WorkerState> = (0..THREADS).map(|_| WorkerState::default()).collect();
    let before = Shared {
        base: first.base.clone(),
        api_key: api_key.clone(),
        attempted: AtomicUsize::new(0),
        acked: AtomicUsize::new(0),
        after_restart: false,
        refusals: Mutex::new(Vec::new()),
        transport: Mutex::new(Vec::new()),
    };
    let (mut writes, killed) = run_writers(&before, &mut states, Some(&mut first));
    assert!(
        killed,
        "the server was never killed: {} acknowledged",
        before.acked.load(Ordering::SeqCst)
    );
    let in_flight = before.transport.lock().unwrap().len();
    let refused_before = before.refusals.lock().unwrap().clone();
    assert!(
        refused_before.is_empty(),
        "writes refused before the crash:\n{}",
        refused_before.join("\n")
    );
    let acked_before = writes.iter().filter(|w| w.acked).count();
    let attempted_before = writes.len();
    drop(first);

    let mut second = Server::start(dir, &db.url, &master_key, &api_key, 2);
    let after = Shared {
        base: second.base.clone(),
        api_key: api_key.clone(),
        attempted: AtomicUsize::new(attempted_before),
        acked: AtomicUsize::new(0),
        after_restart: true,
        refusals: Mutex::new(Vec::new()),
        transport: Mutex::new(Vec::new()),
    };
    let (more, _) = run_writers(&after, &mut states, None);
    let refused_after = after.refusals.lock().unwrap().clone();
    let transport_after = after.transport.lock().unwrap().clone();
    assert!(
        refused_after.is_empty() && transport_after.is_empty(),
        "writes failed after the restart:\n{}\n{}",
        refused_after.join("\n"),
        transport_after.join("\n")
    );
    writes.extend(more);
    assert_eq!(writes.len(), TARGET_ATTEMPTS);

    let c = verify(&second.base, &api_key, &writes);
    second.kill();
    if let Some(path) = &db.sqlite_path {
        integrity_check(path);
    }
    eprintln!(
        "crash[{label}]: attempted {} (before kill {attempted_before}, after restart {}), \
         acknowledged {} (before kill {acked_before}), verified {}, \
         unacknowledged {} (in flight at the kill {in_flight}), unacknowledged-but-present {} \
         — {:.1} s",
        c.attempted,
        c.attempted - attempted_before,
        c.acknowledged,
        c.verified,
        c.unacked,
        c.unacked_present,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        c.verified, c.acknowledged,
        "every acknowledged write is verified"
    );
    assert!(acked_before >= KILL_AFTER_ACKS);
}

fn sqlite_keeps_every_acknowledged_write_across_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = CrashDb::sqlite(dir.path());
    crash_and_restart("sqlite", &db, dir.path());
}

fn postgres_keeps_every_acknowledged_write_across_sigkill(_: crate::helpers::Backend) {
    let Some(db) = CrashDb::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    crash_and_restart("postgres", &db, dir.path());
}

crate::plain_tests!(sqlite_keeps_every_acknowledged_write_across_sigkill);
crate::postgres_tests!(postgres_keeps_every_acknowledged_write_across_sigkill);
