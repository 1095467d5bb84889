//! Black-box tests: the real server over HTTP, on SQLite and on PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic on a missing value or an out-of-range index is the failed assertion"
)]
mod helpers;

mod auth;
mod cli;
mod config;
mod crash;
mod credentials;
mod events;
mod faults;
mod health;
mod http_sig;
mod jobs;
mod lifecycle;
mod logs;
mod multi;
mod openapi;
mod ops;
mod outage;
mod pg_tls;
mod push;
mod races;
mod routing;
mod signing_vectors;
mod stitcher;
mod storage;
mod tls;
mod tokens;
mod ui;
mod upgrade;
mod writes;

/// Run every collected test with libtest-mimic (the same command-line filters and
/// summary as `cargo test`). Whether PostgreSQL and the Python interop library are
/// there is decided once, before any test runs; a test that needs what is missing is
/// reported as ignored.
fn main() {
    // As the service's own `main` does: OpenSSL must not clean up at exit while pool
    // threads of the tests' apps may still be inside libpq. Without it this process
    // once aborted at exit, after every test had passed ("corrupted size vs. prev_size
    // in fastbins", CI 2026-12-06).
    coordinator::db::prepare_process();
    let args = libtest_mimic::Arguments::from_args();
    let postgres = helpers::postgres_reachable();
    if !postgres {
        eprintln!("PostgreSQL is not reachable (TEST_POSTGRES_URL): its tests are ignored");
    }
    let mut trials: Vec<libtest_mimic::Trial> = inventory::iter::<helpers::Test>
        .into_iter()
        .map(|t| {
            let module = t.module.strip_prefix("api::").unwrap_or(t.module);
            let name = if t.variant.is_empty() {
                format!("{module}::{}", t.name)
            } else {
                format!("{module}::{}::{}", t.variant, t.name)
            };
            let missing = (t.needs_postgres && !postgres) || !(t.available)();
            let run = t.run;
            libtest_mimic::Trial::test(name, move || {
                run();
                Ok(())
            })
            .with_ignored_flag(t.ignored || missing)
        })
        .collect();
    trials.sort_by(|a, b| a.name().cmp(b.name()));
    libtest_mimic::run(&args, trials).exit();
}

/// This binary has its own `main`, so a `#[test]` attribute here would compile to
/// nothing and its test would silently never run: every test is collected by the
/// macros in helpers.rs instead.
fn no_test_attribute_is_left_behind() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api");
    let mut stray = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/api") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[test]") {
                stray.push(format!("{}:{}", path.display(), i + 1));
            }
        }
    }
    assert!(
        stray.is_empty(),
        "#[test] never runs in this binary: {stray:?}"
    );
}

plain_tests!(no_test_attribute_is_left_behind);
