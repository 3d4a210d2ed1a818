//! The commit journal: each commit made durable by one sequential append.
//!
//! redb makes a commit durable by writing its dirty pages where they live in the file and then
//! calling fsync. Copy-on-write scatters those pages over the file, and on a virtual disk every
//! separate run of pages is a request of its own: on the reference machine 26 scattered pages
//! took 1.4 ms to sync where the same 26 pages written contiguously took 0.4 ms.
//!
//! [`JournaledFile`] is the redb storage backend that turns the scattered sync into a
//! sequential one. Every write still goes to the database file at once, so redb and readers
//! find it there, and is also copied into a pending record. redb calls `sync_data` at the end
//! of each commit: the record is appended to the active journal file, one contiguous write, and
//! only the journal is fsynced. The database file is fsynced in the background, at a
//! checkpoint, when the active journal file is full; the other file takes the appends
//! meanwhile, and a file is reused only after its checkpoint retired it.
//!
//! **Crash model.** After a crash the database file holds every write up to the last
//! checkpoint, plus some subset of the writes made since. The journal holds, in order, every
//! record since that checkpoint whose fsync returned. [`open`] replays them, older file first,
//! before redb opens the file: every write up to the last completed `sync_data` is then in
//! place, plus some subset of the writes made after it. That is exactly the state redb's own
//! protocol (write pages, fsync, write header, checksums) recovers from after a crash with
//! plain fsync, so a commit whose `commit()` returned is never lost.
//!
//! **Format.** Two files beside the database, `<db>.journal-0` and `<db>.journal-1`. Each
//! grows to the configured size on its first use and is then overwritten in place, so later
//! appends change no file metadata (a cheaper fsync). Each is a sequence of records, all
//! little-endian:
//!
//! ```text
//! magic u32 | generation u64 | payload length u32 | crc32 u32 | payload
//! ```
//!
//! The CRC covers generation, length and payload. A file's generation is that of its first
//! record; replay reads records while they are whole (CRC) and of that generation, which
//! stops it at a torn append or at stale records of an earlier use of the file. The payload is
//! a list of operations: `1, offset u64, length u32, bytes` for a write and `2, length u64` for
//! a resize. A checkpoint retires a file by overwriting the magic of its first record, keeping
//! the generation readable, so a new generation is always larger than any record in either
//! file.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::StorageBackend;
use redb::backends::FileBackend;

/// The first four bytes of a live record.
const LIVE: u32 = u32::from_le_bytes(*b"DJR1");
/// The first four bytes of a retired file: its content is in the synced database file.
const RETIRED: u32 = u32::from_le_bytes(*b"DJRx");
/// magic, generation, payload length, crc.
const HEADER: usize = 4 + 8 + 4 + 4;
const OP_WRITE: u8 = 1;
const OP_SET_LEN: u8 = 2;
/// Smallest journal file: a commit larger than a file is still written whole (the file grows).
pub const MIN_SIZE: u64 = 1 << 20;

/// The journal file `n` (0 or 1) of the database at `db`.
pub fn journal_path(db: &Path, n: usize) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(format!(".journal-{n}"));
    PathBuf::from(name)
}

/// What can go wrong opening or replaying the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{0}: {1}")]
    Io(String, io::Error),
    #[error("{0} is in use by another process")]
    Locked(String),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> JournalError + '_ {
    move |e| JournalError::Io(path.display().to_string(), e)
}

/// The redb storage backend of a journaled database file. See the module documentation.
pub struct JournaledFile {
    main: Arc<FileBackend>,
    state: Mutex<State>,
    checkpoint: Arc<Checkpoint>,
}

struct State {
    /// `None` once closed.
    files: Option<[Arc<File>; 2]>,
    active: usize,
    /// Where the next record of the active file goes.
    pos: u64,
    generation: u64,
    size: u64,
    /// The record being built: `HEADER` bytes reserved, then the operations since the last
    /// sync.
    pending: Vec<u8>,
}

