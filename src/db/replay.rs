//! The `replay_records` table, all of its storage in one place, and the deferred record
//! that a signed request's first database operation settles.
//!
//! - The table: [`insert_replays`], the one insert every path uses (one statement per
//!   batch on PostgreSQL, [`insert_replays_pg`], `ON CONFLICT DO NOTHING RETURNING`;
//!   `INSERT OR IGNORE` per row inside one transaction on SQLite), and the purge of
//!   expired records ([`purge_replays`], run by housekeeping; [`vacuum_replays`] on
//!   PostgreSQL). [`record_replay`] is a plain single insert kept for the load
//!   generator (`bench/`); the server does not call it.
//! - Where a record is written: [`Deferred`] holds a request's record until its first
//!   database work. SQLite: a write through `Db` (`db/mod.rs`, `run_async`) runs
//!   [`record_then`], the record and the request's write in one work item of the
//!   group-commit writer; a read first writes the record alone, as a write of its own.
//!   PostgreSQL: the progress, create and delivery batches carry it in their own
//!   transaction ([`ride`], [`write_group`], `jobs::repo::progress_batch`); any other
//!   operation first writes it alone through the replay log's batching threads
//!   (`auth::replay::ReplayLog`, `Db::record_alone`).
//!
//! The replay log that decides when to write lives in `auth/replay.rs`.
//!
//! On SQLite the table is keyed by the signed time first (`signed_at`, `caller`,
//! `signature_hash`, WITHOUT ROWID): inserts land at the end of its one B-tree and
//! the purge deletes its beginning, a few pages per commit instead of one page per
//! record. PostgreSQL keeps its (`caller`, `signature_hash`) key and `expires_at`
//! index, which instances of the release before rely on during a rolling upgrade.

use std::collections::HashSet;

use diesel::prelude::*;

use super::batch::Batcher;
use super::schema::replay_records;
use super::DbConnection;
use crate::error::{is_unique_violation, StoreError};

/// One replay record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRow {
    pub caller: String,
    pub signature_hash: String,
    /// The signed timestamp (unix seconds): the key's first column on SQLite.
    pub signed_at: i64,
    /// Unix milliseconds.
    pub expires_at: i64,
}

impl ReplayRow {
    pub fn new(
        caller: impl Into<String>,
        signature_hash: impl Into<String>,
        signed_at: i64,
        expires_at: i64,
    ) -> Self {
        ReplayRow {
            caller: caller.into(),
            signature_hash: signature_hash.into(),
            signed_at,
            expires_at,
        }
    }
}

/// Insert every row; `true` for each row that was new (not a replay). Duplicates
/// within the batch: the first is new, the rest are replays.
pub fn insert_replays(
    conn: &mut DbConnection,
    rows: &[ReplayRow],
) -> Result<Vec<bool>, StoreError> {
    match (conn, rows) {
        (DbConnection::Postgresql(pg), rows) => Ok(insert_replays_pg(pg, rows)?),
        // One statement needs no transaction of its own.
        (DbConnection::Sqlite(lite), [row]) => {
            let n = diesel::insert_or_ignore_into(replay_records::table)
                .values(values(row))
                .execute(lite)?;
            Ok(vec![n == 1])
        }
        (DbConnection::Sqlite(lite), rows) => lite.transaction(|lite| {
            rows.iter()
                .map(|r| {
                    diesel::insert_or_ignore_into(replay_records::table)
                        .values(values(r))
                        .execute(lite)
                        .map(|n| n == 1)
                        .map_err(StoreError::from)
                })
                .collect()
        }),
    }
}

