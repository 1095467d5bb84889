//! Several instances sharing one database (review of 2026-12-06, "Multi-instance
//! review" in docs/decisions.md): what one instance decides or revokes holds on the
//! others, whatever their clocks (within the documented 60 s) and however slowly the
//! database commits.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, RunQueryDsl};
use serde_json::json;

use crate::helpers::{jti_of, spawn_app_with, Backend};
use crate::{backend_tests, postgres_tests};

backend_tests!(a_purge_by_an_instance_whose_clock_is_ahead_keeps_revocations_others_need,);
postgres_tests!(a_revocation_committed_late_still_reaches_every_instance,);
postgres_tests!(replay_batches_of_the_same_signatures_in_opposite_orders_never_deadlock,);
backend_tests!(a_webhook_delivery_sent_to_two_instances_at_once_makes_one_job,);
backend_tests!(a_rotation_with_no_grace_ends_the_old_versions_whatever_the_clocks,);
postgres_tests!(a_poll_answered_late_does_not_make_a_stale_cache_current,);

/// Review finding: the revocation purge deleted every row whose expiry had passed on
/// the purging instance's clock, with no margin. An instance whose clock is 45 s ahead
/// (inside the 60 s the security model tolerates) purged a finished job's revocation
/// while its tokens were still 45 s from their `exp` on the other instances' clocks;
/// an instance that then reads the table (a restart, a stale set, overflow) accepted
/// the finished job's token again. The purge is driven here as that instance's
/// housekeeping would run it, with its clock.
fn a_purge_by_an_instance_whose_clock_is_ahead_keeps_revocations_others_need(b: Backend) {
    let Some(a) = spawn_app_with(b, |c| c.token_ttl = Duration::from_secs(30)) else {
        return;
    };
    let id = a.running_job();
    let t = a.job_token(&id, "w", Duration::from_secs(30));
    let path = format!("/coordinator/jobs/{id}");
    let r = a.with_token(&t, "POST", &format!("{path}/complete"), b"{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        a.with_token(&t, "GET", &path, b"").problem(401)["reason"],
        "revoked"
    );
    // The housekeeping of an instance whose clock runs 45 s ahead.
    let ahead = coordinator::db::now_millis() + 45_000;
    a.state
        .db
        .write_sync(move |c| coordinator::db::revoked::purge_revoked(c, ahead, 10_000))
        .unwrap();
    // An instance (re)started now reads the table: the token, 30 s from its expiry on
    // this clock, must still be refused.
    let restarted = a.sibling();
    drop(a);
    let r = restarted.with_token(&t, "GET", &path, b"");
    assert_eq!(
        r.status, 401,
        "a finished job's token accepted again: {}",
        r.body
    );
    assert_eq!(r.problem(401)["reason"], "revoked");
}

