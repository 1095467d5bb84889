//! Background housekeeping, bounded per pass and safe with several instances sharing a
//! database, in this order: expire job leases (`jobs::upkeep::expire_leases`: back to
//! QUEUED, or FAILED after the last attempt, with that attempt's tokens revoked), purge
//! expired replay records (and on PostgreSQL vacuum their table now and then), on
//! PostgreSQL vacuum `jobs` and `job_events` once changes and trims left enough dead
//! rows, trim throttle state, on SQLite a passive WAL checkpoint (automatic ones are off so no
//! request pays for one; most are the writer's backfill thread's and resets,
//! `db/writer.rs`), (with `COORDINATOR_JOB_RETENTION_DAYS`) delete old finished jobs,
//! and last hand the memory the allocator keeps after it was freed back to the system.
//! (Expired token revocations are purged by the revocation poller.)

use std::time::Duration;

use actix_web::web;

use crate::db::now_millis;
use crate::jobs::upkeep as jobs_upkeep;
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
    /// PostgreSQL: the tables of jobs vacuumed.
    pub vacuumed: Vec<jobs_upkeep::Vacuumed>,
}

/// One pass. Each step runs even when another fails (its error is logged), so a
/// broken step never stops the others.
pub async fn pass(state: &AppState) -> PassReport {
    let mut report = PassReport::default();
    let terms = state.config.terms();
    let now = now_millis();
    match state
        .db
        .write(move |conn| jobs_upkeep::expire_leases(conn, now, LEASES_PER_PASS, terms))
        .await
    {
        Ok(sweep) => {
            for row in &sweep.expired {
                state.notifier.row_changed(row);
                state.metrics.transition(row.status());
                state.auth.revocations.job_changed(row, now);
            }
            report.leases_expired = sweep.expired.len();
            if let Some(e) = sweep.stopped_by {
                // The sweep answered `Ok` to keep the jobs it moved, so the pool did not
                // see the error: a lost connection trips the health state here (the
                // connection is then checked before its next use, as after any trip).
                if e.is_connection_loss() {
                    state
                        .db
                        .health()
                        .trip(None, &format!("connection lost: {e}"));
                }
                log::warn!(
                    "housekeeping: lease expiry stopped after {} jobs: {e}",
                    sweep.expired.len()
                );
            }
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
    // PostgreSQL: the old versions of changed jobs and the events the trims delete
    // (`COORDINATOR_EVENTS_PER_JOB`) are reclaimed here, whether or not autovacuum runs.
    for what in jobs_upkeep::Vacuumed::ALL {
        match state
            .db
            .read(move |c| jobs_upkeep::vacuum_if_due(c, what))
            .await
        {
            Ok(true) => report.vacuumed.push(what),
            Ok(false) => {}
            Err(e) => log::info!("housekeeping: {} vacuum skipped: {e}", what.table()),
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
            .write(move |conn| jobs_upkeep::purge_finished(conn, before, JOBS_PER_PASS))
            .await
        {
            Ok(n) => report.jobs_deleted = n,
            Err(e) => log::warn!("housekeeping: retention failed: {e}"),
        }
    }
    // On a blocking thread: the walk takes each arena's lock in turn, and the event
    // loop this pass runs on serves requests.
    if let Err(e) = actix_web::rt::task::spawn_blocking(release_freed_memory).await {
        log::warn!("housekeeping: allocator trim failed: {e}");
    }
    report
}

/// Gives the system back the pages glibc's allocator holds free (`malloc_trim(0)`);
/// `true` when it released any. glibc returns freed memory by itself only from the top
/// of an arena, so a live allocation above a run of freed ones (the purge's transient
/// allocations, SQLite's statement journals, request buffers) keeps their pages
/// resident: the SQLite soak's RSS grew ~3 MiB over ten minutes with a flat live heap,
/// and one call gave 2.3 MiB of it back (docs/decisions.md, "The allocator's free pages
/// go back every pass"). Elsewhere (musl, other systems) it does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code, reason = "glibc's malloc_trim has no safe wrapper")]
fn release_freed_memory() -> bool {
    // SAFETY: `malloc_trim` takes no pointers and touches only the allocator's own free
    // lists, under each arena's lock; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() -> bool {
    false
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

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's anonymous resident memory, KiB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("RssAnon")
    }

    /// 32 MiB freed below a live chunk stays resident (glibc keeps it), and the call
    /// gives it back and says so (the trim exists only with glibc).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_below_a_live_allocation_is_given_back() {
        let (held, released, after) = std::thread::spawn(|| {
            let chunks: Vec<Vec<u8>> = (0..16_384u32)
                .map(|i| vec![u8::try_from(i % 251).unwrap_or(0); 2048])
                .collect();
            let keep = vec![1u8; 2048];
            drop(chunks);
            let held = rss_anon_kib();
            let released = release_freed_memory();
            let after = rss_anon_kib();
            drop(keep);
            (held, released, after)
        })
        .join()
        .expect("thread");
        assert!(released, "nothing given back");
        assert!(
            held.saturating_sub(after) >= 16 * 1024,
            "resident {held} KiB before the trim, {after} KiB after"
        );
    }
}
