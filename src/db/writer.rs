//! SQLite group commit. SQLite takes one writer at a time and every commit writes the
//! WAL pages it touched, so one commit per request caps the write rate at the
//! database's per-commit ceiling. Instead one writer thread per instance takes every
//! write that has queued up, opens one `BEGIN IMMEDIATE` transaction, runs each
//! request's work in its own savepoint (a failing request rolls back to its savepoint
//! and never sinks the batch; work that cannot fail alone runs without one, see
//! [`Work::bare`]), commits once, and only then answers each request. No
//! write is acknowledged before the commit that makes it durable; when the commit
//! fails, every request of the batch gets the error.
//!
//! The writer also drives WAL checkpointing (automatic checkpoints are off): a RESTART
//! checkpoint between batches once the WAL holds [`super::WAL_RESET_BYTES`] of frames
//! (`reset_wal` in `db/wal.rs`, also run after a write made outside this thread, such
//! as `Db::write_sync`; `wal_reset` there decides when one is due), after which the
//! next write starts the WAL over at the front of the same file (a TRUNCATE frees the
//! file's blocks, which can wait for the device to discard them, and hands every later
//! write freshly allocated ones). Writes wait while it runs, so a second thread, the
//! backfiller, copies the WAL into the database file in the background every
//! [`BACKFILL_EVERY`] with PASSIVE checkpoints (which never block the writer) and
//! counts the frames; once they near a reset it passes every [`BACKFILL_NEAR_RESET`],
//! and once they reach one it runs a few passes back to back before it reports the
//! count (`catch_up`): by the time the writer resets, only the frames of a batch or two
//! are left to copy and sync. The two take turns through `Shared::checkpointing`; the
//! writer does not wait for the backfiller, it skips and resets after a later batch —
//! unless the WAL has run past its limit, when it waits for the pass to end.
//! Housekeeping runs one more PASSIVE checkpoint per pass (`Db::checkpoint`).

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, TryLockError, Weak};
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::sqlite::SqliteConnection;
use diesel::{QueryResult, RunQueryDsl};
use tokio::sync::mpsc;

use super::wal::CheckpointOutcome;
use super::{DbConnection, DbPool, Shared, WalReset};
use crate::error::StoreError;

/// Most requests committed together.
const MAX_BATCH: usize = 256;

/// How often the backfiller copies the WAL into the database file.
pub(super) const BACKFILL_EVERY: Duration = Duration::from_millis(100);

/// How often once the last pass counted half the frames of a reset: the count the
/// writer's reset rule reads is then at most this old, so the reset comes at about
/// [`super::WAL_RESET_BYTES`] of frames, right after a pass, and not later on the file's
/// size (at `WAL_LIMIT_BYTES`, at any moment, with a whole interval's frames to copy).
pub(super) const BACKFILL_NEAR_RESET: Duration = Duration::from_millis(25);

/// Most extra passes before a reset ([`catch_up`]).
const CATCH_UP_PASSES: usize = 3;

/// A pass this short left next to nothing behind: no further pass before a reset.
const CATCH_UP_SHORT: Duration = Duration::from_micros(500);

