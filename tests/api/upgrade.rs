//! Upgrades and rollbacks as a platform team runs them: a database written by an older
//! release is served by this one, and a database migrated by a newer release is
//! refused by this one (a rollback) unless the operator says it is compatible.

use coordinator::startup::Application;
use diesel::connection::SimpleConnection;
use diesel::Connection;

use crate::backend_tests;
use crate::helpers::{start, test_config, Backend, TestDb};

backend_tests!(
    an_older_binary_refuses_a_schema_migrated_by_a_newer_one,
    what_the_first_schema_holds_is_served_after_the_upgrade,
);

/// A migration version newer than every one this binary embeds.
const NEWER: &str = "29991231000001";

/// Run a SQL batch on the test database with a connection of its own.
fn exec(db: &TestDb, b: Backend, sql: &str) {
    match b {
        Backend::Sqlite => {
            let path = db.sqlite_path().expect("sqlite url");
            diesel::SqliteConnection::establish(path)
                .expect("open sqlite")
                .batch_execute(sql)
                .expect("sql");
        }
        Backend::Postgres => {
            diesel::PgConnection::establish(&db.url)
                .expect("open postgres")
                .batch_execute(sql)
                .expect("sql");
        }
    }
}

/// `Application::build` on this config, to its end: `Err` with the whole error chain.
fn build(cfg: coordinator::config::Config) -> Result<(), String> {
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            Application::build(cfg)
                .await
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        })
    })
    .join()
    .expect("build thread")
}

/// A rollback: the newer release migrated, then this (older) binary is started on the
/// database. diesel's `run_pending_migrations` ignores applied versions it does not
/// know, so before 2026-12-06 it started and served a schema it was not written for.
/// It must refuse with one line naming the unknown version and what to do, and start
/// (ready, the unknown version still recorded) once the override says the operator
/// knows the newer schema is compatible.
fn an_older_binary_refuses_a_schema_migrated_by_a_newer_one(b: Backend) {
    let Some(db) = TestDb::create(b) else { return };
    let cfg = test_config(&db);
    coordinator::db::migrate::run_pending(&cfg.db).expect("migrate");
    exec(
        &db,
        b,
        &format!("INSERT INTO __diesel_schema_migrations (version) VALUES ('{NEWER}')"),
    );

    let err = build(cfg.clone()).expect_err("an older binary started on a newer schema");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(NEWER), "names the unknown version: {err}");
    assert!(
        err.contains("COORDINATOR_DB_ALLOW_NEWER_SCHEMA"),
        "names the override: {err}"
    );

    let mut allowed = cfg;
    allowed.db.allow_newer_schema = true;
    let app = start(b, db, allowed);
    let logs = crate::helpers::captured_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains(NEWER) && l.contains("COORDINATOR_DB_ALLOW_NEWER_SCHEMA")),
        "one warning names the unknown version and the override"
    );
    let r = app.raw("GET", "/readyz", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let id = app.create_job(&serde_json::json!({"kind": "k"}));
    assert_eq!(app.get(&format!("/coordinator/jobs/{id}")).status, 200);
}

/// The last migration of the first release (2026-11-24): every later one changed a
/// table this test fills (`revoked_tokens` rebuilt with `seq`, `jobs` gained the
/// lifecycle columns and lost an index, `replay_records` re-keyed on SQLite).
const FIRST_RELEASE: &str = "2026-11-24-000004_webhook_deliveries";

/// Apply the embedded migrations up to and including `last` only.
fn migrate_up_to<DB, C>(c: &mut C, source: diesel_migrations::EmbeddedMigrations, last: &str)
where
    DB: diesel::backend::Backend,
    C: diesel_migrations::MigrationHarness<DB>,
    diesel_migrations::EmbeddedMigrations: diesel::migration::MigrationSource<DB>,
{
    use diesel::migration::MigrationSource;
    let all = MigrationSource::<DB>::migrations(&source).expect("migrations");
    c.applied_migrations().expect("bookkeeping table");
    let older: Vec<_> = all
        .iter()
        .filter(|m| m.name().to_string().as_str() <= last)
        .collect();
    assert!(
        !older.is_empty() && older.len() < all.len(),
        "{last} not found"
    );
    for m in older {
        c.run_migration(m.as_ref()).expect("older migration");
    }
}

