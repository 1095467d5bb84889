//! The SQLite WAL as the writer sees it: when a reset (a RESTART checkpoint after a
//! write) is due or urgent, the reset itself, the housekeeping's PASSIVE checkpoint,
//! and what happens when the WAL or its index is removed under the running server.
//! The backfill thread that keeps resets short is in `writer.rs`; why these sizes
//! is in docs/decisions.md ("SQLite WAL bound").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::r2d2::PooledConnection;
use diesel::RunQueryDsl;

use super::{writer, Backend, ConnectionManager, Db, DbConnection, Shared};
use crate::error::StoreError;

/// On SQLite the writer resets the WAL (a RESTART checkpoint, after replying) once it
/// holds this many bytes of frames, as counted by the backfiller's last pass. The next
/// write then starts over at the front of the file, overwriting blocks already
/// allocated: no truncation, no fresh blocks for the file system to allocate, journal
/// or discard. Every reset makes the writes queued behind it wait for a few fsyncs;
/// why this size and not a larger one is in docs/decisions.md.
pub const WAL_RESET_BYTES: u64 = 16 << 20;
/// The `journal_size_limit`: a WAL file that grew past it (while resets could not run,
/// or while the frame count lagged) is cut back to it when the WAL next restarts. The
/// file keeps its size across resets, so only a file past this says anything about the
/// frames in it: then a reset is due whatever the count says, and one frame count or
/// file this far past it makes it urgent (the writer waits for the backfiller's turn
/// instead of skipping). Keeps the WAL file below 64 MiB under continuous load.
pub const WAL_LIMIT_BYTES: u64 = 24 << 20;
/// How long a RESTART checkpoint waits for readers still using the WAL before it gives
/// up (the writer's connection is held meanwhile, so every queued write waits too).
const CHECKPOINT_BUSY_MS: u64 = 100;
/// The same wait once the reset is urgent (the WAL ran past its limit because readers
/// kept the resets before from finishing): writes stall for up to this long rather than
/// let the WAL grow without bound; the door and the request deadlines shed meanwhile.
const URGENT_CHECKPOINT_BUSY_MS: u64 = 1000;
/// After a reset that readers kept from finishing, a due one is not tried again for
/// this long (an urgent one is): a long read must not stall every batch by
/// `CHECKPOINT_BUSY_MS`.
const RESET_RETRY_AFTER_MS: u64 = 250;

/// (device, inode) of the database file, the WAL file and the WAL index (`-shm`).
pub(super) type FileIds = [(u64, u64); 3];

/// What [`Wal::still_the_files`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Files {
    Same,
    /// The WAL or its index was removed or replaced.
    WalRemoved,
    /// The database file itself was: whatever is written through the connections
    /// still open goes into a file nobody will open again.
    DatabaseRemoved,
}

/// What the writer knows about the SQLite WAL file.
pub(super) struct Wal {
    /// The database file as configured, perhaps through a symbolic link.
    db: std::path::PathBuf,
    /// The WAL and its index (`-shm`) where SQLite keeps them: next to the file the
    /// configured path resolves to, since SQLite follows symbolic links (a data
    /// directory or file linked into place). Resolved once the database file exists.
    files: OnceLock<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    /// Set once the WAL or its index was removed (or replaced) under the running
    /// server: every operation is refused from then on (the health probe fails), until
    /// a restart opens the files afresh.
    pub(super) removed: Arc<AtomicBool>,
    /// File size at the last measurement (after every write).
    pub(super) bytes: AtomicU64,
    /// Largest file size measured.
    pub(super) max_bytes: AtomicU64,
    /// Bytes of frames in the WAL as of the backfiller's last pass (0 after a reset).
    pub(super) frame_bytes: AtomicU64,
    /// Writes measured so far: the backfiller skips its pass when none came since.
    pub(super) writes: AtomicU64,
    /// `writes` when the last complete reset ran: until the next write (which starts
    /// the WAL over) the WAL still reports its old frames, all copied back.
    pub(super) writes_at_reset: AtomicU64,
    /// What `retry_at_ms` counts from.
    pub(super) opened: Instant,
    /// No due (not urgent) reset before this, in ms since `opened` (set by an
    /// incomplete one).
    pub(super) retry_at_ms: AtomicU64,
    pub(super) checkpoints: AtomicU64,
    /// Resets that could not finish (readers kept the WAL busy).
    pub(super) incomplete: AtomicU64,
}

