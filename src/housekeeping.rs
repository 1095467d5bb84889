//! Background housekeeping, bounded per pass and safe with several instances sharing a
//! database: expire job leases, purge expired replay records, trim throttle state, and
//! (with `COORDINATOR_JOB_RETENTION_DAYS`) delete old finished jobs.
//! (Expired token revocations are purged by the revocation poller.)

use std::time::Duration;

use actix_web::web;

use crate::auth::repo as auth_repo;
use crate::db::now_millis;
use crate::jobs::repo as jobs_repo;
use crate::startup::AppState;

const LEASES_PER_PASS: i64 = 100;
const REPLAYS_PER_PASS: i64 = 10_000;
const JOBS_PER_PASS: i64 = 1_000;

/// One pass; returns (leases expired, replay records purged).
pub async fn pass(state: &AppState) -> Result<(usize, usize), crate::error::StoreError> {
    let lease_ms = state.config.lease_ms();
    let now = now_millis();
    let expired = state
        .db
        .write(move |conn| jobs_repo::expire_leases(conn, now, LEASES_PER_PASS, lease_ms))
        .await?;
    for row in &expired {
        state.metrics.transition(row.status());
        if let Some((key, until)) = jobs_repo::ended_job_tokens(row, now) {
            state.auth.revocations.revoke_local(&key, until);
        }
    }
    let purged = state
        .db
        .write(move |conn| auth_repo::purge_replays(conn, now, REPLAYS_PER_PASS))
        .await?;
    state.auth.throttle.housekeeping();
    if let Some(keep) = state.config.job_retention {
        let before = now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        let gone = state
            .db
            .write(move |conn| jobs_repo::purge_finished(conn, before, JOBS_PER_PASS))
            .await?;
        if gone > 0 {
            log::info!("retention: deleted {gone} finished job(s)");
        }
    }
    Ok((expired.len(), purged))
}

pub async fn run(state: web::Data<AppState>, every: Duration) {
    let mut tick = actix_web::rt::time::interval(every);
    loop {
        tick.tick().await;
        match pass(&state).await {
            Ok((0, 0)) => {}
            Ok((leases, replays)) => {
                log::info!(
                    "housekeeping: {leases} lease(s) expired, {replays} replay record(s) purged"
                )
            }
            Err(e) => log::warn!("housekeeping failed: {e}"),
        }
    }
}
