#![allow(
    dead_code,
    reason = "each test module uses its own subset of the helpers"
)]
//! Test harness: the real `Application::build` on port 0, in its own actix system on
//! a thread, against a throwaway database (a temp SQLite file, or a fresh PostgreSQL
//! database created from `TEST_POSTGRES_URL` and dropped at the end).

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Once};
use std::thread::JoinHandle;

use actix_web::dev::ServerHandle;
use actix_web::web;
use coordinator::auth::credentials::{self, SecretKind};
use coordinator::auth::{hmac, Scope};
use coordinator::config::Config;
use coordinator::db::DatabaseUrl;
use coordinator::startup::Application;
use coordinator::state::AppState;
use diesel::connection::SimpleConnection;
use diesel::{Connection, RunQueryDsl};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

static LOG: Once = Once::new();

/// Every log line the apps of this test binary write, in the production format (the
/// leak test scans them). With `TEST_LOG` set they go to the test output instead.
pub static CAPTURED_LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = CAPTURED_LOGS.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn init_log() {
    LOG.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = coordinator::telemetry::logger(true).try_init();
        } else {
            let _ = coordinator::telemetry::logger(false)
                .filter_level(log::LevelFilter::Info)
                .target(env_logger::Target::Pipe(Box::new(Capture)))
                .try_init();
        }
    });
}

/// The captured log text so far.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&CAPTURED_LOGS.lock().map(|l| l.clone()).unwrap_or_default())
        .into_owned()
}

/// A throwaway database; dropping the last reference removes it.
pub struct TestDb {
    pub url: String,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(admin) = &self.admin_url {
            if let Ok(mut c) = diesel::PgConnection::establish(admin) {
                // Give the app's own threads a moment to close their sessions, so a
                // passing run prints no "terminating connection" FATAL from libpq.
                #[derive(diesel::QueryableByName)]
                struct Sessions {
                    #[diesel(sql_type = diesel::sql_types::BigInt)]
                    n: i64,
                }
                for _ in 0..40 {
                    let open = diesel::sql_query(
                        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1",
                    )
                    .bind::<diesel::sql_types::Text, _>(&self.name)
                    .get_result::<Sessions>(&mut c)
                    .map(|s| s.n)
                    .unwrap_or(0);
                    if open == 0 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = c.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                    self.name
                ));
            }
        }
    }
}

pub fn replace_db_name(admin: &str, name: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// The admin URL when PostgreSQL tests can run; `None` means skip (panics instead
/// when `REQUIRE_POSTGRES=1`).
pub fn postgres_admin_url() -> Option<String> {
    let explicit = std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|s| !s.is_empty());
    let url = explicit.clone().unwrap_or_else(|| DEFAULT_PG.to_owned());
    match diesel::PgConnection::establish(&url) {
        Ok(_) => Some(url),
        Err(e) => {
            if std::env::var("REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "REQUIRE_POSTGRES=1 but PostgreSQL at TEST_POSTGRES_URL is not reachable: {e}"
                );
            }
            None
        }
    }
}

impl TestDb {
    pub fn create(backend: Backend) -> Option<Arc<TestDb>> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                Some(Arc::new(TestDb {
                    url,
                    admin_url: None,
                    name: String::new(),
                    _dir: Some(dir),
                }))
            }
            Backend::Postgres => {
                let admin = postgres_admin_url()?;
                let name = format!("coord_test_{}", uuid::Uuid::now_v7().simple());
                let mut c = diesel::PgConnection::establish(&admin).expect("admin connection");
                c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
                    .expect("create test database");
                Some(Arc::new(TestDb {
                    url: replace_db_name(&admin, &name),
                    admin_url: Some(admin),
                    name,
                    _dir: None,
                }))
            }
        }
    }
}

