//! Races on one job and one queue: every state change decided once, whoever sends it
//! and on whichever instance; nothing acknowledged is lost or written twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{Backend, Resp, TestApp};
use crate::{backend_tests, postgres_tests};

backend_tests!(
    racing_ends_of_a_running_job_decide_once,
    concurrent_claims_hand_out_each_due_job_once,
    a_finished_job_keeps_its_result_and_is_redriven_once,
    a_requeued_attempts_token_is_refused_alike_on_every_instance,
);
postgres_tests!(
    idempotent_creates_raced_on_two_instances_answer_alike,
    the_retention_purge_never_deletes_a_job_redriven_under_it,
);

/// One request of a race, sent when the race starts.
type Racer<'a> = Box<dyn Fn() -> Resp + Sync + 'a>;

/// Create a job and move it to QUEUED.
fn queued_job(app: &TestApp, body: &Value) -> String {
    let id = app.create_job(body);
    let r = app.patch_json(
        &format!("/coordinator/jobs/{id}/status"),
        &json!({"status": "QUEUED"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    id
}

fn job(app: &TestApp, id: &str) -> Value {
    let r = app.get(&format!("/coordinator/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The events of a job read as one consistent history ending in its row: `seq` runs
/// 1, 2, … without a hole, each status move starts where the one before ended, and
/// the last one ends in the row's status.
fn assert_history(j: &Value) {
    let events = j["events"].as_array().expect("events");
    let mut status = Value::Null;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], json!(i + 1), "{events:#?}");
        let d = &e["data"];
        if e["type"] == "progress" {
            assert_eq!(status, "RUNNING", "progress outside RUNNING: {events:#?}");
            continue;
        }
        assert_eq!(d["from"], status, "a move from elsewhere: {events:#?}");
        status = d["to"].clone();
    }
    assert_eq!(status, j["status"], "history ends elsewhere: {events:#?}");
}

/// Cancel, complete, fail, fail-and-retry, hand back, heartbeat, progress and the lease
/// sweep, all at once on one RUNNING job whose lease has just run out: one of the moves
/// wins, each of the others is refused (409, or 401 for a token whose attempt ended),
/// never a 5xx, and the row, its events and its tokens all tell the same story.
fn racing_ends_of_a_running_job_decide_once(b: Backend) {
    let Some(app) = crate::helpers::spawn_app_with(b, |c| {
        // Every lease has run out by the time the racers start (a heartbeat or a
        // progress report renews it by a millisecond); the sweep is the test's own
        // (housekeeping's first pass aside).
        c.lease = Duration::from_millis(1);
        c.housekeeping_interval = Duration::from_secs(3600);
    }) else {
        return;
    };
    let app = &app;
    let terms = app.state.config.terms();
    for round in 0..6 {
        let id = queued_job(
            app,
            &json!({"kind": "k", "queue": "race", "maxAttempts": 2,
                    "retryBackoff": {"baseMs": 3_600_000, "capMs": 3_600_000}}),
        );
        let r = app.post_json("/coordinator/queues/race/claim", &json!({"worker": "w"}));
        assert_eq!(r.status, 200, "{}", r.body);
        let token = r.json()["token"].as_str().expect("token").to_owned();
        let token = token.as_str();
        let id = id.as_str();
        let racers: Vec<(&str, Racer<'_>)> = vec![
            (
                "cancel",
                Box::new(move || {
                    app.post_json(
                        &format!("/coordinator/jobs/{id}/cancel"),
                        &json!({"reason": "r"}),
                    )
                }),
            ),
            (
                "complete",
                Box::new(move || {
                    app.with_token(
                        token,
                        "POST",
                        &format!("/coordinator/jobs/{id}/complete"),
                        json!({"result": {"round": round}}).to_string().as_bytes(),
                    )
                }),
            ),
            (
                "fail",
                Box::new(move || {
                    app.with_token(
                        token,
                        "POST",
                        &format!("/coordinator/jobs/{id}/fail"),
                        br#"{"error":"boom"}"#,
                    )
                }),
            ),
            (
                "retry",
                Box::new(move || {
                    app.with_token(
                        token,
                        "POST",
                        &format!("/coordinator/jobs/{id}/fail"),
                        br#"{"error":"again","retryable":true}"#,
                    )
                }),
            ),
            (
                "handback",
                Box::new(move || {
                    app.with_token(
                        token,
                        "PATCH",
                        &format!("/coordinator/jobs/{id}/status"),
                        br#"{"status":"QUEUED"}"#,
                    )
                }),
            ),
            (
                "heartbeat",
                Box::new(move || {
                    app.with_token(
                        token,
                        "POST",
                        &format!("/coordinator/jobs/{id}/heartbeat"),
                        b"",
                    )
                }),
            ),
            (
                "progress",
                Box::new(move || {
                    app.with_token(
                        token,
                        "PATCH",
                        &format!("/coordinator/jobs/{id}/progress"),
                        br#"{"percent":50}"#,
                    )
                }),
            ),
        ];
        let barrier = Barrier::new(racers.len() + 1);
        let (answers, swept) = std::thread::scope(|s| {
            let hs: Vec<_> = racers
                .iter()
                .map(|(name, f)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        (*name, f())
                    })
                })
                .collect();
            let sweep = s.spawn(|| {
                barrier.wait();
                app.state.db.write_sync(|conn| {
                    coordinator::jobs::upkeep::expire_leases(
                        conn,
                        coordinator::db::now_millis(),
                        100,
                        terms,
                    )
                })
            });
            let answers: HashMap<&str, Resp> =
                hs.into_iter().map(|h| h.join().expect("racer")).collect();
            (answers, sweep.join().expect("sweep"))
        });
        let swept = swept.expect("lease sweep").expired.len();
        for (name, r) in &answers {
            assert!(
                matches!(r.status, 200 | 401 | 409),
                "round {round}: {name} answered {}: {}",
                r.status,
                r.body
            );
        }
        let ok = |name: &str| answers[name].status == 200;
        let j = job(app, id);
        assert_history(&j);
        let moves = ["cancel", "complete", "fail", "retry", "handback"]
            .into_iter()
            .filter(|m| ok(m))
            .count();
        // The first move out of RUNNING wins; only a cancel can follow it (the job is
        // QUEUED again after a sweep, a retry or a hand back, which a cancel may end).
        let events: Vec<&str> = j["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["type"] != "progress")
            .map(|e| e["type"].as_str().expect("type"))
            .collect();
        let after_claim = &events[3..];
        assert!(
            (1..=2).contains(&after_claim.len()),
            "round {round}: {events:?}"
        );
        // The sweep's, or housekeeping's (its first pass runs as the app starts).
        let expired = after_claim
            .iter()
            .filter(|e| **e == "lease_expired")
            .count();
        assert!(swept <= expired, "round {round}: {events:?}");
        assert_eq!(
            moves + expired,
            after_claim.len(),
            "round {round}: every acknowledged move is in the history once: {events:?} {:?}",
            answers
                .iter()
                .map(|(n, r)| (n, r.status))
                .collect::<Vec<_>>()
        );
        if after_claim.len() == 2 {
            assert_eq!(after_claim[1], "cancelled", "round {round}: {events:?}");
            assert!(ok("cancel"));
        }
        match j["status"].as_str().expect("status") {
            "COMPLETED" => {
                assert!(ok("complete"));
                assert_eq!(j["result"], json!({"round": round}));
                assert!(j["error"].is_null());
            }
            "FAILED" => {
                assert!(ok("fail"), "{j:#}");
                assert_eq!(j["error"], "boom");
                assert!(j["result"].is_null());
            }
            "CANCELLED" => assert!(ok("cancel")),
            "QUEUED" => assert!(ok("retry") || ok("handback") || expired == 1, "{j:#}"),
            s => panic!("round {round}: the job ended {s}"),
        }
        // The worker's token is done with, whatever won: no write of it lands.
        let r = app.with_token(
            token,
            "PATCH",
            &format!("/coordinator/jobs/{id}/progress"),
            br#"{"percent":60}"#,
        );
        assert!(matches!(r.status, 401 | 409), "{}: {}", r.status, r.body);
        assert_eq!(job(app, id)["events"], j["events"]);
        // Clear the queue for the next round.
        if j["status"] == "QUEUED" {
            let r = app.post_json(&format!("/coordinator/jobs/{id}/cancel"), &json!({}));
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
}

/// Several claimers, on one instance and (PostgreSQL) on two, drain a queue of due and
/// scheduled jobs: each due job is claimed exactly once, on its first attempt, and no
/// scheduled one early.
fn concurrent_claims_hand_out_each_due_job_once(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let second = (b == Backend::Postgres).then(|| app.sibling());
    let apps: Vec<&TestApp> = std::iter::once(&app).chain(second.as_ref()).collect();
    let later = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut due = HashSet::new();
    for i in 0..24 {
        due.insert(queued_job(
            &app,
            &json!({"kind": "k", "queue": "cc", "priority": i % 3}),
        ));
    }
    let scheduled: HashSet<String> = (0..4)
        .map(|_| queued_job(&app, &json!({"kind": "k", "queue": "cc", "runAt": later})))
        .collect();
    let claimed = Mutex::new(Vec::new());
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for t in 0..8 {
            let app = apps[t % apps.len()];
            let (claimed, barrier) = (&claimed, &barrier);
            s.spawn(move || {
                barrier.wait();
                loop {
                    let r = app.post_json(
                        "/coordinator/queues/cc/claim",
                        &json!({"worker": format!("w{t}")}),
                    );
                    match r.status {
                        200 => claimed.lock().expect("claimed").push(r.json()),
                        204 => break,
                        s => panic!("claim answered {s}: {}", r.body),
                    }
                }
            });
        }
    });
    let claimed = claimed.into_inner().expect("claimed");
    let ids: Vec<&str> = claimed
        .iter()
        .map(|j| j["id"].as_str().expect("id"))
        .collect();
    let distinct: HashSet<String> = ids.iter().map(|i| (*i).to_owned()).collect();
    assert_eq!(ids.len(), distinct.len(), "a job claimed twice: {ids:?}");
    assert_eq!(distinct, due, "every due job, and no scheduled one");
    assert!(claimed.iter().all(|j| j["attempts"] == 1), "{claimed:#?}");
    for id in &scheduled {
        let j = job(&app, id);
        assert_eq!(
            (j["status"].as_str(), j["attempts"].as_i64()),
            (Some("QUEUED"), Some(0))
        );
    }
    for id in &due {
        let j = job(&app, id);
        assert_eq!(j["status"], "RUNNING");
        assert_eq!(j["attempts"], 1);
        assert_history(&j);
    }
}

/// A COMPLETED job's result cannot be changed by anyone, on any route, even by many
/// at once; a FAILED job redriven by several operators at once is redriven once.
fn a_finished_job_keeps_its_result_and_is_redriven_once(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let app = &app;
    let claim = |queue: &str| {
        let r = app.post_json(
            &format!("/coordinator/queues/{queue}/claim"),
            &json!({"worker": "w"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let id = queued_job(app, &json!({"kind": "k", "queue": "done"}));
    let token = claim("done")["token"].as_str().expect("token").to_owned();
    let r = app.post_json(
        &format!("/coordinator/jobs/{id}/complete"),
        &json!({"result": {"v": 1}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let before = job(app, &id);
    let id = id.as_str();
    let token = token.as_str();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|i| {
                s.spawn(move || {
                    let path = |what: &str| format!("/coordinator/jobs/{id}/{what}");
                    let (status, r) = match i % 6 {
                        0 => (
                            409,
                            app.post_json(&path("complete"), &json!({"result": {"v": i}})),
                        ),
                        1 => (409, app.post_json(&path("fail"), &json!({"error": "e"}))),
                        2 => (
                            409,
                            app.patch_json(&path("status"), &json!({"status": "FAILED"})),
                        ),
                        3 => (409, app.request("POST", &path("retry"), &[], b"")),
                        4 => (
                            401,
                            app.with_token(
                                token,
                                "POST",
                                &path("complete"),
                                json!({"result": {"v": i}}).to_string().as_bytes(),
                            ),
                        ),
                        _ => (
                            409,
                            app.patch_json(&path("progress"), &json!({"percent": 3})),
                        ),
                    };
                    assert_eq!(r.status, status, "{i}: {}", r.body);
                })
            })
            .collect();
        for h in hs {
            h.join().expect("writer");
        }
    });
    assert_eq!(job(app, id), before, "a finished job never changes");

    // Redrives of a FAILED job, all at once: one wins, with one new budget.
    let dead = queued_job(
        app,
        &json!({"kind": "k", "queue": "dead", "maxAttempts": 2}),
    );
    claim("dead");
    let r = app.post_json(
        &format!("/coordinator/jobs/{dead}/fail"),
        &json!({"error": "x"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let dead = dead.as_str();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(move || {
                    app.request("POST", &format!("/coordinator/jobs/{dead}/retry"), &[], b"")
                        .status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("retry")).collect()
    });
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 409, 409, 409, 409, 409], "{statuses:?}");
    let j = job(app, dead);
    assert_eq!(j["status"], "QUEUED");
    assert_eq!(
        (j["attempts"].as_i64(), j["maxAttempts"].as_i64()),
        (Some(1), Some(3))
    );
    assert!(j["error"].is_null() && j["result"].is_null());
    assert_history(&j);
}

/// The same `Idempotency-Key`, sent by one caller to two instances at once, makes one
/// job, and every answer to the same body is the same document; the other body is a
/// 409 whichever body won.
fn idempotent_creates_raced_on_two_instances_answer_alike(b: Backend) {
    let Some(app) = crate::app!(b) else { return };
    let second = app.sibling();
    let apps = [&app, &second];
    for round in 0..4 {
        let key = format!("race-{round}");
        let bodies = [
            json!({"kind": "a", "payload": {"n": round}}).to_string(),
            json!({"kind": "b"}).to_string(),
        ];
        let barrier = Barrier::new(8);
        let answers: Vec<(usize, Resp)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|t| {
                    let (app, key, body, barrier) =
                        (apps[t % 2], &key, &bodies[(t / 2) % 2], &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let r = app.request(
                            "POST",
                            "/coordinator/jobs",
                            &[
                                ("Idempotency-Key", key.as_str()),
                                ("content-type", "application/json"),
                            ],
                            body.as_bytes(),
                        );
                        ((t / 2) % 2, r)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("create")).collect()
        });
        let won: HashSet<usize> = answers
            .iter()
            .filter(|(_, r)| r.status == 201)
            .map(|(b, _)| *b)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {answers:#?}");
        let winner = *won.iter().next().expect("winner");
        let docs: Vec<Value> = answers
            .iter()
            .filter(|(b, _)| *b == winner)
            .map(|(_, r)| {
                assert_eq!(r.status, 201, "{}", r.body);
                r.json()
            })
            .collect();
        assert!(
            docs.iter().all(|d| d == &docs[0]),
            "round {round}: {docs:#?}"
        );
        let fresh = answers
            .iter()
            .filter(|(_, r)| r.status == 201 && r.header("Idempotent-Replayed").is_none())
            .count();
        assert_eq!(fresh, 1, "round {round}: one create, the rest replays");
        for (_, r) in answers.iter().filter(|(b, _)| *b != winner) {
            r.problem(409);
        }
        let id = docs[0]["id"].as_str().expect("id");
        assert_eq!(job(&second, id)["events"].as_array().map(Vec::len), Some(1));
    }
}

/// The retention purge picks old finished jobs, then deletes them; a redrive that
/// lands between the two (acknowledged: the job is QUEUED again) must not be deleted
/// with them. PostgreSQL only: on SQLite both are writes of the one writer. A lock on
/// the job's events (held by the test) stops the purge after its pick, where the
/// redrive is sent.
fn the_retention_purge_never_deletes_a_job_redriven_under_it(b: Backend) {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let Some(app) = crate::app!(b) else { return };
    let app = &app;
    let id = queued_job(app, &json!({"kind": "k", "queue": "old"}));
    let r = app.post_json("/coordinator/queues/old/claim", &json!({"worker": "w"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.post_json(
        &format!("/coordinator/jobs/{id}/fail"),
        &json!({"error": "e"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let mut holder = diesel::PgConnection::establish(&app.db.url).expect("connect");
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM job_events WHERE job_id = '{id}' FOR UPDATE"
        ))
        .expect("lock the events");
    let id = id.as_str();
    let (purged, redrive) = std::thread::scope(|s| {
        let purge = s.spawn(|| {
            // Every job finished before an hour from now is old enough.
            let before = coordinator::db::now_millis() + 3_600_000;
            app.state.db.write_sync(move |conn| {
                coordinator::jobs::upkeep::purge_finished(conn, before, 100)
            })
        });
        std::thread::sleep(Duration::from_millis(400));
        let redrive =
            s.spawn(|| app.request("POST", &format!("/coordinator/jobs/{id}/retry"), &[], b""));
        std::thread::sleep(Duration::from_millis(400));
        holder.batch_execute("COMMIT").expect("release");
        (
            purge.join().expect("purge").expect("purge ran"),
            redrive.join().expect("redrive"),
        )
    });
    let now = app.get(&format!("/coordinator/jobs/{id}"));
    match redrive.status {
        // The redrive was acknowledged: the job is QUEUED, with its history.
        200 => {
            assert_eq!(
                now.status, 200,
                "an acknowledged redrive was deleted: {}",
                now.body
            );
            let j = now.json();
            assert_eq!(j["status"], "QUEUED");
            assert_history(&j);
            assert_eq!(purged, 0);
        }
        // The purge went first: the job is gone, and the redrive said so.
        404 => {
            assert_eq!(now.status, 404, "{}", now.body);
            assert_eq!(purged, 1);
        }
        s => panic!("redrive answered {s}: {}", redrive.body),
    }
}

/// Once an attempt has gone back to QUEUED (a retryable failure, a hand back, a lease
/// run out) and before the next claim, its token is refused 401 `revoked` on every
/// instance: on the one that requeued it by the revocation, and on one that has not
/// seen the revocation yet (within a second) by the write itself, not with a 409.
fn a_requeued_attempts_token_is_refused_alike_on_every_instance(b: Backend) {
    let Some(a) = crate::app!(b) else { return };
    let other = a.sibling();
    for (round, requeue) in [
        r#"{"error":"e","retryable":true}"#,
        r#"{"status":"QUEUED"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let queue = format!("requeued{round}");
        let id = queued_job(
            &a,
            &json!({"kind": "k", "queue": queue,
                    "retryBackoff": {"baseMs": 3_600_000, "capMs": 3_600_000}}),
        );
        let r = a.post_json(
            &format!("/coordinator/queues/{queue}/claim"),
            &json!({"worker": "w"}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let token = r.json()["token"].as_str().expect("token").to_owned();
        let path = format!("/coordinator/jobs/{id}");
        let (method, route) = if round == 0 {
            ("POST", "/fail")
        } else {
            ("PATCH", "/status")
        };
        let r = a.with_token(
            &token,
            method,
            &format!("{path}{route}"),
            requeue.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["status"], "QUEUED");
        for (method, route, body) in [
            ("PATCH", "/progress", r#"{"percent":60}"#),
            ("POST", "/heartbeat", "{}"),
            ("POST", "/complete", r#"{"result":{"by":"old"}}"#),
            ("PATCH", "/status", r#"{"status":"QUEUED"}"#),
        ] {
            for app in [&other, &a] {
                let r = app.with_token(&token, method, &format!("{path}{route}"), body.as_bytes());
                assert_eq!(r.problem(401)["reason"], "revoked", "{route}: {}", r.body);
            }
        }
        assert_eq!(job(&a, &id)["status"], "QUEUED");
    }
}