/// Review finding: on PostgreSQL the revocation poll took every number up to the
/// newest it had seen 3 s earlier as read. A revocation whose transaction took its
/// number and then committed more than 3 s later (a slow or stalled database, a lock
/// wait), after a later revocation was already seen, was never read by the other
/// instances' incremental polls: the token worked there until the next full reload,
/// up to 10 minutes. Here the revoking transaction is held up by a lock on the same id
/// (a stand-in for any stall between taking the number and committing).
fn a_revocation_committed_late_still_reaches_every_instance(b: Backend) {
    // The held-up revocation answers when it commits, not at the request's deadline.
    let Some(a) = spawn_app_with(b, |c| c.request_deadline = Duration::from_secs(30)) else {
        return;
    };
    let other = a.sibling();
    let id = a.running_job();
    let t = a.job_token(&id, "w", Duration::from_secs(3600));
    let jti = jti_of(&t);
    let path = format!("/coordinator/jobs/{id}");
    assert_eq!(other.with_token(&t, "GET", &path, b"").status, 200);

    // Something else holds the id's key: the revocation below takes its number, then
    // waits for this transaction to end.
    let mut blocker = diesel::PgConnection::establish(&a.db.url).unwrap();
    blocker
        .batch_execute(&format!(
            "BEGIN; INSERT INTO revoked_tokens (jti, expires_at, revoked_at) \
             VALUES ('{jti}', 1, 1)"
        ))
        .unwrap();
    std::thread::scope(|s| {
        let late = s.spawn(|| a.post_json("/admin/tokens/revoke", &json!({"jti": jti})));
        std::thread::sleep(Duration::from_millis(500));
        // A later revocation commits and every instance sees it.
        let r = a.post_json("/admin/tokens/revoke", &json!({"jti": "someone-else"}));
        assert_eq!(r.status, 200, "{}", r.body);
        std::thread::sleep(Duration::from_millis(4500));
        blocker.batch_execute("ROLLBACK").unwrap();
        let r = late.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    });
    let late_below_seen: bool = diesel::sql_query(
        "SELECT (SELECT seq FROM revoked_tokens WHERE jti = $1) < \
                (SELECT seq FROM revoked_tokens WHERE jti = 'someone-else') AS v",
    )
    .bind::<diesel::sql_types::Text, _>(&jti)
    .get_result::<Flag>(&mut blocker)
    .unwrap()
    .v;
    assert!(
        late_below_seen,
        "the held-up revocation took its number first"
    );
    // Committed now, with a number below one the other instance has seen for 4 s.
    std::thread::sleep(Duration::from_millis(1500));
    let r = other.with_token(&t, "GET", &path, b"");
    assert_eq!(
        r.status, 401,
        "a revoked token still accepted by the other instance: {}",
        r.body
    );
    assert_eq!(r.problem(401)["reason"], "revoked");
}

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    v: bool,
}

