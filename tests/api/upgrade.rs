//! Upgrades and rollbacks as a platform team runs them: a database written by an older
//! release is served by this one, and a database migrated by a newer release is
//! refused by this one (a rollback) unless the operator says it is compatible.

use coordinator::startup::Application;
use diesel::connection::SimpleConnection;
use diesel::Connection;

use crate::backend_tests;
use crate::helpers::{start, test_config, Backend, TestDb};

backend_tests!(an_older_binary_refuses_a_schema_migrated_by_a_newer_one);

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
    let r = app.raw("GET", "/readyz", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let id = app.create_job(&serde_json::json!({"kind": "k"}));
    assert_eq!(app.get(&format!("/coordinator/jobs/{id}")).status, 200);
}