/// A database at the first release's schema, filled the way that release filled it,
/// then served by this one: every job shows with its fields (`runAt` is its creation,
/// the lifecycle migration's rule), a queued one can be claimed, an idempotent create
/// finds its job, the API key authenticates, a revoked job token stays revoked (and one
/// not revoked works), a recorded signed request stays a replay (and a fresh signature
/// works), and a recorded webhook delivery stays a duplicate of its job.
///
/// Rows of tables whose columns have not changed since (callers, secrets, API keys,
/// the token-signing key) are written with today's library functions; rows of tables a
/// migration changed (`jobs`, `job_events`, `revoked_tokens`, `replay_records`,
/// `webhook_deliveries`) in plain SQL in the first release's shape.
fn what_the_first_schema_holds_is_served_after_the_upgrade(b: Backend) {
    use coordinator::auth::credentials::{self, SecretKind};
    use coordinator::auth::Scope;
    use coordinator::crypto::seal::Sealer;
    use coordinator::db::migrate::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use serde_json::json;

    let Some(db) = TestDb::create(b) else { return };
    let cfg = test_config(&db);
    match b {
        Backend::Sqlite => {
            let path = db.sqlite_path().expect("sqlite url");
            let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
            migrate_up_to(&mut c, SQLITE_MIGRATIONS, FIRST_RELEASE);
        }
        Backend::Postgres => {
            let mut c = diesel::PgConnection::establish(&db.url).expect("open postgres");
            migrate_up_to(&mut c, POSTGRES_MIGRATIONS, FIRST_RELEASE);
        }
    }

    // Credentials, through a store on the old schema.
    let sealer = Sealer::new((*cfg.master_key).clone(), None).expect("sealer");
    let store = coordinator::db::Db::new(&cfg.db);
    credentials::add_caller(&store, "old-svc", &Scope::ALL).expect("caller");
    let hmac = credentials::add_secret(&store, &sealer, "old-svc", SecretKind::Hmac, None, None)
        .expect("hmac secret");
    let signer = crate::helpers::Signer {
        caller: "old-svc".to_owned(),
        secret: hmac.plaintext.to_string(),
        key_version: None,
    };
    let api_key = credentials::issue_key(&store, "old-svc", None, None)
        .expect("api key")
        .key
        .expose_secret()
        .to_owned();
    credentials::add_caller(&store, "old-hook", &[Scope::StitcherWebhook]).expect("caller");
    let hook =
        credentials::add_secret(&store, &sealer, "old-hook", SecretKind::Webhook, None, None)
            .expect("webhook secret");
    let hook_key = coordinator::crypto::credential::WebhookSecret::parse(&hook.plaintext)
        .expect("whsec")
        .key_bytes()
        .to_vec();
    coordinator::auth::token::ensure_signing_key(&store, &sealer).expect("signing key");
    let keys = store
        .write_sync(|conn| coordinator::auth::token::load_keys(conn, &sealer))
        .expect("token keys");
    let key = keys.first().expect("a signing key");

    // Jobs in every status, in the first release's columns.
    let now = coordinator::db::now_millis();
    let t0 = now - 3_600_000;
    let ids: Vec<String> = (0..6).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let [pending, queued, running, completed, failed, cancelled] =
        <[String; 6]>::try_from(ids.clone()).expect("six ids");
    let create_body =
        br#"{"kind":"build","queue":"old-q","priority":5,"payload":{"n":1},"maxAttempts":4}"#;
    let create_hash = coordinator::crypto::sha256_hex(create_body);
    let lease = now + 600_000;
    let mut sql = format!(
        "INSERT INTO jobs (id, kind, queue, priority, status, progress, message, payload, \
           result, error, gate_results, created_by, idempotency_key, request_hash, attempts, \
           max_attempts, version, worker, lease_expires_at, created_at, updated_at, \
           started_at, finished_at, tokens_until) VALUES \
         ('{pending}', 'build', 'old-q', 5, 'PENDING', 0, NULL, '{{\"n\":1}}', NULL, NULL, \
           NULL, 'old-svc', 'idem-1', '{create_hash}', 0, 4, 1, NULL, NULL, {t0}, {t0}, \
           NULL, NULL, NULL), \
         ('{queued}', 'build', 'old-q', 0, 'QUEUED', 0, NULL, '{{\"deliveryId\":\"msg_old\"}}', \
           NULL, NULL, NULL, 'old-hook', NULL, NULL, 0, 3, 2, NULL, NULL, {t1}, {t1}, NULL, \
           NULL, NULL), \
         ('{running}', 'build', 'run-q', 0, 'RUNNING', 40, 'half way', '{{}}', NULL, NULL, \
           NULL, 'old-svc', NULL, NULL, 1, 3, 4, 'w-old', {lease}, {t0}, {now}, {t0}, NULL, \
           {tokens}), \
         ('{completed}', 'build', 'done-q', 0, 'COMPLETED', 100, 'done', '{{}}', \
           '{{\"ok\":true}}', NULL, NULL, 'old-svc', NULL, NULL, 1, 3, 5, 'w-old', NULL, {t0}, \
           {now}, {t0}, {now}, NULL), \
         ('{failed}', 'build', 'done-q', 0, 'FAILED', 10, NULL, '{{}}', NULL, 'boom', \
           '{{\"lint\":\"red\"}}', 'old-svc', NULL, NULL, 3, 3, 9, 'w-old', NULL, {t0}, {now}, \
           {t0}, {now}, NULL), \
         ('{cancelled}', 'build', 'done-q', 0, 'CANCELLED', 0, 'stop', '{{}}', NULL, NULL, \
           NULL, 'old-svc', NULL, NULL, 0, 3, 2, NULL, NULL, {t0}, {now}, NULL, {now}, NULL);",
        t1 = t0 + 1,
        tokens = now + 3_600_000,
    );
    for id in &ids {
        sql.push_str(&format!(
            "INSERT INTO job_events (job_id, seq, event_type, data, created_at) VALUES \
             ('{id}', 1, 'created', '{{\"to\":\"PENDING\"}}', {t0});"
        ));
    }
    // A job token of the running attempt revoked by hand, and one not revoked.
    let token = |jti: &str| {
        let claims = json!({
            "iss": coordinator::auth::token::ISSUER, "sub": "w-old", "cal": "old-svc",
            "jid": running, "scope": "jobs:update jobs:read", "jti": jti,
            "iat": now / 1000, "exp": now / 1000 + 3600, "att": 1,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(format!("v{}", key.version));
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&key.key),
        )
        .expect("token")
    };
    let (revoked, kept) = (token("jti-revoked-before"), token("jti-kept"));
    sql.push_str(&format!(
        "INSERT INTO revoked_tokens (jti, expires_at, revoked_at) \
         VALUES ('jti-revoked-before', {}, {now});",
        now + 3_600_000
    ));
    // A signed request recorded as seen (the first release's replay key).
    let target = format!("/coordinator/jobs/{completed}");
    let seen = signer.headers("GET", &target, b"", crate::helpers::now_secs());
    let sig = &seen
        .iter()
        .find(|(k, _)| k == "X-Coordinator-Signature")
        .expect("signature")
        .1;
    sql.push_str(&format!(
        "INSERT INTO replay_records (caller, signature_hash, expires_at) \
         VALUES ('old-svc', '{}', {});",
        coordinator::crypto::sha256_hex(sig.as_bytes()),
        (crate::helpers::now_secs() + 360) * 1000
    ));
    // The webhook delivery that created the queued job.
    sql.push_str(&format!(
        "INSERT INTO webhook_deliveries (caller, delivery_id, received_at, payload, job_id) \
         VALUES ('old-hook', 'msg_old', {t0}, '{{}}', '{queued}');"
    ));
    store
        .write_sync(|conn| Ok(conn.batch_execute(&sql)?))
        .expect("first-release rows");
    drop(store);

    // The current release migrates and serves it.
    let app = start(b, db, cfg);
    assert_eq!(app.raw("GET", "/readyz", &[], b"").status, 200);
    let expected = [
        (
            &pending,
            "PENDING",
            json!({"n": 1}),
            json!(null),
            json!(null),
        ),
        (
            &queued,
            "QUEUED",
            json!({"deliveryId": "msg_old"}),
            json!(null),
            json!(null),
        ),
        (&running, "RUNNING", json!({}), json!(null), json!(null)),
        (
            &completed,
            "COMPLETED",
            json!({}),
            json!({"ok": true}),
            json!(null),
        ),
        (&failed, "FAILED", json!({}), json!(null), json!("boom")),
        (&cancelled, "CANCELLED", json!({}), json!(null), json!(null)),
    ];
    for (id, status, payload, result, error) in expected {
        let r = app.get(&format!("/coordinator/jobs/{id}"));
        assert_eq!(r.status, 200, "{status}: {}", r.body);
        let j = r.json();
        assert_eq!(j["status"], status, "{j}");
        assert_eq!(j["payload"], payload, "{j}");
        assert_eq!(j["result"], result, "{j}");
        assert_eq!(j["error"], error, "{j}");
        assert_eq!(
            j["runAt"], j["createdAt"],
            "{status}: runAt is the creation: {j}"
        );
        assert_eq!(j["events"][0]["type"], "created", "{j}");
    }
    let j = app.get(&format!("/coordinator/jobs/{failed}")).json();
    assert_eq!(j["gateResults"], json!({"lint": "red"}), "{j}");
    assert_eq!(
        (j["attempts"].as_i64(), j["maxAttempts"].as_i64()),
        (Some(3), Some(3))
    );
    let j = app.get(&format!("/coordinator/jobs/{running}")).json();
    assert_eq!(
        (j["progress"].as_i64(), j["message"].as_str()),
        (Some(40), Some("half way"))
    );
    assert!(j["leaseExpiresAt"].is_string(), "{j}");

    // The queued job is claimable; the idempotent create finds the pending one.
    let r = app.post_json(
        "/coordinator/queues/old-q/claim",
        &json!({"worker": "w-new"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], queued.as_str());
    let r = app.signed_by(
        &signer,
        "POST",
        "/coordinator/jobs",
        &[
            ("content-type", "application/json"),
            ("Idempotency-Key", "idem-1"),
        ],
        create_body,
    );
    assert!(r.status < 300, "{}", r.body);
    assert_eq!(r.json()["id"], pending.as_str(), "{}", r.body);

    // Credentials.
    let r = app.raw("GET", &target, &[("x-api-key", &api_key)], b"");
    assert_eq!(r.status, 200, "API key: {}", r.body);
    let seen: Vec<(&str, &str)> = seen.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = app.raw("GET", &target, &seen, b"");
    assert_eq!(
        r.status, 401,
        "a request recorded before the upgrade: {}",
        r.body
    );
    assert_eq!(app.signed_by(&signer, "GET", &target, &[], b"").status, 200);
    let path = format!("/coordinator/jobs/{running}");
    let r = app.with_token(&kept, "GET", &path, b"");
    assert_eq!(r.status, 200, "a token not revoked: {}", r.body);
    let r = app.with_token(&revoked, "GET", &path, b"");
    assert_eq!(
        r.status, 401,
        "a token revoked before the upgrade: {}",
        r.body
    );

    // The delivery stays a duplicate of its job.
    let ts = crate::helpers::now_secs().to_string();
    let body = r#"{"issueNumber":1,"repository":"octo/old","action":"assigned"}"#;
    let sig = coordinator::auth::webhook::wire::sign(&hook_key, "msg_old", &ts, body.as_bytes());
    let r = app.raw(
        "POST",
        "/stitcher/webhook",
        &[
            ("webhook-id", "msg_old"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["duplicate"], true, "{}", r.body);
    assert_eq!(r.json()["jobId"], queued.as_str(), "{}", r.body);
}

crate::postgres_tests!(
    a_concurrent_index_build_behind_a_long_transaction_waits_and_is_valid,
    every_postgres_down_migration_restores_the_schema_before_it,
    a_migration_behind_a_long_transaction_gives_up_instead_of_stalling_every_instance,
);

/// One line per column and per index of the PostgreSQL schema (diesel's table left out).
fn pg_schema(c: &mut diesel::PgConnection) -> Vec<String> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text)]
        line: String,
    }
    diesel::sql_query(
        "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable \
           || ' ' || COALESCE(column_default, '-') || ' ' || is_identity AS line \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations' \
         UNION ALL SELECT 'index ' || indexname || ': ' || indexdef FROM pg_indexes \
         WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations' \
         ORDER BY 1",
    )
    .load::<Line>(c)
    .expect("schema")
    .into_iter()
    .map(|l| l.line)
    .collect()
}