/// A WAL reset due after a write, with the connection that wrote (it runs the reset).
pub(super) type ResetDue = (PooledConnection<ConnectionManager>, WalReset);

/// Is a WAL reset due after a write, and has the WAL run so far past it that the
/// writer should wait for its turn rather than skip?
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum WalReset {
    No,
    Due,
    Urgent,
}

impl Wal {
    pub(super) fn new(db_path: &str, removed: Arc<AtomicBool>) -> Self {
        Wal {
            db: db_path.into(),
            files: OnceLock::new(),
            removed,
            bytes: AtomicU64::new(0),
            max_bytes: AtomicU64::new(0),
            frame_bytes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            writes_at_reset: AtomicU64::new(u64::MAX),
            opened: Instant::now(),
            retry_at_ms: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            incomplete: AtomicU64::new(0),
        }
    }

    /// Are the WAL and its index still the files the writing connection wrote through
    /// (`seen`: their ids after its first write, recorded here)? While a connection is
    /// open SQLite neither removes nor replaces them (the WAL goes when the last
    /// connection closes, and ours is open), so a file missing, or another file under
    /// its name, was removed under the server: its frames, acknowledged writes among
    /// them, live on only in the copies still open, and a connection opened now reads
    /// another WAL than the writer writes.
    /// The database file is watched the same way (review, 2026-12-06): SQLite keeps
    /// writing into a removed one through its open descriptors, and acknowledged
    /// every write into it.
    pub(super) fn still_the_files(&self, seen: &mut Option<FileIds>) -> Files {
        // No database file yet: nothing was written through these files.
        let Some((db, wal, shm)) = self.files() else {
            return Files::Same;
        };
        same_files([file_id(db), file_id(wal), file_id(shm)], seen)
    }

    /// The WAL and its index as SQLite names them: the configured path with its
    /// symbolic links resolved (as SQLite does when it opens the file), and `-wal`,
    /// `-shm`. Before the review of 2026-12-06 they were looked for next to the path
    /// as configured: through a link nothing is there, so a removed WAL went unnoticed
    /// and the WAL's size read 0.
    fn files(&self) -> Option<&(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
        if let Some(f) = self.files.get() {
            return Some(f);
        }
        let real = std::fs::canonicalize(&self.db).ok()?;
        let beside = |suffix: &str| {
            let mut name = real.clone().into_os_string();
            name.push(suffix);
            std::path::PathBuf::from(name)
        };
        Some(
            self.files
                .get_or_init(|| (real.clone(), beside("-wal"), beside("-shm"))),
        )
    }

    pub(super) fn measure(&self) -> u64 {
        let n = self
            .files()
            .and_then(|(_, wal, _)| std::fs::metadata(wal).ok())
            .map_or(0, |m| m.len());
        self.bytes.store(n, Ordering::Relaxed);
        self.max_bytes.fetch_max(n, Ordering::Relaxed);
        n
    }

    /// After a write: measure the file and say whether a reset is due.
    pub(super) fn after_write(&self) -> WalReset {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let file = self.measure();
        match wal_reset(self.frame_bytes.load(Ordering::Relaxed), file) {
            WalReset::Due if self.elapsed_ms() < self.retry_at_ms.load(Ordering::Relaxed) => {
                WalReset::No
            }
            r => r,
        }
    }

    pub(super) fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Record a reset's outcome: the next due one may run at once, or after a pause.
    pub(super) fn reset_done(&self, complete: bool) {
        let at = if complete {
            self.frame_bytes.store(0, Ordering::Relaxed);
            self.writes_at_reset
                .store(self.writes.load(Ordering::Relaxed), Ordering::Relaxed);
            0
        } else {
            self.incomplete.fetch_add(1, Ordering::Relaxed);
            self.elapsed_ms().saturating_add(RESET_RETRY_AFTER_MS)
        };
        self.retry_at_ms.store(at, Ordering::Relaxed);
    }
}