/// A running application instance.
pub struct TestApp {
    pub address: String,
    pub backend: Backend,
    // Fields drop in order: the state (and its pool's connections) before the database
    // is dropped, so PostgreSQL never has to terminate live sessions of a passing test.
    pub state: web::Data<AppState>,
    pub db: Arc<TestDb>,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
    pub config: Config,
    /// The default credential: caller `tester` with every scope, signing with HMAC.
    pub signer: Signer,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn test_config(db: &TestDb) -> Config {
    let mut cfg = Config::new(DatabaseUrl::parse(&db.url).expect("db url"));
    cfg.workers = 2;
    cfg.db.pool_size = 8;
    cfg.shutdown_timeout = std::time::Duration::from_secs(1);
    // The door's limit stays at its ceiling (32 per worker): the machine running the
    // suite is itself overloaded (many apps and clients on a few cores), and an
    // adaptive limit would turn that into 503s in tests of other things. The limit
    // is tested on its own (`db::admission` unit tests, `outage::*in_flight*`).
    cfg.overload_target = std::time::Duration::ZERO;
    cfg
}

/// Spawn an app on a fresh database; `None` when the backend is unavailable.
pub fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {})
}

pub fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<TestApp> {
    let db = TestDb::create(backend)?;
    let mut cfg = test_config(&db);
    tweak(&mut cfg);
    Some(start(backend, db, cfg))
}

/// Start an application with this config on this database.
pub fn start(backend: Backend, db: Arc<TestDb>, cfg: Config) -> TestApp {
    init_log();
    let (tx, rx) = mpsc::channel();
    let build_cfg = cfg.clone();
    let thread = std::thread::spawn(move || {
        let sys = actix_web::rt::System::new();
        sys.block_on(async move {
            match Application::build(build_cfg).await {
                Ok(app) => {
                    let _ = tx.send(Ok((app.port(), app.handle(), app.state())));
                    let _ = app.run_until_stopped().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
            }
        });
    });
    let (port, handle, state) = rx.recv().expect("app thread").expect("app builds");
    let signer = ensure_caller(&state, "tester", &Scope::ALL);
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        backend,
        db,
        state,
        handle,
        thread: Some(thread),
        config: cfg,
        signer,
    }
}

/// A caller that signs requests with its HMAC secret.
#[derive(Clone)]
pub struct Signer {
    pub caller: String,
    pub secret: String,
    pub key_version: Option<i32>,
}

impl Signer {
    /// The signature headers for a request, with a fresh nonce.
    pub fn headers(
        &self,
        method: &str,
        target: &str,
        body: &[u8],
        ts: i64,
    ) -> Vec<(String, String)> {
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        self.headers_with(method, target, body, ts, Some(&nonce))
    }

    pub fn headers_with(
        &self,
        method: &str,
        target: &str,
        body: &[u8],
        ts: i64,
        nonce: Option<&str>,
    ) -> Vec<(String, String)> {
        let ts = ts.to_string();
        let canonical =
            hmac::wire::canonical(method, target, &self.caller, &ts, nonce.unwrap_or(""), body);
        let sig = hmac::wire::sign(&self.secret, &canonical);
        let mut h = vec![
            ("X-Coordinator-Caller".to_owned(), self.caller.clone()),
            ("X-Coordinator-Timestamp".to_owned(), ts),
            ("X-Coordinator-Signature".to_owned(), sig),
        ];
        if let Some(n) = nonce {
            h.push(("X-Coordinator-Nonce".to_owned(), n.to_owned()));
        }
        if let Some(v) = self.key_version {
            h.push(("X-Coordinator-Key-Version".to_owned(), v.to_string()));
        }
        h
    }
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn sealer(state: &AppState) -> &coordinator::crypto::seal::Sealer {
    state.auth.store.sealer()
}

/// Create a caller with these scopes and an HMAC secret (idempotent for the caller).
pub fn ensure_caller(state: &AppState, name: &str, scopes: &[Scope]) -> Signer {
    let _ = credentials::add_caller(&state.db, name, scopes);
    let s = credentials::add_secret(&state.db, sealer(state), name, SecretKind::Hmac, None, None)
        .expect("secret");
    Signer {
        caller: name.to_owned(),
        secret: s.plaintext.to_string(),
        key_version: None,
    }
}

impl TestApp {
    /// A second instance on the same database (for cross-instance tests).
    pub fn sibling(&self) -> TestApp {
        start(self.backend, self.db.clone(), self.config.clone())
    }
}

/// A response read into memory.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Assert an RFC 9457 problem with this status; returns the document.
    pub fn problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "body: {}",
            self.body
        );
        let p = self.json();
        assert_eq!(p["status"], status);
        assert!(p["type"].is_string() && p["title"].is_string() && p["detail"].is_string());
        p
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(30))
        .redirects(0)
        .build()
}

