//! Surviving I/O failures (a full disk, a failed fsync): a database handle that can be closed
//! and reopened in place, and the loop that keeps proving the database writable until it is.
//!
//! redb latches the first I/O error of a write: from then on every transaction of that
//! `Database` fails with `PreviousIo` until it is dropped and the file opened again (which
//! repairs it back to the last durable commit). `DbHandle` is what `Store` and the writer hold
//! instead of the `Database`, so the writer can swap in a fresh one while readers keep their
//! handle.
//!
//! **Invariant:** nobody but `DbHandle` holds the `Arc<redb::Database>`: transactions are begun
//! under the slot's read lock, and redb transactions do not borrow their database, so when the
//! writer takes the slot for a reopen, dropping the old `Database` closes its file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::clock::Instant;

use redb::{ReadableDatabase, StorageError, TransactionError};

use super::journal::Durability;
use super::writer::{WriteError, WriterHandle};
use super::{Opened, StoreError};

/// The first wait between two reopen attempts; doubles up to `MAX_BACKOFF` while they fail,
/// so a large file is not repaired over and over while the disk is still full.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Room the data directory must have before a database that failed on I/O is reopened: a
/// freshly reopened file takes small commits even on a full disk (they reuse free pages), so
/// without this check readiness would flap back to ready while real writes still fail.
pub const HEADROOM: usize = 1 << 20;

/// The scratch file that proves `HEADROOM`, removed right after.
const HEADROOM_FILE: &str = ".dispatchd-space-check";

/// A reopenable redb database: the only owner of the `redb::Database`.
pub struct DbHandle {
    path: PathBuf,
    cache_size: usize,
    journal_size: u64,
    slot: RwLock<Option<Current>>,
    /// The writer answers for its commits once they are durable (see `journal::Durability`);
    /// kept here so a reopened journal pipelines too.
    pipelined: AtomicBool,
    retry: Mutex<Retry>,
}

/// The database open now.
struct Current {
    db: Arc<redb::Database>,
    durability: Option<Durability>,
}

impl Current {
    fn new(opened: Opened, pipelined: bool) -> Self {
        if let Some(d) = &opened.durability
            && pipelined
        {
            d.pipeline();
        }
        Self {
            db: Arc::new(opened.db),
            durability: opened.durability,
        }
    }
}

#[derive(Debug)]
struct Retry {
    not_before: Option<Instant>,
    backoff: Duration,
}

impl DbHandle {
    /// Wraps a freshly opened database that lives at `path`.
    pub(crate) fn new(db: Opened, path: &Path, cache_size: usize, journal_size: u64) -> Self {
        Self {
            path: path.to_path_buf(),
            cache_size,
            journal_size,
            slot: RwLock::new(Some(Current::new(db, false))),
            pipelined: AtomicBool::new(false),
            retry: Mutex::new(Retry {
                not_before: None,
                backoff: FIRST_BACKOFF,
            }),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size of the database file in bytes (0 when it cannot be read).
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Begins a read transaction on the current database.
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, TransactionError> {
        let slot = self.slot.read().map_err(|_| closed())?;
        match slot.as_ref() {
            Some(c) => c.db.begin_read(),
            None => Err(closed()),
        }
    }

    /// Begins a write transaction on the current database. Only the writer thread writes.
    pub fn begin_write(&self) -> Result<redb::WriteTransaction, TransactionError> {
        let slot = self.slot.read().map_err(|_| closed())?;
        match slot.as_ref() {
            Some(c) => c.db.begin_write(),
            None => Err(closed()),
        }
    }

    /// From now on a commit returns before it is durable, and its writer learns of that
    /// through [`DbHandle::durability`]. Only the writer thread calls this.
    pub fn pipeline(&self) {
        self.pipelined.store(true, Ordering::Relaxed);
        if let Some(d) = self.durability() {
            d.pipeline();
        }
    }

    /// The durability of the current database's commits; `None` without a journal, where a
    /// commit is durable when it returns.
    pub fn durability(&self) -> Option<Durability> {
        let slot = self.slot.read().ok()?;
        slot.as_ref().and_then(|c| c.durability.clone())
    }

    /// Proves the data directory takes `HEADROOM` bytes (written, synced and removed): space
    /// has returned and the file system is writable.
    pub fn check_headroom(&self) -> Result<(), StoreError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let scratch = dir.join(HEADROOM_FILE);
        let result = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&scratch)?;
            f.write_all(&vec![0u8; HEADROOM])?;
            f.sync_data()
        })();
        let _ = std::fs::remove_file(&scratch);
        result.map_err(|e| {
            StoreError::Reopen(format!(
                "the data directory {} has no room for {} KiB: {e}",
                dir.display(),
                HEADROOM >> 10
            ))
        })
    }

    /// Closes the current database and opens the file again, which rolls it back to its last
    /// durable commit. Attempts are spaced out by a growing backoff while they fail; one made
    /// too early fails at once with `ReopenBackoff`.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut retry = self
            .retry
            .lock()
            .map_err(|_| StoreError::Reopen("lock poisoned".into()))?;
        if let Some(t) = retry.not_before {
            let now = Instant::now();
            if now < t {
                return Err(StoreError::Reopen(format!(
                    "next attempt in {} ms",
                    (t - now).as_millis()
                )));
            }
        }
        let poisoned = |_| StoreError::Reopen("lock poisoned".into());
        // Taken out under the lock, dropped and reopened outside it: readers meanwhile fail
        // at once with `DatabaseClosed` instead of blocking their threads through a repair.
        // Dropping the last reference closes the file and releases its lock.
        let old = self.slot.write().map_err(poisoned)?.take();
        drop(old);
        let opened = super::open_database(&self.path, self.cache_size, self.journal_size);
        match opened {
            Ok(db) => {
                let current = Current::new(db, self.pipelined.load(Ordering::Relaxed));
                *self.slot.write().map_err(poisoned)? = Some(current);
                retry.not_before = None;
                retry.backoff = FIRST_BACKOFF;
                tracing::info!(path = %self.path.display(), "database reopened after an I/O failure");
                Ok(())
            }
            Err(e) => {
                retry.not_before = Some(Instant::now() + retry.backoff);
                retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
                Err(e)
            }
        }
    }
}