#[derive(Default)]
struct Checkpoint {
    state: Mutex<CheckpointState>,
    done: Condvar,
}

#[derive(Default)]
struct CheckpointState {
    running: bool,
    /// A failed checkpoint: the journal may not be reused, so no further file switch is made
    /// and the writer's next commit that needs one fails; reopening replays both files.
    failed: Option<String>,
}

impl fmt::Debug for JournaledFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournaledFile").finish_non_exhaustive()
    }
}

/// Opens the database file at `path` with its journal: takes the journal lock (one process
/// at a time), creates the journal files (each used up to `size` bytes), and replays what a
/// crash left in them into the database file. The result is what redb opens.
pub fn open(path: &Path, size: u64) -> Result<JournaledFile, JournalError> {
    let size = size.max(MIN_SIZE);
    let main = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_at(path))?;
    let (files, generation) = lock_and_replay(path, &main)?;
    let files = match files {
        Some(f) => f,
        None => return Err(JournalError::Locked(path.display().to_string())),
    };
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io_at(dir))?;
    }
    let main = FileBackend::new(main).map_err(|e| {
        JournalError::Io(path.display().to_string(), io::Error::other(e.to_string()))
    })?;
    let mut pending = Vec::with_capacity(1 << 20);
    pending.resize(HEADER, 0);
    Ok(JournaledFile {
        main: Arc::new(main),
        state: Mutex::new(State {
            files: Some(files.map(Arc::new)),
            active: 0,
            pos: 0,
            generation: generation + 1,
            size,
            pending,
        }),
        checkpoint: Arc::default(),
    })
}

/// Replays the journal of the database at `path` into it, if there is one, and retires it;
/// for tools that open the file without the daemon (verify). Fails with `Locked` while a
/// daemon has it open.
pub fn recover(path: &Path) -> Result<(), JournalError> {
    if !journal_path(path, 0).exists() && !journal_path(path, 1).exists() {
        return Ok(());
    }
    let main = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    match lock_and_replay(path, &main)? {
        (Some(files), _) => {
            for f in &files {
                let _ = f.unlock();
            }
            Ok(())
        }
        (None, _) => Err(JournalError::Locked(path.display().to_string())),
    }
}

/// Opens (or creates) both journal files, locks the first, replays live records into `main`,
/// syncs it and retires them. Returns `None` when the lock is held elsewhere, and the largest
/// generation seen.
fn lock_and_replay(path: &Path, main: &File) -> Result<(Option<[File; 2]>, u64), JournalError> {
    let open = |n: usize| {
        let p = journal_path(path, n);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(io_at(&p))
    };
    let files = [open(0)?, open(1)?];
    match files[0].try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok((None, 0)),
        Err(std::fs::TryLockError::Error(e)) => return Err(io_at(&journal_path(path, 0))(e)),
    }
    let mut heads = Vec::new();
    for (n, f) in files.iter().enumerate() {
        let p = journal_path(path, n);
        if let Some(h) = first_header(f).map_err(io_at(&p))? {
            heads.push((h.generation, h.live, n));
        }
    }
    let max_generation = heads.iter().map(|h| h.0).max().unwrap_or(0);
    heads.sort_unstable();
    let mut replayed = false;
    for &(generation, live, n) in &heads {
        if live {
            let p = journal_path(path, n);
            replay(&files[n], generation, main).map_err(io_at(&p))?;
            replayed = true;
        }
    }
    if replayed {
        main.sync_data().map_err(io_at(path))?;
        for &(_, live, n) in &heads {
            if live {
                retire(&files[n]).map_err(io_at(&journal_path(path, n)))?;
            }
        }
        tracing::info!(path = %path.display(), "replayed the commit journal into the database file");
    }
    Ok((Some(files), max_generation))
}

struct Head {
    generation: u64,
    live: bool,
}