/// Send a request with these headers and body.
pub fn send(url: &str, method: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = if body.is_empty() && matches!(method, "GET" | "HEAD" | "DELETE") {
        req.call()
    } else {
        req.send_bytes(body)
    };
    let r = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error for {method} {url}: {e}"),
    };
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .filter_map(|n| r.header(&n).map(|v| (n.to_ascii_lowercase(), v.to_owned())))
        .collect();
    let body = r.into_string().expect("body");
    Resp {
        status,
        headers,
        body,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// A request signed by the default caller (`tester`, every scope).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.signed_by(&self.signer, method, path, headers, body)
    }

    /// A request signed by `signer`.
    pub fn signed_by(
        &self,
        signer: &Signer,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let sig = signer.headers(method, path, body, now_secs());
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.extend(sig.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        send(&self.url(path), method, &all, body)
    }

    /// A request with exactly these headers (no credentials added).
    pub fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        send(&self.url(path), method, headers, body)
    }

    /// A caller with these scopes and an HMAC secret.
    pub fn caller(&self, name: &str, scopes: &[Scope]) -> Signer {
        ensure_caller(&self.state, name, scopes)
    }

    /// An API key for a (new or existing) caller with these scopes.
    pub fn api_key(&self, name: &str, scopes: &[Scope]) -> String {
        let _ = credentials::add_caller(&self.state.db, name, scopes);
        credentials::issue_key(&self.state.db, name, None, None)
            .expect("key")
            .key
            .expose_secret()
            .to_owned()
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.request(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn patch_json(&self, path: &str, body: &Value) -> Resp {
        self.request(
            "PATCH",
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// Create a job and return its id.
    pub fn create_job(&self, body: &Value) -> String {
        let r = self.post_json("/coordinator/jobs", body);
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["id"].as_str().expect("id").to_owned()
    }

    /// Create a job on `queue`, queue it and claim it as worker `w`: its id and the
    /// claim's answer (with `token` and `tokenExpiresAt`).
    pub fn claimed_job(&self, queue: &str) -> (String, Value) {
        let id = self.create_job(&serde_json::json!({"kind": "k", "queue": queue}));
        let r = self.patch_json(
            &format!("/coordinator/jobs/{id}/status"),
            &serde_json::json!({"status": "QUEUED"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let r = self.post_json(
            &format!("/coordinator/queues/{queue}/claim"),
            &serde_json::json!({"worker": "w"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let claim = r.json();
        assert_eq!(claim["id"], id.as_str());
        (id, claim)
    }

    /// Create a job and move it to RUNNING.
    pub fn running_job(&self) -> String {
        let id = self.create_job(&serde_json::json!({"kind": "build"}));
        for s in ["QUEUED", "RUNNING"] {
            let r = self.patch_json(
                &format!("/coordinator/jobs/{id}/status"),
                &serde_json::json!({"status": s}),
            );
            assert_eq!(r.status, 200, "{}", r.body);
        }
        id
    }
}

/// One test of this binary (collected with `inventory`; `main.rs` runs them with
/// libtest-mimic). A test whose backend or interop library is missing is reported as
/// ignored, never as passed.
pub struct Test {
    /// `module_path!()` of the file that defines it.
    pub module: &'static str,
    /// `sqlite` / `postgres` for a test defined once per backend, else empty.
    pub variant: &'static str,
    pub name: &'static str,
    pub run: fn(),
    pub needs_postgres: bool,
    /// Whether what else it needs is here (checked once, before the run; it panics
    /// itself when a `REQUIRE_…` variable says it must be).
    pub available: fn() -> bool,
    /// Not a check (a measurement): run only with `--ignored`.
    pub ignored: bool,
}

inventory::collect!(Test);

impl Test {
    pub const fn new(
        module: &'static str,
        variant: &'static str,
        name: &'static str,
        run: fn(),
    ) -> Test {
        Test {
            module,
            variant,
            name,
            run,
            needs_postgres: false,
            available: || true,
            ignored: false,
        }
    }

    pub const fn on_postgres(mut self) -> Test {
        self.needs_postgres = true;
        self
    }

    /// Needs the Python `standardwebhooks` package (`REQUIRE_INTEROP=1`: must be there).
    pub const fn with_python_interop(mut self) -> Test {
        self.available = python_interop_available;
        self
    }

    /// Runs only where `available()` says what it needs is installed.
    pub const fn when(mut self, available: fn() -> bool) -> Test {
        self.available = available;
        self
    }

    pub const fn measurement(mut self) -> Test {
        self.ignored = true;
        self
    }
}

/// Define each listed test `fn name(b: Backend)` once per backend (`…::sqlite::name`,
/// `…::postgres::name`).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            inventory::submit! {
                $crate::helpers::Test::new(module_path!(), "sqlite", stringify!($name),
                    || $name($crate::helpers::Backend::Sqlite))
            }
            inventory::submit! {
                $crate::helpers::Test::new(module_path!(), "postgres", stringify!($name),
                    || $name($crate::helpers::Backend::Postgres)).on_postgres()
            }
        )*
    };
}

/// Tests `fn name()` that need no database or make their own SQLite one.
#[macro_export]
macro_rules! plain_tests {
    ($($name:ident),* $(,)?) => {
        $(
            inventory::submit! {
                $crate::helpers::Test::new(module_path!(), "", stringify!($name), $name)
            }
        )*
    };
}

/// Tests `fn name(b: Backend)` that exist for PostgreSQL only (ignored without it).
#[macro_export]
macro_rules! postgres_tests {
    ($($name:ident),* $(,)?) => {
        $(
            inventory::submit! {
                $crate::helpers::Test::new(module_path!(), "postgres", stringify!($name),
                    || $name($crate::helpers::Backend::Postgres)).on_postgres()
            }
        )*
    };
}

/// Tests `fn name(b: Backend)` that exist for SQLite only.
#[macro_export]
macro_rules! sqlite_tests {
    ($($name:ident),* $(,)?) => {
        $(
            inventory::submit! {
                $crate::helpers::Test::new(module_path!(), "sqlite", stringify!($name),
                    || $name($crate::helpers::Backend::Sqlite))
            }
        )*
    };
}

/// Is PostgreSQL reachable for the tests? Panics when it is not and
/// `REQUIRE_POSTGRES=1`, so CI never mistakes a missing server for a pass.
pub fn postgres_reachable() -> bool {
    postgres_admin_url().is_some()
}

/// Can `python3` import `standardwebhooks`? Panics when it cannot and
/// `REQUIRE_INTEROP=1`.
pub fn python_interop_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("REQUIRE_INTEROP").as_deref() == Ok("1") {
        panic!("REQUIRE_INTEROP=1 but python3 cannot import standardwebhooks");
    }
    ok
}

/// `let Some(app) = app!(backend) else { return };` — skips when the backend is absent.
#[macro_export]
macro_rules! app {
    ($backend:expr) => {
        $crate::helpers::spawn_app($backend)
    };
}

impl TestApp {
    /// A job token for `job_id` issued the way `coordinator token issue` does it.
    pub fn job_token(&self, job_id: &str, worker: &str, ttl: std::time::Duration) -> String {
        let id = coordinator::jobs::JobId::parse(job_id, "id").expect("job id");
        coordinator::auth::token::issue(
            &self.state.db,
            self.state.auth.store.sealer(),
            &id,
            worker,
            None,
            ttl,
        )
        .expect("token")
        .token
        .to_string()
    }

    /// A request with `Authorization: Bearer <token>`.
    pub fn with_token(&self, token: &str, method: &str, path: &str, body: &[u8]) -> Resp {
        let auth = format!("Bearer {token}");
        self.raw(
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        )
    }
}

impl TestDb {
    /// A SQLite database at `path` (its directory is the caller's to remove).
    pub fn sqlite_at(path: &std::path::Path) -> Arc<TestDb> {
        Arc::new(TestDb {
            url: format!("sqlite://{}", path.display()),
            admin_url: None,
            name: String::new(),
            _dir: None,
        })
    }

    /// A PostgreSQL database created in this tablespace; `None` without PostgreSQL.
    pub fn postgres_in(tablespace: &str) -> Option<Arc<TestDb>> {
        let admin = postgres_admin_url()?;
        let name = format!("coord_test_{}", uuid::Uuid::now_v7().simple());
        let mut c = diesel::PgConnection::establish(&admin).expect("admin connection");
        c.batch_execute(&format!(
            "CREATE DATABASE \"{name}\" TABLESPACE \"{tablespace}\""
        ))
        .expect("create test database");
        Some(Arc::new(TestDb {
            url: replace_db_name(&admin, &name),
            admin_url: Some(admin),
            name,
            _dir: None,
        }))
    }
}

impl TestDb {
    /// The PostgreSQL admin URL this database was created from (`None` for SQLite).
    pub fn admin_url(&self) -> Option<&str> {
        self.admin_url.as_deref()
    }

    /// The PostgreSQL database name (empty for SQLite).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SQLite file (`None` for PostgreSQL).
    pub fn sqlite_path(&self) -> Option<&str> {
        self.url.strip_prefix("sqlite://")
    }
}

/// Like [`send`], but a transport error (no answer) is returned instead of panicking.
pub fn try_send(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut req = agent().request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = match req.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("transport error for {method} {url}: {e}")),
    };
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .filter_map(|n| r.header(&n).map(|v| (n.to_ascii_lowercase(), v.to_owned())))
        .collect();
    let body = r
        .into_string()
        .map_err(|e| format!("body of {method} {url}: {e}"))?;
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// The `jti` claim of a job token (for `/admin/tokens/revoke`).
pub fn jti_of(token: &str) -> String {
    use base64::Engine;
    let claims = token.split('.').nth(1).expect("JWT claims");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .expect("base64url claims");
    let v: Value = serde_json::from_slice(&bytes).expect("claims JSON");
    v["jti"].as_str().expect("jti").to_owned()
}

/// A TCP relay between the app and PostgreSQL that can stop passing bytes without
/// closing anything: a partition, or a host that hangs. Held, every query and every
/// new connection waits; released, what was sent meanwhile goes through.
pub struct Relay {
    pub port: u16,
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answers: std::sync::Arc<AnswerHold>,
}

/// The hold of the database's answers alone ([`Relay::hold_answers`]): queries reach the
/// database and run, what it answers waits. `passed` is the moment (µs since `epoch`)
/// before which an answer read from the database goes through
/// ([`Relay::pass_held_answers`]).
struct AnswerHold {
    on: std::sync::atomic::AtomicBool,
    epoch: std::time::Instant,
    passed: std::sync::atomic::AtomicU64,
}

impl AnswerHold {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether an answer read at `read_at` must still wait.
    fn holds(&self, read_at: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.on.load(Ordering::Acquire) && read_at >= self.passed.load(Ordering::Acquire)
    }
}

impl Relay {
    pub fn start(upstream: String) -> Relay {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let held = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AnswerHold {
            on: AtomicBool::new(false),
            epoch: std::time::Instant::now(),
            passed: std::sync::atomic::AtomicU64::new(0),
        });
        let h = held.clone();
        let a = answers.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for (mut from, mut to, is_answer) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let held = h.clone();
                    let answers = a.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let read_at = answers.now();
                            while held.load(Ordering::Acquire)
                                || (is_answer && answers.holds(read_at))
                            {
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay {
            port,
            held,
            answers,
        }
    }

    /// A relay to the host of this PostgreSQL URL, and the same URL through it.
    pub fn in_front_of(url: &str) -> (Relay, String) {
        let (head, rest) = url.split_once('@').expect("postgres url with a user");
        let (authority, path) = rest.split_once('/').expect("postgres url with a database");
        let r = Relay::start(authority.to_owned());
        let through = format!("{head}@127.0.0.1:{}/{path}", r.port);
        (r, through)
    }

    /// An app on a fresh database that it reaches through a relay (the relay with it);
    /// `None` when the backend is unavailable.
    pub fn app_behind(b: Backend) -> Option<(TestApp, Relay)> {
        let mut relay = None;
        let app = spawn_app_with(b, |c| {
            let (r, through) = Relay::in_front_of(c.db.url.target());
            c.db.url = coordinator::db::DatabaseUrl::parse(&through).expect("relay url");
            relay = Some(r);
        })?;
        Some((app, relay.expect("relay")))
    }

    pub fn hold(&self, on: bool) {
        self.held.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Hold (or pass again) what the database answers, not what is sent to it: a query
    /// runs at once, its answer arrives late (a slow or congested path back).
    pub fn hold_answers(&self, on: bool) {
        self.answers
            .on
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// While answers are held: let those already read from the database through, and
    /// keep holding every later one.
    pub fn pass_held_answers(&self) {
        let now = self.answers.now();
        self.answers
            .passed
            .store(now, std::sync::atomic::Ordering::Release);
    }
}
