//! Storage faults (the review of 2026-12-06): the file system under the database fills
//! up, or the database stops taking writes (a PostgreSQL that went read-only, as a
//! standby does after a failover). What must hold, as for every fault: a write gets its
//! answer or a 503 (problem+json with `Retry-After`, nothing about the database in the
//! body), never a 500; no acknowledged write is lost, also across a restart; a signed
//! request that was acknowledged is still refused when replayed; the service recovers
//! by itself once the fault is gone.
//!
//! The disk-full tests mount a small tmpfs (root and `mount`, and for PostgreSQL a
//! server on this machine that can use a directory here as a tablespace). Where that
//! is not possible they are reported as ignored, never as passed (`REQUIRE_MOUNTS=1`:
//! they fail instead).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coordinator::auth::Scope;
use diesel::connection::SimpleConnection;
use diesel::{Connection, RunQueryDsl};
use serde_json::{json, Value};

use crate::helpers::{
    now_secs, postgres_admin_url, start, test_config, try_send, Backend, Resp, Test, TestApp,
    TestDb,
};

inventory::submit! {
    Test::new(module_path!(), "sqlite", "a_full_disk_is_503_never_500_and_loses_no_acknowledged_write",
        || a_full_disk_is_503_never_500_and_loses_no_acknowledged_write(Backend::Sqlite))
        .when(can_mount)
}
inventory::submit! {
    Test::new(module_path!(), "postgres", "a_full_disk_is_503_never_500_and_loses_no_acknowledged_write",
        || a_full_disk_is_503_never_500_and_loses_no_acknowledged_write(Backend::Postgres))
        .on_postgres()
        .when(can_mount_for_postgres)
}

inventory::submit! {
    Test::new(module_path!(), "sqlite", "a_full_disk_under_concurrent_signed_reads_and_writes_loses_nothing_acknowledged",
        || a_full_disk_under_concurrent_signed_reads_and_writes_loses_nothing_acknowledged(Backend::Sqlite))
        .when(can_mount)
}
inventory::submit! {
    Test::new(module_path!(), "postgres", "a_full_disk_under_concurrent_signed_reads_and_writes_loses_nothing_acknowledged",
        || a_full_disk_under_concurrent_signed_reads_and_writes_loses_nothing_acknowledged(Backend::Postgres))
        .on_postgres()
        .when(can_mount_for_postgres)
}

crate::backend_tests!(a_damaged_database_is_503_never_500);

inventory::submit! {
    Test::new(module_path!(), "sqlite", "a_damaged_database_met_by_signed_writes_only_takes_the_instance_out",
        || a_damaged_database_met_by_signed_writes_only_takes_the_instance_out(Backend::Sqlite))
}

inventory::submit! {
    Test::new(module_path!(), "sqlite", "a_read_only_database_file_is_503_never_500_and_recovers",
        || a_read_only_database_file_is_503_never_500_and_recovers(Backend::Sqlite))
        .when(can_mount)
}

crate::postgres_tests!(
    a_progress_batch_cut_mid_way_answers_each_report_as_committed,
    a_progress_batch_of_several_jobs_cut_mid_way_answers_each_report_as_committed,
    a_read_only_database_is_503_never_500_and_recovers,
    a_statement_cancelled_by_a_lock_timeout_is_503_never_500,
);

const JSON: (&str, &str) = ("content-type", "application/json");

/// Words a 503 body must not contain: where the data lives, what the database said.
const INTERNALS: &[&str] = &[
    "/tmp",
    "pg_tblspc",
    "No space",
    "disk",
    "read-only",
    "readonly",
    "SQL",
    "malformed",
    "invalid page",
    "zero page",
];

// ---- the file system --------------------------------------------------------------------

/// A tmpfs of a fixed size, mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A read-only bind mount of a directory (the same files, which nothing may write
/// through it); unmounted when dropped.
struct ReadOnlyView {
    dir: tempfile::TempDir,
}