/// (device, inode) of a file; `Ok(None)` when nothing is under that name.
fn file_id(path: &std::path::Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`Wal::still_the_files`] on the ids found now. Only a file missing or another file
/// under its name is a removal: a `stat` that fails otherwise (permissions changed on
/// the directory for a moment, `EIO`/`ESTALE` on a network file system, no memory)
/// says nothing about SQLite's open files and must not take the server out of service
/// until a restart; the next write looks again.
fn same_files(now: [std::io::Result<Option<(u64, u64)>>; 3], seen: &mut Option<FileIds>) -> Files {
    let [db, wal, shm] = now;
    let (db, wal, shm) = match (db, wal, shm) {
        (Ok(db), Ok(wal), Ok(shm)) => (db, wal, shm),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            log::warn!("cannot tell whether the SQLite files are still in place: {e}");
            return Files::Same;
        }
    };
    match (db, wal, shm, *seen) {
        (db, _, _, Some(ids)) if db != Some(ids[0]) => Files::DatabaseRemoved,
        (_, Some(wal), Some(shm), Some(ids)) if [wal, shm] == [ids[1], ids[2]] => Files::Same,
        (_, _, _, Some(_)) => Files::WalRemoved,
        (Some(db), Some(wal), Some(shm), None) => {
            *seen = Some([db, wal, shm]);
            Files::Same
        }
        // Not in WAL mode (`sqlite_wal` could not switch): nothing to watch.
        (_, _, _, None) => Files::Same,
    }
}

/// The reset rule: due at [`WAL_RESET_BYTES`] of frames or a file past
/// [`WAL_LIMIT_BYTES`] (the frame count is only as fresh as the backfiller's last pass);
/// urgent at the limit of frames or a file as far again past it.
pub(super) fn wal_reset(frame_bytes: u64, file_bytes: u64) -> WalReset {
    let margin = WAL_LIMIT_BYTES - WAL_RESET_BYTES;
    if frame_bytes >= WAL_LIMIT_BYTES || file_bytes >= WAL_LIMIT_BYTES + margin {
        WalReset::Urgent
    } else if frame_bytes >= WAL_RESET_BYTES || file_bytes > WAL_LIMIT_BYTES {
        WalReset::Due
    } else {
        WalReset::No
    }
}

/// A row of `PRAGMA wal_checkpoint(…)`: whether it could not finish, the frames in the
/// WAL and how many of them are now in the database file.
#[derive(diesel::QueryableByName)]
pub(super) struct CheckpointOutcome {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub(super) busy: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub(super) log: i32,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub(super) checkpointed: i32,
}

/// What the log and the health probe say once the WAL was removed under the server.
pub(super) const WAL_REMOVED: &str =
    "the SQLite database file, its WAL or its index (-wal, -shm) was removed while \
     the server was running; every request is refused until the server is restarted";

/// The WAL or its index was removed under the server (`Wal::still_the_files`): copy
/// every frame into the database file through the writing connection, which still
/// has the removed WAL open (a TRUNCATE checkpoint, waiting up to
/// `URGENT_CHECKPOINT_BUSY_MS` for readers), so that what was acknowledged, and the
/// write about to be, no longer depends on it. Then refuse everything until a
/// restart: connections opened before and after the removal read different files,
/// and a write now would go where new connections cannot read it. `Err` when the copy
/// did not finish: the write must not be acknowledged.
///
/// The database file itself removed: nothing can be rescued (the copy would go into
/// the removed file too), and the write is never acknowledged.
pub(super) fn rescue_removed_wal(
    shared: &Shared,
    wal: &Wal,
    lite: &mut DbConnection,
    found: Files,
) -> Result<(), String> {
    let first = !wal.removed.swap(true, Ordering::AcqRel);
    let copied = match lite {
        _ if found == Files::DatabaseRemoved => {
            Err("the database file itself is gone, with what was written to it".to_owned())
        }
        DbConnection::Sqlite(lite) => {
            let _turn = writer::checkpoint_turn(&shared.checkpointing, true);
            lite.batch_execute(&format!(
                "PRAGMA busy_timeout = {URGENT_CHECKPOINT_BUSY_MS};"
            ))
            .and_then(|()| {
                diesel::sql_query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .get_result::<CheckpointOutcome>(lite)
            })
            .map_err(|e| e.to_string())
            .and_then(|o| {
                (o.busy == 0)
                    .then_some(())
                    .ok_or_else(|| "readers kept the checkpoint from finishing".to_owned())
            })
        }
        DbConnection::Postgresql(_) => Ok(()),
    };
    if first {
        match &copied {
            Ok(()) => log::error!(
                "{WAL_REMOVED}; every committed write was copied into the database file"
            ),
            Err(e) => log::error!(
                "{WAL_REMOVED}; the last writes could not be copied into the database file \
                 ({e}) and were not acknowledged"
            ),
        }
    }
    shared.health.trip(None, WAL_REMOVED);
    copied.map_err(|e| format!("{WAL_REMOVED}: {e}"))
}

