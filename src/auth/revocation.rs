//! The set of revoked job-token ids, held in memory so the common case costs no
//! database round trip. Loaded at start, kept current by an incremental poll every
//! 200 ms (on every instance) and at once on the instance that revokes. When the set is
//! not known to be current (no successful poll for `MAX_STALENESS`), each check asks
//! the database; if that fails too, the request fails closed (503).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::repo;
use crate::db::{now_millis, Db};
use crate::error::StoreError;

pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Past this without a successful poll, each check asks the database instead (so a
/// slow or failing poll can never stretch the 1 s promise).
pub const MAX_STALENESS: Duration = Duration::from_secs(1);
/// Rows written up to this long before the newest one seen are read again each poll,
/// so a revocation whose (short) transaction committed after a later one is not missed.
const OVERLAP_MS: i64 = 1_000;
/// Clock difference tolerated between the instance that revokes and the one polling.
const CLOCK_SKEW_MS: i64 = 5_000;
/// A full reload this often catches anything the incremental poll could not.
const FULL_RELOAD: Duration = Duration::from_secs(600);
/// Expired rows are removed from the table at most this often, bounded per pass.
const GC_EVERY: Duration = Duration::from_secs(300);
const GC_BATCH: i64 = 10_000;

/// The token id under which all tokens of a job are revoked when the job ends.
pub fn job_key(job_id: &str) -> String {
    format!("job:{job_id}")
}

/// The id under which the tokens of one attempt of a job are revoked when that
/// attempt ends without finishing the job (requeue, lease expiry).
pub fn attempt_key(job_id: &str, attempt: i32) -> String {
    format!("job:{job_id}:{attempt}")
}

struct Sync {
    cursor: i64,
    synced_at: Option<Instant>,
    full_at: Option<Instant>,
    gc_at: Instant,
}

pub struct Revocations {
    db: Db,
    set: RwLock<HashMap<String, i64>>,
    sync: Mutex<Sync>,
}

fn poisoned() -> StoreError {
    StoreError::Internal("revocation lock poisoned".into())
}

impl Revocations {
    pub fn new(db: Db) -> Self {
        Revocations {
            db,
            set: RwLock::new(HashMap::new()),
            sync: Mutex::new(Sync {
                cursor: 0,
                synced_at: None,
                full_at: None,
                gc_at: Instant::now(),
            }),
        }
    }

    /// Number of revoked ids held (for metrics).
    pub fn len(&self) -> usize {
        self.set.read().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record a revocation made by this instance (effective at once here).
    pub fn revoke_local(&self, jti: &str, expires_at: i64) {
        if let Ok(mut s) = self.set.write() {
            let e = s.entry(jti.to_owned()).or_insert(expires_at);
            *e = (*e).max(expires_at);
        }
    }

    /// Revoke in the database and locally.
    pub async fn revoke(&self, jti: String, expires_at: i64) -> Result<(), StoreError> {
        let id = jti.clone();
        self.db
            .write(move |conn| repo::revoke_token(conn, &id, expires_at, now_millis()))
            .await?;
        self.revoke_local(&jti, expires_at);
        Ok(())
    }

    fn fresh(&self) -> bool {
        self.sync
            .lock()
            .ok()
            .and_then(|s| s.synced_at)
            .is_some_and(|t| t.elapsed() < MAX_STALENESS)
    }

    /// Is this token (or its job) revoked? Errors mean the state cannot be known.
    pub async fn is_revoked(
        &self,
        jti: &str,
        job_id: &str,
        attempt: i32,
    ) -> Result<bool, StoreError> {
        let now = now_millis();
        let jk = job_key(job_id);
        let ak = attempt_key(job_id, attempt);
        if self.fresh() {
            let s = self.set.read().map_err(|_| poisoned())?;
            let hit = |k: &str| s.get(k).is_some_and(|e| *e > now);
            return Ok(hit(jti) || hit(&jk) || hit(&ak));
        }
        let jti = jti.to_owned();
        self.db
            .read(move |conn| {
                repo::any_revoked(conn, &[jti.as_str(), jk.as_str(), ak.as_str()], now)
            })
            .await
    }

    /// One poll: incremental (or full, once a minute), dropping expired entries, and
    /// the occasional bounded purge of the table.
    pub async fn poll(&self) -> Result<(), StoreError> {
        let (cursor, full, gc) = {
            let s = self.sync.lock().map_err(|_| poisoned())?;
            (
                s.cursor,
                s.full_at.is_none_or(|t| t.elapsed() >= FULL_RELOAD),
                s.gc_at.elapsed() >= GC_EVERY,
            )
        };
        let now = now_millis();
        let rows = if full {
            self.db
                .read(move |conn| repo::revoked_active(conn, now))
                .await?
        } else {
            let since = cursor.saturating_sub(OVERLAP_MS);
            self.db
                .read(move |conn| repo::revoked_since(conn, since))
                .await?
        };
        let newest = rows.iter().map(|r| r.2).max().unwrap_or(cursor);
        {
            let mut set = self.set.write().map_err(|_| poisoned())?;
            if full {
                set.retain(|_, e| *e > now);
            }
            for (jti, exp, _) in rows {
                let e = set.entry(jti).or_insert(exp);
                *e = (*e).max(exp);
            }
        }
        if gc {
            let purged = self
                .db
                .write(move |conn| repo::purge_revoked(conn, now, GC_BATCH))
                .await?;
            if purged > 0 {
                log::info!("purged {purged} expired token revocations");
            }
        }
        let mut s = self.sync.lock().map_err(|_| poisoned())?;
        // The cursor also moves with time (less the clock skew allowed between
        // instances), so a burst of rows sharing one timestamp is re-read only for a few
        // seconds, not on every poll until a newer revocation arrives.
        s.cursor = s.cursor.max(newest).max(now.saturating_sub(CLOCK_SKEW_MS));
        s.synced_at = Some(Instant::now());
        if full {
            s.full_at = Some(Instant::now());
        }
        if gc {
            s.gc_at = Instant::now();
        }
        Ok(())
    }

    pub async fn run_poller(self: Arc<Self>) {
        let mut tick = actix_web::rt::time::interval(POLL_INTERVAL);
        loop {
            tick.tick().await;
            if let Err(e) = self.poll().await {
                log::warn!("revocation poll failed: {e}");
            }
        }
    }
}