impl ReadOnlyView {
    fn of(source: &Path) -> ReadOnlyView {
        let dir = tempfile::tempdir().expect("tempdir");
        for args in [
            vec!["--bind".to_owned(), source.display().to_string()],
            vec!["-o".to_owned(), "remount,bind,ro".to_owned()],
        ] {
            let out = std::process::Command::new("mount")
                .args(&args)
                .arg(dir.path())
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ReadOnlyView { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Can this process mount a tmpfs? Panics when it cannot and `REQUIRE_MOUNTS=1`.
fn can_mount() -> bool {
    let ok = Tmpfs::mount("1m").is_ok();
    if !ok && std::env::var("REQUIRE_MOUNTS").as_deref() == Ok("1") {
        panic!("REQUIRE_MOUNTS=1 but this process cannot mount a tmpfs");
    }
    ok
}

/// A tmpfs, and a PostgreSQL server that runs on this machine as `postgres`, so a
/// directory of the tmpfs can be its tablespace.
fn can_mount_for_postgres() -> bool {
    let Some(admin) = postgres_admin_url() else {
        return false;
    };
    #[derive(diesel::QueryableByName)]
    struct Dir {
        #[diesel(sql_type = diesel::sql_types::Text)]
        dir: String,
    }
    let local = diesel::PgConnection::establish(&admin)
        .ok()
        .and_then(|mut c| {
            diesel::sql_query("SELECT current_setting('data_directory') AS dir")
                .get_result::<Dir>(&mut c)
                .ok()
        })
        .is_some_and(|d| Path::new(&d.dir).is_dir());
    let has_user = std::process::Command::new("id")
        .arg("postgres")
        .output()
        .is_ok_and(|o| o.status.success());
    local && has_user && can_mount()
}

/// Fill the file system `dir` is on with one file, until a write fails for want of
/// space; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match f.write_all(&buf) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    path
}

/// A PostgreSQL tablespace in a directory of its own on `fs`, dropped (after the
/// databases in it) when this is.
struct Tablespace {
    admin: String,
    name: String,
}

impl Tablespace {
    fn create(fs: &Tmpfs) -> Tablespace {
        let admin = postgres_admin_url().expect("PostgreSQL");
        let dir = fs.path().join("pg");
        std::fs::create_dir(&dir).expect("tablespace dir");
        let owned = std::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(fs.path())
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(owned.success(), "chown postgres {}", dir.display());
        let name = format!("coord_ts_{}", uuid::Uuid::now_v7().simple());
        let mut c = diesel::PgConnection::establish(&admin).expect("admin connection");
        c.batch_execute(&format!(
            "CREATE TABLESPACE \"{name}\" LOCATION '{}'",
            dir.display()
        ))
        .expect("create tablespace");
        Tablespace { admin, name }
    }
}

impl Drop for Tablespace {
    fn drop(&mut self) {
        if let Ok(mut c) = diesel::PgConnection::establish(&self.admin) {
            let _ = c.batch_execute(&format!("DROP TABLESPACE IF EXISTS \"{}\"", self.name));
        }
    }
}

// ---- requests -----------------------------------------------------------------------------

/// One signed request exactly as sent (to send it again as a replay) and its answer.
struct Sent {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    answer: Result<Resp, String>,
}

impl Sent {
    fn signed(app: &TestApp, method: &'static str, path: &str, body: &Value) -> Sent {
        let body = body.to_string();
        let mut headers = vec![(JSON.0.to_owned(), JSON.1.to_owned())];
        headers.extend(
            app.signer
                .headers(method, path, body.as_bytes(), now_secs()),
        );
        let answer = send_as(app, method, path, &headers, &body);
        Sent {
            method,
            path: path.to_owned(),
            headers,
            body,
            answer,
        }
    }

    fn again(&self, app: &TestApp) -> Result<Resp, String> {
        send_as(app, self.method, &self.path, &self.headers, &self.body)
    }

    fn ok(&self) -> bool {
        self.answer
            .as_ref()
            .is_ok_and(|r| (200..300).contains(&r.status))
    }
}

fn send_as(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> Result<Resp, String> {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    try_send(&app.url(path), method, &h, body.as_bytes())
}

/// `None` for a 2xx or a proper 503; otherwise what is wrong with the answer.
fn not_2xx_or_503(what: &str, answer: &Result<Resp, String>) -> Option<String> {
    let r = match answer {
        Err(e) => return Some(format!("{what}: no answer: {e}")),
        Ok(r) => r,
    };
    if (200..300).contains(&r.status) {
        return None;
    }
    let ok = r.status == 503
        && r.header("content-type") == Some("application/problem+json")
        && r.header("retry-after").is_some()
        && serde_json::from_str::<Value>(&r.body).is_ok_and(|p| p["status"] == 503)
        && !INTERNALS.iter().any(|w| r.body.contains(w));
    (!ok).then(|| format!("{what}: {} {:?} {}", r.status, r.headers, r.body))
}

/// What the writes of a test left acknowledged.
#[derive(Default)]
struct Acked {
    /// Progress messages of the job.
    messages: Vec<String>,
    /// Jobs created (ids).
    jobs: Vec<String>,
    /// Signed requests that were acknowledged: each must be refused when replayed.
    signed: Vec<Sent>,
    refused: usize,
    problems: Vec<String>,
}

impl Acked {
    /// Write `n` times: a signed progress report, one with the API key, a signed create
    /// (with an `Idempotency-Key`), in turn; record what was acknowledged.
    fn write(&mut self, app: &TestApp, job: &str, key: &str, label: &str, n: usize) {
        let path = format!("/coordinator/jobs/{job}/progress");
        for i in 0..n {
            let message = format!("{label}-{i}");
            match i % 3 {
                0 => {
                    let body = json!({"percent": 50, "message": message});
                    let s = Sent::signed(app, "PATCH", &path, &body);
                    self.note(&message, &s.answer);
                    if s.ok() {
                        self.messages.push(message);
                        self.signed.push(s);
                    }
                }
                1 => {
                    let body = json!({"percent": 50, "message": message}).to_string();
                    let r = try_send(
                        &app.url(&path),
                        "PATCH",
                        &[JSON, ("X-API-Key", key)],
                        body.as_bytes(),
                    );
                    self.note(&message, &r);
                    if r.as_ref().is_ok_and(|r| r.status == 200) {
                        self.messages.push(message);
                    }
                }
                _ => {
                    let body =
                        json!({"kind": "disk", "queue": "storage", "payload": {"m": message}});
                    let s = Sent::signed(app, "POST", "/coordinator/jobs", &body);
                    self.note(&message, &s.answer);
                    if s.ok() {
                        if let Ok(r) = &s.answer {
                            self.jobs
                                .push(r.json()["id"].as_str().unwrap_or_default().to_owned());
                        }
                        self.signed.push(s);
                    }
                }
            }
        }
    }

    fn note(&mut self, what: &str, answer: &Result<Resp, String>) {
        if let Some(p) = not_2xx_or_503(what, answer) {
            self.problems.push(p);
        } else if answer.as_ref().is_ok_and(|r| r.status == 503) {
            self.refused += 1;
        }
    }

    /// Every acknowledged write is there: each progress message exactly once, with
    /// the job's event `seq`s 1..n, and every created job.
    fn check(&self, app: &TestApp, job: &str, when: &str) {
        let events = events(app, job);
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| e["seq"].as_i64().unwrap_or(-1))
            .collect();
        let want: Vec<i64> = (1..=i64::try_from(events.len()).expect("len")).collect();
        assert_eq!(seqs, want, "{when}: event seqs are not 1..n");
        let messages: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "progress")
            .filter_map(|e| e["data"]["message"].as_str())
            .collect();
        let lost: Vec<&String> = self
            .messages
            .iter()
            .filter(|m| messages.iter().filter(|x| **x == m.as_str()).count() != 1)
            .collect();
        assert!(
            lost.is_empty(),
            "{when}: acknowledged progress lost or doubled: {lost:?}"
        );
        for id in &self.jobs {
            let r = retry_503(|| app.get(&format!("/coordinator/jobs/{id}")));
            assert_eq!(r.status, 200, "{when}: acknowledged job {id}: {}", r.body);
        }
    }

    /// Every acknowledged signed request, sent again, is refused as a replay.
    fn check_replays(&self, app: &TestApp, when: &str) {
        for s in &self.signed {
            let r = s.again(app).expect("answered");
            let p = r.problem(401);
            assert_eq!(
                p["reason"], "replayed request",
                "{when}: {} {}",
                s.method, s.path
            );
        }
    }
}

/// Send again while the answer is a 503 (a client honouring `Retry-After`), for at
/// most 30 s: right after a fault the health state may still be probing.
fn retry_503(mut send: impl FnMut() -> Resp) -> Resp {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = send();
        if r.status != 503 || Instant::now() >= until {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every event of the job, oldest first (every page).
fn events(app: &TestApp, id: &str) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    loop {
        let after = events.last().map_or(0, |e| e["seq"].as_i64().unwrap_or(-1));
        let r = retry_503(|| app.get(&format!("/coordinator/jobs/{id}/events?after={after}")));
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.json();
        events.extend(page["events"].as_array().expect("events").iter().cloned());
        if page["hasMore"] != true {
            return events;
        }
    }
}

/// Once the fault is gone: writes are taken again, without a restart (the first may
/// still meet the fault's last refusals), and then every one of a run of them.
fn writes_recover(app: &TestApp, job: &str, key: &str, acked: &mut Acked, label: &str) {
    let path = format!("/coordinator/jobs/{job}/progress");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let message = format!("{label}-first");
        let s = Sent::signed(
            app,
            "PATCH",
            &path,
            &json!({"percent": 60, "message": message}),
        );
        if let Some(p) = not_2xx_or_503(&message, &s.answer) {
            panic!("{p}");
        }
        if s.ok() {
            acked.messages.push(message);
            acked.signed.push(s);
            break;
        }
        assert!(
            Instant::now() < until,
            "writes still refused 30 s after the fault ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = acked.refused;
    acked.write(app, job, key, label, 30);
    assert!(acked.problems.is_empty(), "{}", acked.problems.join("\n"));
    assert_eq!(
        acked.refused, before,
        "a write refused after the service had recovered"
    );
}

/// Wait (at most 10 s) until this process holds no file of the SQLite database at
/// `path` open: a stopped app's last threads (the WAL backfiller wakes every 100 ms)
/// may still hold connections, and SQLite shares one WAL index per database file
/// among all connections of a process, so an app started before they are gone would
/// share the stopped one's files (a restart in production is a new process).
fn wait_until_closed(path: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let open = std::fs::read_dir("/proc/self/fd")
            .map(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with(path))
                })
            })
            .unwrap_or(false);
        if !open {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A database on a small tmpfs (16 MiB for SQLite's file, 24 MiB for a PostgreSQL
/// tablespace), to be filled; `None` where PostgreSQL is not there. Its fields drop in
/// order: the database, its tablespace, the mount.
struct SmallDisk {
    db: std::sync::Arc<TestDb>,
    _tablespace: Option<Tablespace>,
    fs: Tmpfs,
}

impl SmallDisk {
    fn new(b: Backend) -> Option<SmallDisk> {
        let fs = Tmpfs::mount(if b == Backend::Sqlite { "16m" } else { "24m" }).expect("mount");
        let (db, tablespace) = match b {
            Backend::Sqlite => (TestDb::sqlite_at(&fs.path().join("test.db")), None),
            Backend::Postgres => {
                let tablespace = Tablespace::create(&fs);
                (TestDb::postgres_in(&tablespace.name)?, Some(tablespace))
            }
        };
        Some(SmallDisk {
            db,
            _tablespace: tablespace,
            fs,
        })
    }
}

// ---- the tests ----------------------------------------------------------------------------

/// The file system under the database fills up while the service writes: every write
/// gets a 2xx or a 503 problem, never a 500; once space is freed writes are taken
/// again without a restart (SQLite's group-commit writer thread survived); every
/// acknowledged write is there, and still there after a restart; acknowledged signed
/// requests are still refused as replays.
fn a_full_disk_is_503_never_500_and_loses_no_acknowledged_write(b: Backend) {
    let Some(disk) = SmallDisk::new(b) else {
        return;
    };
    let (fs, db) = (&disk.fs, &disk.db);
    let mut cfg = test_config(db);
    cfg.auth_failures_per_minute = 100_000;
    let app = start(b, db.clone(), cfg.clone());
    let job = app.running_job();
    let key = app.api_key("disk-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 9);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));

    let filler = fill(fs.path());
    acked.write(&app, &job, &key, "full", 300);
    assert!(
        acked.refused > 0,
        "no write was refused on a full disk: the test did not reach the fault"
    );
    let problems = std::mem::take(&mut acked.problems);
    eprintln!(
        "disk full: {} of 309 writes acknowledged, {} refused",
        acked.messages.len() + acked.jobs.len(),
        acked.refused
    );
    // Reads need no space (with an API key: a signed request's replay record is a
    // write).
    let r = retry_503(|| {
        app.raw(
            "GET",
            &format!("/coordinator/jobs/{job}"),
            &[("X-API-Key", &key)],
            b"",
        )
    });
    assert_eq!(r.status, 200, "a read while the disk is full: {}", r.body);

    std::fs::remove_file(&filler).expect("free the space");
    writes_recover(&app, &job, &key, &mut acked, "after");
    assert!(
        problems.is_empty(),
        "{} bad answers while the disk was full:\n{}",
        problems.len(),
        problems.join("\n")
    );
    acked.check(&app, &job, "after the space came back");
    acked.check_replays(&app, "after the space came back");

    drop(app);
    if let Some(path) = db.sqlite_path() {
        wait_until_closed(path);
        let mut c = diesel::SqliteConnection::establish(path).expect("open");
        #[derive(diesel::QueryableByName)]
        struct Check {
            #[diesel(sql_type = diesel::sql_types::Text)]
            integrity_check: String,
        }
        let check = diesel::sql_query("PRAGMA integrity_check")
            .get_result::<Check>(&mut c)
            .expect("integrity_check");
        assert_eq!(check.integrity_check, "ok");
    }
    let app = start(b, db.clone(), cfg);
    acked.check(&app, &job, "after a restart");
    acked.check_replays(&app, "after a restart");
}

/// The database stops taking writes while it still answers reads: PostgreSQL with
/// `default_transaction_read_only` (what a standby answers after a failover that left
/// the service pointed at it). Writes get 503 problems, never a 500; reads go on; once
/// it takes writes again they are taken without a restart; nothing acknowledged is lost.
fn a_read_only_database_is_503_never_500_and_recovers(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let admin_url = app.db.admin_url().expect("admin url").to_owned();
    let name = app.db.name().to_owned();
    let job = app.running_job();
    let key = app.api_key("ro-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 9);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));

    let read_only = |on: bool| {
        let mut c = diesel::PgConnection::establish(&admin_url).expect("admin");
        let set = if on {
            "SET default_transaction_read_only = on"
        } else {
            "RESET default_transaction_read_only"
        };
        c.batch_execute(&format!("ALTER DATABASE \"{name}\" {set}"))
            .expect("alter database");
        // Sessions read the setting when they start.
        c.batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ))
        .expect("terminate sessions");
    };
    /// Resets the database when the test fails half-way (the harness drops it anyway).
    struct Writable<F: Fn(bool)>(F);
    impl<F: Fn(bool)> Drop for Writable<F> {
        fn drop(&mut self) {
            (self.0)(false);
        }
    }
    read_only(true);
    let guard = Writable(read_only);
    // The sessions cut by the switch are answered 503 and the health state recovers;
    // once it has, every write meets the read-only database itself. A read goes on
    // (with an API key: a signed request's replay record is a write).
    let r = retry_503(|| {
        app.raw(
            "GET",
            &format!("/coordinator/jobs/{job}"),
            &[("X-API-Key", &key)],
            b"",
        )
    });
    assert_eq!(r.status, 200, "a read of a read-only database: {}", r.body);
    acked.write(&app, &job, &key, "read-only", 30);
    assert!(
        acked.refused > 0,
        "no write was refused by a read-only database"
    );
    let problems = std::mem::take(&mut acked.problems);
    drop(guard);
    writes_recover(&app, &job, &key, &mut acked, "writable");
    assert!(
        problems.is_empty(),
        "{} bad answers while the database was read-only:\n{}",
        problems.len(),
        problems.join("\n")
    );
    acked.check(&app, &job, "after the database took writes again");
    acked.check_replays(&app, "after the database took writes again");
}

crate::sqlite_tests!(
    a_removed_wal_file_loses_no_acknowledged_write,
    a_removed_shm_file_loses_no_acknowledged_write,
    a_removed_wal_of_a_symlinked_database_loses_no_acknowledged_write,
    a_removed_database_file_takes_the_instance_out_of_service,
);

/// The database file itself removed (or replaced) under the running server: SQLite
/// refuses every write on the connections that still have the old file open
/// ("attempt to write a readonly database", `SQLITE_READONLY_DBMOVED`), which is the
/// message of a read-only file, a 503 that trips nothing. Nothing written from then on
/// can last, so the instance must say so (`/readyz` 503) until a restart, as for a
/// removed WAL, rather than stay ready and refuse every write for good.
fn a_removed_database_file_takes_the_instance_out_of_service(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let job = app.running_job();
    let key = app.api_key("db-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 5);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));
    let before = acked.messages.len();
    std::fs::remove_file(app.db.sqlite_path().expect("SQLite")).expect("remove the file");
    acked.write(&app, &job, &key, "removed", 10);
    // Written into the removed file: gone with it, so never acknowledged.
    assert_eq!(
        acked.messages.len(),
        before,
        "writes acknowledged into the removed database file"
    );
    assert!(
        acked.problems.is_empty(),
        "bad answers after the database file was removed:\n{}",
        acked.problems.join("\n")
    );
    assert!(acked.refused > 0, "no write refused after the removal");
    assert_eq!(
        app.raw("GET", "/readyz", &[], b"").status,
        503,
        "/readyz after the database file was removed"
    );
}

fn a_removed_wal_file_loses_no_acknowledged_write(b: Backend) {
    removed_file_loses_no_acknowledged_write(b, "-wal");
}

fn a_removed_shm_file_loses_no_acknowledged_write(b: Backend) {
    removed_file_loses_no_acknowledged_write(b, "-shm");
}

/// The same with `COORDINATOR_DATABASE_URL` naming a symbolic link to the database
/// file (a data directory linked into place): SQLite resolves the link and keeps its
/// WAL and index next to the file it names, not next to the link.
fn a_removed_wal_of_a_symlinked_database_loses_no_acknowledged_write(b: Backend) {
    let Some(db) = TestDb::create(b) else {
        return;
    };
    let links = tempfile::tempdir().expect("tempdir");
    let link = links.path().join("linked.db");
    std::os::unix::fs::symlink(db.sqlite_path().expect("SQLite"), &link).expect("symlink");
    let mut cfg = test_config(&db);
    cfg.auth_failures_per_minute = 100_000;
    cfg.db.url =
        coordinator::db::DatabaseUrl::parse(&format!("sqlite://{}", link.display())).expect("url");
    removed_file_loses_no_acknowledged_write_on(b, start(b, db, cfg), "-wal");
}

/// An operator (or a clean-up job) removes the SQLite WAL or its index (`-shm`) under
/// the running server. The next write finds it out: from then on every request gets a
/// 503 problem (never a 500) and `/readyz` 503 until a restart; every acknowledged
/// write is in the database file once the server has stopped (which passes SQLite's
/// integrity check), and a server started on it again has all of them and takes
/// writes.
fn removed_file_loses_no_acknowledged_write(b: Backend, suffix: &str) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    removed_file_loses_no_acknowledged_write_on(b, app, suffix);
}

fn removed_file_loses_no_acknowledged_write_on(b: Backend, app: TestApp, suffix: &str) {
    let file = format!("{}{suffix}", app.db.sqlite_path().expect("SQLite"));
    let job = app.running_job();
    let key = app.api_key("wal-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 30);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));
    std::fs::remove_file(&file).expect("remove the file");
    acked.write(&app, &job, &key, "removed", 60);
    // A write acknowledged is what the next read shows (a read may be refused, never
    // stale: a read connection opened after the removal must not see an older state).
    let path = format!("/coordinator/jobs/{job}/progress");
    for i in 0..40 {
        let message = format!("read-your-write-{i}");
        let body = json!({"percent": 70, "message": message}).to_string();
        let w = try_send(
            &app.url(&path),
            "PATCH",
            &[JSON, ("X-API-Key", &key)],
            body.as_bytes(),
        );
        acked.note(&message, &w);
        if !w.as_ref().is_ok_and(|r| r.status == 200) {
            continue;
        }
        acked.messages.push(message.clone());
        let r = try_send(
            &app.url(&format!("/coordinator/jobs/{job}")),
            "GET",
            &[("X-API-Key", &key)],
            b"",
        );
        acked.note(&format!("read after {message}"), &r);
        if let Some(r) = r.as_ref().ok().filter(|r| r.status == 200) {
            let shown = r.json()["message"].as_str().unwrap_or_default().to_owned();
            if shown != message {
                acked
                    .problems
                    .push(format!("stale read after {message}: shows {shown:?}"));
            }
        }
    }
    assert!(
        acked.problems.is_empty(),
        "{} bad answers after {file} was removed:\n{}",
        acked.problems.len(),
        acked.problems.join("\n")
    );
    // Asserted after the data: without the detection, what goes wrong first is the
    // database file itself (it failed SQLite's integrity check: pages that only the
    // removed WAL held).
    let refused = acked.refused;
    let ready = app.raw("GET", "/readyz", &[], b"").status;
    let (db, cfg) = (app.db.clone(), app.config.clone());
    drop(app);
    let path = db.sqlite_path().expect("SQLite");
    wait_until_closed(path);
    let mut c = diesel::SqliteConnection::establish(path).expect("open");
    #[derive(diesel::QueryableByName)]
    struct Check {
        #[diesel(sql_type = diesel::sql_types::Text)]
        integrity_check: String,
    }
    let check = diesel::sql_query("PRAGMA integrity_check")
        .get_result::<Check>(&mut c)
        .map(|c| c.integrity_check)
        .unwrap_or_else(|e| e.to_string());
    drop(c);
    assert_eq!(check, "ok", "the database after {file} was removed");
    let app = start(b, db, cfg);
    acked.check(&app, &job, "after a restart");
    assert!(refused > 0, "no request refused after {file} was removed");
    assert_eq!(ready, 503, "/readyz after {file} was removed");
    writes_recover(&app, &job, &key, &mut acked, "restarted");
    acked.check(&app, &job, "after writes on the restarted server");
}

/// A statement PostgreSQL cancels (here: `lock_timeout`, set on the database as a DBA
/// may, while another session holds the job's row; `statement_timeout` and
/// `pg_cancel_backend` end a statement the same way, "canceling statement due to …")
/// is load: 503 with `Retry-After`, never a 500, and writes go on once the lock is
/// released.
fn a_statement_cancelled_by_a_lock_timeout_is_503_never_500(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let (admin_url, name) = (
        app.db.admin_url().expect("admin url").to_owned(),
        app.db.name().to_owned(),
    );
    let job = app.running_job();
    let key = app.api_key("lock-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut admin = diesel::PgConnection::establish(&admin_url).expect("admin");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" SET lock_timeout = '100ms'; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ))
        .expect("set lock_timeout");
    let read = || {
        app.raw(
            "GET",
            &format!("/coordinator/jobs/{job}"),
            &[("X-API-Key", &key)],
            b"",
        )
    };
    assert_eq!(retry_503(read).status, 200);
    // The sessions terminated above include the write paths' own connections (the
    // replay and progress batches, the creates' group commit): each may answer one 503
    // before it reconnects, depending on when it next ran (the full suite saw one,
    // 2026-12-07). Write until a round goes through whole, so what follows starts from
    // live connections.
    let started = Instant::now();
    loop {
        let mut warm = Acked::default();
        warm.write(&app, &job, &key, "warm", 3);
        assert!(warm.problems.is_empty(), "{}", warm.problems.join("\n"));
        if warm.refused == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "writes never recovered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 6);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));

    let mut lock = diesel::PgConnection::establish(&app.db.url).expect("connect");
    lock.batch_execute(&format!(
        "BEGIN; SELECT id FROM jobs WHERE id = '{job}' FOR UPDATE"
    ))
    .expect("lock the job's row");
    acked.write(&app, &job, &key, "locked", 12);
    let problems = std::mem::take(&mut acked.problems);
    let refused = acked.refused;
    lock.batch_execute("COMMIT").expect("release the row");
    assert!(
        problems.is_empty(),
        "{} bad answers while the row was locked:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(refused > 0, "no write waited out the lock timeout");
    writes_recover(&app, &job, &key, &mut acked, "released");
    acked.check(&app, &job, "after the lock was released");
}

impl Acked {
    /// Take in what another thread's writes left acknowledged.
    fn merge(&mut self, other: Acked) {
        self.messages.extend(other.messages);
        self.jobs.extend(other.jobs);
        self.signed.extend(other.signed);
        self.refused += other.refused;
        self.problems.extend(other.problems);
    }
}

/// A signed read (its replay record is the only thing it writes: on SQLite a work
/// without a savepoint of its own in the group-commit writer, `Work::bare`).
fn signed_read(app: &TestApp, path: &str) -> Sent {
    let headers: Vec<(String, String)> = app.signer.headers("GET", path, b"", now_secs());
    let answer = send_as(app, "GET", path, &headers, "");
    Sent {
        method: "GET",
        path: path.to_owned(),
        headers,
        body: String::new(),
        answer,
    }
}

/// [`a_full_disk_is_503_never_500_and_loses_no_acknowledged_write`] with the requests
/// sent at once from several threads, so that SQLite's writer batches signed reads
/// (a replay record alone, no savepoint), signed writes (a record in front of the
/// change) and API-key writes (a savepoint each) together while the disk fills: a
/// batch one of them sinks must acknowledge none of them. Every answer is a 2xx or a
/// 503, every acknowledged write is there once, and every acknowledged signed request,
/// reads included, is refused as a replay afterwards (its record committed).
fn a_full_disk_under_concurrent_signed_reads_and_writes_loses_nothing_acknowledged(b: Backend) {
    let Some(disk) = SmallDisk::new(b) else {
        return;
    };
    let (fs, db) = (&disk.fs, &disk.db);
    let mut cfg = test_config(db);
    cfg.auth_failures_per_minute = 100_000;
    let app = start(b, db.clone(), cfg);
    let job = app.running_job();
    let key = app.api_key("disk-concurrent", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 6);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));

    let filler = fill(fs.path());
    let read_path = format!("/coordinator/jobs/{job}");
    let threads: Vec<Acked> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (app, job, key, read_path) = (&app, &job, &key, &read_path);
                s.spawn(move || {
                    let mut mine = Acked::default();
                    for i in 0..25 {
                        if t % 2 == 0 {
                            let r = signed_read(app, read_path);
                            mine.note(&format!("read-{t}-{i}"), &r.answer);
                            if r.ok() {
                                mine.signed.push(r);
                            }
                        } else {
                            mine.write(app, job, key, &format!("full-{t}-{i}"), 3);
                        }
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender"))
            .collect()
    });
    for t in threads {
        acked.merge(t);
    }
    assert!(
        acked.refused > 0,
        "nothing was refused on a full disk: the test did not reach the fault"
    );
    let problems = std::mem::take(&mut acked.problems);
    std::fs::remove_file(&filler).expect("free the space");
    writes_recover(&app, &job, &key, &mut acked, "after");
    assert!(
        problems.is_empty(),
        "{} bad answers while the disk was full:\n{}",
        problems.len(),
        problems.join("\n")
    );
    acked.check(&app, &job, "after the space came back");
    acked.check_replays(&app, "after the space came back");
}

/// The database reports damaged data while the service runs. SQLite: pages of the
/// `jobs` table overwritten in the file ("database disk image is malformed",
/// `SQLITE_CORRUPT`); PostgreSQL: what it answers for a damaged index (XX002) and then a
/// damaged table page (XX001), raised by triggers on the write path. Every answer is a
/// 2xx or a 503 problem with nothing of the cause in the body, never a 500; no write
/// that needs the damaged table is acknowledged; the log names the cause. SQLite takes
/// the instance out of service until a restart (`/readyz` 503, reads refused too);
/// PostgreSQL, shared by every instance, stays ready and goes on reading.
fn a_damaged_database_is_503_never_500(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let job = app.running_job();
    let key = app.api_key("damage-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    // 150 jobs and 300 progress reports: the tables span many pages.
    acked.write(&app, &job, &key, "before", 450);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));
    let before = acked.messages.len() + acked.jobs.len();

    // Kept open to the end: its close must not be the file's last (which would remove
    // the WAL under the server).
    let (_sqlite, mut pg) = match b {
        Backend::Sqlite => (
            Some(damage_sqlite(app.db.sqlite_path().expect("SQLite"))),
            None,
        ),
        Backend::Postgres => {
            let mut c = diesel::PgConnection::establish(&app.db.url).expect("connect");
            c.batch_execute(
                "CREATE FUNCTION coord_damaged() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN \
                   IF TG_TABLE_NAME = 'jobs' THEN \
                     RAISE EXCEPTION 'invalid page in block 7 of relation base/16384/16397' \
                       USING ERRCODE = 'XX001'; \
                   END IF; \
                   RAISE EXCEPTION 'index \"job_events_pkey\" contains unexpected zero page at block 3' \
                     USING ERRCODE = 'XX002'; \
                 END $$; \
                 CREATE TRIGGER damaged BEFORE INSERT OR UPDATE ON job_events \
                   FOR EACH ROW EXECUTE FUNCTION coord_damaged();",
            )
            .expect("damage job_events");
            (None, Some(c))
        }
    };
    acked.write(&app, &job, &key, "damaged", 30);
    if let Some(c) = &mut pg {
        c.batch_execute(
            "CREATE TRIGGER damaged BEFORE INSERT OR UPDATE ON jobs \
               FOR EACH ROW EXECUTE FUNCTION coord_damaged();",
        )
        .expect("damage jobs");
        acked.write(&app, &job, &key, "damaged-table", 30);
    }
    let read = try_send(
        &app.url(&format!("/coordinator/jobs/{job}")),
        "GET",
        &[("X-API-Key", &key)],
        b"",
    );
    acked.note("a read", &read);
    assert!(
        acked.problems.is_empty(),
        "{} bad answers from a damaged database:\n{}",
        acked.problems.len(),
        acked.problems.join("\n")
    );
    assert_eq!(
        acked.messages.len() + acked.jobs.len(),
        before,
        "writes acknowledged though the table they need is damaged"
    );
    let ready = app.raw("GET", "/readyz", &[], b"").status;
    let logs = crate::helpers::captured_logs();
    let logged = |cause: &str| {
        std::env::var_os("TEST_LOG").is_some() || logs.lines().any(|l| l.contains(cause))
    };
    match b {
        Backend::Sqlite => {
            assert_eq!(ready, 503, "/readyz with a damaged database file");
            assert_eq!(
                read.map(|r| r.status).ok(),
                Some(503),
                "a read after the damage"
            );
            assert!(
                logged("until the server is restarted"),
                "no ERROR line names the damage"
            );
        }
        Backend::Postgres => {
            assert_eq!(ready, 200, "/readyz: a damaged relation is no outage");
            assert_eq!(
                read.map(|r| r.status).ok(),
                Some(200),
                "a read after the damage"
            );
            assert!(logged("invalid page in block 7") && logged("unexpected zero page"));
        }
    }
}

/// SQLite: the damage met only by signed writes, whose replay record rides in front of
/// the write (`replay::record_then`, the write's error inside the work's `Ok`): the
/// instance is taken out of service all the same, at the first one (`/readyz` 503 at
/// once, with no read in between), and no such write is acknowledged. (PostgreSQL keeps
/// serving a damaged relation: `a_damaged_database_is_503_never_500`.)
fn a_damaged_database_met_by_signed_writes_only_takes_the_instance_out(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let job = app.running_job();
    let key = app.api_key("damage-signed", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 450);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));
    assert_eq!(app.raw("GET", "/readyz", &[], b"").status, 200);
    // The events' table: the report reads its job first, unharmed, and meets the
    // damage only in its write, behind its replay record.
    let _sqlite = damage_sqlite_table(app.db.sqlite_path().expect("SQLite"), "job_events");
    let mut answers = Vec::new();
    for i in 0..6 {
        let body = json!({"percent": 60, "message": format!("after-{i}")});
        let s = Sent::signed(
            &app,
            "PATCH",
            &format!("/coordinator/jobs/{job}/progress"),
            &body,
        );
        acked.note(&format!("after-{i}"), &s.answer);
        answers.push(s.answer.map(|r| r.status).unwrap_or_default());
    }
    assert!(acked.problems.is_empty(), "{}", acked.problems.join("\n"));
    assert!(
        answers.iter().all(|s| *s == 503),
        "a signed write acknowledged into a damaged table: {answers:?}"
    );
    assert_eq!(
        app.raw("GET", "/readyz", &[], b"").status,
        503,
        "/readyz after signed writes met the damaged file"
    );
}

/// Overwrite the root page of the `jobs` table in the SQLite file of a running server
/// with garbage, so that every use of the table meets it: first every frame is copied
/// into the file and the WAL emptied (else a newer copy of the page in the WAL would
/// hide the damage), then, after the overwrite, one write through SQLite, so that
/// every connection of the server drops the pages it cached. Returns the connection,
/// to be kept open.
fn damage_sqlite(path: &str) -> diesel::SqliteConnection {
    damage_sqlite_table(path, "jobs")
}

/// [`damage_sqlite`] with the root page of `table`.
fn damage_sqlite_table(path: &str, table: &str) -> diesel::SqliteConnection {
    #[derive(diesel::QueryableByName)]
    struct Checkpoint {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        busy: i32,
    }
    #[derive(diesel::QueryableByName)]
    struct Root {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        rootpage: i64,
    }
    #[derive(diesel::QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        page_size: i64,
    }
    let mut c = diesel::SqliteConnection::establish(path).expect("open");
    c.batch_execute("PRAGMA busy_timeout = 5000")
        .expect("busy timeout");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let done = diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)")
            .get_result::<Checkpoint>(&mut c)
            .is_ok_and(|o| o.busy == 0);
        if done {
            break;
        }
        assert!(Instant::now() < until, "the WAL could not be emptied");
        std::thread::sleep(Duration::from_millis(20));
    }
    let root =
        diesel::sql_query("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?")
            .bind::<diesel::sql_types::Text, _>(table)
            .get_result::<Root>(&mut c)
            .expect("root page")
            .rootpage;
    let page = diesel::sql_query("PRAGMA page_size")
        .get_result::<PageSize>(&mut c)
        .expect("page size")
        .page_size;
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open the file");
        let at = u64::try_from((root - 1) * page).expect("offset");
        f.seek(SeekFrom::Start(at)).expect("seek");
        f.write_all(&vec![0xa5u8; usize::try_from(page).expect("page")])
            .expect("overwrite");
        f.sync_all().expect("sync");
    }
    c.batch_execute("PRAGMA user_version = 7").expect("a write");
    #[derive(diesel::QueryableByName)]
    struct Check {
        #[diesel(sql_type = diesel::sql_types::Text)]
        quick_check: String,
    }
    let check = diesel::sql_query("PRAGMA quick_check")
        .get_result::<Check>(&mut c)
        .map(|c| c.quick_check)
        .unwrap_or_else(|e| e.to_string());
    assert_ne!(check, "ok", "the file is not damaged");
    c
}