/// SQLite, on the writing connection after a write (the writer thread's, or a
/// synchronous write's): RESTART checkpoint, so the next write starts the WAL over at
/// its front. It takes the checkpoint turn from the backfiller — skipping when a pass
/// is running, unless the reset is urgent, when it waits for the pass to end. Readers
/// still using the WAL are waited for at most `CHECKPOINT_BUSY_MS`
/// (`URGENT_CHECKPOINT_BUSY_MS` when urgent); if they keep it, a later write tries
/// again.
pub(super) fn reset_wal(
    shared: &Shared,
    mut c: PooledConnection<ConnectionManager>,
    reset: WalReset,
) {
    let Some(wal) = &shared.wal else { return };
    let urgent = reset == WalReset::Urgent;
    let Some(_turn) = writer::checkpoint_turn(&shared.checkpointing, urgent) else {
        return;
    };
    let DbConnection::Sqlite(lite) = &mut c.conn else {
        return;
    };
    let busy_ms = shared.busy_ms();
    let wait_ms = if urgent {
        URGENT_CHECKPOINT_BUSY_MS
    } else {
        CHECKPOINT_BUSY_MS
    };
    let r = lite
        .batch_execute(&format!("PRAGMA busy_timeout = {};", busy_ms.min(wait_ms)))
        .and_then(|()| {
            diesel::sql_query("PRAGMA wal_checkpoint(RESTART)")
                .get_result::<CheckpointOutcome>(lite)
        });
    let restored = lite.batch_execute(&format!("PRAGMA busy_timeout = {busy_ms};"));
    wal.checkpoints.fetch_add(1, Ordering::Relaxed);
    match r {
        Ok(o) if o.busy == 0 => wal.reset_done(true),
        Ok(_) => {
            wal.reset_done(false);
            log::debug!("WAL reset incomplete: readers still use the WAL");
        }
        Err(e) => {
            wal.reset_done(false);
            log::warn!("WAL reset failed: {e}");
        }
    }
    if restored.is_err() {
        c.broken = true;
    }
    wal.measure();
}

