//! Credential lifetimes that caches and clocks must not outlive (issue 23, items 2, 3,
//! 4, 7, 8, 9).

use std::time::{Duration, Instant};

use coordinator::auth::credentials::{self, SecretKind};
use coordinator::auth::{repo, revocation, token, webhook, Scope};
use coordinator::db::{now_millis, revoked};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use serde_json::{json, Value};

use crate::helpers::{captured_logs, jti_of, now_secs, Backend, Resp, TestApp};
use crate::{backend_tests, postgres_tests};

backend_tests!(
    a_revocation_written_by_a_clock_ten_seconds_behind_reaches_another_instance,
    revocations_are_capped_at_a_day_and_the_set_is_bounded,
    the_set_stays_bounded_while_no_poll_completes,
    past_the_bound_a_filter_answers_from_memory_and_misses_no_revocation,
    a_filter_build_keeps_the_set_current_while_it_reads_the_table,
    a_revocation_made_here_while_a_built_filter_is_put_in_place_is_kept,
    expired_revocations_leave_the_filter_without_a_read,
    a_revocation_made_with_the_sets_full_holds_on_both_instances_within_a_second,
    an_expired_webhook_secret_stops_working_while_cached,
    a_credential_read_that_raced_a_revocation_is_not_cached,
    a_job_token_names_its_caller_and_dies_with_it,
    tokens_without_a_caller_or_with_an_unknown_one_are_refused,
    a_token_issued_before_the_first_claim_is_fenced_by_it,
    no_more_versions_are_issued_than_are_tried,
    concurrent_rotations_issue_no_more_than_are_tried,
    a_stray_master_key_seals_nothing_and_revocations_keep_their_first_time,
    instances_starting_together_make_one_signing_key,
    dev_credentials_issued_again_end_the_lost_ones,
);