/// The turn to checkpoint (`None`: the other thread is at it and `wait` is false). A
/// poisoned lock guards nothing but the turn, so it is taken all the same.
pub(super) fn checkpoint_turn(lock: &Mutex<()>, wait: bool) -> Option<MutexGuard<'_, ()>> {
    if wait {
        return Some(
            lock.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
    }
    match lock.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Start the backfiller; it ends with the last `Db` clone. It borrows a read connection
/// for each pass (never waiting long for one: under load it skips a pass instead), and
/// skips the pass when nothing was written since the last one caught up.
pub(super) fn start_backfiller(read: DbPool, shared: Weak<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sqlite-backfill".into())
        .spawn(move || {
            let mut seen_writes = 0;
            let mut caught_up = true;
            let mut frame_size = None;
            let mut frames_seen = 0;
            loop {
                std::thread::sleep(if frames_seen >= super::WAL_RESET_BYTES / 2 {
                    BACKFILL_NEAR_RESET
                } else {
                    BACKFILL_EVERY
                });
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let Some(wal) = &shared.wal else { return };
                let writes = wal.writes.load(Ordering::Relaxed);
                if caught_up && writes == seen_writes {
                    continue;
                }
                let Some(_turn) = checkpoint_turn(&shared.checkpointing, false) else {
                    continue;
                };
                let Ok(mut c) = read.get_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let DbConnection::Sqlite(lite) = &mut c.conn else {
                    return;
                };
                match catch_up(lite, &mut frame_size) {
                    Ok(CaughtUp {
                        frames,
                        caught,
                        passes,
                    }) => {
                        if passes > 1 {
                            log::debug!("WAL backfill: {passes} passes before a reset");
                        }
                        seen_writes = writes;
                        caught_up = caught;
                        // Reset and not written since: the next write starts the WAL
                        // over, whatever its header still counts.
                        let reset = writes == wal.writes_at_reset.load(Ordering::Relaxed);
                        frames_seen = if reset { 0 } else { frames };
                        wal.frame_bytes.store(frames_seen, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // A connection opened while the file could not be written
                        // stays read-only (SQLite's fallback) and can never copy the
                        // WAL: replaced, so the next pass gets another, or a fresh one
                        // once the file can be written again.
                        c.broken |= crate::error::is_write_refused(&e);
                        log::debug!("WAL backfill: {e}");
                    }
                }
            }
        })
        .map(drop)
}

/// A pass, and once the WAL holds enough frames for the writer to reset it, more passes
/// back to back (at most [`CATCH_UP_PASSES`], while the one before took longer than
/// [`CATCH_UP_SHORT`]): each copies what was written while the one before ran. The
/// writer resets only after it sees this pass's count, and every write waits while it
/// does, so its reset then copies the frames of a batch or two instead of all those of
/// the last [`BACKFILL_EVERY`], and its fsyncs flush that much.
fn catch_up(lite: &mut SqliteConnection, frame_size: &mut Option<u64>) -> QueryResult<CaughtUp> {
    let mut started = Instant::now();
    let (mut frames, mut caught) = backfill(lite, frame_size)?;
    let mut passes = 1;
    while passes <= CATCH_UP_PASSES
        && frames >= super::WAL_RESET_BYTES
        && caught
        && started.elapsed() > CATCH_UP_SHORT
    {
        started = Instant::now();
        (frames, caught) = backfill(lite, frame_size)?;
        passes += 1;
    }
    Ok(CaughtUp {
        frames,
        caught,
        passes,
    })
}

/// What [`catch_up`] left: the last pass's frame count (bytes) and whether it copied
/// all of them, and how many passes it ran.
struct CaughtUp {
    frames: u64,
    caught: bool,
    passes: usize,
}

/// One PASSIVE checkpoint: the bytes of frames in the WAL (the writer resets it past a
/// threshold) and whether all of them are now in the database file.
fn backfill(lite: &mut SqliteConnection, frame_size: &mut Option<u64>) -> QueryResult<(u64, bool)> {
    #[derive(diesel::QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        page_size: i64,
    }
    let size = match *frame_size {
        Some(s) => s,
        None => {
            let page = diesel::sql_query("PRAGMA page_size").get_result::<PageSize>(lite)?;
            // Each frame is a 24-byte header and one page.
            let s = u64::try_from(page.page_size).unwrap_or(0) + 24;
            *frame_size = Some(s);
            s
        }
    };
    let o = diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
        .get_result::<CheckpointOutcome>(lite)?;
    let frames = u64::try_from(o.log).unwrap_or(0);
    Ok((frames.saturating_mul(size), o.log <= o.checkpointed))
}

/// What the writer hands a queued request: its connection inside its savepoint, or
/// the reason it cannot run (the connection could not be had).
pub(super) enum Slot<'a> {
    Run(&'a mut DbConnection),
    Refused(StoreError),
}

/// Sends a request its result once the batch's fate is known: `None` when the batch
/// committed, otherwise why it did not.
pub(super) type Reply = Box<dyn FnOnce(Option<&str>) + Send>;

/// How a request's work ended, and so what becomes of what it wrote.
pub(super) enum Step {
    /// Keep it (release the savepoint).
    Keep,
    /// Undo it (roll back to the savepoint): the request failed, the batch goes on.
    Undo,
    /// A work without a savepoint failed after it may have written: nothing of the
    /// batch can be acknowledged.
    Broken(String),
}

/// One request's work: run with its connection, it returns how it ended and its reply.
pub(super) struct Work {
    /// Run without a savepoint of its own. For work that either succeeds or fails in a
    /// way that sinks the batch anyway (an I/O error, a full disk), and that leaves
    /// nothing behind when it refuses (a replay record found already there): a single
    /// statement, which SQLite applies whole or not at all, or a replay record with the
    /// request's write in a savepoint of its own behind it (`replay::record_then`).
    /// Saves two statements per request and the savepoint's page copies (its statement
    /// journal) on the writer thread, which every write of the instance goes through.
    pub(super) bare: bool,
    pub(super) run: Run,
}

/// A request's work proper: given its connection (or why there is none), how it ended
/// and its reply.
pub(super) type Run = Box<dyn FnOnce(Slot<'_>) -> (Step, Reply) + Send>;

type Tm = AnsiTransactionManager;

/// Start the writer thread; it ends when every sender (every `Db` clone) is gone.
pub(super) fn start(write: DbPool, shared: Weak<Shared>) -> std::io::Result<Sender> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || run(&write, &shared, rx))?;
    Ok(tx)
}

