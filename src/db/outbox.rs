//! PostgreSQL notifications sent after the write that made them has committed.
//!
//! A `NOTIFY` inside a transaction makes its commit take a lock that every notifying
//! transaction of the database shares, and hold it until the commit is flushed: the
//! service's job changes then commit one at a time, each waiting out the flush of the
//! one before (measured: half the write rate on the same server; `docs/decisions.md`,
//! "Notifications after commit"). So the job statements queue their notification here
//! ([`after_commit`]) instead, and `Db` sends what a write queued once the write has
//! returned `Ok` — the work's transaction has committed — and drops it on `Err`:
//!
//! - to the instance's notification thread, when one has registered ([`Outbox::take_receiver`]):
//!   it sends every queued payload with one statement, outside any data transaction;
//! - otherwise, or when that queue is full, on the same connection at once, one
//!   statement for all of them (a CLI command, a full queue: never dropped).
//!
//! The payloads wait in a per-thread list between the statement that made them and the
//! end of the `Db` call on the same thread (the write runs synchronously on it); `Db`
//! empties the list before and after every write, so it never outlives one call.

use std::cell::RefCell;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;

use diesel::sql_types::{Array, Text};
use diesel::RunQueryDsl;

use super::DbConnection;
use crate::error::StoreError;

/// The channel every instance listens and notifies on.
pub const CHANNEL: &str = "coordinator_jobs";

/// Batches waiting for the notification thread; past this a writer sends its own.
const QUEUE: usize = 1024;

thread_local! {
    static PENDING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Queue a notification for when the current write commits (PostgreSQL; dropped if it
/// does not). Outside a `Db` write it is dropped by the next one on this thread.
pub fn after_commit(payload: String) {
    PENDING.with(|p| p.borrow_mut().push(payload));
}

/// Forget what an earlier write on this thread may have left (none should have).
pub(super) fn clear() {
    PENDING.with(|p| p.borrow_mut().clear());
}

/// What the write that just returned queued.
pub(super) fn take() -> Vec<String> {
    PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// Where committed writes' notifications go: the notification thread's queue, once it
/// has taken the receiving end.
#[derive(Default)]
pub struct Outbox {
    tx: OnceLock<SyncSender<Vec<String>>>,
}

impl Outbox {
    /// The receiving end, for the one thread that sends the notifications
    /// ([`send_now`]); `None` once taken. Until it is taken writers send their own.
    pub fn take_receiver(&self) -> Option<Receiver<Vec<String>>> {
        let (tx, rx) = sync_channel(QUEUE);
        self.tx.set(tx).ok().map(|()| rx)
    }

    /// Send the payloads of a committed write: to the notification thread, or on `conn`
    /// itself when there is none or its queue is full.
    pub(super) fn publish(&self, conn: &mut DbConnection, payloads: Vec<String>) {
        if payloads.is_empty() {
            return;
        }
        let payloads = match self.tx.get() {
            Some(tx) => match tx.try_send(payloads) {
                Ok(()) => return,
                Err(TrySendError::Full(p) | TrySendError::Disconnected(p)) => p,
            },
            None => payloads,
        };
        if let Err(e) = send_now(conn, &payloads) {
            // The change itself is committed; waiters elsewhere find it on their next
            // look (a stream's keep-alive re-read, a claim's next poll).
            log::warn!("push: could not notify other instances of a change: {e}");
        }
    }
}

/// `SELECT pg_notify(channel, p) FROM unnest(payloads)`: one statement for all of them
/// (PostgreSQL keeps their order). Nothing on SQLite, whose instances read
/// `job_events` instead.
pub fn send_now(conn: &mut DbConnection, payloads: &[String]) -> Result<(), StoreError> {
    match conn {
        DbConnection::Postgresql(pg) => send_now_pg(pg, payloads),
        DbConnection::Sqlite(_) => Ok(()),
    }
}

/// [`send_now`] on a PostgreSQL connection of its own (the notification thread's).
pub fn send_now_pg(pg: &mut diesel::PgConnection, payloads: &[String]) -> Result<(), StoreError> {
    diesel::sql_query("SELECT pg_notify($1, p) FROM unnest($2) AS p")
        .bind::<Text, _>(CHANNEL)
        .bind::<Array<Text>, _>(payloads)
        .execute(pg)?;
    Ok(())
}