/// [`insert_replays`] on PostgreSQL: one statement ([`PgInsertReplays`]), in whatever
/// transaction `pg` is in (the progress log's batch writes its reports' records in
/// its own, `jobs::repo::progress_batch`). The records go in key order, so two
/// instances' batches holding the same new signatures wait for each other instead of
/// deadlocking (each would hold the rows it inserted first and wait for the other's:
/// one batch aborted, every request in it 503).
pub fn insert_replays_pg(
    pg: &mut diesel::PgConnection,
    rows: &[ReplayRow],
) -> QueryResult<Vec<bool>> {
    let mut sorted: Vec<&ReplayRow> = rows.iter().collect();
    sorted.sort_unstable_by(|a, b| {
        (a.caller.as_str(), a.signature_hash.as_str())
            .cmp(&(b.caller.as_str(), b.signature_hash.as_str()))
    });
    let inserted: Vec<(String, String)> = PgInsertReplays {
        callers: sorted.iter().map(|r| r.caller.as_str()).collect(),
        hashes: sorted.iter().map(|r| r.signature_hash.as_str()).collect(),
        expires: sorted.iter().map(|r| r.expires_at).collect(),
        signed: sorted.iter().map(|r| r.signed_at).collect(),
    }
    .load(pg)?;
    let mut fresh: HashSet<(String, String)> = inserted.into_iter().collect();
    Ok(rows
        .iter()
        .map(|r| fresh.remove(&(r.caller.clone(), r.signature_hash.clone())))
        .collect())
}

/// PostgreSQL: a batch of records with one statement whose SQL is the same for every
/// batch size (the rows go as four arrays), so it stays prepared on each connection,
/// where a multi-row `VALUES` list is parsed and planned again for each batch.
/// Returns the (caller, signature) of each row it inserted; a row already there, or
/// the second of a pair within the batch, is skipped (`ON CONFLICT DO NOTHING`).
struct PgInsertReplays<'a> {
    callers: Vec<&'a str>,
    hashes: Vec<&'a str>,
    expires: Vec<i64>,
    signed: Vec<i64>,
}

super::prepared_statement!(PgInsertReplays);

impl diesel::query_builder::Query for PgInsertReplays<'_> {
    type SqlType = (diesel::sql_types::Text, diesel::sql_types::Text);
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for PgInsertReplays<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Array, BigInt, Text};
        out.push_sql(
            "INSERT INTO replay_records (caller, signature_hash, expires_at, signed_at) \
             SELECT * FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&self.callers)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.hashes)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.expires)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.signed)?;
        out.push_sql(") ON CONFLICT DO NOTHING RETURNING caller, signature_hash");
        Ok(())
    }
}

type Values<'a> = (
    diesel::dsl::Eq<replay_records::caller, &'a String>,
    diesel::dsl::Eq<replay_records::signature_hash, &'a String>,
    diesel::dsl::Eq<replay_records::expires_at, i64>,
    diesel::dsl::Eq<replay_records::signed_at, Option<i64>>,
);

fn values(r: &ReplayRow) -> Values<'_> {
    (
        replay_records::caller.eq(&r.caller),
        replay_records::signature_hash.eq(&r.signature_hash),
        replay_records::expires_at.eq(r.expires_at),
        replay_records::signed_at.eq(Some(r.signed_at)),
    )
}

