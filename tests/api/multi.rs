//! Several instances sharing one database (review of 2026-12-06, "Multi-instance
//! review" in docs/decisions.md): what one instance decides or revokes holds on the
//! others, whatever their clocks (within the documented 60 s) and however slowly the
//! database commits.

use std::time::Duration;

use crate::backend_tests;
use crate::helpers::{spawn_app_with, Backend};

backend_tests!(a_purge_by_an_instance_whose_clock_is_ahead_keeps_revocations_others_need,);

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