/// As `db::migrate::tests::every_sqlite_down_migration_restores_the_schema_before_it`
/// (a unit test: SQLite in memory) for PostgreSQL: each `down.sql` gives back the schema
/// as it was before its `up.sql`, and everything applies again after. The service has
/// no revert command; `diesel migration revert` runs these.
fn every_postgres_down_migration_restores_the_schema_before_it(b: Backend) {
    use coordinator::db::migrate::POSTGRES_MIGRATIONS;
    use diesel::migration::MigrationSource;
    use diesel_migrations::MigrationHarness;
    let Some(db) = TestDb::create(b) else { return };
    let mut c = diesel::PgConnection::establish(&db.url).expect("open postgres");
    c.applied_migrations().expect("bookkeeping table");
    let all =
        MigrationSource::<diesel::pg::Pg>::migrations(&POSTGRES_MIGRATIONS).expect("migrations");
    let mut before = vec![pg_schema(&mut c)];
    for m in &all {
        c.run_migration(m.as_ref()).expect("up");
        before.push(pg_schema(&mut c));
    }
    for (i, m) in all.iter().enumerate().rev() {
        c.revert_migration(m.as_ref())
            .unwrap_or_else(|e| panic!("{}: down.sql fails: {e}", m.name()));
        assert_eq!(
            pg_schema(&mut c),
            before[i],
            "{}: down.sql leaves another schema",
            m.name()
        );
    }
    let again = c
        .run_pending_migrations(POSTGRES_MIGRATIONS)
        .expect("up again");
    assert_eq!(again.len(), all.len());
}