/// Record one row; `false` when it was already there (a replay). Only the load
/// generator's direct-write baseline uses it: it learns of a replay from the unique-key
/// violation, which on PostgreSQL aborts a surrounding transaction, so it must run in
/// a transaction of its own there (the service records with [`insert_replays`]).
pub fn record_replay(conn: &mut DbConnection, row: &ReplayRow) -> Result<bool, StoreError> {
    let r = diesel::insert_into(replay_records::table)
        .values(values(row))
        .execute(conn);
    match r {
        Ok(_) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Delete at most about `limit` expired replay records (bounded per pass); returns
/// how many went. `now` in milliseconds; `window_secs` is how long after its signed
/// time this instance keeps a record (its accepted clock skew plus the margin,
/// `auth::hmac::record_window_secs`).
///
/// SQLite: by the key's first column, `signed_at`, so the search and the delete are a
/// range at the start of the table's one B-tree. Records signed before `now -
/// window_secs` are out of this instance's window; `expires_at < now` still
/// keeps any written with a wider window (a larger skew before a restart) until they
/// expire. A chunk ends at a whole second, so it may exceed `limit` by the records of
/// its last second.
///
/// PostgreSQL: by `expires_at` (its index): instances of the release before write no
/// `signed_at`, and a rolling upgrade runs both.
pub fn purge_replays(
    conn: &mut DbConnection,
    now: i64,
    window_secs: i64,
    limit: i64,
) -> Result<usize, StoreError> {
    use diesel::sql_types::BigInt;
    let offset = limit.saturating_sub(1).max(0);
    if let DbConnection::Sqlite(lite) = conn {
        #[derive(QueryableByName)]
        struct Cutoff {
            #[diesel(sql_type = BigInt)]
            signed_at: i64,
        }
        let bound = (now / 1000).saturating_sub(window_secs);
        let cutoff = diesel::sql_query(SQLITE_PURGE_CUTOFF)
            .bind::<BigInt, _>(bound)
            .bind::<BigInt, _>(now)
            .bind::<BigInt, _>(offset)
            .get_result::<Cutoff>(lite)
            .optional()?;
        let upto = cutoff.map_or(bound, |c| c.signed_at.saturating_add(1).min(bound));
        return Ok(diesel::sql_query(SQLITE_PURGE)
            .bind::<BigInt, _>(upto)
            .bind::<BigInt, _>(now)
            .execute(lite)?);
    }
    let cutoff: Option<i64> = replay_records::table
        .filter(replay_records::expires_at.lt(now))
        .order(replay_records::expires_at)
        .select(replay_records::expires_at)
        .offset(offset)
        .first(conn)
        .optional()?;
    let upto = cutoff.map_or(now, |c| c.saturating_add(1).min(now));
    Ok(
        diesel::delete(replay_records::table.filter(replay_records::expires_at.lt(upto)))
            .execute(conn)?,
    )
}

/// SQLite: the signed time ending a purge chunk (`?` bound, now, offset). A range of the
/// primary key (`EXPLAIN QUERY PLAN`: SEARCH replay_records USING PRIMARY KEY
/// (signed_at<?); see the test below).
const SQLITE_PURGE_CUTOFF: &str = "SELECT signed_at FROM replay_records \
     WHERE signed_at < ? AND expires_at < ? ORDER BY signed_at LIMIT 1 OFFSET ?";
/// SQLite: one purge chunk (upto, now), the same range of the primary key.
const SQLITE_PURGE: &str = "DELETE FROM replay_records WHERE signed_at < ? AND expires_at < ?";

/// PostgreSQL: the replay table is the one the service deletes from all the time (every
/// record expires), so its dead tuples are reclaimed here instead of being left to
/// autovacuum, which may be off or slow to start on a busy table. Run once at least
/// this many rows were purged since the last run.
pub const VACUUM_AFTER_PURGED: u64 = 50_000;

/// The least time between two vacuums of the replay table: each `VACUUM` scans the
/// table's two indexes whole, whatever few rows it reclaims, and at 7 000 signed
/// requests/s [`VACUUM_AFTER_PURGED`] came every 7 s (docs/decisions.md, "Housekeeping vacuums `replay_records`
/// on PostgreSQL"). Between two vacuums the dead tuples stay below a minute's purge.
pub const VACUUM_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// When the replay table is due for its vacuum: after [`VACUUM_AFTER_PURGED`] purged
/// records, and not within [`VACUUM_AT_MOST_EVERY`] of the last one.
#[derive(Debug, Default)]
pub struct VacuumPacer {
    purged: u64,
    last: Option<std::time::Instant>,
}

impl VacuumPacer {
    /// Count `purged` records; `true` (and the count starts over) when a vacuum is due.
    pub fn due(&mut self, purged: u64, now: std::time::Instant) -> bool {
        self.purged = self.purged.saturating_add(purged);
        let rested = self
            .last
            .is_none_or(|at| now.saturating_duration_since(at) >= VACUUM_AT_MOST_EVERY);
        if self.purged < VACUUM_AFTER_PURGED || !rested {
            return false;
        }
        self.purged = 0;
        self.last = Some(now);
        true
    }
}

/// `VACUUM replay_records`, giving up at once when another instance is vacuuming it (it
/// will have done the work). Not in a transaction (VACUUM refuses one). No `ANALYZE`:
/// it reads a sample of the table under a snapshot, and for as long as that takes no
/// backend may prune the row versions every progress update leaves in `jobs`
/// (docs/decisions.md, "Housekeeping vacuums `replay_records` on PostgreSQL").
pub fn vacuum_replays(conn: &mut DbConnection) -> Result<(), StoreError> {
    use diesel::connection::SimpleConnection;
    if !matches!(conn, DbConnection::Postgresql(_)) {
        return Ok(());
    }
    conn.batch_execute("SET lock_timeout = '100ms'")?;
    let r = conn.batch_execute("VACUUM replay_records");
    conn.batch_execute("RESET lock_timeout")?;
    Ok(r?)
}

/// What became of a deferred replay record.
#[derive(Debug)]
pub enum Verdict {
    /// Recorded (committed): the signature was new.
    Fresh,
    /// Already recorded: a replay. Nothing of the request was written.
    Replayed,
    /// Not recorded (the database refused or failed): the request may not be answered
    /// as if it had been (the refusal, as [`StoreError::shared`] passes it on).
    Failed(StoreError),
}

/// A signed request's replay record, held back so it commits with the request's own
/// first write where that saves a commit — one share of one group commit per request
/// instead of two (docs/decisions.md, "The replay record rides with the request's
/// first write").
///
/// The guard (`auth::middleware`) runs the handler under [`Deferred::scope`]. Inside
/// it the record is settled before any database work:
/// - on SQLite a write runs the insert first in the same savepoint-protected work
///   item of the group-commit writer (a replay runs nothing else; the request's own
///   work runs in a savepoint of its own, so a request that fails still burns its
///   signature);
/// - on PostgreSQL a progress report, a job create or a webhook delivery writes it in
///   its batch's transaction (`jobs::repo::progress_batch`, [`write_group`]; [`ride`]),
///   with the same rules;
/// - any other database work first writes the record on its own: through
///   PostgreSQL's replay batch ([`Deferred::batch`]) or SQLite's writer.
///
/// Once the verdict is anything but [`Verdict::Fresh`], every later database operation
/// of the request fails. Whatever the handler did, the guard settles a record still
/// pending after it and answers 401 for a replay, 503 for a record that could not be
/// written.
pub struct Deferred {
    state: std::sync::Mutex<DeferredState>,
    settled: tokio::sync::Notify,
    batch: Option<Batcher<ReplayRow, bool>>,
}

enum DeferredState {
    Pending(ReplayRow),
    /// Taken by a database operation that has not answered yet.
    Riding,
    Settled(Verdict),
}

/// What a database operation finds when it asks for the current request's record.
pub enum Turn {
    /// No deferred record in this request, or it was recorded fresh: go ahead.
    Clear,
    /// The record is the caller's to write, with (or before) its work.
    Take(ReplayRow),
    /// Refused: the record was a replay or could not be written.
    Refused(StoreError),
}

tokio::task_local! {
    static DEFERRED: std::sync::Arc<Deferred>;
}

impl Deferred {
    /// `batch`: where the record goes when it is written on its own (PostgreSQL's
    /// replay batch, `auth::replay`); `None` for a write through `Db`.
    pub fn new(row: ReplayRow, batch: Option<Batcher<ReplayRow, bool>>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Deferred {
            state: std::sync::Mutex::new(DeferredState::Pending(row)),
            settled: tokio::sync::Notify::new(),
            batch,
        })
    }

    /// Where the record goes when it is written on its own, if not through `Db`.
    pub fn batch(&self) -> Option<&Batcher<ReplayRow, bool>> {
        self.batch.as_ref()
    }

    /// Run `f` (the handler) with this record deferred.
    pub async fn scope<F: std::future::Future>(self: &std::sync::Arc<Self>, f: F) -> F::Output {
        DEFERRED.scope(self.clone(), f).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeferredState> {
        // The state is replaced whole under the lock, so a poisoned one is consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record the verdict of a taken record and wake whoever waits for it.
    pub fn settle(&self, verdict: Verdict) {
        *self.lock() = DeferredState::Settled(verdict);
        self.settled.notify_waiters();
    }

    /// Take the record if it is still pending; otherwise wait for its verdict.
    pub async fn turn(&self) -> Turn {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                match std::mem::replace(&mut *state, DeferredState::Riding) {
                    DeferredState::Pending(row) => return Turn::Take(row),
                    DeferredState::Riding => {}
                    DeferredState::Settled(v) => {
                        let turn = refusal(&v);
                        *state = DeferredState::Settled(v);
                        return turn;
                    }
                }
            }
            notified.await;
        }
    }
}

fn refusal(v: &Verdict) -> Turn {
    match v {
        Verdict::Fresh => Turn::Clear,
        Verdict::Replayed => Turn::Refused(StoreError::Replayed),
        Verdict::Failed(e) => Turn::Refused(e.shared()),
    }
}

/// The current request's deferred record, if it runs under [`Deferred::scope`].
pub fn current_deferred() -> Option<std::sync::Arc<Deferred>> {
    DEFERRED.try_with(std::sync::Arc::clone).ok()
}

/// `f` under the current request's deferred record, if it has one: for work the
/// request hands to a task of its own (a task-local does not cross `spawn`). Without
/// it that task's database work would run unchecked, before the record's verdict.
pub fn carry<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
    let deferred = current_deferred();
    async move {
        match deferred {
            Some(d) => d.scope(f).await,
            None => f.await,
        }
    }
}