/// Point the symbolic link `link` at `target`, in one step (a rename over it).
fn relink(link: &Path, target: &Path) {
    let tmp = link.with_extension("next");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, link).expect("relink");
}

/// The SQLite database file becomes one this process may not write while the server
/// runs, and then writable again. As root permissions do not bite and a file system
/// cannot be made read-only while the server holds files open on it for writing, the
/// server opens the database through a symbolic link, which is pointed at a read-only
/// bind mount of the same directory: connections opened from then on open the same
/// file read-only, as after a `chmod 0444` or a read-only remount; the ones open
/// already keep writing. One batch of the group-commit writer is made to fail (another
/// connection holds the write lock past the busy timeout), so the writer opens a new
/// connection, read-only. Writes are then 503 problems, never 500; once the link points
/// at the writable directory again, writes are taken again without a restart (a
/// connection that opened read-only must not stay in the pool for good), reads show
/// them, and nothing acknowledged is lost.
fn a_read_only_database_file_is_503_never_500_and_recovers(b: Backend) {
    let fs = Tmpfs::mount("16m").expect("mount");
    let file = fs.path().join("test.db");
    let db = TestDb::sqlite_at(&file);
    let view = ReadOnlyView::of(fs.path());
    let links = tempfile::tempdir().expect("tempdir");
    let link = links.path().join("db.sqlite");
    relink(&link, &file);
    let mut cfg = test_config(&db);
    cfg.auth_failures_per_minute = 100_000;
    cfg.db.sqlite_busy_timeout = Duration::from_millis(200);
    cfg.db.url =
        coordinator::db::DatabaseUrl::parse(&format!("sqlite://{}", link.display())).expect("url");
    let app = start(b, db, cfg);
    let job = app.running_job();
    let key = app.api_key("ro-file-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    let mut acked = Acked::default();
    acked.write(&app, &job, &key, "before", 9);
    assert_eq!(acked.refused, 0, "{}", acked.problems.join("\n"));

    relink(&link, &view.path().join("test.db"));
    // Another session holds the write lock past the busy timeout: the writer's batch
    // fails and its connection is replaced, by one opened read-only.
    let mut lock = diesel::SqliteConnection::establish(&file.to_string_lossy()).expect("open");
    lock.batch_execute("BEGIN IMMEDIATE")
        .expect("take the write lock");
    acked.write(&app, &job, &key, "locked", 3);
    lock.batch_execute("COMMIT")
        .expect("release the write lock");
    acked.write(&app, &job, &key, "read-only", 30);
    // Reads at once, so that the read pool opens connections now, read-only.
    let reads: Vec<Result<Resp, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    try_send(
                        &app.url(&format!("/coordinator/jobs/{job}")),
                        "GET",
                        &[("X-API-Key", &key)],
                        b"",
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader"))
            .collect()
    });
    for r in &reads {
        acked.note("a read while read-only", r);
    }
    let problems = std::mem::take(&mut acked.problems);
    let refused = acked.refused;
    assert!(
        problems.is_empty(),
        "{} bad answers while the file was read-only:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(refused > 3, "no write refused while the file was read-only");

    relink(&link, &file);
    writes_recover(&app, &job, &key, &mut acked, "writable");
    // A write acknowledged is what the next read shows.
    let message = acked.messages.last().expect("a write").clone();
    let r = app.raw(
        "GET",
        &format!("/coordinator/jobs/{job}"),
        &[("X-API-Key", &key)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], message.as_str());
    acked.check(&app, &job, "after the file was writable again");
    acked.check_replays(&app, "after the file was writable again");
    // The WAL backfill runs on the read pool's connections: it copies every frame into
    // the database file again (a connection that opened read-only cannot, and must
    // not stay in the pool for good).
    let shm = format!("{}-shm", file.display());
    let until = Instant::now() + Duration::from_millis(1500);
    let (mut frames, mut copied) = (0, 0);
    while Instant::now() < until {
        (frames, copied) = wal_backfill(&shm);
        if copied == frames {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        copied, frames,
        "WAL frames left uncopied 1.5 s after the last write"
    );
    drop(lock);
    drop(app);
}

/// The WAL's frame count and how many of them are copied into the database file, as
/// the WAL index (`-shm`) says: `mxFrame` of its header, `nBackfill` after the two
/// copies of the header (SQLite's `wal.c`; native byte order).
fn wal_backfill(shm: &str) -> (u32, u32) {
    let bytes = std::fs::read(shm).expect("read the WAL index");
    let word = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    (word(16), word(96))
}

/// A trigger on `job_events` that holds a report whose message says `hold-the-batcher`
/// for `hold` seconds (keeping a batching thread busy) and ends its own session on one
/// that says `cut-here`.
fn cut_trigger(app: &crate::helpers::TestApp, hold: f64) {
    let mut c = diesel::PgConnection::establish(&app.db.url).expect("connect");
    c.batch_execute(&format!(
        "CREATE FUNCTION coord_cut() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.data LIKE '%hold-the-batcher%' THEN PERFORM pg_sleep({hold}); END IF; \
           IF NEW.data LIKE '%cut-here%' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; \
           RETURN NEW; \
         END $$; \
         CREATE TRIGGER cut BEFORE INSERT ON job_events \
           FOR EACH ROW EXECUTE FUNCTION coord_cut();"
    ))
    .expect("trigger");
}

/// Occupy both batching threads with a `hold-the-batcher` report each, so that the
/// reports sent next queue up and are taken as one batch. The second hold is sent only
/// once the first sits in its trigger (PostgreSQL shows a session of this database in
/// `pg_sleep`): sent together, both could be taken as one batch by one thread, leaving
/// the other free to write the next reports one by one (the test then flaked, about 1
/// run in 12). Returns once both sleep, plus 50 ms.
fn hold_both_threads<'s, F>(
    s: &'s std::thread::Scope<'s, '_>,
    db_url: &str,
    busy: &'s [String; 2],
    report: &'s F,
) -> Vec<std::thread::ScopedJoinHandle<'s, Result<Resp, String>>>
where
    F: Fn(&str, &str) -> Result<Resp, String> + Sync,
{
    #[derive(diesel::QueryableByName)]
    struct Sleeping {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut pg = diesel::PgConnection::establish(db_url).expect("connect");
    let mut sleeping = || {
        diesel::sql_query(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .get_result::<Sleeping>(&mut pg)
        .expect("pg_stat_activity")
        .n
    };
    let mut holds = Vec::new();
    for (n, id) in (1..).zip(busy) {
        holds.push(s.spawn(move || report(id, "hold-the-batcher")));
        let started = Instant::now();
        while sleeping() < n && started.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    holds
}

/// An API-key progress report of `percent` 40 with `message`.
fn api_report(
    app: &crate::helpers::TestApp,
    key: &str,
    id: &str,
    message: &str,
) -> Result<Resp, String> {
    let body = json!({"percent": 40, "message": message}).to_string();
    try_send(
        &app.url(&format!("/coordinator/jobs/{id}/progress")),
        "PATCH",
        &[JSON, ("X-API-Key", key)],
        body.as_bytes(),
    )
}

/// PostgreSQL's progress batch without replay records (API keys, job tokens) writes
/// outside a transaction: its statement commits the first report of each job, and a
/// later report of the same job is written on its own after it. The connection is cut
/// between the two (a trigger ends its own session on the later report's event): the
/// first report is committed and must be answered so, the later one 503; never a 503
/// for a committed report, which a client would send again and double.
fn a_progress_batch_cut_mid_way_answers_each_report_as_committed(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let job = app.running_job();
    let busy = [app.running_job(), app.running_job()];
    let key = app.api_key("cut-worker", &[Scope::JobsUpdate, Scope::JobsRead]);
    cut_trigger(&app, 0.6);
    let report = |id: &str, message: &str| api_report(&app, &key, id, message);
    let (first, later) = std::thread::scope(|s| {
        // Both batching threads busy for a while, so the next two reports queue up and
        // are taken as one batch.
        let holds = hold_both_threads(s, &app.db.url, &busy, &report);
        let first = s.spawn(|| report(&job, "first"));
        std::thread::sleep(Duration::from_millis(50));
        let later = s.spawn(|| report(&job, "cut-here"));
        for h in holds {
            // Only there for the timing: on a slow machine one may come late, after
            // the cut tripped the health state.
            let r = h.join().expect("hold");
            if let Some(p) = not_2xx_or_503("a report holding a thread", &r) {
                panic!("{p}");
            }
        }
        (first.join().expect("first"), later.join().expect("later"))
    });
    let status = |r: &Result<Resp, String>| r.as_ref().map_or(0, |r| r.status);
    for (what, r) in [("first", &first), ("cut-here", &later)] {
        if let Some(p) = not_2xx_or_503(what, r) {
            panic!("{p}");
        }
    }
    assert_eq!(status(&later), 503, "the report whose connection was cut");
    let messages: Vec<String> = events(&app, &job)
        .iter()
        .filter(|e| e["type"] == "progress")
        .filter_map(|e| e["data"]["message"].as_str().map(str::to_owned))
        .collect();
    let committed = messages.iter().filter(|m| *m == "first").count();
    assert_eq!(
        committed, 1,
        "the first report is not there once: {messages:?}"
    );
    assert_eq!(
        status(&first),
        200,
        "the first report was committed, and answered {:?}",
        first.map(|r| r.body)
    );
    assert!(!messages.iter().any(|m| m == "cut-here"));
}

/// [`a_progress_batch_cut_mid_way_answers_each_report_as_committed`] with two jobs and
/// reports of both after the cut, in one batch without replay records (API keys):
/// `a-first`, `b-first`, `cut-here` (job a), `a-after`, `b-after`. Each job's first
/// report goes into the batch's statement and commits; the later ones are written on
/// their own in arrival order, and the connection is cut in the first of them. So
/// exactly the two first reports are committed and answered 200, and every report from
/// the cut on, of either job, is a 503 and not there (none a 500: the dead
/// connection's later errors count as its loss too). Then, once the service has
/// recovered, a batch whose statement itself meets the cut (`cut-here` as job a's
/// first report, with `b-again`) commits nothing and answers every report 503.
fn a_progress_batch_of_several_jobs_cut_mid_way_answers_each_report_as_committed(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| c.auth_failures_per_minute = 100_000)
    else {
        return;
    };
    let (job_a, job_b) = (app.running_job(), app.running_job());
    let busy = [app.running_job(), app.running_job()];
    let key = app.api_key("cut-several", &[Scope::JobsUpdate, Scope::JobsRead]);
    cut_trigger(&app, 0.8);
    let report = |id: &str, message: &str| api_report(&app, &key, id, message);
    // One batch of `sent` (in this order) behind two reports holding both threads.
    let batch = |sent: &[(&str, &str)]| -> Vec<Result<Resp, String>> {
        std::thread::scope(|s| {
            let holds = hold_both_threads(s, &app.db.url, &busy, &report);
            let mut answers = Vec::new();
            for (id, message) in sent {
                answers.push(s.spawn(|| report(id, message)));
                std::thread::sleep(Duration::from_millis(50));
            }
            for h in holds {
                // Only there for the timing (see the test above).
                let r = h.join().expect("hold");
                if let Some(p) = not_2xx_or_503("a report holding a thread", &r) {
                    panic!("{p}");
                }
            }
            answers
                .into_iter()
                .map(|h| h.join().expect("report"))
                .collect()
        })
    };
    let messages = |id: &str| -> Vec<String> {
        events(&app, id)
            .iter()
            .filter(|e| e["type"] == "progress")
            .filter_map(|e| e["data"]["message"].as_str().map(str::to_owned))
            .collect()
    };
    let status = |r: &Result<Resp, String>| r.as_ref().map_or(0, |r| r.status);

    let sent = [
        (job_a.as_str(), "a-first"),
        (job_b.as_str(), "b-first"),
        (job_a.as_str(), "cut-here"),
        (job_a.as_str(), "a-after"),
        (job_b.as_str(), "b-after"),
    ];
    let answers = batch(&sent);
    for ((_, m), r) in sent.iter().zip(&answers) {
        if let Some(p) = not_2xx_or_503(m, r) {
            panic!("{p}");
        }
    }
    let (a, b_) = (messages(&job_a), messages(&job_b));
    let there = |m: &str| a.iter().chain(&b_).filter(|x| *x == m).count();
    for ((_, m), r) in sent.iter().zip(&answers) {
        let want = if m.ends_with("-first") {
            (1, 200)
        } else {
            (0, 503)
        };
        assert_eq!(
            (there(m), status(r)),
            want,
            "{m}: (times stored, answer); job a {a:?}, job b {b_:?}"
        );
    }

    // Once the service takes reports again: the cut in the batch's statement.
    let r = retry_503(|| {
        let body = json!({"percent": 40, "message": "recovered"}).to_string();
        crate::helpers::send(
            &app.url(&format!("/coordinator/jobs/{job_b}/progress")),
            "PATCH",
            &[JSON, ("X-API-Key", &key)],
            body.as_bytes(),
        )
    });
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = [(job_a.as_str(), "cut-here"), (job_b.as_str(), "b-again")];
    let answers = batch(&sent);
    let (a, b_) = (messages(&job_a), messages(&job_b));
    for ((_, m), r) in sent.iter().zip(&answers) {
        if let Some(p) = not_2xx_or_503(m, r) {
            panic!("{p}");
        }
        let stored = a.iter().chain(&b_).filter(|x| *x == m).count();
        // The cut report is never stored. The other one shares its batch (then cut with
        // it: not stored, 503) unless it arrived after that batch had started (then in a
        // batch of its own: stored once, 200; CI saw this once, 2026-12-07). Either
        // way its answer says what was stored.
        let allowed: &[(usize, u16)] = if *m == "cut-here" {
            &[(0, 503)]
        } else {
            &[(0, 503), (1, 200)]
        };
        assert!(
            allowed.contains(&(stored, status(r))),
            "{m} in a statement that was cut: (times stored, answer) = {:?}",
            (stored, status(r))
        );
    }
}