fn run(write: &DbPool, shared: &Weak<Shared>, mut rx: mpsc::UnboundedReceiver<Work>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            refuse_all(batch, || StoreError::Internal("database closed".into()));
            return;
        };
        let mut conn = match super::checkout(&shared, write, &shared.write_gate, None) {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                refuse_all(batch, || StoreError::Unavailable(msg.clone()));
                continue;
            }
        };
        let (replies, failed) = commit_batch(&mut conn.conn, batch);
        // The batch failed as a whole because the file is damaged (at a savepoint or
        // the commit; a request's own damage is seen in its work, `group_work`).
        if let Some(why) = replies
            .iter()
            .find_map(|(_, o)| o.as_deref().filter(|w| crate::error::is_damage_message(w)))
        {
            super::damaged(&shared.health, super::Backend::Sqlite, why);
        }
        // A failed batch may leave the connection mid-transaction: open a fresh one.
        conn.broken |= failed;
        let (reset, lost) = if failed {
            (WalReset::No, None)
        } else {
            match shared.wal_after_write(&mut conn) {
                Ok(reset) => (reset, None),
                Err(why) => (WalReset::No, Some(why)),
            }
        };
        for (reply, outcome) in replies {
            reply(outcome.as_deref().or(lost.as_deref()));
        }
        if reset != WalReset::No {
            // After the replies: the batch's requests never wait for the reset (which
            // skips a running backfill pass, or waits for it once urgent).
            super::reset_wal(&shared, conn, reset);
        }
    }
}

fn refuse_all(batch: Vec<Work>, why: impl Fn() -> StoreError) {
    for work in batch {
        let (_, reply) = (work.run)(Slot::Refused(why()));
        reply(None);
    }
}

/// Apply a transaction-manager step to the SQLite connection inside `conn`.
fn on_lite(
    conn: &mut DbConnection,
    step: impl FnOnce(&mut SqliteConnection) -> diesel::QueryResult<()>,
) -> Result<(), String> {
    match conn {
        DbConnection::Sqlite(lite) => step(lite).map_err(|e| StoreError::from(e).to_string()),
        DbConnection::Postgresql(_) => Err("group commit on a non-SQLite connection".into()),
    }
}