postgres_tests!(
    a_revocation_made_here_while_a_filter_is_built_is_in_the_new_one,
    a_build_dropped_for_the_revocations_made_meanwhile_does_not_count_as_current,
    a_revocation_made_here_while_the_set_returns_to_its_ids_is_kept,
    a_revocation_committed_late_is_read_after_a_rebuild_of_the_filter,
    a_revocation_whose_writer_stalled_is_read_once_the_writer_ends,
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
    let key = revoked::job_key(&id);
    app.state
        .db
        .write_sync(|c| revoked::revoke_token(c, &key, now + 3_600_000, now - 10_000))
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
    // 24 h + 61 s: the longest a token with that id (renewals included, perhaps on an
    // instance whose clock runs up to 60 s ahead) outlives it.
    let day = 24 * 3_600_000 + 61_000;
    assert!(
        until <= now_millis() + day && until >= before + day - 1000,
        "expiresAt not capped at now + 24 h + 61 s: {}",
        r.body
    );

    // Fill the table up to the bound (as many active revocations as an instance
    // holds in memory), the way other instances' revocations arrive.
    let limit = app.state.auth.revocations.limit();
    assert_eq!(limit, revocation::MAX_REVOCATIONS);
    let fill = limit - 1; // `far` is the other one
    let exp = now_millis() + 3_600_000;
    bulk_revocations(&app, b, fill, exp);
    let started = Instant::now();
    while gauge(&app) < i64::try_from(limit).unwrap() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the gauge never showed the set's size: {}",
            gauge(&app)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Full: an operator's revocation is still taken, and holds at once. Workers can
    // fill the set (every hand-back revokes its attempt); that must not disarm it.
    let id = app.running_job();
    let t = app.job_token(&id, "w", HOUR);
    assert_eq!(get_job(&app, &t, &id).status, 200);
    let r = app.post_json("/admin/tokens/revoke", &json!({"jti": jti_of(&t)}));
    assert_eq!(
        r.status, 200,
        "a revocation refused while the set is full: {}",
        r.body
    );
    assert_eq!(get_job(&app, &t, &id).problem(401)["reason"], "revoked");
    // Extending one already held is not a new entry.
    assert_eq!(
        app.post_json("/admin/tokens/revoke", &json!({"jti": "far"}))
            .status,
        200
    );
    // Still revoked once the next poll has found the table over the bound.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(get_job(&app, &t, &id).problem(401)["reason"], "revoked");

    // Past the bound (a job's end is never refused), the instance stops holding the
    // set and asks the database for each token: still correct, memory bounded.
    let id = app.running_job();
    let t = app.job_token(&id, "w", HOUR);
    assert_eq!(get_job(&app, &t, &id).status, 200);
    app.state
        .db
        .write_sync(|c| revoked::revoke_token(c, "bulk-extra", exp, now_millis()))
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
/// The admin route is no longer refused when the set is full, so the bound on memory
/// cannot wait for the next poll to notice: while no poll completes (a database that
/// answers writes but whose reads are shed or slow, say) every revocation this instance
/// makes, by hand or by a job's end, would otherwise stay in memory. Past the bound the
/// set is dropped at once and each check asks the database, where every one of them is.
fn the_set_stays_bounded_while_no_poll_completes(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    // An instance's set whose poller never runs: as if each poll failed.
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    let exp = now_millis() + 3_600_000;
    let ids: Vec<String> = (0..50).map(|i| format!("flood-{i}")).collect();
    actix_web::rt::System::new().block_on(async {
        for id in &ids {
            set.revoke(id.clone(), exp).await.expect("revoke");
        }
        // A job's end: its row committed with the job's change, then held here.
        app.state
            .db
            .write_sync(|c| revoked::revoke_token(c, "job:x:1", exp, now_millis()))
            .expect("job revocation");
        set.revoke_local_all(&[("job:x:1".to_owned(), exp)]);
        assert!(
            set.held() <= set.limit(),
            "{} ids held in memory past a bound of {}",
            set.held(),
            set.limit()
        );
        for id in ids.iter().chain(["job:x:1".to_owned()].iter()) {
            let (jti, job, attempt) = match id.strip_prefix("job:") {
                Some(_) => ("other", "x", 1),
                None => (id.as_str(), "y", 1),
            };
            assert!(
                set.is_revoked(jti, job, attempt).await.expect("check"),
                "{id} not revoked"
            );
        }
        assert!(!set.is_revoked("other", "y", 1).await.expect("check"));
    });
}

/// Begin a transaction on `conn` that revokes `jti` (its row numbered) and leave it open.
fn open_revoking(conn: &mut diesel::PgConnection, jti: &str, exp: i64) {
    conn.batch_execute(&format!(
        "BEGIN; INSERT INTO revoked_tokens (jti, expires_at, revoked_at) \
         VALUES ('{jti}', {exp}, {})",
        now_millis()
    ))
    .expect("open a revoking transaction");
}

/// Rename a table (to take it away from the service, and to give it back).
fn rename_table(app: &TestApp, from: &str, to: &str) {
    app.state
        .db
        .write_sync(|c| {
            diesel::sql_query(format!("ALTER TABLE {from} RENAME TO {to}")).execute(c)?;
            Ok(())
        })
        .expect("rename");
}

/// Revoke `fill-<i>` for each `i` in `range`, in the table only (as another instance).
fn fill_revocations(app: &TestApp, range: std::ops::Range<usize>, exp: i64) {
    app.state
        .db
        .write_sync(move |c| {
            for i in range {
                revoked::revoke_token(c, &format!("fill-{i}"), exp, now_millis())?;
            }
            Ok(())
        })
        .expect("fill");
}

/// Past the bound the set holds a Bloom filter of every active revocation instead of
/// the ids. A token it does not hold is answered from memory: here with the table
/// renamed away, where before (the set dropped, every check asked the database) each
/// check failed. Every id revoked stays held, through the builds from the table as it
/// grows past the filter's size, with revocations made on this instance while a build
/// reads the table, and a revoked token is still refused (its possible hit is asked of
/// the database).
fn past_the_bound_a_filter_answers_from_memory_and_misses_no_revocation(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    // An instance's set, polled here by hand.
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    let exp = now_millis() + 3_600_000;
    let fill = |from, to| fill_revocations(&app, from..to, exp);
    let rename = |from: &str, to: &str| rename_table(&app, from, to);
    actix_web::rt::System::new().block_on(async {
        fill(0, 50);
        set.poll().await.expect("first poll, a full load");
        assert_eq!(set.held(), 0, "past the bound, no ids held");
        assert!(set.len() >= 50, "gauge {}", set.len());
        // Past the filter's size (1 024 ids at least): the next polls build a larger
        // one from the table, while this instance revokes more.
        fill(50, 3000);
        let local: Vec<String> = (0..40).map(|i| format!("local-{i}")).collect();
        let revoking = async {
            for id in &local {
                set.revoke(id.clone(), exp).await.expect("revoke");
            }
        };
        let polling = async {
            for _ in 0..3 {
                // A load during which more than the bound were revoked here keeps the
                // filter in place and fails: it is not a refresh.
                if let Err(e) = set.poll().await {
                    assert!(e.to_string().contains("were revoked here"), "poll: {e}");
                }
            }
        };
        futures_util::future::join(revoking, polling).await;
        set.poll().await.expect("poll");
        let missing: Vec<String> = (0..3000)
            .map(|i| format!("fill-{i}"))
            .chain(local.iter().cloned())
            .filter(|id| !set.holds(id))
            .collect();
        assert!(missing.is_empty(), "not held: {missing:?}");
        assert!(set.is_revoked("fill-2999", "y", 1).await.expect("check"));
        assert!(set.is_revoked("local-39", "y", 1).await.expect("check"));

        // Tokens not revoked, with the table gone: answered from memory, all but the
        // rare possible hit (which asks the database, and fails here).
        set.poll().await.expect("poll");
        rename("revoked_tokens", "revoked_tokens_away");
        let mut answered = 0;
        for i in 0..200 {
            match set
                .is_revoked(&format!("other-{i}"), &format!("job-{i}"), 1)
                .await
            {
                Ok(false) => answered += 1,
                Ok(true) => panic!("other-{i} revoked"),
                Err(_) => {}
            }
        }
        rename("revoked_tokens_away", "revoked_tokens");
        assert!(
            answered >= 190,
            "only {answered} of 200 answered from memory"
        );
    });
}

/// A filter built from the table replaces the one in place, so what this instance
/// revoked while the table was read must be in the new one: between the swap and the
/// next poll no row read would bring it back. The build is held here by a lock on the
/// table (PostgreSQL only: a SQLite reader never waits for a writer), and the ids
/// revoked meanwhile have no row, so only the hand-over can put them in the new filter.
fn a_revocation_made_here_while_a_filter_is_built_is_in_the_new_one(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    let exp = now_millis() + 3_600_000;
    let fill = |from, to| fill_revocations(&app, from..to, exp);
    fill(0, 20);
    let mut lock = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
    // Fewer than the bound (10): past it a build is dropped and the old filter kept.
    let local: Vec<String> = (0..8).map(|i| format!("local-{i}")).collect();
    actix_web::rt::System::new().block_on(async {
        set.poll()
            .await
            .expect("first poll, a full load past the bound");
        assert_eq!(set.held(), 0);
        fill(20, 2000);
        set.poll().await.expect("poll that reads them");
        lock.batch_execute("BEGIN; LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
            .expect("lock");
        // 2 000 ids in a filter sized for 1 024: this poll builds a larger one, and
        // waits for the lock.
        let building = async { set.poll().await.expect("poll that builds") };
        let revoking = async {
            actix_web::rt::time::sleep(Duration::from_millis(300)).await;
            for id in &local {
                set.revoke_local(id, exp);
            }
            lock.batch_execute("COMMIT").expect("unlock");
        };
        futures_util::future::join(building, revoking).await;
    });
    let missing: Vec<&String> = local.iter().filter(|id| !set.holds(id)).collect();
    assert!(missing.is_empty(), "lost in the hand-over: {missing:?}");
    let gone: Vec<usize> = (0..2000)
        .filter(|i| !set.holds(&format!("fill-{i}")))
        .collect();
    assert!(
        gone.is_empty(),
        "{} of the table's ids not held: {:?}",
        gone.len(),
        &gone[..gone.len().min(20)]
    );
}

/// A build of the filter that more revocations made here than the bound spoiled is
/// dropped and the old filter kept. That filter lacks what other instances revoked
/// since the last poll, so the poll must not count as a refresh (before: the set was
/// stamped as current as the build's read, and the cursor moved 1 024 numbers below
/// the newest: the rows in between were missed, until the next build, up to 10 min).
fn a_build_dropped_for_the_revocations_made_meanwhile_does_not_count_as_current(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    let exp = now_millis() + 3_600_000;
    fill_revocations(&app, 0..20, exp);
    let mut lock = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
    actix_web::rt::System::new().block_on(async {
        set.poll()
            .await
            .expect("first poll, a full load past the bound");
        fill_revocations(&app, 20..1100, exp);
        set.poll()
            .await
            .expect("poll that reads them (the filter is outgrown)");
        // Revoked elsewhere after that poll, and more than a second before the checks.
        fill_revocations(&app, 1100..2300, exp);
        actix_web::rt::time::sleep(Duration::from_millis(1200)).await;
        lock.batch_execute("BEGIN; LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
            .expect("lock");
        let building = async {
            // Fails or not; what it leaves is what counts.
            let _ = set.poll().await;
        };
        let revoking = async {
            actix_web::rt::time::sleep(Duration::from_millis(300)).await;
            for i in 0..11 {
                set.revoke_local(&format!("local-{i}"), exp);
            }
            lock.batch_execute("COMMIT").expect("unlock");
        };
        futures_util::future::join(building, revoking).await;
        let mut accepted = Vec::new();
        for i in 1100..2300 {
            let id = format!("fill-{i}");
            if !set.is_revoked(&id, "y", 1).await.expect("check") {
                accepted.push(i);
            }
        }
        assert!(
            accepted.is_empty(),
            "{} revoked ids accepted: {:?}",
            accepted.len(),
            &accepted[..accepted.len().min(20)]
        );
    });
}

/// A build that finds the table back under the bound returns to the ids. What this
/// instance revoked while the table was read went into the filter being dropped, so
/// it must come along (before: lost, and answered "not revoked" from memory until a
/// poll read its row back).
fn a_revocation_made_here_while_the_set_returns_to_its_ids_is_kept(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    let short = now_millis() + 4_000;
    let exp = now_millis() + 3_600_000;
    fill_revocations(&app, 0..20, short);
    let mut lock = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
    actix_web::rt::System::new().block_on(async {
        set.poll()
            .await
            .expect("first poll, a full load past the bound");
        fill_revocations(&app, 20..1100, short);
        set.poll()
            .await
            .expect("poll that reads them (the filter is outgrown)");
        while now_millis() <= short + 200 {
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        lock.batch_execute("BEGIN; LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
            .expect("lock");
        // Every revocation expired: this build goes back to the ids.
        let building = async { set.poll().await.expect("poll that builds") };
        let revoking = async {
            actix_web::rt::time::sleep(Duration::from_millis(300)).await;
            set.revoke_local("local-0", exp);
            lock.batch_execute("COMMIT").expect("unlock");
        };
        futures_util::future::join(building, revoking).await;
        assert!(set.holds("local-0"), "lost on the way back to the ids");
        assert!(set.is_revoked("local-0", "y", 1).await.expect("check"));
    });
}

/// A full load moved the cursor to 1 024 numbers below the newest, past any
/// transaction still open (PostgreSQL numbers rows when written, not when committed).
/// With a filter rebuilt whenever it is outgrown, that is any time: a revocation that
/// took its number before 1 024 others and committed after the build was never read
/// by this instance's polls (until the next build), whatever the writers said.
fn a_revocation_committed_late_is_read_after_a_rebuild_of_the_filter(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    let exp = now_millis() + 3_600_000;
    fill_revocations(&app, 0..20, exp);
    let mut late = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
    actix_web::rt::System::new().block_on(async {
        set.poll()
            .await
            .expect("first poll, a full load past the bound");
        open_revoking(&mut late, "late", exp);
        fill_revocations(&app, 20..1200, exp);
        set.poll()
            .await
            .expect("poll that reads them (the filter is outgrown)");
        set.poll().await.expect("poll that builds a larger filter");
        late.batch_execute("COMMIT")
            .expect("commit the late revocation");
        for _ in 0..3 {
            actix_web::rt::time::sleep(Duration::from_millis(200)).await;
            set.poll().await.expect("poll");
        }
        assert!(set.holds("late"), "the late revocation was never read");
        assert!(set.is_revoked("late", "y", 1).await.expect("check"));
    });
}

/// While a filter is built again from the table (when it is outgrown, a stalled
/// writer has ended, or an hour has passed), incremental polls keep the set in use current: a revocation another
/// instance commits during the build is held within a poll or two, before the build
/// ends, and the new filter has it too. Before (2026-12-07), the build held the poll
/// for as long as it read the table (tens of seconds at the millions of rows a busy
/// instance's one-hour tokens leave), and every job-token check asked the database
/// meanwhile; the whole-life soak lost half its rate then. Here the build reads one
/// row at a time through many expired rows (which no filter holds), so it outlasts a
/// few polls while the filter in use stays far from saturated.
fn a_filter_build_keeps_the_set_current_while_it_reads_the_table(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    set.set_build_page(1);
    let exp = now_millis() + 3_600_000;
    fill_revocations(&app, 0..20, exp);
    actix_web::rt::System::new().block_on(async {
        set.poll()
            .await
            .expect("first poll, a full load past the bound");
        // Past the 1 024 ids the first filter was sized for (so the next poll builds
        // a larger one), behind 20 000 rows that expired already.
        let past = now_millis() - 1000;
        app.state
            .db
            .write_sync(move |c| {
                for i in 0..20_000 {
                    revoked::revoke_token(c, &format!("expired-{i}"), past, past)?;
                }
                Ok(())
            })
            .expect("expired rows");
        fill_revocations(&app, 20..1100, exp);
        set.poll()
            .await
            .expect("poll that reads them (the filter is outgrown)");
        // The filter in use is not saturated: it tells ids apart.
        let strays = (0..100)
            .filter(|i| set.holds(&format!("never-{i}")))
            .count();
        assert!(strays < 10, "{strays} of 100 ids never revoked seem held");
        let done = std::cell::Cell::new(false);
        let building = async {
            set.poll().await.expect("poll that builds a larger filter");
            done.set(true);
        };
        let watching = async {
            actix_web::rt::time::sleep(Duration::from_millis(200)).await;
            assert!(!done.get(), "the build ended before the test could revoke");
            assert!(!set.holds("elsewhere"), "held before it was revoked");
            app.state
                .db
                .write_sync(|c| revoked::revoke_token(c, "elsewhere", exp, now_millis()))
                .expect("revoke elsewhere");
            let started = Instant::now();
            while !set.holds("elsewhere") {
                assert!(
                    !done.get(),
                    "held only once the build ended ({:?} after it was revoked)",
                    started.elapsed()
                );
                actix_web::rt::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "held {:?} after it was revoked",
                started.elapsed()
            );
        };
        futures_util::future::join(building, watching).await;
        assert!(done.get());
        assert!(set.holds("elsewhere"), "not in the new filter");
        assert!(set.is_revoked("elsewhere", "y", 1).await.expect("check"));
    });
    let gone: Vec<usize> = (0..1100)
        .filter(|i| !set.holds(&format!("fill-{i}")))
        .collect();
    assert!(
        gone.is_empty(),
        "{} of the table's ids not held",
        gone.len()
    );
}

/// A filter built from the table must be put in place under the same lock that takes
/// it from `Set::next`. Before (review, 2026-12-07) it was taken under one lock and put
/// in place under the next: an id revoked here in between (by a request thread, while
/// the poll's task was between the two) went neither into the new filter (no longer
/// `next`) nor aside (`during` ends where the build starts), only into the set about to
/// be replaced; it was then answered "not revoked" from memory, the set stamped fresh,
/// until a poll read its row again. The window is a few instructions wide, so another
/// thread revokes here as fast as it can through many builds (first loads, each reading
/// the table past the bound); its ids have no row, so only the set itself keeps them.
/// The table's 50 000 rows size each new filter for 200 000 ids: it tells apart the
/// ids revoked meanwhile, and one lost is not held.
fn a_revocation_made_here_while_a_built_filter_is_put_in_place_is_kept(b: Backend) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(app) = crate::app!(b) else { return };
    let exp = now_millis() + 3_600_000;
    let fill = 50_000;
    bulk_revocations(&app, b, fill, exp);
    let system = actix_web::rt::System::new();
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(8) {
        rounds += 1;
        let set = revocation::Revocations::new(app.state.db.clone());
        // Read by the poll when it starts: past it, the load builds a filter.
        set.set_limit(1);
        let go = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let (polled, revoked) = std::thread::scope(|s| {
            let revoking = s.spawn(|| {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    set.revoke_local(&format!("local-{rounds}-{n}"), exp);
                    n += 1;
                }
                n
            });
            let polled = system.block_on(async {
                let polling = set.poll();
                let starting = async {
                    // The poll has read its bound: the ids revoked from here on pass
                    // no bound here, so none spoils the build.
                    set.set_limit(1 << 40);
                    go.store(true, Ordering::Release);
                };
                futures_util::future::join(polling, starting).await.0
            });
            stop.store(true, Ordering::Release);
            (polled, revoking.join())
        });
        polled.expect("first poll, a full load past the bound");
        let revoked = revoked.expect("revoking thread");
        let lost: Vec<usize> = (0..revoked)
            .filter(|n| !set.holds(&format!("local-{rounds}-{n}")))
            .collect();
        assert!(
            lost.is_empty(),
            "round {rounds}: {} of the {revoked} ids revoked here during the load lost \
             (local-{rounds}-<n> for n in {:?})",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        assert_eq!(set.held(), 0, "past the bound, no ids held");
    }
}

/// Past the bound, what expired leaves the filter without a read of the table: each
/// window of expiry times is dropped once its expiries have passed. Before
/// (2026-12-07) only a build from the whole table, every 10 minutes, dropped them; at a
/// busy instance's millions of one-hour revocations that read took 30–50 s of CPU each
/// time. Here the table is renamed away after the first load, so nothing is read, and
/// still the 50 expired ids leave while the 30 active ones stay.
fn expired_revocations_leave_the_filter_without_a_read(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_limit(10);
    set.set_window(Duration::from_millis(500));
    let short = now_millis() + 1_500;
    let exp = now_millis() + 3_600_000;
    fill_revocations(&app, 0..50, short);
    app.state
        .db
        .write_sync(move |c| {
            for i in 0..30 {
                revoked::revoke_token(c, &format!("long-{i}"), exp, now_millis())?;
            }
            Ok(())
        })
        .expect("long revocations");
    let rename = |from: &str, to: &str| rename_table(&app, from, to);
    actix_web::rt::System::new().block_on(async {
        set.poll()
            .await
            .expect("first poll, a full load past the bound");
        assert_eq!(set.held(), 0, "past the bound, no ids held");
        assert_eq!(set.len(), 80, "gauge");
        rename("revoked_tokens", "revoked_tokens_away");
        while now_millis() <= short + 600 {
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        // Its read fails (no table); what expired has left by then.
        assert!(
            set.poll().await.is_err(),
            "a poll read a table renamed away"
        );
        rename("revoked_tokens_away", "revoked_tokens");
    });
    assert_eq!(set.len(), 30, "gauge after the short revocations expired");
    let lost: Vec<usize> = (0..30)
        .filter(|i| !set.holds(&format!("long-{i}")))
        .collect();
    assert!(lost.is_empty(), "active revocations lost: {lost:?}");
    let kept = (0..50).filter(|i| set.holds(&format!("fill-{i}"))).count();
    assert!(kept < 5, "{kept} of 50 expired ids still seem held");
}

/// A PostgreSQL transaction that took its revocation's number and stays open past
/// the stall limit no longer holds the poll back, so the cursor passes its number
/// before it commits. Once it has ended, a reload reads what it committed. Before
/// (2026-12-07) that was left to the periodic full reload, up to 10 minutes later,
/// and every token it revoked was accepted here meanwhile. Another writer left open
/// throughout (a leaked session) must not hold that repair back: in the first version
/// only the last stalled writer to end asked for it (review, 2026-12-07). (The limit
/// is 60 s; here 1 s.)
fn a_revocation_whose_writer_stalled_is_read_once_the_writer_ends(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let set = revocation::Revocations::new(app.state.db.clone());
    set.set_stall_limit(Duration::from_secs(1));
    let exp = now_millis() + 3_600_000;
    fill_revocations(&app, 0..20, exp);
    let mut late = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
    let mut stuck = diesel::PgConnection::establish(&app.db.url).expect("open postgres");
    let reloads = |why: &str| {
        set.reloads()
            .iter()
            .find(|(w, _)| *w == why)
            .map_or(u64::MAX, |r| r.1)
    };
    actix_web::rt::System::new().block_on(async {
        set.poll().await.expect("first poll, a full load");
        assert_eq!((reloads("first"), reloads("repair")), (1, 0));
        open_revoking(&mut stuck, "stuck", exp);
        open_revoking(&mut late, "late", exp);
        fill_revocations(&app, 20..40, exp);
        // Past the 3 s overlap and the stall limit: the cursor moves past 'late'.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(5_000) {
            set.poll().await.expect("poll");
            actix_web::rt::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(set.holds("fill-39"));
        assert_eq!(
            reloads("repair"),
            0,
            "a repair while the writer is still open"
        );
        late.batch_execute("COMMIT")
            .expect("commit the late revocation");
        for _ in 0..3 {
            set.poll().await.expect("poll");
            actix_web::rt::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            set.holds("late"),
            "the stalled writer's revocation was never read"
        );
        assert!(set.is_revoked("late", "y", 1).await.expect("check"));
        assert_eq!(
            (reloads("first"), reloads("repair"), reloads("periodic")),
            (1, 1, 0),
            "one full read to repair, counted as such"
        );
    });
    stuck
        .batch_execute("ROLLBACK")
        .expect("end the session left open");
}

/// With both instances' sets full (and then past full), an operator's revocation on one
/// holds there at once and on the other within a second.
fn a_revocation_made_with_the_sets_full_holds_on_both_instances_within_a_second(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let other = app.sibling();
    let limit = 5;
    app.state.auth.revocations.set_limit(limit);
    other.state.auth.revocations.set_limit(limit);
    let exp = now_millis() + 3_600_000;
    for i in 0..limit {
        app.state
            .db
            .write_sync(|c| revoked::revoke_token(c, &format!("fill-{i}"), exp, now_millis()))
            .expect("fill");
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        other.state.auth.revocations.held(),
        limit,
        "full, not past it"
    );
    for round in ["full", "past full"] {
        let id = app.running_job();
        let t = app.job_token(&id, "w", HOUR);
        assert_eq!(get_job(&other, &t, &id).status, 200, "{round}");
        let r = app.post_json("/admin/tokens/revoke", &json!({"jti": jti_of(&t)}));
        assert_eq!(r.status, 200, "{round}: {}", r.body);
        let started = Instant::now();
        assert_eq!(
            get_job(&app, &t, &id).problem(401)["reason"],
            "revoked",
            "{round}"
        );
        let r = poll_until(
            Duration::from_secs(1),
            || get_job(&other, &t, &id),
            |r| r.status == 401,
        );
        assert_eq!(r.problem(401)["reason"], "revoked", "{round}");
        assert!(started.elapsed() < Duration::from_secs(1), "{round}");
    }
    assert!(other.state.auth.revocations.held() <= limit);
}

// ---- item 2: a cached credential carries its expiry -------------------------------

const WEBHOOK_BODY: &str = r#"{"issueNumber":7,"repository":"octo/widgets","action":"assigned"}"#;

fn webhook(app: &TestApp, key: &[u8], id: &str) -> Resp {
    let ts = now_secs().to_string();
    let sig = webhook::wire::sign(key, id, &ts, WEBHOOK_BODY.as_bytes());
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
    credentials::add_caller(&app.state.db, "hook", &[Scope::StitcherWebhook]).unwrap();
    let v1 = credentials::add_secret(
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
    let v2 = credentials::add_secret(
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
        let row = fetched.value.clone().unwrap().key;
        assert!(row.revoked_at.is_none());
        // ...the key is revoked and this instance's poll sees the change...
        credentials::revoke_key(&db, &row.id).unwrap();
        store.poll().await.unwrap();
        // ...and only then does the request try to cache what it read.
        let inserted = store.admit_api_key(&hash, &fetched).unwrap();
        let now = store.api_key(&hash).await.unwrap().unwrap().key;
        assert!(
            now.revoked_at.is_some(),
            "the cache serves the key as active"
        );
        assert!(!inserted, "a read from before the revocation was cached");
    });
    let r = app.raw("GET", "/coordinator/health", &[("x-api-key", &key)], b"");
    assert_eq!(r.problem(401)["reason"], "revoked");
}

fn queued_job(app: &TestApp, queue: &str) -> String {
    let id = app.create_job(&json!({"kind": "k", "queue": queue}));
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    id
}

// ---- item 4: a job token records its caller -----------------------------------------

fn claim_as(app: &TestApp, who: &crate::helpers::Signer, queue: &str, worker: &str) -> Value {
    let body = json!({"worker": worker}).to_string();
    let r = app.signed_by(
        who,
        "POST",
        &format!("/coordinator/queues/{queue}/claim"),
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The payload of a JWT, decoded (the test reads its claims).
fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The audit lines written for requests made with this token id.
fn audit_lines_for(jti: &str) -> Vec<Value> {
    let needle = format!(r#""key":"{jti}""#);
    captured_logs()
        .lines()
        .filter(|l| l.contains(r#""event":"auth""#) && l.contains(&needle))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn a_job_token_names_its_caller_and_dies_with_it(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let wk = app.caller("wk", &[Scope::JobsUpdate, Scope::JobsRead]);
    let id = queued_job(&app, "cq");
    // The worker calls itself `dev` (another caller's name); the token still records
    // that `wk` claimed it.
    let claimed = claim_as(&app, &wk, "cq", "dev");
    assert_eq!(claimed["id"], id.as_str());
    let t = claimed["token"].as_str().unwrap().to_owned();
    let claims = claims_of(&t);
    assert_eq!(claims["cal"], "wk");
    assert_eq!(claims["sub"], "dev");
    let r = app.with_token(
        &t,
        "PATCH",
        &format!("/coordinator/jobs/{id}/progress"),
        br#"{"percent":10}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);

    std::thread::sleep(Duration::from_millis(200));
    let jti = claims["jti"].as_str().unwrap();
    let lines = audit_lines_for(jti);
    assert!(!lines.is_empty(), "no audit line for the token");
    for l in &lines {
        assert_eq!(l["scheme"], "token");
        assert_eq!(l["caller"], "wk", "{l}");
        assert_eq!(l["worker"], "dev", "{l}");
    }

    // Disabling the caller ends its tokens (within the cache's poll).
    credentials::disable_caller(&app.state.db, "wk").unwrap();
    let r = poll_until(
        Duration::from_millis(1500),
        || {
            app.with_token(
                &t,
                "PATCH",
                &format!("/coordinator/jobs/{id}/progress"),
                br#"{"percent":20}"#,
            )
        },
        |r| r.status == 401,
    );
    assert_eq!(r.problem(401)["reason"], "caller disabled");
    let r = app.with_token(
        &t,
        "POST",
        &format!("/coordinator/jobs/{id}/complete"),
        br#"{"result":1}"#,
    );
    assert_eq!(r.problem(401)["reason"], "caller disabled");
    std::thread::sleep(Duration::from_millis(200));
    let denied = audit_lines_for(jti)
        .into_iter()
        .filter(|l| l["outcome"] == "deny")
        .collect::<Vec<_>>();
    assert!(!denied.is_empty());
    assert!(denied
        .iter()
        .all(|l| l["caller"] == "wk" && l["worker"] == "dev"));
}

fn tokens_without_a_caller_or_with_an_unknown_one_are_refused(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let gone = app.caller("gone", &[Scope::JobsUpdate, Scope::JobsRead]);
    let id = queued_job(&app, "uq");
    let t = claim_as(&app, &gone, "uq", "w")["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(get_job(&app, &t, &id).status, 200);

    // A token minted before tokens recorded their caller: same key, no `cal`.
    let sealer = app.state.auth.store.sealer().clone();
    let keys = app
        .state
        .db
        .write_sync(|c| token::load_keys(c, &sealer))
        .unwrap();
    let key = &keys[0];
    let now = now_secs();
    let legacy = json!({
        "iss": token::ISSUER, "sub": "w", "jid": id, "scope": "jobs:update jobs:read",
        "jti": uuid::Uuid::now_v7().to_string(), "iat": now, "exp": now + 600, "att": 1,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(format!("v{}", key.version));
    let legacy = jsonwebtoken::encode(
        &header,
        &legacy,
        &jsonwebtoken::EncodingKey::from_secret(&key.key),
    )
    .unwrap();
    assert_eq!(
        get_job(&app, &legacy, &id).problem(401)["reason"],
        "token without caller"
    );

    // The caller is deleted (it has no API keys, so nothing else refers to it).
    app.state
        .db
        .write_sync(|c| {
            use coordinator::db::schema::callers;
            diesel::delete(callers::table.find("gone")).execute(c)?;
            repo::bump_generation(c)
        })
        .unwrap();
    let r = poll_until(
        Duration::from_millis(1500),
        || get_job(&app, &t, &id),
        |r| r.status == 401,
    );
    assert_eq!(r.problem(401)["reason"], "unknown caller");
}

// ---- item 8: a token issued before any claim is fenced -------------------------------

fn a_token_issued_before_the_first_claim_is_fenced_by_it(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let other = app.sibling();
    let id = queued_job(&app, "fq");
    // `coordinator token issue` for a job nobody has claimed: attempt 0.
    let early = app.job_token(&id, "early", HOUR);
    assert_eq!(claims_of(&early)["att"], 0);
    assert_eq!(get_job(&app, &early, &id).status, 200);
    assert_eq!(get_job(&other, &early, &id).status, 200);

    let claimed = app
        .post_json("/coordinator/queues/fq/claim", &json!({"worker": "w1"}))
        .json();
    assert_eq!(claimed["attempts"], 1);
    let t1 = claimed["token"].as_str().unwrap().to_owned();
    assert_eq!(get_job(&app, &t1, &id).status, 200);
    // The first attempt started: the attempt-0 token is refused, here at once and on
    // the other instance within a second.
    assert_eq!(get_job(&app, &early, &id).problem(401)["reason"], "revoked");
    let r = poll_until(
        Duration::from_millis(1500),
        || get_job(&other, &early, &id),
        |r| r.status == 401,
    );
    assert_eq!(r.problem(401)["reason"], "revoked");
    assert_eq!(get_job(&other, &t1, &id).status, 200);

    // Back in the queue between attempts: no token can be issued (it would name an
    // attempt that has ended, and could outlive the next one).
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let job = coordinator::jobs::JobId::parse(&id, "id").unwrap();
    let refused = token::issue(
        &app.state.db,
        app.state.auth.store.sealer(),
        &job,
        "late",
        None,
        HOUR,
    );
    assert!(
        matches!(refused, Err(coordinator::error::StoreError::Conflict(_))),
        "{refused:?}"
    );
    // The second attempt's token works; neither earlier one does.
    let second = app
        .post_json("/coordinator/queues/fq/claim", &json!({"worker": "w2"}))
        .json();
    assert_eq!(second["attempts"], 2);
    let t2 = second["token"].as_str().unwrap();
    assert_eq!(get_job(&app, t2, &id).status, 200);
    get_job(&app, &early, &id).problem(401);
    get_job(&app, &t1, &id).problem(401);
    // A RUNNING job gets a token for its current attempt.
    let running = app.job_token(&id, "op", HOUR);
    assert_eq!(claims_of(&running)["att"], 2);
    assert_eq!(get_job(&app, &running, &id).status, 200);
}

/// Review finding (2026-12-05): only the newest 8 active versions of a secret are
/// tried, but `secret rotate` issued a ninth and said the older ones stayed valid, while
/// the oldest had silently stopped working. Now a version past the eighth active one is
/// refused (409 `Conflict`, naming the remedy), unless the rotation ends the others.
fn no_more_versions_are_issued_than_are_tried(b: Backend) {
    use coordinator::auth::store::MAX_VERSIONS_TRIED;
    use coordinator::error::StoreError;
    let Some(app) = crate::app!(b) else { return };
    let sealer = app.state.auth.store.sealer();
    credentials::add_caller(&app.state.db, "many", &[Scope::StitcherWebhook]).unwrap();
    let add = |grace: Option<Duration>| {
        credentials::add_secret(
            &app.state.db,
            sealer,
            "many",
            SecretKind::Webhook,
            grace,
            None,
        )
    };
    for v in 1..=MAX_VERSIONS_TRIED {
        let issued = add(Some(HOUR)).unwrap_or_else(|e| panic!("version {v}: {e}"));
        assert_eq!(usize::try_from(issued.version).unwrap(), v);
    }
    match add(Some(HOUR)) {
        Err(StoreError::Conflict(why)) => {
            assert!(why.contains("revoke"), "{why}");
            assert!(why.contains("--kind webhook"), "{why}");
        }
        Err(e) => panic!("another error: {e}"),
        Ok(v) => panic!("a ninth active version was issued: {}", v.version),
    }
    // Another kind counts on its own.
    credentials::add_secret(&app.state.db, sealer, "many", SecretKind::Hmac, None, None)
        .expect("an HMAC secret beside eight webhook versions");
    // One revoked: room for one more.
    credentials::revoke_secret(&app.state.db, "many", SecretKind::Webhook, 1).unwrap();
    let ninth = add(Some(HOUR)).expect("after a revocation");
    assert!(matches!(add(Some(HOUR)), Err(StoreError::Conflict(_))));
    // A rotation that ends every other version at once is always possible.
    let tenth = add(Some(Duration::ZERO)).expect("with --grace 0s");
    assert_eq!(tenth.version, ninth.version + 1);
}

/// The same bound when rotations race (two operators, or a script run twice): exactly
/// eight of twelve concurrent rotations are issued. On PostgreSQL the count and the
/// insert run under the caller's row lock; without it, READ COMMITTED takes a snapshot
/// per statement, so a rotation could count before another's commit and pick its
/// version after it (rare: the version's primary key catches the common interleaving).
fn concurrent_rotations_issue_no_more_than_are_tried(b: Backend) {
    use coordinator::auth::store::MAX_VERSIONS_TRIED;
    let Some(app) = crate::app!(b) else { return };
    let sealer = app.state.auth.store.sealer();
    credentials::add_caller(&app.state.db, "racy", &[Scope::JobsRead]).unwrap();
    let barrier = std::sync::Barrier::new(12);
    let issued = std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|_| {
                let (db, barrier) = (&app.state.db, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    credentials::add_secret(db, sealer, "racy", SecretKind::Hmac, Some(HOUR), None)
                        .is_ok()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("joined"))
            .filter(|ok| *ok)
            .count()
    });
    assert_eq!(issued, MAX_VERSIONS_TRIED);
}

/// Review (2026-12-06): an operator command run with a stray master key (a leftover
/// `COORDINATOR_MASTER_KEY` in the shell) sealed a new secret version under a key no
/// instance held, expiring the working one, and a later `token rotate-key` made every
/// claim fail. Sealing now refuses while active rows use keys the sealer lacks, and
/// writes nothing. A revoked row under such a key is left by `rewrap` rather than
/// blocking it for ever. Revoking a key or disabling a caller a second time is refused
/// and keeps the first time.
fn a_stray_master_key_seals_nothing_and_revocations_keep_their_first_time(b: Backend) {
    use coordinator::crypto::seal::{MasterKey, Sealer};
    let Some(app) = crate::app!(b) else { return };
    let db = &app.state.db;
    let sealer = app.state.auth.store.sealer();
    app.caller("svc", &[Scope::HealthRead]);
    let stray = Sealer::new(MasterKey::generate(), None).expect("sealer");
    let hmac_rows = || {
        credentials::list_secrets(db, Some("svc"))
            .expect("list")
            .into_iter()
            .filter(|r| r.purpose == "hmac")
            .collect::<Vec<_>>()
    };
    let before = hmac_rows();
    let err = credentials::add_secret(
        db,
        &stray,
        "svc",
        SecretKind::Hmac,
        Some(Duration::ZERO),
        None,
    )
    .err()
    .expect("a stray key is refused");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    let after = hmac_rows();
    assert_eq!(after.len(), before.len());
    assert!(
        after.iter().all(|r| r.expires_at.is_none()),
        "an expiry was written"
    );
    token::rotate_signing_key(db, &stray, Duration::ZERO).expect_err("a stray key is refused");
    // Claims still get tokens from the instance's own signing key.
    app.running_job();
    // With the right key, sealing works as before.
    credentials::add_secret(db, sealer, "svc", SecretKind::Hmac, None, None).expect("sealed");

    // A revoked row under a key nobody holds does not stop a rewrap.
    let stray_row = stray
        .seal(
            coordinator::auth::model::Purpose::HmacSecret,
            "svc",
            99,
            b"x",
        )
        .expect("seal");
    let now = now_millis();
    let row = coordinator::auth::model::SecretRow {
        caller: "svc".into(),
        purpose: "hmac".into(),
        version: 99,
        ciphertext: stray_row.ciphertext,
        nonce: stray_row.nonce,
        master_key_id: stray_row.key_id,
        created_at: now,
        expires_at: None,
        revoked_at: Some(now),
        last_used_at: None,
    };
    db.write_sync(|conn| repo::insert_secret(conn, &row))
        .expect("insert");
    let done = credentials::rewrap(db, sealer).expect("rewrap runs");
    assert_eq!((done.rows, done.left_inactive), (0, 1));

    // Revoked or disabled twice: refused, and the first time stays.
    let key = credentials::issue_key(db, "svc", None, None).expect("key");
    let first = credentials::revoke_key(db, &key.row.id).expect("revoke");
    let first_at = credentials::list_keys(db, Some("svc")).expect("keys")[0].revoked_at;
    assert!(first_at.is_some());
    std::thread::sleep(Duration::from_millis(5));
    let again = credentials::revoke_key(db, &first.id).expect_err("revoked twice");
    assert!(again.to_string().contains("already revoked"), "{again}");
    assert_eq!(
        credentials::list_keys(db, Some("svc")).expect("keys")[0].revoked_at,
        first_at
    );
    credentials::disable_caller(db, "svc").expect("disable");
    let again = credentials::disable_caller(db, "svc").expect_err("disabled twice");
    assert!(again.to_string().contains("already disabled"), "{again}");
}

/// Review (2026-12-06): two instances starting at once on PostgreSQL could each create
/// a token-signing key (v1 and v2 both active), as each statement of a transaction
/// sees what committed before it. Eight starts at once, twenty times: one key each time.
fn instances_starting_together_make_one_signing_key(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let db = &app.state.db;
    let sealer = app.state.auth.store.sealer();
    let active = || {
        let now = now_millis();
        credentials::list_secrets(db, Some(token::KEY_OWNER))
            .expect("list")
            .iter()
            .filter(|r| r.is_active(now))
            .count()
    };
    for round in 0..20 {
        db.write_sync(|conn| {
            conn.batch_execute(&format!(
                "UPDATE sealed_secrets SET revoked_at = {} WHERE caller = '{}' \
                 AND revoked_at IS NULL",
                now_millis(),
                token::KEY_OWNER
            ))
            .map_err(Into::into)
        })
        .expect("retire");
        assert_eq!(active(), 0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| token::ensure_signing_key(db, sealer).expect("ensure"));
            }
        });
        assert_eq!(active(), 1, "round {round}");
    }
}

/// `serve --dev` with the `dev` caller in the database but its credentials file gone
/// issues new credentials; the lost ones end with it. Before, they stayed active, and
/// the ninth such start failed on the limit of active secret versions.
fn dev_credentials_issued_again_end_the_lost_ones(b: Backend) {
    use coordinator::cli::dev::{ensure_dev_caller, DEV_CALLER};
    let Some(app) = crate::app!(b) else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dev-credentials.env");
    let db = &app.state.db;
    let sealer = app.state.auth.store.sealer();
    // Another caller's credentials, made by an operator: never the dev caller's to end.
    let other_key = app.api_key("ops", &[Scope::HealthRead]);
    let mut last = String::new();
    for start in 0..10 {
        let _ = std::fs::remove_file(&file);
        last = ensure_dev_caller(db, sealer, "http://127.0.0.1:1", &file)
            .unwrap_or_else(|e| panic!("start {start}: {e}"))
            .expect("issued");
    }
    assert!(ensure_dev_caller(db, sealer, "http://127.0.0.1:1", &file)
        .unwrap()
        .is_none());
    let now = now_millis();
    let live = |revoked: Option<i64>, expires: Option<i64>| {
        revoked.is_none() && expires.is_none_or(|t| t > now)
    };
    let secrets = credentials::list_secrets(db, Some(DEV_CALLER)).unwrap();
    for purpose in ["hmac-secret", "webhook-secret"] {
        let active = secrets
            .iter()
            .filter(|s| s.purpose == purpose && live(s.revoked_at, s.expires_at))
            .count();
        assert_eq!(active, 1, "{purpose} versions still active");
    }
    let keys = credentials::list_keys(db, Some(DEV_CALLER)).unwrap();
    let active = keys
        .iter()
        .filter(|k| live(k.revoked_at, k.expires_at))
        .count();
    assert_eq!(active, 1, "API keys still active");
    // The newest key is the one that works.
    let key = last
        .lines()
        .find_map(|l| l.strip_prefix("COORDINATOR_CLIENT_API_KEY="))
        .unwrap();
    let r = app.raw("GET", "/coordinator/health", &[("x-api-key", key)], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.raw(
        "GET",
        "/coordinator/health",
        &[("x-api-key", &other_key)],
        b"",
    );
    assert_eq!(r.status, 200, "another caller's key: {}", r.body);
    let r = app.get("/coordinator/health");
    assert_eq!(r.status, 200, "another caller's HMAC secret: {}", r.body);
}

/// Write `fill` active revocations (`bulk-1` … `bulk-<fill>`, until `exp`) straight
/// into the table, the way other instances' revocations arrive.
fn bulk_revocations(app: &crate::helpers::TestApp, b: Backend, fill: usize, exp: i64) {
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
        .expect("fill the revocation table");
}