/// A rolling upgrade while something holds a table the migration changes (a report, a
/// `pg_dump`, any open transaction that read it): the migration's `ALTER TABLE` waits for
/// its exclusive lock, and every later statement on that table, from every instance,
/// queues behind the waiting `ALTER`. Without a bound that is an outage as long as the
/// other transaction. The migration now gives up after `db::migrate::LOCK_TIMEOUT`
/// (the instance fails to start, with one line, and its supervisor starts it again);
/// before, `run_pending` waited as long as the transaction stayed open (this test gave up
/// on it after 30 s).
fn a_migration_behind_a_long_transaction_gives_up_instead_of_stalling_every_instance(b: Backend) {
    use coordinator::db::migrate::POSTGRES_MIGRATIONS;
    use diesel::migration::MigrationSource;
    use diesel_migrations::MigrationHarness;
    let Some(db) = TestDb::create(b) else { return };
    let cfg = test_config(&db);
    coordinator::db::migrate::run_pending(&cfg.db).expect("migrate");
    // A migration that takes a table lock in its transaction (an `ALTER TABLE
    // replay_records`) is pending again. (Not the newest: that one builds an index
    // `CONCURRENTLY`, outside a transaction, and waits as long as it must.)
    let mut c = diesel::PgConnection::establish(&db.url).expect("open postgres");
    let all =
        MigrationSource::<diesel::pg::Pg>::migrations(&POSTGRES_MIGRATIONS).expect("migrations");
    let altering = all
        .iter()
        .find(|m| m.name().to_string() == "2026-12-04-000002_replay_records_by_time")
        .expect("the replay_records migration");
    c.revert_migration(altering.as_ref()).expect("revert it");
    // Another session reads the table in a transaction it keeps open.
    let mut holder = diesel::PgConnection::establish(&db.url).expect("open postgres");
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM replay_records;")
        .expect("hold");

    let (tx, rx) = std::sync::mpsc::channel();
    let db_cfg = cfg.db.clone();
    std::thread::spawn(move || {
        let _ =
            tx.send(coordinator::db::migrate::run_pending(&db_cfg).map_err(|e| format!("{e:#}")));
    });
    let answer = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the migration still waits for its lock after 30 s");
    let err = answer.expect_err("the migration cannot have taken its lock");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("lock"), "{err}");

    // Once the other transaction ends, the next start migrates.
    holder.batch_execute("COMMIT").expect("release");
    assert_eq!(
        coordinator::db::migrate::run_pending(&cfg.db).expect("migrate"),
        1
    );
}