/// Run the batch in one transaction; each reply with the outcome it must report.
/// `true` as well when the batch failed as a whole.
fn commit_batch(conn: &mut DbConnection, batch: Vec<Work>) -> (Vec<(Reply, Option<String>)>, bool) {
    let mut replies = Vec::with_capacity(batch.len());
    let mut broken = on_lite(conn, |c| Tm::begin_transaction_sql(c, "BEGIN IMMEDIATE")).err();
    let began = broken.is_none();
    for work in batch {
        if let Some(why) = &broken {
            let (_, reply) = (work.run)(Slot::Refused(StoreError::Unavailable(why.clone())));
            replies.push((reply, None));
            continue;
        }
        if !work.bare {
            if let Err(why) = on_lite(
                conn,
                <Tm as TransactionManager<SqliteConnection>>::begin_transaction,
            ) {
                let (_, reply) = (work.run)(Slot::Refused(StoreError::Unavailable(why.clone())));
                replies.push((reply, None));
                broken = Some(why);
                continue;
            }
        }
        let (step, reply) = (work.run)(Slot::Run(conn));
        let closed = match (step, work.bare) {
            // A savepoint still open here is rolled back with the batch.
            (Step::Broken(why), _) => Err(why),
            (Step::Keep, true) => Ok(()),
            (Step::Undo, true) => {
                Err("a request's work without a savepoint could not be undone".into())
            }
            (Step::Keep, false) => on_lite(
                conn,
                <Tm as TransactionManager<SqliteConnection>>::commit_transaction,
            ),
            (Step::Undo, false) => on_lite(
                conn,
                <Tm as TransactionManager<SqliteConnection>>::rollback_transaction,
            ),
        };
        // A savepoint that could not be released or rolled back leaves the transaction
        // in an unknown state: nothing of it may be acknowledged.
        broken = closed.err();
        replies.push((reply, None));
    }
    let outcome = match broken {
        None => on_lite(
            conn,
            <Tm as TransactionManager<SqliteConnection>>::commit_transaction,
        )
        .err(),
        Some(why) => Some(why),
    };
    let failed = outcome.is_some();
    if let Some(why) = outcome {
        if began {
            let _ = on_lite(
                conn,
                <Tm as TransactionManager<SqliteConnection>>::rollback_transaction,
            );
        }
        for (_, o) in &mut replies {
            *o = Some(why.clone());
        }
    }
    (replies, failed)
}

/// The handle `Db` keeps to submit work.
pub(super) type Sender = mpsc::UnboundedSender<Work>;

#[cfg(test)]
mod tests {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    use super::*;

    fn open(path: &std::path::Path) -> SqliteConnection {
        let mut c = SqliteConnection::establish(&path.to_string_lossy()).expect("open");
        c.batch_execute("PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;")
            .expect("pragmas");
        c
    }

    /// `bytes` of new pages, in one transaction, so as many bytes of WAL frames.
    fn write(c: &mut SqliteConnection, bytes: u64) {
        let rows = bytes / 4096 + 1;
        c.batch_execute(&format!(
            "BEGIN; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}) \
             INSERT INTO t (b) SELECT randomblob(4000) FROM n; COMMIT;"
        ))
        .expect("write");
    }

    #[test]
    fn a_pass_copies_every_frame_and_counts_them_below_and_past_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let mut writer = open(&path);
        writer
            .batch_execute("CREATE TABLE t (b BLOB NOT NULL)")
            .expect("table");
        let mut reader = open(&path);
        let mut frame_size = None;

        write(&mut writer, 1 << 20);
        let pass = catch_up(&mut reader, &mut frame_size).expect("pass");
        assert!(
            pass.caught,
            "a pass with no writer running copies every frame"
        );
        assert!(
            (1 << 20..super::super::WAL_RESET_BYTES).contains(&pass.frames),
            "{}",
            pass.frames
        );
        assert_eq!(pass.passes, 1, "below a reset's worth: one pass");
        assert_eq!(
            frame_size,
            Some(4096 + 24),
            "a frame is its header and a page"
        );