/// Hand `item` to a batch that writes a request's deferred record in its own
/// transaction (PostgreSQL's progress, create and delivery logs): the record still pending, if
/// the request has one, goes with the item (`attach`), and its verdict is settled from
/// the batch's answer — the batch's own failure (or a refusal before it) wrote no
/// record, while an item's own error came after its record was committed. A request
/// whose record was refused before gets that refusal and writes nothing.
pub async fn ride<I, T>(
    batcher: &Batcher<I, Result<T, StoreError>>,
    mut item: I,
    attach: impl FnOnce(&mut I, ReplayRow),
) -> Result<Result<T, StoreError>, StoreError>
where
    I: Send + 'static,
    T: Send + 'static,
{
    let deferred = current_deferred();
    let mut carried = false;
    if let Some(d) = &deferred {
        match d.turn().await {
            Turn::Clear => {}
            Turn::Refused(e) => return Err(e),
            Turn::Take(row) => {
                attach(&mut item, row);
                carried = true;
            }
        }
    }
    let written = batcher.submit(item).await;
    if let (Some(d), true) = (&deferred, carried) {
        d.settle(match &written {
            Err(e) => Verdict::Failed(e.shared()),
            Ok(Err(StoreError::Replayed)) => Verdict::Replayed,
            Ok(_) => Verdict::Fresh,
        });
    }
    written
}

