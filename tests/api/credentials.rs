//! Credential lifetimes that caches and clocks must not outlive (issue 23, items 2, 3,
//! 4, 7, 8, 9).

use std::time::{Duration, Instant};

use coordinator::auth::{repo, revocation};
use coordinator::db::now_millis;
use diesel::connection::SimpleConnection;
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{Backend, Resp, TestApp};

backend_tests!(
    a_revocation_written_by_a_clock_ten_seconds_behind_reaches_another_instance,
    revocations_are_capped_at_a_day_and_the_set_is_bounded,
);

const HOUR: Duration = Duration::from_secs(3600);

/// Call `f` until `done` holds or `within` has passed; returns the last result.
fn poll_until(within: Duration, mut f: impl FnMut() -> Resp, done: impl Fn(&Resp) -> bool) -> Resp {
    let started = Instant::now();
    loop {
        let r = f();
        if done(&r) || started.elapsed() >= within {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get_job(app: &TestApp, token: &str, id: &str) -> Resp {
    app.with_token(token, "GET", &format!("/coordinator/jobs/{id}"), b"")
}

// ---- item 3: revocations are polled by a database sequence -------------------------

fn a_revocation_written_by_a_clock_ten_seconds_behind_reaches_another_instance(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let other = app.sibling();
    let id = app.running_job();
    let t = app.job_token(&id, "w", HOUR);
    assert_eq!(get_job(&other, &t, &id).status, 200);
    // Let both pollers run for a while, so their cursors have moved on.
    std::thread::sleep(Duration::from_millis(1200));

    // A writer whose clock is 10 s behind ours records the revocation.
    let now = now_millis();
    let key = revocation::job_key(&id);
    app.state
        .db
        .write_sync(|c| repo::revoke_token(c, &key, now + 3_600_000, now - 10_000))
        .unwrap();
    let written = Instant::now();
    for (name, instance) in [("other", &other), ("writer", &app)] {
        let r = poll_until(
            Duration::from_millis(1500),
            || get_job(instance, &t, &id),
            |r| r.status == 401,
        );
        assert_eq!(
            r.status,
            401,
            "{name} instance still accepts the token {:?} after the revocation: {}",
            written.elapsed(),
            r.body
        );
        assert_eq!(r.problem(401)["reason"], "revoked");
    }
    assert!(written.elapsed() < Duration::from_millis(2000));
}

// ---- item 9: capped expiry, bounded set ----------------------------------------------

fn gauge(app: &TestApp) -> i64 {
    let text = app.raw("GET", "/metrics", &[], b"").body;
    text.lines()
        .find_map(|l| l.strip_prefix("coordinator_revoked_tokens "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

fn revocations_are_capped_at_a_day_and_the_set_is_bounded(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let before = now_millis();
    let r = app.post_json(
        "/admin/tokens/revoke",
        &json!({"jti": "far", "expiresAt": "9999-12-31T23:59:59Z"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let until = chrono::DateTime::parse_from_rfc3339(r.json()["expiresAt"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    let day = 24 * 3_600_000;
    assert!(
        until <= now_millis() + day && until >= before + day - 1000,
        "expiresAt not capped at now + 24 h: {}",
        r.body
    );

    // Fill the table up to the bound (as many active revocations as an instance
    // holds in memory), the way other instances' revocations arrive.
    let limit = app.state.auth.revocations.limit();
    assert_eq!(limit, revocation::MAX_REVOCATIONS);
    let fill = limit - 1; // `far` is the other one
    let exp = now_millis() + 3_600_000;
    let sql = match b {
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {fill}) \
             INSERT INTO revoked_tokens (jti, expires_at, revoked_at) \
             SELECT 'bulk-' || i, {exp}, 0 FROM n"
        ),
        Backend::Postgres => format!(
            "INSERT INTO revoked_tokens (jti, expires_at, revoked_at) \
             SELECT 'bulk-' || i, {exp}, 0 FROM generate_series(1, {fill}) AS i"
        ),
    };
    app.state
        .db
        .write_sync(|c| Ok(c.batch_execute(&sql)?))
        .unwrap();
    let started = Instant::now();
    while gauge(&app) < i64::try_from(limit).unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the gauge never showed the set's size: {}",
            gauge(&app)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Full: a new revocation is refused rather than held in ever more memory.
    let p = app
        .post_json("/admin/tokens/revoke", &json!({"jti": "one-more"}))
        .problem(409);
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("revocation set is full"));
    // Extending one already held is not a new entry.
    assert_eq!(
        app.post_json("/admin/tokens/revoke", &json!({"jti": "far"}))
            .status,
        200
    );

    // Past the bound (a job's end is never refused), the instance stops holding the
    // set and asks the database for each token: still correct, memory bounded.
    let id = app.running_job();
    let t = app.job_token(&id, "w", HOUR);
    assert_eq!(get_job(&app, &t, &id).status, 200);
    app.state
        .db
        .write_sync(|c| repo::revoke_token(c, "bulk-extra", exp, now_millis()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(get_job(&app, &t, &id).status, 200);
    let r = app.request(
        "POST",
        &format!("/coordinator/jobs/{id}/complete"),
        &[("content-type", "application/json")],
        br#"{"result":1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get_job(&app, &t, &id).problem(401)["reason"], "revoked");
    assert!(gauge(&app) > i64::try_from(limit).unwrap());
}