/// Copy a migrations folder (each migration a folder of files).
fn copy_migrations(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).expect("read migrations") {
        let entry = entry.expect("entry");
        let dir = to.join(entry.file_name());
        std::fs::create_dir_all(&dir).expect("mkdir");
        for file in std::fs::read_dir(entry.path()).expect("read migration") {
            let file = file.expect("file");
            std::fs::copy(file.path(), dir.join(file.file_name())).expect("copy");
        }
    }
}

/// The rule's way to index a table that exists (docs/decisions.md, "PostgreSQL
/// migrations only expand"): `CREATE INDEX CONCURRENTLY` in a migration that runs
/// outside a transaction. Such a build waits for every transaction older than it (a
/// report, `pg_dump`); it blocks no reader or writer meanwhile, so it must not be given
/// up after `db::migrate::LOCK_TIMEOUT`: a build cancelled half-way leaves an invalid
/// index behind, and the next start's run of the same migration finds it "already
/// exists" (start refused for good) or, with `IF NOT EXISTS`, keeps it invalid. Before:
/// cancelled after 5 s ("canceling statement due to lock timeout"), the index invalid.
fn a_concurrent_index_build_behind_a_long_transaction_waits_and_is_valid(b: Backend) {
    use diesel::RunQueryDsl;
    let Some(db) = TestDb::create(b) else { return };
    let cfg = test_config(&db);
    coordinator::db::migrate::run_pending(&cfg.db).expect("migrate");
    // The embedded migrations and, after them, one that builds an index concurrently.
    let dir = tempfile::tempdir().expect("tempdir");
    copy_migrations(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres"),
        dir.path(),
    );
    let cic = dir.path().join("2999-12-31-000001_jobs_by_kind");
    std::fs::create_dir_all(&cic).expect("mkdir");
    std::fs::write(
        cic.join("up.sql"),
        "CREATE INDEX CONCURRENTLY jobs_by_kind ON jobs (kind)",
    )
    .expect("up");
    std::fs::write(cic.join("down.sql"), "DROP INDEX jobs_by_kind").expect("down");
    std::fs::write(cic.join("metadata.toml"), "run_in_transaction = false\n").expect("meta");
    let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).expect("source");

    // Another session keeps a snapshot open for longer than the lock timeout.
    let held = coordinator::db::migrate::LOCK_TIMEOUT + std::time::Duration::from_secs(2);
    let url = db.url.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let mut c = diesel::PgConnection::establish(&url).expect("open postgres");
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM jobs;")
            .expect("hold");
        ready_tx.send(()).expect("ready");
        std::thread::sleep(held);
        c.batch_execute("COMMIT").expect("release");
    });
    ready_rx.recv().expect("holder");
    let mut c = diesel::PgConnection::establish(&db.url).expect("open postgres");
    let ran = coordinator::db::migrate::run_postgres(&mut c, &source, false);
    holder.join().expect("holder");
    assert_eq!(
        ran.map_err(|e| e.to_string()),
        Ok(1),
        "the concurrent build was given up"
    );
    #[derive(diesel::QueryableByName)]
    struct Valid {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        indisvalid: bool,
    }
    let valid = diesel::sql_query(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'jobs_by_kind'::regclass",
    )
    .get_result::<Valid>(&mut c)
    .expect("the index");
    assert!(valid.indisvalid, "an invalid index was left behind");
}