fn first_header(f: &File) -> io::Result<Option<Head>> {
    let mut h = [0u8; HEADER];
    match f.read_exact_at(&mut h, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let generation = u64::from_le_bytes(h[4..12].try_into().unwrap_or([0; 8]));
    Ok(match magic {
        LIVE => Some(Head {
            generation,
            live: true,
        }),
        RETIRED => Some(Head {
            generation,
            live: false,
        }),
        _ => None,
    })
}

/// Applies the whole records of `generation` at the start of `f` to `main`, in order.
fn replay(f: &File, generation: u64, main: &File) -> io::Result<()> {
    let len = f.metadata()?.len();
    let mut pos = 0u64;
    let mut buf = Vec::new();
    while pos + HEADER as u64 <= len {
        let mut h = [0u8; HEADER];
        f.read_exact_at(&mut h, pos)?;
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let g = u64::from_le_bytes(h[4..12].try_into().unwrap_or([0; 8]));
        let n = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as u64;
        let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        if magic != LIVE || g != generation || pos + HEADER as u64 + n > len {
            break;
        }
        buf.resize(n as usize, 0);
        f.read_exact_at(&mut buf, pos + HEADER as u64)?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&h[4..16]);
        hasher.update(&buf);
        if hasher.finalize() != crc {
            break;
        }
        apply(&buf, main)?;
        pos += HEADER as u64 + n;
    }
    Ok(())
}

/// Applies one record's operations to `main`.
fn apply(mut ops: &[u8], main: &File) -> io::Result<()> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed journal record");
    while let Some((&op, rest)) = ops.split_first() {
        match op {
            OP_WRITE => {
                let (off, rest) = take_u64(rest).ok_or_else(bad)?;
                let (n, rest) = take_u32(rest).ok_or_else(bad)?;
                let n = n as usize;
                if rest.len() < n {
                    return Err(bad());
                }
                main.write_all_at(&rest[..n], off)?;
                ops = &rest[n..];
            }
            OP_SET_LEN => {
                let (len, rest) = take_u64(rest).ok_or_else(bad)?;
                main.set_len(len)?;
                ops = rest;
            }
            _ => return Err(bad()),
        }
    }
    Ok(())
}

fn take_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = b.split_at_checked(8)?;
    Some((u64::from_le_bytes(head.try_into().ok()?), rest))
}

fn take_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = b.split_at_checked(4)?;
    Some((u32::from_le_bytes(head.try_into().ok()?), rest))
}