fn closed() -> TransactionError {
    TransactionError::Storage(StorageError::DatabaseClosed)
}

/// Whether a failure to begin a write transaction means the `Database` must be reopened.
pub fn needs_reopen(e: &TransactionError) -> bool {
    matches!(
        e,
        TransactionError::Storage(
            StorageError::PreviousIo | StorageError::DatabaseClosed | StorageError::Io(_)
        )
    )
}

/// While the writer is unhealthy (its last commit failed), proves the database writable with
/// an empty commit, first after `every` and then backing off to `16 * every` while it keeps
/// failing; the writer reopens the file when it needs to. Without this a daemon with no
/// traffic and no readiness probes would stay unready after space returns. Runs until `stop`.
pub async fn heal(
    writer: WriterHandle,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut wait = every;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stop => return,
        }
        if writer.health.ok() {
            wait = every;
            continue;
        }
        match writer.probe().await {
            Ok(()) => {
                tracing::info!("the database is writable again");
                wait = every;
            }
            Err(WriteError::Stopped) => return,
            Err(_) => wait = (wait * 2).min(every * 16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::Store;

    #[test]
    fn reopen_keeps_committed_data_and_readers_carry_on() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("dispatchd.redb"), 1 << 20, 1 << 20).unwrap();
        let w = store.db().begin_write().unwrap();
        {
            let mut t = w.open_table(crate::storage::schema::EVENT_IDS).unwrap();
            t.insert("evt_1", 1).unwrap();
        }
        w.commit().unwrap();
        // A read transaction open across the reopen keeps working on the old snapshot or
        // fails cleanly; it never blocks the reopen.
        let old_reader = store.db().begin_read().unwrap();
        store.db().check_headroom().unwrap();
        assert!(!tmp.path().join(HEADROOM_FILE).exists());
        store.db().reopen().unwrap();
        drop(old_reader);
        let r = store.db().begin_read().unwrap();
        let t = r.open_table(crate::storage::schema::EVENT_IDS).unwrap();
        assert_eq!(t.get("evt_1").unwrap().map(|g| g.value()), Some(1));
        assert!(store.readable());
    }

    #[test]
    fn failed_reopens_back_off() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("dispatchd.redb");
        let store = Store::open(&path, 1 << 20, 1 << 20).unwrap();
        // A directory where the file was makes reopening fail.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(store.db().reopen().is_err());
        assert!(!store.readable());
        let e = store.db().reopen().unwrap_err().to_string();
        assert!(e.contains("next attempt in"), "{e}");
    }

    #[test]
    fn io_failures_need_a_reopen() {
        assert!(needs_reopen(&TransactionError::Storage(
            StorageError::PreviousIo
        )));
        assert!(needs_reopen(&closed()));
        assert!(!needs_reopen(&TransactionError::WouldBlock));
    }
}