/// Checked, sound: one Standard Webhooks delivery sent to two instances at the same
/// moment makes one job; the other instance answers it as a duplicate of that job.
fn a_webhook_delivery_sent_to_two_instances_at_once_makes_one_job(b: Backend) {
    use coordinator::auth::credentials::{self, SecretKind};
    use coordinator::auth::{webhook, Scope};
    let Some(a) = crate::app!(b) else { return };
    let other = a.sibling();
    let _ = credentials::add_caller(&a.state.db, "bot", &[Scope::StitcherWebhook]);
    let s = credentials::add_secret(
        &a.state.db,
        a.state.auth.store.sealer(),
        "bot",
        SecretKind::Webhook,
        None,
        None,
    )
    .unwrap();
    let key = coordinator::crypto::credential::WebhookSecret::parse(&s.plaintext)
        .unwrap()
        .key_bytes()
        .to_vec();
    let body = r#"{"issueNumber":7,"repository":"octo/widgets","action":"assigned"}"#;
    for round in 0..8 {
        let id = format!("msg_{round}");
        let ts = crate::helpers::now_secs().to_string();
        let sig = webhook::wire::sign(&key, &id, &ts, body.as_bytes());
        let headers = [
            ("webhook-id", id.as_str()),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", sig.as_str()),
            ("content-type", "application/json"),
        ];
        let barrier = std::sync::Barrier::new(2);
        let mut rs: Vec<crate::helpers::Resp> = std::thread::scope(|s| {
            let hs: Vec<_> = [&a, &other]
                .into_iter()
                .map(|inst| {
                    let (barrier, headers) = (&barrier, &headers);
                    s.spawn(move || {
                        barrier.wait();
                        inst.raw("POST", "/stitcher/webhook/bot", headers, body.as_bytes())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        rs.sort_by_key(|r| r.status);
        assert_eq!(
            (rs[0].status, rs[1].status),
            (200, 202),
            "round {round}: {} / {}",
            rs[0].body,
            rs[1].body
        );
        assert_eq!(rs[0].json()["duplicate"], true);
        assert_eq!(rs[0].json()["jobId"], rs[1].json()["jobId"]);
    }
}

/// Review finding: `--grace 0s` (operations.md: after a suspected compromise, "every
/// outstanding token is refused at once") wrote the older versions' expiry as the
/// rotating process's `now`, and every instance compares an expiry with its own clock.
/// An instance whose clock is behind the host that rotated (within the tolerated
/// 60 s) kept accepting the retired signing key's tokens, and the retired HMAC secret,
/// for that difference. Emulated here: the expiry a host 30 s ahead would have written.
fn a_rotation_with_no_grace_ends_the_old_versions_whatever_the_clocks(b: Backend) {
    use coordinator::auth::credentials::{self, SecretKind};
    use coordinator::auth::Scope;
    let Some(a) = crate::app!(b) else { return };
    let id = a.running_job();
    let t = a.job_token(&id, "w", Duration::from_secs(3600));
    let path = format!("/coordinator/jobs/{id}");
    assert_eq!(a.with_token(&t, "GET", &path, b"").status, 200);
    let old = a.caller("leaky", &[Scope::JobsRead]);
    assert_eq!(a.signed_by(&old, "GET", &path, &[], b"").status, 200);

    let sealer = a.state.auth.store.sealer();
    coordinator::auth::token::rotate_signing_key(&a.state.db, sealer, Duration::ZERO).unwrap();
    credentials::add_secret(
        &a.state.db,
        sealer,
        "leaky",
        SecretKind::Hmac,
        Some(Duration::ZERO),
        None,
    )
    .unwrap();
    a.state
        .db
        .write_sync(|c| {
            diesel::sql_query(
                "UPDATE sealed_secrets SET expires_at = expires_at + 30000 \
                 WHERE expires_at IS NOT NULL",
            )
            .execute(c)?;
            coordinator::auth::repo::bump_generation(c)
        })
        .unwrap();
    // Once the cache has dropped (a poll, 250 ms): well within the 30 s left on the
    // emulated expiry.
    let started = std::time::Instant::now();
    loop {
        let token = a.with_token(&t, "GET", &path, b"");
        let secret = a.signed_by(&old, "GET", &path, &[], b"");
        if token.status == 401 && secret.status == 401 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the retired versions still accepted: token {} {}, secret {} {}",
            token.status,
            token.body,
            secret.status,
            secret.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Review residual, fixed: two instances' replay batches holding the same new
/// signatures in opposite orders at the same moment deadlocked (each statement held the
/// rows it had inserted and waited for the other's), and PostgreSQL aborted one batch
/// after `deadlock_timeout`: 503 for every request in it. Now each batch inserts its
/// records in key order, so the second waits for the first. Twenty rounds of two
/// 64-record batches, one reversed, sent at once from two connections: every round
/// records each signature exactly once and neither batch fails.
fn replay_batches_of_the_same_signatures_in_opposite_orders_never_deadlock(b: Backend) {
    use coordinator::db::replay::{insert_replays_pg, ReplayRow};
    let Some(app) = spawn_app_with(b, |_| {}) else {
        return;
    };
    let url = app.db.url.clone();
    let start = std::sync::Barrier::new(2);
    let mut conns: Vec<diesel::PgConnection> = (0..2)
        .map(|_| diesel::PgConnection::establish(&url).expect("connect"))
        .collect();
    for round in 0..20 {
        let rows: Vec<ReplayRow> = (0..64)
            .map(|i| {
                ReplayRow::new(
                    "dev",
                    format!("{round:04}-{i:04}-{}", uuid::Uuid::now_v7()),
                    0,
                    i64::MAX,
                )
            })
            .collect();
        let reversed: Vec<ReplayRow> = rows.iter().rev().cloned().collect();
        let results: Vec<Vec<bool>> = std::thread::scope(|s| {
            let handles: Vec<_> = conns
                .iter_mut()
                .zip([&rows, &reversed])
                .map(|(conn, batch)| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        insert_replays_pg(conn, batch)
                            .unwrap_or_else(|e| panic!("round {round}: a batch failed: {e}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("batch thread"))
                .collect()
        });
        // Each signature recorded as new by exactly one of the two batches.
        for (i, fresh) in results[0].iter().enumerate() {
            let other = results[1][63 - i];
            assert!(
                *fresh != other,
                "round {round}, record {i}: {fresh} and {other}"
            );
        }
    }
}

/// Third security review (2026-12-07): the credential store and the revocation set
/// counted as current from the moment a poll's answer *arrived*, not from when it was
/// asked. A poll whose answer the path back from PostgreSQL held up (congestion, or
/// someone on that path delaying packets) made a cache as old as its question current
/// again for another 2 s (credentials) or 1 s (revocations): a job token and an API key
/// revoked on another instance while the answer was on its way were accepted here
/// after the revocation, past the staleness bounds docs/security.md states. Now a poll
/// stamps the moment it asked, so an answer older than the bound leaves the cache
/// stale (every check asks the database, or answers 503).
fn a_poll_answered_late_does_not_make_a_stale_cache_current(b: Backend) {
    use crate::helpers::Relay;
    use coordinator::auth::credentials;
    use coordinator::auth::Scope;
    let Some((a, relay)) = Relay::app_behind(b) else {
        return;
    };
    // The other instance talks to the database directly.
    let mut direct = a.config.clone();
    direct.db.url = coordinator::db::DatabaseUrl::parse(&a.db.url).expect("db url");
    let other = crate::helpers::start(b, a.db.clone(), direct);
    let key = a.api_key("late-poll", &[Scope::JobsRead]);
    let id = a.running_job();
    let t = a.job_token(&id, "w", Duration::from_secs(3600));
    // A path no route serves: 404 once authenticated, with no database work of its
    // own, so the answer says what authentication decided.
    let by_key = || a.raw("GET", "/nowhere", &[("X-API-Key", key.as_str())], b"");
    let by_token = || a.with_token(&t, "GET", "/nowhere", b"");
    // Cached here once the polls have seen the credentials' own changes (an entry read
    // at a generation the cache has not reached yet is not kept).
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(by_key().status, 404, "{}", by_key().body);
    assert_eq!(by_token().status, 404, "{}", by_token().body);

    struct Release<'a>(&'a Relay);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.hold_answers(false);
        }
    }
    let _release = Release(&relay);
    // `revoke` runs on the other instance while the answers of the polls asked here
    // just before are held; once every bound has passed, the answers asked before the
    // revocation are let through (`passes` times, a pause between: a poll of several
    // statements asks its next one only when the one before is answered), then `ask`
    // runs while every later answer is still held, and last everything passes again.
    let round =
        |revoke: &dyn Fn(), passes: usize, ask: &(dyn Fn() -> crate::helpers::Resp + Sync)| {
            relay.hold_answers(true);
            std::thread::sleep(Duration::from_millis(500));
            revoke();
            // Both caches are past their bound (2 s, 1 s) when the answers come.
            std::thread::sleep(Duration::from_millis(2700));
            for _ in 0..passes {
                relay.pass_held_answers();
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::scope(|s| {
                let r = s.spawn(ask);
                // A check that asks the database waits for its answer: let all through.
                std::thread::sleep(Duration::from_millis(1500));
                relay.hold_answers(false);
                r.join().unwrap()
            })
        };

    // A token revocation (the auth generation does not move): the revocation poll asks
    // for the rows, then for the transactions writing them, so two passes.
    let r = round(
        &|| {
            let r = other.post_json("/admin/tokens/revoke", &json!({"jti": jti_of(&t)}));
            assert_eq!(r.status, 200, "{}", r.body);
        },
        2,
        &by_token,
    );
    assert!(
        matches!(r.status, 401 | 503),
        "a job token revoked 3 s ago accepted from a set a late poll made current: {} {}",
        r.status,
        r.body
    );

    // Back to normal before the next round: the key works again here.
    let again = std::time::Instant::now();
    while by_key().status != 404 {
        assert!(
            again.elapsed() < Duration::from_secs(15),
            "the key never worked again"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // An API key revoked: the generation poll is one statement, one pass.
    let r = round(
        &|| {
            let row = credentials::list_keys(&other.state.db, Some("late-poll"))
                .unwrap()
                .into_iter()
                .next()
                .expect("the key");
            credentials::revoke_key(&other.state.db, &row.id).expect("revoke the key");
        },
        1,
        &by_key,
    );
    assert!(
        matches!(r.status, 401 | 503),
        "an API key revoked 3 s ago accepted from a cache a late poll made current: {} {}",
        r.status,
        r.body
    );
}
