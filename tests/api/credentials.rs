//! Credential lifetimes that caches and clocks must not outlive (issue 23, items 2, 3,
//! 4, 7, 8, 9).

use std::time::{Duration, Instant};

use coordinator::auth::admin::{self, SecretKind};
use coordinator::auth::{repo, revocation, webhook_sig, Scope};
use coordinator::db::now_millis;
use diesel::connection::SimpleConnection;
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{now_secs, Backend, Resp, TestApp};

backend_tests!(
    a_revocation_written_by_a_clock_ten_seconds_behind_reaches_another_instance,
    revocations_are_capped_at_a_day_and_the_set_is_bounded,
    an_expired_webhook_secret_stops_working_while_cached,
    a_credential_read_that_raced_a_revocation_is_not_cached,
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
// ---- item 2: a cached credential carries its expiry -------------------------------

const WEBHOOK_BODY: &str = r#"{"issueNumber":7,"repository":"octo/widgets","action":"assigned"}"#;

fn webhook(app: &TestApp, key: &[u8], id: &str) -> Resp {
    let ts = now_secs().to_string();
    let sig = webhook_sig::sign(key, id, &ts, WEBHOOK_BODY.as_bytes());
    app.raw(
        "POST",
        "/stitcher/webhook",
        &[
            ("webhook-id", id),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
            ("content-type", "application/json"),
        ],
        WEBHOOK_BODY.as_bytes(),
    )
}

fn webhook_key(plaintext: &str) -> Vec<u8> {
    coordinator::crypto::credential::WebhookSecret::parse(plaintext)
        .unwrap()
        .key_bytes()
        .to_vec()
}

fn an_expired_webhook_secret_stops_working_while_cached(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let sealer = app.state.auth.store.sealer();
    admin::add_caller(&app.state.db, "hook", &[Scope::StitcherWebhook]).unwrap();
    let v1 = admin::add_secret(
        &app.state.db,
        sealer,
        "hook",
        SecretKind::Webhook,
        None,
        None,
    )
    .unwrap();
    let old = webhook_key(&v1.plaintext);
    assert_eq!(webhook(&app, &old, "d1").status, 202);

    // Rotate with a short grace; once every instance has dropped its cache, the old
    // secret is loaded again (still in its grace) and cached with its expiry.
    let grace = Duration::from_secs(2);
    let rotated_at = Instant::now();
    let v2 = admin::add_secret(
        &app.state.db,
        sealer,
        "hook",
        SecretKind::Webhook,
        Some(grace),
        None,
    )
    .unwrap();
    let new = webhook_key(&v2.plaintext);
    std::thread::sleep(Duration::from_millis(600));
    let r = webhook(&app, &old, "d2");
    assert_eq!(r.status, 202, "old secret during its grace: {}", r.body);
    assert!(
        rotated_at.elapsed() < grace,
        "the machine is too slow for this test"
    );

    // No credential changes from here on: only the expiry can stop the cached secret.
    std::thread::sleep((rotated_at + grace + Duration::from_millis(300)) - Instant::now());
    let r = webhook(&app, &old, "d3");
    assert_eq!(
        r.problem(401)["reason"],
        "signature mismatch",
        "old secret after its expires_at"
    );
    assert_eq!(webhook(&app, &new, "d4").status, 202);
}

// ---- item 7: no stale insert after a generation move ---------------------------------

fn a_credential_read_that_raced_a_revocation_is_not_cached(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let key = app.api_key("racer", &[Scope::HealthRead]);
    let hash = coordinator::crypto::credential::ApiKey::parse(&key)
        .unwrap()
        .hash();
    let hash = hash.as_str().to_owned();
    let store = app.state.auth.store.clone();
    let db = app.state.db.clone();
    actix_web::rt::System::new().block_on(async move {
        store.poll().await.unwrap();
        // A request reads the key (still active)...
        let fetched = store.fetch_api_key(&hash).await.unwrap();
        let (row, _) = fetched.value.clone().unwrap();
        assert!(row.revoked_at.is_none());
        // ...the key is revoked and this instance's poll sees the change...
        admin::revoke_key(&db, &row.id).unwrap();
        store.poll().await.unwrap();
        // ...and only then does the request try to cache what it read.
        let inserted = store.admit_api_key(&hash, &fetched).unwrap();
        let (now, _) = store.api_key(&hash).await.unwrap().unwrap();
        assert!(
            now.revoked_at.is_some(),
            "the cache serves the key as active"
        );
        assert!(!inserted, "a read from before the revocation was cached");
    });
    let r = app.raw("GET", "/coordinator/health", &[("x-api-key", &key)], b"");
    assert_eq!(r.problem(401)["reason"], "revoked");
}