        // Past a reset's worth: more passes follow the first (which copied a reset's
        // worth, far longer than `CATCH_UP_SHORT`) until one finds next to nothing.
        // (No writer runs meanwhile: one inside a transaction keeps a pass from
        // copying every frame, and then no pass follows, by design.)
        write(&mut writer, super::super::WAL_RESET_BYTES);
        let pass = catch_up(&mut reader, &mut frame_size).expect("catch up");
        assert!(pass.caught);
        assert!(
            pass.frames > super::super::WAL_RESET_BYTES,
            "{}",
            pass.frames
        );
        assert!(
            (2..=CATCH_UP_PASSES + 1).contains(&pass.passes),
            "{} passes",
            pass.passes
        );
    }

    /// A work that writes `v` into `t` (a unique column), with or without a savepoint;
    /// what its reply was told goes into `told`.
    fn insert(bare: bool, v: i64, told: &std::sync::Arc<Mutex<Vec<(i64, bool)>>>) -> Work {
        let told = told.clone();
        let run: Run = Box::new(move |slot| {
            let step = match slot {
                Slot::Run(DbConnection::Sqlite(c)) => {
                    match c.batch_execute(&format!("INSERT INTO t (v) VALUES ({v})")) {
                        Ok(()) => Step::Keep,
                        Err(e) if bare => Step::Broken(e.to_string()),
                        Err(_) => Step::Undo,
                    }
                }
                _ => Step::Keep,
            };
            let reply: Reply = Box::new(move |failed| {
                told.lock().expect("told").push((v, failed.is_none()));
            });
            (step, reply)
        });
        Work { bare, run }
    }

    fn stored(c: &mut DbConnection) -> Vec<i64> {
        #[derive(diesel::QueryableByName)]
        struct V {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            v: i64,
        }
        let DbConnection::Sqlite(c) = c else {
            panic!("sqlite")
        };
        diesel::sql_query("SELECT v FROM t ORDER BY v")
            .load::<V>(c)
            .expect("read")
            .into_iter()
            .map(|r| r.v)
            .collect()
    }

    #[test]
    fn bare_work_keeps_its_write_and_its_failure_sinks_the_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut lite = open(&dir.path().join("x.db"));
        lite.batch_execute("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
            .expect("table");
        let mut conn = DbConnection::Sqlite(lite);
        let told = std::sync::Arc::new(Mutex::new(Vec::new()));

        // A failing request with a savepoint rolls back alone; bare work beside it
        // commits with the batch.
        let batch = vec![
            insert(false, 1, &told),
            insert(true, 2, &told),
            insert(false, 2, &told),
            insert(true, 3, &told),
        ];
        let (replies, failed) = commit_batch(&mut conn, batch);
        assert!(!failed);
        for (reply, outcome) in replies {
            reply(outcome.as_deref());
        }
        assert_eq!(stored(&mut conn), [1, 2, 3]);
        // The batch committed: every reply is told so (the third request's own
        // failure is its work's answer, which the reply carries in real work).
        assert_eq!(
            std::mem::take(&mut *told.lock().expect("told")),
            [(1, true), (2, true), (2, true), (3, true)]
        );

        // Bare work that fails after it ran may have left part of a write: nothing of
        // its batch is kept, before or after it, and every request is told.
        let batch = vec![
            insert(false, 4, &told),
            insert(true, 1, &told),
            insert(false, 5, &told),
        ];
        let (replies, failed) = commit_batch(&mut conn, batch);
        assert!(failed, "the batch failed as a whole");
        for (reply, outcome) in replies {
            reply(outcome.as_deref());
        }
        assert_eq!(stored(&mut conn), [1, 2, 3], "nothing of the batch is kept");
        assert_eq!(
            std::mem::take(&mut *told.lock().expect("told")),
            [(4, false), (1, false), (5, false)]
        );
    }

    /// A work whose statement makes SQLite roll back the whole transaction (as
    /// `SQLITE_FULL`, `SQLITE_IOERR` or `SQLITE_NOMEM` may): a trigger's
    /// `RAISE(ROLLBACK)`, run through `execute`, after which diesel still counts the
    /// savepoints it opened. `bare` as [`insert`]; with `record_then`, a replay record in
    /// front and the failing statement in its savepoint, as a signed write.
    fn rolls_back_all(
        bare: bool,
        record_then: bool,
        told: &std::sync::Arc<Mutex<Vec<(i64, bool)>>>,
    ) -> Work {
        let told = told.clone();
        let run: Run = Box::new(move |slot| {
            let boom = |c: &mut DbConnection| {
                diesel::sql_query("INSERT INTO boom (v) VALUES (1)")
                    .execute(c)
                    .map(drop)
                    .map_err(StoreError::from)
            };
            let step = match slot {
                Slot::Run(c) if record_then => {
                    let row = crate::db::replay::ReplayRow::new("c", "sig", 1, 2);
                    match crate::db::replay::record_then(c, &row, boom) {
                        Ok(_) => Step::Keep,
                        Err(StoreError::Replayed) => Step::Keep,
                        Err(e) => Step::Broken(e.to_string()),
                    }
                }
                Slot::Run(c) => match boom(c) {
                    Ok(()) => Step::Keep,
                    Err(e) if bare => Step::Broken(e.to_string()),
                    Err(_) => Step::Undo,
                },
                Slot::Refused(_) => Step::Keep,
            };
            let reply: Reply = Box::new(move |failed| {
                told.lock().expect("told").push((-1, failed.is_none()));
            });
            (step, reply)
        });
        Work { bare, run }
    }

    /// SQLite may end the whole transaction on an error inside a batch. The works after
    /// it must not run in autocommit mode (each statement committed on its own) and be
    /// acknowledged, nor may anything before it: the batch fails as a whole, whichever
    /// kind of work met the error.
    #[test]
    fn a_transaction_sqlite_rolled_back_inside_a_batch_fails_the_batch() {
        use diesel_migrations::MigrationHarness;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let mut lite = open(&path);
        lite.run_pending_migrations(crate::db::migrate::SQLITE_MIGRATIONS)
            .expect("migrations");
        lite.batch_execute(
            "CREATE TABLE t (v INTEGER NOT NULL UNIQUE); \
             CREATE TABLE boom (v INTEGER); \
             CREATE TRIGGER boom BEFORE INSERT ON boom BEGIN SELECT RAISE(ROLLBACK, 'gone'); END;",
        )
        .expect("tables");
        drop(lite);
        let told = std::sync::Arc::new(Mutex::new(Vec::new()));
        for (bare, record_then) in [(true, false), (false, false), (true, true)] {
            // A fresh connection per batch, as the writer takes after a failed one.
            let mut conn = DbConnection::Sqlite(open(&path));
            let batch = vec![
                insert(false, 10, &told),
                insert(true, 11, &told),
                rolls_back_all(bare, record_then, &told),
                insert(false, 12, &told),
                insert(true, 13, &told),
            ];
            let (replies, failed) = commit_batch(&mut conn, batch);
            for (reply, outcome) in replies {
                reply(outcome.as_deref());
            }
            let what = format!("bare {bare}, record_then {record_then}");
            assert!(failed, "{what}: the batch failed as a whole");
            let mut conn = DbConnection::Sqlite(open(&path));
            assert_eq!(stored(&mut conn), Vec::<i64>::new(), "{what}: nothing kept");
            assert_eq!(
                std::mem::take(&mut *told.lock().expect("told")),
                [
                    (10, false),
                    (11, false),
                    (-1, false),
                    (12, false),
                    (13, false)
                ],
                "{what}: nothing acknowledged"
            );
        }
    }
}
