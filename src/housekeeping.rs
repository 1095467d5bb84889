//! Background housekeeping, bounded per pass and safe with several instances sharing a
//! database: expire job leases, purge expired replay records, trim throttle state, and
//! (with `COORDINATOR_JOB_RETENTION_DAYS`) delete old finished jobs; on SQLite, a passive
//! WAL checkpoint (automatic ones are off so no request pays for one).
//! (Expired token revocations are purged by the revocation poller.)

use std::time::Duration;

use actix_web::web;

use crate::db::now_millis;
use crate::jobs::repo as jobs_repo;
use crate::state::AppState;

const LEASES_PER_PASS: i64 = 100;
/// Expired replay records deleted per write, and writes per pass at most (with the
/// default 5 s pass: up to 80,000 records a second, several times what one instance
/// records). On PostgreSQL a chunk's deletes touch primary-key pages all over the table
/// (signatures are random), so chunks stay small; on SQLite the table is keyed by the
/// signed time and a chunk is a range at the start of it (plus the rest of its last
/// second).
const REPLAY_CHUNK: i64 = 1_000;
const REPLAY_CHUNKS_PER_PASS: usize = 400;
const JOBS_PER_PASS: i64 = 1_000;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub leases_expired: usize,
    pub replays_purged: usize,
    pub jobs_deleted: usize,
}

/// One pass. Each step runs even when another fails (its error is logged), so a
/// broken step never stops the others.
pub async fn pass(state: &AppState) -> PassReport {
    let mut report = PassReport::default();
    let lease_ms = state.config.lease_ms();
    let now = now_millis();
    match state
        .db
        .write(move |conn| jobs_repo::expire_leases(conn, now, LEASES_PER_PASS, lease_ms))
        .await
    {
        Ok(expired) => {
            for row in &expired {
                state.notifier.row_changed(row);
                state.metrics.transition(row.status());
                state.auth.revocations.job_changed(row, now);
            }
            report.leases_expired = expired.len();
        }
        Err(e) => log::warn!("housekeeping: lease expiry failed: {e}"),
    }
    // In small chunks, each its own write: a request queued behind the purge waits for
    // one chunk, never for the whole backlog, and the WAL grows by one chunk at a time.
    // Up to REPLAY_CHUNKS_PER_PASS chunks a pass keeps up with far more signed requests
    // per second than one instance serves.
    let window = crate::auth::hmac::record_window_secs(state.config.signature_skew_secs);
    let purge =
        move |conn: &mut _| crate::db::replay::purge_replays(conn, now, window, REPLAY_CHUNK);
    for _ in 0..REPLAY_CHUNKS_PER_PASS {
        // SQLite: while checkpoints lag (readers hold the WAL), the purge waits for a
        // later pass rather than push the WAL past its bound. Expired records refuse
        // nothing; they only take space until then.
        if state.db.wal_backlogged() {
            break;
        }
        match state.db.write(purge).await {
            Ok(n) => {
                report.replays_purged += n;
                if i64::try_from(n).unwrap_or(i64::MAX) < REPLAY_CHUNK {
                    break;
                }
            }
            Err(e) => {
                log::warn!("housekeeping: replay purge failed: {e}");
                break;
            }
        }
    }
    if state.db.replay_vacuum_due(report.replays_purged) {
        if let Err(e) = state.db.read(crate::db::replay::vacuum_replays).await {
            log::info!("housekeeping: replay table vacuum skipped: {e}");
        }
    }
    state.auth.throttle.housekeeping();
    if let Err(e) = state.db.checkpoint().await {
        log::warn!("housekeeping: WAL checkpoint failed: {e}");
    }
    if let Some(keep) = state.config.job_retention {
        let before = now.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
        match state
            .db
            .write(move |conn| jobs_repo::purge_finished(conn, before, JOBS_PER_PASS))
            .await
        {
            Ok(n) => report.jobs_deleted = n,
            Err(e) => log::warn!("housekeeping: retention failed: {e}"),
        }
    }
    report
}

pub async fn run(state: web::Data<AppState>, every: Duration) {
    let mut tick = actix_web::rt::time::interval(every);
    loop {
        tick.tick().await;
        let r = pass(&state).await;
        if r != PassReport::default() {
            log::info!(
                "housekeeping: {} lease(s) expired, {} replay record(s) purged, {} finished job(s) deleted",
                r.leases_expired,
                r.replays_purged,
                r.jobs_deleted
            );
        }
    }
}
