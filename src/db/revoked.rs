//! The `revoked_tokens` table: job-token ids refused until their expiry. Written by the
//! admin route and the CLI, and by job transitions in the same transaction as the
//! change that ends an attempt or a job; read by the revocation poller
//! (`auth::revocation`, the in-memory set every instance keeps).

use diesel::prelude::*;

use super::schema::revoked_tokens;
use super::DbConnection;
use crate::error::StoreError;

/// The job-wide id, `job:<id>`: a row under it refuses every token of the job. No job
/// change writes it any more (a job's end revokes its last attempt's id,
/// [`attempt_key`], so a redriven job's new tokens work); it is still checked, for a
/// revocation made by hand (`token revoke job:<id>`) or written by an older release.
pub fn job_key(job_id: &str) -> String {
    format!("job:{job_id}")
}

/// The id under which the tokens of one attempt of a job are revoked when that
/// attempt ends: a requeue or lease expiry, the job's end (its last attempt), and
/// attempt 0 (tokens issued before any claim) when the first attempt starts; see
/// `jobs::repo::token_revocation`.
pub fn attempt_key(job_id: &str, attempt: i32) -> String {
    format!("job:{job_id}:{attempt}")
}

/// Revoke a token id; revoking twice keeps the later expiry. A revocation whose expiry
/// moves is deleted and inserted again, so it gets a new `seq` from the database and
/// every instance's incremental poll sees it again. `now` is only recorded
/// (`revoked_at`, for operators): no instance orders or filters by it.
///
/// The common case, an id not revoked yet (every attempt's end), is one statement that
/// inserts unless the id is there (no savepoint, no read first: on PostgreSQL three
/// round trips fewer in every completion); only an id already revoked takes the
/// transaction below.
pub fn revoke_token(
    conn: &mut DbConnection,
    jti: &str,
    expires_at: i64,
    now: i64,
) -> Result<(), StoreError> {
    let inserted = super::on_backend!(conn, |c| diesel::insert_into(revoked_tokens::table)
        .values((
            revoked_tokens::jti.eq(jti),
            revoked_tokens::expires_at.eq(expires_at),
            revoked_tokens::revoked_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))?;
    if inserted == 1 {
        return Ok(());
    }
    let mut tries = 0;
    loop {
        let r: Result<(), StoreError> = conn.transaction(|conn| {
            let existing: Option<i64> = revoked_tokens::table
                .find(jti)
                .select(revoked_tokens::expires_at)
                .first(conn)
                .optional()?;
            match existing {
                Some(e) if e >= expires_at => return Ok(()),
                Some(_) => {
                    diesel::delete(revoked_tokens::table.find(jti)).execute(conn)?;
                }
                None => {}
            }
            diesel::insert_into(revoked_tokens::table)
                .values((
                    revoked_tokens::jti.eq(jti),
                    revoked_tokens::expires_at.eq(expires_at),
                    revoked_tokens::revoked_at.eq(now),
                ))
                .execute(conn)?;
            Ok(())
        });
        match r {
            // Another writer revoked the same id at the same moment: read it again.
            Err(e) if e.is_unique_violation() && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

/// A revocation as the poll reads it: `(jti, expires_at, seq)`.
pub type RevocationRow = (String, i64, i64);

/// Revocations with a sequence number above `after`, oldest first, at most `limit`.
pub fn revoked_after(
    conn: &mut DbConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<RevocationRow>, StoreError> {
    Ok(revoked_tokens::table
        .filter(revoked_tokens::seq.gt(after))
        .order(revoked_tokens::seq)
        .limit(limit)
        .select((
            revoked_tokens::jti,
            revoked_tokens::expires_at,
            revoked_tokens::seq,
        ))
        .load(conn)?)
}

/// Revocations that still matter (not yet expired), at most `limit`.
pub fn revoked_active(
    conn: &mut DbConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<RevocationRow>, StoreError> {
    Ok(revoked_tokens::table
        .filter(revoked_tokens::expires_at.gt(now))
        .limit(limit)
        .select((
            revoked_tokens::jti,
            revoked_tokens::expires_at,
            revoked_tokens::seq,
        ))
        .load(conn)?)
}

/// Number of revocations that still matter.
pub fn count_revoked_active(conn: &mut DbConnection, now: i64) -> Result<i64, StoreError> {
    Ok(revoked_tokens::table
        .filter(revoked_tokens::expires_at.gt(now))
        .count()
        .get_result(conn)?)
}

/// PostgreSQL: the transactions (virtual ids) other than this session's that are
/// writing to `revoked_tokens` now. A writer takes the table's `ROW EXCLUSIVE` lock when
/// its statement starts, before the identity gives its row a number, and holds it until
/// it commits or rolls back; so a transaction that took a number and has not committed
/// is among them. SQLite has one writer at a time, whose numbers commit in order: none.
pub fn writers(conn: &mut DbConnection) -> Result<Vec<String>, StoreError> {
    #[derive(QueryableByName)]
    struct Writer {
        #[diesel(sql_type = diesel::sql_types::Text)]
        vxid: String,
    }
    match conn {
        DbConnection::Postgresql(pg) => Ok(diesel::sql_query(PG_WRITERS)
            .load::<Writer>(pg)?
            .into_iter()
            .map(|w| w.vxid)
            .collect()),
        DbConnection::Sqlite(_) => Ok(Vec::new()),
    }
}

const PG_WRITERS: &str = "SELECT virtualtransaction AS vxid FROM pg_locks \
     WHERE locktype = 'relation' AND relation = 'revoked_tokens'::regclass \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()";

/// The highest sequence number assigned so far (0 for an empty table).
pub fn max_revocation_seq(conn: &mut DbConnection) -> Result<i64, StoreError> {
    let max: Option<i64> = revoked_tokens::table
        .select(diesel::dsl::max(revoked_tokens::seq))
        .first(conn)?;
    Ok(max.unwrap_or(0))
}

/// Direct check, used when the in-memory set is not known to be current.
pub fn any_revoked(conn: &mut DbConnection, ids: &[&str], now: i64) -> Result<bool, StoreError> {
    let n: i64 = revoked_tokens::table
        .filter(revoked_tokens::jti.eq_any(ids))
        .filter(revoked_tokens::expires_at.gt(now))
        .count()
        .get_result(conn)?;
    Ok(n > 0)
}

/// How long past its expiry (on the purging instance's clock) a revocation is kept:
/// the clock difference between instances that the security model tolerates
/// (docs/security.md, "Clock skew"; the replay records' margin,
/// `auth::hmac::CLOCK_SKEW_MARGIN_SECS`). A token expires on the clock of the instance
/// that checks it, so an instance whose clock runs ahead must not purge a revocation
/// the others still need: before this margin (review, 2026-12-06) one 45 s ahead
/// purged a finished job's revocation while its token still verified for 45 s on the
/// others, which accepted it again from the database.
pub const PURGE_MARGIN_MS: i64 = 60_000;

/// Delete at most about `limit` revocations whose expiry passed more than
/// [`PURGE_MARGIN_MS`] before `now`.
pub fn purge_revoked(conn: &mut DbConnection, now: i64, limit: i64) -> Result<usize, StoreError> {
    let now = now.saturating_sub(PURGE_MARGIN_MS);
    let cutoff: Option<i64> = revoked_tokens::table
        .filter(revoked_tokens::expires_at.lt(now))
        .order(revoked_tokens::expires_at)
        .select(revoked_tokens::expires_at)
        .offset(limit.saturating_sub(1).max(0))
        .first(conn)
        .optional()?;
    let upto = cutoff.map_or(now, |c| c.saturating_add(1).min(now));
    Ok(
        diesel::delete(revoked_tokens::table.filter(revoked_tokens::expires_at.lt(upto)))
            .execute(conn)?,
    )
}