/// Marks a file's records as checkpointed (keeping its generation readable) and syncs it.
fn retire(f: &File) -> io::Result<()> {
    let mut magic = [0u8; 4];
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) if u32::from_le_bytes(magic) == LIVE => {}
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(e),
    }
    f.write_all_at(&RETIRED.to_le_bytes(), 0)?;
    f.sync_data()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent whatever panicked while holding it: every update is
    // a plain assignment or an append that is truncated before reuse.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl JournaledFile {
    /// Makes the other journal file the active one and checkpoints the full one in the
    /// background: sync the database file, then retire the full journal file.
    fn switch(&self, st: &mut State) -> io::Result<()> {
        let files = st.files.as_ref().ok_or_else(closed)?;
        {
            let mut ck = lock(&self.checkpoint.state);
            while ck.running {
                ck = self
                    .checkpoint
                    .done
                    .wait(ck)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if let Some(e) = &ck.failed {
                return Err(io::Error::other(format!(
                    "a journal checkpoint failed earlier: {e}"
                )));
            }
            ck.running = true;
        }
        let full = files[st.active].clone();
        let main = self.main.clone();
        let checkpoint = self.checkpoint.clone();
        let spawned = std::thread::Builder::new()
            .name("dispatchd-checkpoint".into())
            .spawn(move || {
                let result = main.sync_data().and_then(|()| retire(&full));
                let mut ck = lock(&checkpoint.state);
                ck.running = false;
                if let Err(e) = result {
                    tracing::error!(error = %e, "journal checkpoint failed; the journal is kept for replay");
                    ck.failed = Some(e.to_string());
                }
                checkpoint.done.notify_all();
            });
        if let Err(e) = spawned {
            lock(&self.checkpoint.state).running = false;
            return Err(e);
        }
        st.active = 1 - st.active;
        st.generation += 1;
        st.pos = 0;
        Ok(())
    }

    fn wait_checkpoint(&self) -> io::Result<()> {
        let mut ck = lock(&self.checkpoint.state);
        while ck.running {
            ck = self
                .checkpoint
                .done
                .wait(ck)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        match &ck.failed {
            Some(e) => Err(io::Error::other(e.clone())),
            None => Ok(()),
        }
    }
}

fn closed() -> io::Error {
    io::Error::other("the journal is closed")
}

impl StorageBackend for JournaledFile {
    fn len(&self) -> io::Result<u64> {
        self.main.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.main.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        self.main.set_len(len)?;
        st.pending.push(OP_SET_LEN);
        st.pending.extend_from_slice(&len.to_le_bytes());
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = lock(&self.state);
        self.main.write(offset, data)?;
        let n =
            u32::try_from(data.len()).map_err(|_| io::Error::other("a single write over 4 GiB"))?;
        st.pending.push(OP_WRITE);
        st.pending.extend_from_slice(&offset.to_le_bytes());
        st.pending.extend_from_slice(&n.to_le_bytes());
        st.pending.extend_from_slice(data);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.pending.len() == HEADER {
            return Ok(());
        }
        let record = st.pending.len() as u64;
        if st.pos > 0 && st.pos + record > st.size {
            self.switch(st)?;
        }
        let payload = u32::try_from(st.pending.len() - HEADER)
            .map_err(|_| io::Error::other("a commit over 4 GiB"))?;
        st.pending[0..4].copy_from_slice(&LIVE.to_le_bytes());
        st.pending[4..12].copy_from_slice(&st.generation.to_le_bytes());
        st.pending[12..16].copy_from_slice(&payload.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&st.pending[4..16]);
        hasher.update(&st.pending[HEADER..]);
        let crc = hasher.finalize();
        st.pending[16..20].copy_from_slice(&crc.to_le_bytes());
        let files = st.files.as_ref().ok_or_else(closed)?;
        let f = &files[st.active];
        f.write_all_at(&st.pending, st.pos)?;
        f.sync_data()?;
        st.pos += record;
        st.pending.truncate(HEADER);
        // A huge commit grew the buffer: give the memory back.
        if st.pending.capacity() > 64 << 20 {
            st.pending.shrink_to(1 << 20);
        }
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        let mut st = lock(&self.state);
        let result = (|| {
            self.wait_checkpoint()?;
            if st.pending.len() > HEADER {
                // Writes after the last sync belong to no commit: they are dropped, as a
                // crash would drop them, and the file is synced as it stands.
                st.pending.truncate(HEADER);
            }
            self.main.sync_data()?;
            if let Some(files) = &st.files {
                for f in files {
                    retire(f)?;
                }
            }
            Ok(())
        })();
        if let Some(files) = st.files.take() {
            let _ = files[0].unlock();
        }
        let closed = self.main.close();
        result.and(closed)
    }

    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.main.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.main.try_lock_shared_range(start, end)
    }

    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.main.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.main.lock_shared_range(start, end)
    }

    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.main.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.main.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    fn db(path: &Path) -> redb::Database {
        redb::Database::builder()
            .create_with_backend(open(path, MIN_SIZE).unwrap())
            .unwrap()
    }

    fn put(db: &redb::Database, keys: std::ops::Range<u64>, value: &[u8]) {
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(T).unwrap();
            for k in keys {
                t.insert(k, value).unwrap();
            }
        }
        w.commit().unwrap();
    }

    fn count(db: &redb::Database) -> (u64, Option<u64>) {
        use redb::{ReadableTable, ReadableTableMetadata};
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        (t.len().unwrap(), t.last().unwrap().map(|(k, _)| k.value()))
    }

    /// The worst crash for the database file: it kept nothing written after the last
    /// checkpoint (here, a clean close). Only the journal has those commits.
    #[test]
    fn replay_restores_commits_the_database_file_lost() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        {
            let d = db(&path);
            put(&d, 0..10, b"first");
        }
        let checkpointed = std::fs::read(&path).unwrap();
        let d = db(&path);
        for i in 0..20 {
            put(&d, 10 + i * 5..15 + i * 5, &[i as u8; 300]);
        }
        // The crash image: the database file as of the checkpoint, the journal as synced.
        let copy = b.path().join("d.redb");
        std::fs::write(&copy, &checkpointed).unwrap();
        for n in 0..2 {
            std::fs::copy(journal_path(&path, n), journal_path(&copy, n)).unwrap();
        }
        drop(d);
        let again = db(&copy);
        assert_eq!(count(&again), (110, Some(109)));
        // Replayed once and retired: a second open finds the same.
        drop(again);
        assert_eq!(count(&db(&copy)), (110, Some(109)));
    }

    /// Many commits larger than a journal file: files switch, checkpoints run in the
    /// background, and a crash image taken at the end still has every commit.
    #[test]
    fn commits_survive_file_switches_and_checkpoints() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        let d = db(&path);
        let value = vec![7u8; 3000];
        for i in 0..200u64 {
            put(&d, i * 100..(i + 1) * 100, &value);
        }
        assert_eq!(count(&d), (20_000, Some(19_999)));
        let copy = b.path().join("d.redb");
        std::fs::copy(&path, &copy).unwrap();
        for n in 0..2 {
            std::fs::copy(journal_path(&path, n), journal_path(&copy, n)).unwrap();
        }
        assert_eq!(count(&db(&copy)), (20_000, Some(19_999)));
        drop(d);
        assert_eq!(count(&db(&path)), (20_000, Some(19_999)));
    }

    /// A torn append (the crash hit mid-write) ends the replay there: the commits before it
    /// are applied and nothing after.
    #[test]
    fn a_torn_record_ends_the_replay() {
        let a = tempfile::tempdir().unwrap();
        let path = a.path().join("d");
        std::fs::write(&path, []).unwrap();
        let j = open(&path, MIN_SIZE).unwrap();
        j.set_len(8192).unwrap();
        j.write(0, &[1u8; 4096]).unwrap();
        j.sync_data().unwrap();
        j.write(4096, &[2u8; 4096]).unwrap();
        j.sync_data().unwrap();
        let second = HEADER as u64 + 1 + 8 + (1 + 8 + 4 + 4096);
        // Tear the second record: flip a byte of its payload.
        let f = OpenOptions::new()
            .write(true)
            .open(journal_path(&path, 0))
            .unwrap();
        f.write_all_at(&[9], second + HEADER as u64 + 100).unwrap();
        drop(j);
        // The database file as a crash could leave it: nothing of either write.
        std::fs::write(&path, []).unwrap();
        let j = open(&path, MIN_SIZE).unwrap();
        let mut page = vec![0u8; 4096];
        j.read(0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 1));
        assert_eq!(j.len().unwrap(), 8192);
        j.read(4096, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0), "the torn commit was applied");
    }

    #[test]
    fn one_process_at_a_time() {
        let a = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        let d = db(&path);
        assert!(matches!(
            open(&path, MIN_SIZE),
            Err(JournalError::Locked(_))
        ));
        assert!(matches!(recover(&path), Err(JournalError::Locked(_))));
        drop(d);
        recover(&path).unwrap();
        assert!(open(&path, MIN_SIZE).is_ok());
    }
}