impl Db {
    /// SQLite: copy the WAL back into the database file without blocking writers (a
    /// PASSIVE checkpoint, run once per housekeeping pass). Automatic checkpoints are
    /// off; most checkpoints are the writer's backfill thread's (every 100 ms) and its
    /// RESTART resets (`reset_wal`), see `db/writer.rs`. PostgreSQL: nothing to do.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        if self.backend != Backend::Sqlite {
            return Ok(());
        }
        self.read(|conn| {
            conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);")?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Only a missing or replaced file is a removal; a `stat` that fails otherwise is
    /// no verdict (before: any error counted as "missing", and the server refused
    /// everything until a restart).
    #[test]
    fn only_a_missing_or_replaced_file_is_a_removal() {
        use std::io::{Error, ErrorKind};
        let (db, wal, shm) = ((1, 9), (1, 10), (1, 11));
        let mut seen = None;
        let same = Files::Same;
        assert_eq!(
            same_files([Ok(Some(db)), Ok(Some(wal)), Ok(Some(shm))], &mut seen),
            same
        );
        assert_eq!(seen, Some([db, wal, shm]), "recorded after the first write");
        assert_eq!(
            same_files([Ok(Some(db)), Ok(Some(wal)), Ok(Some(shm))], &mut seen),
            same
        );
        for kind in [ErrorKind::PermissionDenied, ErrorKind::Other] {
            let e = || Err(Error::from(kind));
            assert_eq!(
                same_files([e(), Ok(Some(wal)), Ok(Some(shm))], &mut seen),
                same
            );
            assert_eq!(
                same_files([Ok(Some(db)), e(), Ok(Some(shm))], &mut seen),
                same
            );
            assert_eq!(
                same_files([Ok(Some(db)), Ok(Some(wal)), e()], &mut seen),
                same
            );
        }
        assert_eq!(seen, Some([db, wal, shm]));
        let wal_gone = Files::WalRemoved;
        assert_eq!(
            same_files([Ok(Some(db)), Ok(None), Ok(Some(shm))], &mut seen),
            wal_gone
        );
        assert_eq!(
            same_files([Ok(Some(db)), Ok(Some(wal)), Ok(None)], &mut seen),
            wal_gone
        );
        assert_eq!(
            same_files([Ok(Some(db)), Ok(Some((1, 12))), Ok(Some(shm))], &mut seen),
            wal_gone
        );
        let db_gone = Files::DatabaseRemoved;
        assert_eq!(
            same_files([Ok(None), Ok(Some(wal)), Ok(Some(shm))], &mut seen),
            db_gone
        );
        assert_eq!(
            same_files([Ok(Some((1, 13))), Ok(None), Ok(Some(shm))], &mut seen),
            db_gone
        );
        let mut none = None;
        assert_eq!(
            same_files([Ok(Some(db)), Ok(None), Ok(None)], &mut none),
            same
        );
        assert_eq!(none, None, "not in WAL mode");
    }

    #[test]
    fn wal_reset_is_due_on_the_frame_count_or_a_file_grown_past_the_limit() {
        let (reset, limit) = (WAL_RESET_BYTES, WAL_LIMIT_BYTES);
        // The file keeps its size after a reset (up to the journal size limit): a
        // large file with few frames is no reason for another reset.
        assert_eq!(wal_reset(0, limit), WalReset::No);
        assert_eq!(wal_reset(reset - 1, limit), WalReset::No);
        assert_eq!(wal_reset(reset, limit), WalReset::Due);
        // A stale frame count: a file grown past the limit is enough.
        assert_eq!(wal_reset(0, limit + 1), WalReset::Due);
        assert_eq!(wal_reset(limit - 1, limit), WalReset::Due);
        assert_eq!(wal_reset(limit, limit), WalReset::Urgent);
        let far = limit + (limit - reset);
        assert_eq!(wal_reset(0, far - 1), WalReset::Due);
        assert_eq!(wal_reset(0, far), WalReset::Urgent);
        const { assert!(WAL_RESET_BYTES < WAL_LIMIT_BYTES) };
        const {
            assert!(
                2 * WAL_LIMIT_BYTES - WAL_RESET_BYTES <= 32 << 20,
                "urgent well below 64 MiB"
            )
        };
    }

    #[test]
    fn a_reset_readers_held_up_is_not_retried_at_once_unless_urgent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("x.db");
        std::fs::write(&db, b"").expect("database file");
        std::fs::write(dir.path().join("x.db-wal"), b"").expect("wal file");
        let wal = Wal::new(&db.to_string_lossy(), Arc::new(AtomicBool::new(false)));
        wal.frame_bytes.store(WAL_RESET_BYTES, Ordering::Relaxed);
        assert_eq!(wal.after_write(), WalReset::Due);
        wal.reset_done(false);
        assert_eq!(wal.incomplete.load(Ordering::Relaxed), 1);
        assert_eq!(
            wal.after_write(),
            WalReset::No,
            "paused after an incomplete reset"
        );
        wal.frame_bytes.store(WAL_LIMIT_BYTES, Ordering::Relaxed);
        assert_eq!(
            wal.after_write(),
            WalReset::Urgent,
            "an urgent one is not paused"
        );
        wal.frame_bytes.store(WAL_RESET_BYTES, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(RESET_RETRY_AFTER_MS + 20));
        assert_eq!(
            wal.after_write(),
            WalReset::Due,
            "due again after the pause"
        );
        wal.reset_done(true);
        assert_eq!(wal.frame_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(
            wal.writes_at_reset.load(Ordering::Relaxed),
            4,
            "the backfiller learns after which write the reset ran"
        );
        assert_eq!(wal.after_write(), WalReset::No);
    }
}