/// Answers of a group of writes, in the group's order: each item's own outcome.
pub type Answers<T> = Vec<Result<T, StoreError>>;
/// Answers keyed by the item's place in its group, in any order.
pub type Placed<T> = Vec<(usize, Result<T, StoreError>)>;
/// How [`write_group`] writes a group's items together: (place, item) in, answers out.
pub type Together<C, T> = fn(&mut DbConnection, Vec<(usize, &C)>) -> Result<Placed<T>, StoreError>;

/// One group of writes in one transaction, as PostgreSQL's create and delivery logs
/// write theirs, with the items' deferred replay records (`record`):
///
/// - the records go first, with one statement; an item whose record was already
///   stored (or repeats another of the group) is answered `Replayed` and writes
///   nothing, and one whose record is new keeps it even when the item itself fails
///   (the signature is burned, as on every path);
/// - the other items are written by `together`, in few statements, answering each
///   (it must fail as a whole on any statement's error, and an item it answers with an
///   error must have written nothing);
/// - if that fails for any reason but a lost connection, the transaction runs again
///   with each item written by `alone` in a savepoint of its own, so one bad item
///   sinks none of the others.
pub fn write_group<C, T>(
    conn: &mut DbConnection,
    group: &[C],
    record: fn(&C) -> Option<&ReplayRow>,
    together: Together<C, T>,
    alone: fn(&mut DbConnection, &C) -> Result<T, StoreError>,
) -> Result<Answers<T>, StoreError> {
    let records: Vec<ReplayRow> = group.iter().filter_map(|c| record(c).cloned()).collect();
    let attempt = |conn: &mut DbConnection, one_by_one: bool| {
        conn.transaction(|conn| {
            let mut fresh = if records.is_empty() {
                Vec::new()
            } else {
                insert_replays(conn, &records)?
            }
            .into_iter();
            let mut answers: Placed<T> = Vec::with_capacity(group.len());
            let mut todo = Vec::with_capacity(group.len());
            for (i, c) in group.iter().enumerate() {
                if record(c).is_none() || fresh.next() == Some(true) {
                    todo.push((i, c));
                } else {
                    answers.push((i, Err(StoreError::Replayed)));
                }
            }
            if one_by_one {
                for (i, c) in todo {
                    answers.push((i, conn.transaction(|conn| alone(conn, c))));
                }
            } else {
                answers.append(&mut together(conn, todo)?);
            }
            Ok::<_, StoreError>(answers)
        })
    };
    let mut answers = match attempt(conn, false) {
        Err(e) if !e.is_connection_loss() => {
            log::warn!("a group of {} writes written one by one: {e}", group.len());
            attempt(conn, true)?
        }
        r => r?,
    };
    answers.sort_unstable_by_key(|&(i, _)| i);
    Ok(answers.into_iter().map(|(_, a)| a).collect())
}

/// The verdict a settled outcome gives: `Ok` the record committed, or why not.
pub fn verdict_of<T>(r: &Result<T, StoreError>) -> Verdict {
    match r {
        Ok(_) => Verdict::Fresh,
        Err(StoreError::Replayed) => Verdict::Replayed,
        Err(e) => Verdict::Failed(e.shared()),
    }
}

/// Insert the record alone: `Err(Replayed)` when it was already there.
pub fn record(conn: &mut DbConnection, row: &ReplayRow) -> Result<(), StoreError> {
    let fresh = insert_replays(conn, std::slice::from_ref(row))?;
    if fresh.first().copied().unwrap_or(false) {
        Ok(())
    } else {
        Err(StoreError::Replayed)
    }
}

/// One request's write with its record in front: insert the record; a replay stops
/// there (`Err(Replayed)`, so the work item keeps nothing); otherwise run `f` in a
/// savepoint of its own and return its result inside `Ok`, so the work item keeps the
/// record even when `f` fails.
pub fn record_then<T>(
    conn: &mut DbConnection,
    row: &ReplayRow,
    f: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<Result<T, StoreError>, StoreError> {
    use diesel::connection::TransactionManager;
    type Tm = <DbConnection as Connection>::TransactionManager;
    record(conn, row)?;
    // By hand rather than `conn.transaction(f)`: this is instantiated for every write
    // call site, so only the call of `f` is generic.
    Tm::begin_transaction(conn)?;
    let r = f(conn);
    if r.is_ok() {
        Tm::commit_transaction(conn)?;
    } else {
        Tm::rollback_transaction(conn)?;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use crate::db::plan_tests::{migrated_sqlite, Step};
    use diesel::prelude::*;
    use diesel::sql_types::BigInt;

    /// The SQLite purge reads and deletes a range of the primary key: no scan of the
    /// table, no other index (there is none).
    #[test]
    fn the_sqlite_purge_searches_the_primary_key() {
        let mut c = migrated_sqlite();
        for (sql, binds) in [(super::SQLITE_PURGE_CUTOFF, 3), (super::SQLITE_PURGE, 2)] {
            let mut q = diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}")).into_boxed();
            for v in 0..binds {
                q = q.bind::<BigInt, _>(1_000_000 - v);
            }
            let plan: Vec<String> = q
                .load::<Step>(&mut c)
                .expect("plan")
                .into_iter()
                .map(|s| s.detail)
                .collect();
            assert_eq!(
                plan,
                ["SEARCH replay_records USING PRIMARY KEY (signed_at<?)"],
                "{sql}"
            );
        }
    }

    fn row() -> super::ReplayRow {
        super::ReplayRow::new("c", "sig", 1, 2)
    }

    #[test]
    fn the_replay_vacuum_waits_for_enough_purged_records_and_a_minute() {
        use super::{VacuumPacer, VACUUM_AFTER_PURGED, VACUUM_AT_MOST_EVERY};
        let t0 = std::time::Instant::now();
        let mut p = VacuumPacer::default();
        assert!(!p.due(VACUUM_AFTER_PURGED - 1, t0));
        assert!(p.due(1, t0), "the first one as soon as enough are purged");
        // Enough again, but within the minute: not yet, and the count keeps.
        assert!(!p.due(VACUUM_AFTER_PURGED * 3, t0 + VACUUM_AT_MOST_EVERY / 2));
        assert!(p.due(0, t0 + VACUUM_AT_MOST_EVERY));
        // The count started over.
        let later = t0 + VACUUM_AT_MOST_EVERY * 3;
        assert!(!p.due(VACUUM_AFTER_PURGED - 1, later));
        assert!(p.due(1, later));
    }

    /// The first operation takes the record; a second one waits for its verdict; after
    /// a replay every later one is refused, after a fresh record every one goes ahead.
    #[actix_web::test]
    async fn a_deferred_record_is_taken_once_and_its_verdict_holds() {
        use super::{Deferred, Turn, Verdict};
        let d = Deferred::new(row(), None);
        assert!(matches!(d.turn().await, Turn::Take(r) if r == row()));
        let waiter = {
            let d = d.clone();
            actix_web::rt::spawn(async move { d.turn().await })
        };
        actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the record rides");
        d.settle(Verdict::Replayed);
        let waited = waiter.await.expect("join");
        assert!(matches!(
            waited,
            Turn::Refused(crate::error::StoreError::Replayed)
        ));
        assert!(matches!(d.turn().await, Turn::Refused(_)));

        let d = Deferred::new(row(), None);
        assert!(matches!(d.turn().await, Turn::Take(_)));
        d.settle(Verdict::Fresh);
        assert!(matches!(d.turn().await, Turn::Clear));

        let d = Deferred::new(row(), None);
        assert!(matches!(d.turn().await, Turn::Take(_)));
        d.settle(Verdict::Failed(crate::error::StoreError::Unavailable(
            "down".into(),
        )));
        assert!(matches!(
            d.turn().await,
            Turn::Refused(crate::error::StoreError::Unavailable(_))
        ));
    }

    /// Only inside its scope is a record the current request's.
    #[actix_web::test]
    async fn a_deferred_record_belongs_to_its_scope_only() {
        assert!(super::current_deferred().is_none());
        let d = super::Deferred::new(row(), None);
        let inside = d.scope(async { super::current_deferred().is_some() }).await;
        assert!(inside);
        assert!(super::current_deferred().is_none());
    }
}
