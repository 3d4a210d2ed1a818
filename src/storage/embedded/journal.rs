//! The commit journal: each commit made durable by one sequential append.
//!
//! redb makes a commit durable by writing its dirty pages where they live in the file and then
//! calling fsync. Copy-on-write scatters those pages over the file, and on a virtual disk every
//! separate run of pages is a request of its own: on the reference machine 26 scattered pages
//! took 1.4 ms to sync where the same 26 pages written contiguously took 0.4 ms.
//!
//! [`JournaledFile`] is the redb storage backend that turns the scattered sync into a
//! sequential one. A page redb writes goes into an in-memory overlay (reads see it there at
//! once) and into a pending record. redb calls `sync_data` at the end of each commit: the
//! record is sealed and handed to the syncer thread, which appends it to the active journal
//! file, one contiguous write, and fsyncs only the journal (one fsync for every record
//! waiting); then the commit is durable. By default `commit()` returns only then. An owner
//! that [pipelines](Durability::pipeline) gets `commit()` back as soon as the record is
//! sealed, applies its next transaction meanwhile, and learns of durability through
//! [`Durability::after`]. The applier thread copies durable records into the database file
//! afterwards, off the writer's path, and drops them from the overlay. When the active
//! journal file is full the other takes the appends, and once the applier has copied every
//! record of the full file it checkpoints it in the background: fsync the database file,
//! then retire the journal file. A file is reused only after its checkpoint.
//!
//! **Crash model.** The database file only ever receives writes of records that are durable
//! in the journal, in order, so after a crash it holds every write up to the last
//! checkpoint plus some of the writes of durable records since. The journal holds, in order,
//! every record since that checkpoint whose fsync returned. [`open`] replays them, older file
//! first, before redb opens the file: every write up to the last durable record is then in
//! place, which is the state of the last commit known durable (and perhaps of later ones).
//! Records are appended and made durable in order, and a file is fsynced before the switch
//! to the other, so a durable record implies every earlier one is.
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

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

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

/// The unit of the in-memory overlay: redb's page size.
const CHUNK: u64 = 4096;
/// Durable records the applier may have queued before the syncer waits for it, and sealed
/// records the syncer may have queued before `sync_data` waits for it: the bound on the
/// overlay's memory.
const QUEUE: usize = 4;
/// Sealed records the syncer appends before one fsync covers them all.
const GROUP: usize = 16;

/// Run once the commits sealed before it are durable (`Ok`) or can no longer be (`Err`, with
/// the journal's failure).
pub type Ack = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The redb storage backend of a journaled database file. See the module documentation.
pub struct JournaledFile {
    shared: Arc<Shared>,
    /// redb's own backend on the database file, for its file locks only.
    locks: FileBackend,
}

struct Shared {
    /// The database file, for positional reads and for the applier's writes.
    main: File,
    files: [File; 2],
    state: Mutex<State>,
    /// Where the next record goes; held by the syncer through its appends and the fsync.
    position: Mutex<Position>,
    /// Sealed records, to the syncer.
    to_sync: Sender<Sealed>,
    syncer: Mutex<Option<JoinHandle<()>>>,
    /// Signalled (with `state`) whenever `durable` grows or the journal fails.
    durable: Condvar,
    /// Set by the owner of the commits: `sync_data` returns once the record is sealed and
    /// queued, and the owner learns of its durability through [`Durability::after`].
    pipelined: AtomicBool,
    /// Durable records, to the applier.
    tx: Sender<Msg>,
    applier: Mutex<Option<JoinHandle<()>>>,
    checkpoint: Checkpoint,
    /// The thread of the last checkpoint, joined once the applier (which starts them) ended.
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    /// Tests stop the applier to take the files as a crash leaves them.
    halted: AtomicBool,
    /// Tests make the applier's writes to the database file fail.
    #[cfg(test)]
    fail_applies: AtomicBool,
    /// Tests make the syncer's appends to the journal fail.
    #[cfg(test)]
    fail_syncs: AtomicBool,
}

struct Position {
    active: usize,
    pos: u64,
    generation: u64,
    size: u64,
}

struct State {
    /// The record being built: `HEADER` bytes reserved, then the operations since the last
    /// sync.
    pending: Vec<u8>,
    /// The overlay chunks written since the last sync.
    touched: Vec<u64>,
    /// The epoch of the writes being collected; every sealed record has a smaller one.
    epoch: u64,
    /// Chunks written but not yet in the database file: reads see them first.
    overlay: HashMap<u64, Chunk>,
    /// The length redb set, whatever the database file's length is yet.
    len: u64,
    /// Shrinks not yet applied to the database file, by epoch: its bytes from the smallest
    /// of these lengths up read as zeros.
    shrinks: Vec<(u64, u64)>,
    /// Set once the journal or the database file failed: every later write and sync fails
    /// with it, until the database is reopened (which replays the journal).
    failed: Option<String>,
    /// The epoch of the last record whose fsync returned (0: none yet).
    durable: u64,
    /// Acks waiting for the epoch they name to be durable, in epoch order.
    acks: std::collections::VecDeque<(u64, Ack)>,
    /// The syncer has stopped: nothing more becomes durable.
    closed: bool,
}

/// A record sealed by `sync_data`, on its way to the syncer; `None` stops the syncer.
type Sealed = Option<Record>;

struct Record {
    epoch: u64,
    bytes: Vec<u8>,
    touched: Vec<u64>,
}

struct Chunk {
    epoch: u64,
    data: Arc<[u8]>,
}

enum Msg {
    /// A durable record, for the database file.
    Record {
        epoch: u64,
        record: Vec<u8>,
        touched: Vec<u64>,
    },
    /// Every record of journal file `n` is before this: sync the database file, retire `n`.
    Checkpoint(usize),
    #[cfg(test)]
    Flush(std::sync::mpsc::Sender<()>),
    Stop,
}

#[derive(Default)]
struct Checkpoint {
    state: Mutex<CheckpointState>,
    done: Condvar,
}

#[derive(Default)]
struct CheckpointState {
    /// Requested or running.
    running: bool,
    /// A failed checkpoint: the journal may not be reused, so no further file switch is made;
    /// reopening replays both files.
    failed: Option<String>,
}

impl Drop for JournaledFile {
    /// redb calls `close` before dropping; this only ends the syncer and the applier of a
    /// backend dropped without it, so its files (and the journal lock) are released.
    fn drop(&mut self) {
        self.shared.stop_threads();
    }
}

impl fmt::Debug for JournaledFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournaledFile").finish_non_exhaustive()
    }
}

/// Opens the database file at `path` with its journal: takes the journal lock (one process
/// at a time), creates the journal files (each used up to `size` bytes), replays what a
/// crash left in them into the database file and starts the applier thread. The result is
/// what redb opens.
pub fn open(path: &Path, size: u64) -> Result<JournaledFile, JournalError> {
    let size = size.max(MIN_SIZE);
    let open_main = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_at(path))
    };
    let main = open_main()?;
    let (files, generation) = lock_and_replay(path, &main)?;
    let files = match files {
        Some(f) => f,
        None => return Err(JournalError::Locked(path.display().to_string())),
    };
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io_at(dir))?;
    }
    let len = main.metadata().map_err(io_at(path))?.len();
    let locks = FileBackend::new(open_main()?).map_err(|e| {
        JournalError::Io(path.display().to_string(), io::Error::other(e.to_string()))
    })?;
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    let (to_sync, sealed) = crossbeam_channel::bounded(QUEUE);
    let shared = Arc::new(Shared {
        main,
        files,
        state: Mutex::new(State {
            pending: new_record(0),
            touched: Vec::new(),
            epoch: 1,
            overlay: HashMap::new(),
            len,
            shrinks: Vec::new(),
            failed: None,
            durable: 0,
            acks: std::collections::VecDeque::new(),
            closed: false,
        }),
        position: Mutex::new(Position {
            active: 0,
            pos: 0,
            generation: generation + 1,
            size,
        }),
        to_sync,
        syncer: Mutex::new(None),
        durable: Condvar::new(),
        pipelined: AtomicBool::new(false),
        tx,
        applier: Mutex::new(None),
        checkpoint: Checkpoint::default(),
        checkpointer: Mutex::new(None),
        halted: AtomicBool::new(false),
        #[cfg(test)]
        fail_applies: AtomicBool::new(false),
        #[cfg(test)]
        fail_syncs: AtomicBool::new(false),
    });
    let applier = Applier {
        shared: shared.clone(),
    };
    let handle = std::thread::Builder::new()
        .name("dispatchd-journal".into())
        .spawn(move || applier.run(rx))
        .map_err(io_at(path))?;
    *lock(&shared.applier) = Some(handle);
    let syncer = Syncer {
        shared: shared.clone(),
    };
    let spawned = std::thread::Builder::new()
        .name("dispatchd-sync".into())
        .spawn(move || syncer.run(sealed));
    match spawned {
        Ok(h) => *lock(&shared.syncer) = Some(h),
        Err(e) => {
            shared.stop_threads();
            return Err(io_at(path)(e));
        }
    }
    Ok(JournaledFile { shared, locks })
}

/// An empty record with room for `hint` bytes (the size of the last one), so that a commit's
/// pages are not copied again each time the buffer grows.
fn new_record(hint: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(hint.max(256 << 10));
    v.resize(HEADER, 0);
    v
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
    // a plain assignment, an insert or an append.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn closed() -> io::Error {
    io::Error::other("the journal is closed")
}

/// Reads `out.len()` bytes of `f` at `offset`; what lies past the end of the file reads as
/// zeros.
fn read_zero_filled(f: &File, offset: u64, out: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        match f.read_at(&mut out[done..], offset + done as u64) {
            Ok(0) => {
                out[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Shared {
    /// Latches the journal's first failure and settles every ack waiting: what is durable
    /// already stays so, nothing else will be.
    fn fail(&self, e: &io::Error) {
        {
            let mut st = lock(&self.state);
            if st.failed.is_none() {
                st.failed = Some(e.to_string());
            }
        }
        self.settle();
    }

    /// Runs the acks whose epoch is durable, and, once the journal failed or closed, all the
    /// others with the reason; outside the lock, on the calling thread.
    fn settle(&self) {
        let (ready, failed, why) = {
            let mut st = lock(&self.state);
            let durable = st.durable;
            let n = st.acks.iter().take_while(|a| a.0 <= durable).count();
            let ready: Vec<Ack> = st.acks.drain(..n).map(|a| a.1).collect();
            match durability(&st, u64::MAX) {
                Some(Err(why)) => (ready, st.acks.drain(..).map(|a| a.1).collect(), why),
                _ => (ready, Vec::new(), String::new()),
            }
        };
        self.durable.notify_all();
        for a in ready {
            a(Ok(()));
        }
        for a in failed {
            a(Err(why.clone()));
        }
    }

    /// Blocks until the record of `epoch` is durable, or fails with the journal's failure.
    fn wait_durable(&self, epoch: u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = durability(&st, epoch) {
                return r.map_err(io::Error::other);
            }
            st = self
                .durable
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Ends the syncer (after it made every record sealed so far durable), then the applier
    /// (after it copied them into the database file), then a checkpoint still running: once
    /// this returns no thread of the journal touches its files.
    fn stop_threads(&self) {
        let _ = self.to_sync.send(None);
        if let Some(h) = lock(&self.syncer).take() {
            let _ = h.join();
        }
        let _ = self.tx.send(Msg::Stop);
        if let Some(h) = lock(&self.applier).take() {
            let _ = h.join();
        }
        let checkpointer = lock(&self.checkpointer).take();
        if let Some(h) = checkpointer {
            let _ = h.join();
        }
        // Nothing can become durable any more.
        lock(&self.state).closed = true;
        self.settle();
    }

    fn failed(st: &State) -> io::Result<()> {
        match &st.failed {
            Some(e) => Err(io::Error::other(format!("the commit journal failed: {e}"))),
            None => Ok(()),
        }
    }

    /// The content of chunk `c` as redb last wrote it.
    fn chunk(&self, st: &State, c: u64) -> io::Result<Vec<u8>> {
        if let Some(ch) = st.overlay.get(&c) {
            return Ok(ch.data.to_vec());
        }
        let mut buf = vec![0u8; CHUNK as usize];
        read_zero_filled(&self.main, c * CHUNK, &mut buf)?;
        mask(&mut buf, c * CHUNK, zero_above(st));
        Ok(buf)
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

/// Whether the record of `epoch` is durable (`Ok`), can no longer become so (`Err`, why), or
/// may still (`None`).
fn durability(st: &State, epoch: u64) -> Option<Result<(), String>> {
    if st.durable >= epoch {
        Some(Ok(()))
    } else if let Some(e) = &st.failed {
        Some(Err(format!("the commit journal failed: {e}")))
    } else if st.closed {
        Some(Err("the journal is closed".to_string()))
    } else {
        None
    }
}

/// The epoch of the last record sealed: the one the last returned commit is durable with.
fn last_sealed(st: &State) -> u64 {
    st.epoch - 1
}

/// The smallest length of a shrink not yet applied to the database file.
fn zero_above(st: &State) -> u64 {
    st.shrinks.iter().map(|s| s.1).min().unwrap_or(u64::MAX)
}

/// Zeros the bytes of `buf` (which holds the file from `offset`) at `zero_above` and beyond.
fn mask(buf: &mut [u8], offset: u64, zero_above: u64) {
    if zero_above < offset + buf.len() as u64 {
        let from = zero_above.saturating_sub(offset) as usize;
        buf[from..].fill(0);
    }
}

/// The applier thread: copies durable records' writes into the database file, drops them
/// from the overlay, and checkpoints full journal files once everything in them is applied.
struct Applier {
    shared: Arc<Shared>,
}

impl Applier {
    fn run(self, rx: Receiver<Msg>) {
        for msg in rx.iter() {
            let result = match msg {
                Msg::Record {
                    epoch,
                    record,
                    touched,
                } => self.apply(epoch, &record, &touched),
                Msg::Checkpoint(n) => self.checkpoint(n),
                #[cfg(test)]
                Msg::Flush(done) => {
                    let _ = done.send(());
                    Ok(())
                }
                Msg::Stop => return,
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "the commit journal failed; the daemon must reopen the database");
                self.shared.fail(&e);
            }
        }
    }

    /// Copies one durable record's writes into the database file and drops them from the
    /// overlay.
    fn apply(&self, epoch: u64, record: &[u8], touched: &[u64]) -> io::Result<()> {
        if self.shared.halted.load(Ordering::Relaxed) || lock(&self.shared.state).failed.is_some() {
            return Ok(());
        }
        #[cfg(test)]
        if self.shared.fail_applies.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected write failure"));
        }
        apply(&record[HEADER..], &self.shared.main)?;
        let mut st = lock(&self.shared.state);
        for c in touched {
            if st.overlay.get(c).is_some_and(|ch| ch.epoch <= epoch) {
                st.overlay.remove(c);
            }
        }
        st.shrinks.retain(|s| s.0 > epoch);
        Ok(())
    }

    /// Syncs the database file, which holds every write of journal file `n` by now, and
    /// retires `n`, in a thread of its own so applying goes on meanwhile.
    fn checkpoint(&self, n: usize) -> io::Result<()> {
        if self.shared.halted.load(Ordering::Relaxed) {
            return Ok(());
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("dispatchd-checkpoint".into())
            .spawn(move || {
                let result = if lock(&shared.state).failed.is_some() {
                    Err(io::Error::other("the journal failed before the checkpoint"))
                } else {
                    shared.main.sync_data().and_then(|()| retire(&shared.files[n]))
                };
                let mut ck = lock(&shared.checkpoint.state);
                ck.running = false;
                if let Err(e) = result {
                    tracing::error!(error = %e, "journal checkpoint failed; the journal is kept for replay");
                    ck.failed = Some(e.to_string());
                }
                shared.checkpoint.done.notify_all();
            });
        match spawned {
            Ok(h) => {
                // Only one checkpoint runs at a time: the previous one has finished its work.
                let previous = lock(&self.shared.checkpointer).replace(h);
                if let Some(previous) = previous {
                    let _ = previous.join();
                }
                Ok(())
            }
            Err(e) => {
                let mut ck = lock(&self.shared.checkpoint.state);
                ck.running = false;
                ck.failed = Some(e.to_string());
                self.shared.checkpoint.done.notify_all();
                Err(e)
            }
        }
    }
}

/// The syncer thread: appends sealed records to the active journal file, makes each group of
/// them durable with one fsync, hands them to the applier and settles the acks they satisfy.
struct Syncer {
    shared: Arc<Shared>,
}

impl Syncer {
    fn run(self, rx: Receiver<Sealed>) {
        let sh = &*self.shared;
        let mut written: Vec<Record> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut stop = first.is_none();
            let mut group = Vec::from_iter(first);
            while !stop && group.len() < GROUP {
                match rx.try_recv() {
                    Ok(Some(r)) => group.push(r),
                    Ok(None) => stop = true,
                    Err(_) => break,
                }
            }
            let result = {
                let mut p = lock(&sh.position);
                group
                    .into_iter()
                    .try_for_each(|r| self.append(&mut p, &mut written, r))
                    .and_then(|()| self.flush(&p, &mut written))
            };
            // `flush` settled the acks it made durable; `fail` settles them all.
            if let Err(e) = result {
                written.clear();
                sh.fail(&e);
            }
            if stop {
                return;
            }
        }
    }

    /// Appends one record to the active journal file, switching files first when it is
    /// full (after making what it holds durable, so its checkpoint comes after all of it).
    fn append(&self, p: &mut Position, written: &mut Vec<Record>, mut r: Record) -> io::Result<()> {
        let sh = &*self.shared;
        Shared::failed(&lock(&sh.state))?;
        let len = r.bytes.len() as u64;
        if p.pos > 0 && p.pos + len > p.size {
            self.flush(p, written)?;
            sh.switch(p)?;
        }
        let payload = u32::try_from(r.bytes.len() - HEADER)
            .map_err(|_| io::Error::other("a commit over 4 GiB"))?;
        let record = &mut r.bytes;
        record[0..4].copy_from_slice(&LIVE.to_le_bytes());
        record[4..12].copy_from_slice(&p.generation.to_le_bytes());
        record[12..16].copy_from_slice(&payload.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&record[4..16]);
        hasher.update(&record[HEADER..]);
        let crc = hasher.finalize();
        record[16..20].copy_from_slice(&crc.to_le_bytes());
        #[cfg(test)]
        if sh.fail_syncs.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected journal write failure"));
        }
        sh.files[p.active].write_all_at(record, p.pos)?;
        p.pos += len;
        written.push(r);
        Ok(())
    }

    /// Makes the records written since the last flush durable (one fsync), publishes the new
    /// durable epoch and passes the records to the applier.
    fn flush(&self, p: &Position, written: &mut Vec<Record>) -> io::Result<()> {
        let sh = &*self.shared;
        let Some(last) = written.last().map(|r| r.epoch) else {
            return Ok(());
        };
        sh.files[p.active].sync_data()?;
        // Published before the applier sees the records: if it then fails on one, the commits
        // that are in the journal must still be reported durable, not failed.
        lock(&sh.state).durable = last;
        for r in written.drain(..) {
            sh.tx
                .send(Msg::Record {
                    epoch: r.epoch,
                    record: r.bytes,
                    touched: r.touched,
                })
                .map_err(|_| closed())?;
        }
        sh.settle();
        Ok(())
    }
}

/// The owner's view of a journal's durability: a commit whose `commit()` returned is durable
/// once the acks registered after it run with `Ok`.
#[derive(Clone)]
pub struct Durability {
    shared: Arc<Shared>,
}

impl fmt::Debug for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Durability").finish_non_exhaustive()
    }
}

impl Durability {
    /// From now on `commit()` returns once its record is sealed, before it is durable: the
    /// owner overlaps the next transaction with the fsync, and answers for a commit only in
    /// an ack registered after it.
    pub fn pipeline(&self) {
        self.shared.pipelined.store(true, Ordering::Relaxed);
    }

    /// Runs `ack` once every commit that returned before this call is durable, with the
    /// journal's failure if that can no longer happen. It may run at once, on this thread,
    /// or later on the journal's syncer thread: it must be short.
    pub fn after(&self, ack: Ack) {
        let now = {
            let mut st = lock(&self.shared.state);
            let epoch = last_sealed(&st);
            match durability(&st, epoch) {
                Some(r) => r,
                None => {
                    st.acks.push_back((epoch, ack));
                    return;
                }
            }
        };
        ack(now);
    }

    /// Blocks until every commit that returned is durable (or the journal failed).
    pub fn wait(&self) -> io::Result<()> {
        let epoch = last_sealed(&lock(&self.shared.state));
        self.shared.wait_durable(epoch)
    }
}

impl JournaledFile {
    /// The handle through which the owner of the commits learns of their durability.
    pub fn durability(&self) -> Durability {
        Durability {
            shared: self.shared.clone(),
        }
    }
}

#[cfg(test)]
impl Shared {
    /// Stops copying records into the database file, as a crash would stop it; commits go
    /// on into the journal.
    fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
    }

    /// Waits until the applier has handled everything sent so far.
    fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

impl Shared {
    /// Makes the other journal file the active one and asks the applier to checkpoint the
    /// full one after its last record.
    fn switch(&self, p: &mut Position) -> io::Result<()> {
        self.wait_checkpoint()?;
        lock(&self.checkpoint.state).running = true;
        if self.tx.send(Msg::Checkpoint(p.active)).is_err() {
            lock(&self.checkpoint.state).running = false;
            return Err(closed());
        }
        p.active = 1 - p.active;
        p.generation += 1;
        p.pos = 0;
        Ok(())
    }
}

impl StorageBackend for JournaledFile {
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.shared.state).len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let end = offset + out.len() as u64;
        let (copies, zero_above) = {
            let st = lock(&self.shared.state);
            if end > st.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the database",
                ));
            }
            let mut copies = Vec::new();
            if !st.overlay.is_empty() {
                for c in offset / CHUNK..end.div_ceil(CHUNK) {
                    if let Some(ch) = st.overlay.get(&c) {
                        copies.push((c, ch.data.clone()));
                    }
                }
            }
            (copies, zero_above(&st))
        };
        let chunks = end.div_ceil(CHUNK) - offset / CHUNK;
        if copies.len() as u64 != chunks {
            read_zero_filled(&self.shared.main, offset, out)?;
            mask(out, offset, zero_above);
        }
        for (c, data) in copies {
            let cs = c * CHUNK;
            let from = cs.max(offset);
            let to = (cs + CHUNK).min(end);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - cs) as usize..(to - cs) as usize]);
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        Shared::failed(st)?;
        st.pending.push(OP_SET_LEN);
        st.pending.extend_from_slice(&len.to_le_bytes());
        if len < st.len {
            st.overlay.retain(|&c, _| c * CHUNK < len);
            let c = len / CHUNK;
            if !len.is_multiple_of(CHUNK)
                && let Some(ch) = st.overlay.get_mut(&c)
            {
                let mut data = ch.data.to_vec();
                data[(len % CHUNK) as usize..].fill(0);
                ch.data = Arc::from(data);
            }
            let epoch = st.epoch;
            st.shrinks.push((epoch, len));
        }
        st.len = len;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut guard = lock(&self.shared.state);
        let st = &mut *guard;
        Shared::failed(st)?;
        let n =
            u32::try_from(data.len()).map_err(|_| io::Error::other("a single write over 4 GiB"))?;
        st.pending.push(OP_WRITE);
        st.pending.extend_from_slice(&offset.to_le_bytes());
        st.pending.extend_from_slice(&n.to_le_bytes());
        st.pending.extend_from_slice(data);
        let end = offset + data.len() as u64;
        let mut c = offset / CHUNK;
        while c * CHUNK < end {
            let cs = c * CHUNK;
            let from = cs.max(offset);
            let to = (cs + CHUNK).min(end);
            let src = &data[(from - offset) as usize..(to - offset) as usize];
            let chunk: Arc<[u8]> = if to - from == CHUNK {
                Arc::from(src)
            } else {
                let mut buf = self.shared.chunk(st, c)?;
                buf[(from - cs) as usize..(to - cs) as usize].copy_from_slice(src);
                Arc::from(buf)
            };
            let epoch = st.epoch;
            st.overlay.insert(c, Chunk { epoch, data: chunk });
            st.touched.push(c);
            c += 1;
        }
        st.len = st.len.max(end);
        Ok(())
    }

    /// Seals the writes since the last call into a record for the syncer. Unless the owner
    /// pipelines its commits, waits until that record is durable.
    fn sync_data(&self) -> io::Result<()> {
        let sh = &*self.shared;
        let sealed = {
            let mut st = lock(&sh.state);
            Shared::failed(&st)?;
            if st.pending.len() == HEADER {
                None
            } else {
                let hint = st.pending.len() + st.pending.len() / 4;
                let bytes = std::mem::replace(&mut st.pending, new_record(hint));
                let touched = std::mem::take(&mut st.touched);
                let epoch = st.epoch;
                st.epoch += 1;
                Some(Record {
                    epoch,
                    bytes,
                    touched,
                })
            }
        };
        let epoch = match sealed {
            Some(r) => {
                let epoch = r.epoch;
                sh.to_sync.send(Some(r)).map_err(|_| closed())?;
                epoch
            }
            None => last_sealed(&lock(&sh.state)),
        };
        if sh.pipelined.load(Ordering::Relaxed) {
            return Ok(());
        }
        sh.wait_durable(epoch)
    }

    fn close(&self) -> io::Result<()> {
        // Every sealed record is made durable and reaches the database file first; writes
        // after the last sync belong to no commit and are dropped, as a crash would drop them.
        self.shared.stop_threads();
        let failed = lock(&self.shared.state).failed.clone();
        let result = match failed {
            Some(e) => Err(io::Error::other(e)),
            None => self
                .shared
                .wait_checkpoint()
                .and_then(|()| self.shared.main.sync_data())
                .and_then(|()| self.shared.files.iter().try_for_each(retire)),
        };
        let _ = self.shared.files[0].unlock();
        let closed = self.locks.close();
        result.and(closed)
    }

    fn try_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.locks.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }

    fn lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.locks.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.locks.lock_shared_range(start, end)
    }

    fn unlock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.locks.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: std::ops::Bound<u64>,
        end: std::ops::Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.locks.query_lock_range(start, end)
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
        try_put(db, keys, value).unwrap();
    }

    fn try_put(
        db: &redb::Database,
        keys: std::ops::Range<u64>,
        value: &[u8],
    ) -> Result<(), redb::Error> {
        let w = db.begin_write()?;
        {
            let mut t = w.open_table(T)?;
            for k in keys {
                t.insert(k, value)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    fn count(db: &redb::Database) -> (u64, Option<u64>) {
        use redb::{ReadableTable, ReadableTableMetadata};
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        (t.len().unwrap(), t.last().unwrap().map(|(k, _)| k.value()))
    }

    /// The files as they are now, copied to `to`: what a crash of the machine right now
    /// leaves, as far as the journal and the database file were written.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::copy(from, to).unwrap();
        for n in 0..2 {
            std::fs::copy(journal_path(from, n), journal_path(to, n)).unwrap();
        }
    }

    /// The worst crash for the database file: it kept nothing written after the last
    /// checkpoint (here, a clean close). Only the journal has those commits.
    #[test]
    fn replay_restores_commits_the_database_file_lost() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        drop({
            let d = db(&path);
            put(&d, 0..10, b"first");
            d
        });
        let checkpointed = std::fs::read(&path).unwrap();
        let d = db(&path);
        for i in 0..20 {
            put(&d, 10 + i * 5..15 + i * 5, &[i as u8; 300]);
        }
        let copy = b.path().join("d.redb");
        crash_image(&path, &copy);
        std::fs::write(&copy, &checkpointed).unwrap();
        drop(d);
        let again = db(&copy);
        assert_eq!(count(&again), (110, Some(109)));
        // Replayed once and retired: a second open finds the same.
        drop(again);
        assert_eq!(count(&db(&copy)), (110, Some(109)));
    }

    /// The applier stops (as in a crash) while commits go on: the database file lacks
    /// everything since, and every commit that returned is there after the replay.
    #[test]
    fn a_crash_keeps_every_commit_that_returned() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        let (backend_shared, d) = {
            let backend = open(&path, MIN_SIZE).unwrap();
            let shared = backend.shared.clone();
            (
                shared,
                redb::Database::builder()
                    .create_with_backend(backend)
                    .unwrap(),
            )
        };
        let value = vec![5u8; 100];
        for i in 0..40u64 {
            put(&d, i * 10..(i + 1) * 10, &value);
        }
        backend_shared.flush();
        backend_shared.halt();
        for i in 40..80u64 {
            put(&d, i * 10..(i + 1) * 10, &value);
        }
        assert!(!lock(&backend_shared.state).overlay.is_empty());
        let copy = b.path().join("d.redb");
        crash_image(&path, &copy);
        std::mem::forget(d);
        assert_eq!(count(&db(&copy)), (800, Some(799)));
    }

    /// Many commits larger than a journal file: files switch, checkpoints run in the
    /// background, reads are served from the overlay while the applier catches up, and a
    /// crash image still has every commit.
    #[test]
    fn commits_survive_file_switches_and_checkpoints() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        let d = db(&path);
        let value = vec![7u8; 3000];
        for i in 0..200u64 {
            put(&d, i * 100..(i + 1) * 100, &value);
            assert_eq!(count(&d), ((i + 1) * 100, Some((i + 1) * 100 - 1)));
        }
        let copy = b.path().join("d.redb");
        crash_image(&path, &copy);
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
        let f = open(&path, MIN_SIZE).unwrap();
        f.shared.halt();
        f.set_len(8192).unwrap();
        f.write(0, &[1u8; 4096]).unwrap();
        f.sync_data().unwrap();
        f.write(4096, &[2u8; 4096]).unwrap();
        f.sync_data().unwrap();
        let second = HEADER as u64 + 1 + 8 + (1 + 8 + 4 + 4096);
        // Tear the second record: flip a byte of its payload.
        let tear = OpenOptions::new()
            .write(true)
            .open(journal_path(&path, 0))
            .unwrap();
        tear.write_all_at(&[9], second + HEADER as u64 + 100)
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        drop(f);
        let f = open(&path, MIN_SIZE).unwrap();
        let mut page = vec![0u8; 4096];
        f.read(0, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 1));
        assert_eq!(f.len().unwrap(), 8192);
        f.read(4096, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0), "the torn commit was applied");
    }

    /// Reads see every write at once, whatever the applier has copied: partial chunks,
    /// shrinks and regrowth included; and the database file ends up the same.
    #[test]
    fn reads_see_writes_before_they_reach_the_file() {
        let a = tempfile::tempdir().unwrap();
        let path = a.path().join("d");
        let f = open(&path, MIN_SIZE).unwrap();
        let mut model = vec![0u8; 0];
        let mut next = crate::testrng::xorshift(7);
        for step in 0..2000 {
            match next() % 10 {
                0 => {
                    let len = next() % (64 << 10);
                    f.set_len(len).unwrap();
                    model.resize(len as usize, 0);
                }
                1..=6 if !model.is_empty() => {
                    let off = next() % model.len() as u64;
                    let n = (next() % 9000).min(model.len() as u64 - off) as usize;
                    let b = (step % 251) as u8;
                    f.write(off, &vec![b; n]).unwrap();
                    model[off as usize..off as usize + n].fill(b);
                }
                7 => f.sync_data().unwrap(),
                _ => {}
            }
            assert_eq!(f.len().unwrap(), model.len() as u64);
            if !model.is_empty() {
                let off = next() % model.len() as u64;
                let n = (next() % 10_000).min(model.len() as u64 - off) as usize;
                let mut out = vec![0u8; n];
                f.read(off, &mut out).unwrap();
                assert!(out == model[off as usize..off as usize + n], "step {step}");
            }
        }
        f.sync_data().unwrap();
        f.shared.flush();
        assert!(lock(&f.shared.state).overlay.is_empty());
        let mut whole = vec![0u8; model.len()];
        read_zero_filled(&f.shared.main, 0, &mut whole).unwrap();
        assert!(
            whole == model,
            "the database file differs from what was written"
        );
    }

    /// The database file fails under the applier: commits from then on fail, the ones that
    /// returned are in the journal, and reopening the database replays them.
    #[test]
    fn a_failed_database_file_write_fails_later_commits_and_reopening_replays() {
        let a = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        let backend = open(&path, MIN_SIZE).unwrap();
        let shared = backend.shared.clone();
        let d = redb::Database::builder()
            .create_with_backend(backend)
            .unwrap();
        put(&d, 0..10, b"x");
        shared.flush();
        shared.fail_applies.store(true, Ordering::Relaxed);
        put(&d, 10..20, b"y");
        shared.flush();
        assert_eq!(reopened_after_failure(d, shared, &path), (20, Some(19)));
    }

    /// After a journal failure: a further commit fails; then, with `d` and `keep` (whatever
    /// else holds the journal) dropped, what reopening the file finds.
    fn reopened_after_failure(
        d: redb::Database,
        keep: impl Sized,
        path: &Path,
    ) -> (u64, Option<u64>) {
        assert!(
            try_put(&d, 20..30, b"z").is_err(),
            "a commit after the failure succeeded"
        );
        drop(d);
        drop(keep);
        count(&db(path))
    }

    fn pipelined(path: &Path, size: u64) -> (redb::Database, Durability) {
        let backend = open(path, size).unwrap();
        let durability = backend.durability();
        durability.pipeline();
        let d = redb::Database::builder()
            .create_with_backend(backend)
            .unwrap();
        (d, durability)
    }

    /// What an ack registered now is told, once it is told.
    fn ack_result(durability: &Durability) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        durability.after(Box::new(move |r| drop(tx.send(r))));
        rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap()
    }

    /// Pipelined commits return before their record is durable; an ack registered after
    /// them runs only once every one of them is in the journal, so a crash image taken in
    /// the ack has them all.
    #[test]
    fn an_ack_runs_once_the_commits_before_it_are_in_the_journal() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        // Large enough for every commit: a halted applier checkpoints nothing, so a second
        // file switch would wait for ever.
        let (d, durability) = pipelined(&path, 64 * MIN_SIZE);
        durability.shared.halt();
        let copy = b.path().join("d.redb");
        for round in 0..5u64 {
            for i in 0..10u64 {
                let k = (round * 10 + i) * 10;
                put(&d, k..k + 10, &[3u8; 200]);
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let (from, to) = (path.clone(), copy.clone());
            durability.after(Box::new(move |r| {
                crash_image(&from, &to);
                drop(tx.send(r));
            }));
            assert_eq!(
                rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap(),
                Ok(())
            );
            let n = (round + 1) * 100;
            assert_eq!(count(&db(&copy)), (n, Some(n - 1)), "round {round}");
        }
        durability.wait().unwrap();
    }

    /// A failed journal append: the commit returned (pipelined), but its ack is told it is
    /// not durable, later commits fail, and reopening has only what was durable.
    #[test]
    fn a_failed_append_fails_the_acks_and_later_commits() {
        let a = tempfile::tempdir().unwrap();
        let path = a.path().join("d.redb");
        let (d, durability) = pipelined(&path, MIN_SIZE);
        put(&d, 0..10, b"x");
        assert_eq!(ack_result(&durability), Ok(()));
        durability.shared.fail_syncs.store(true, Ordering::Relaxed);
        put(&d, 10..20, b"y");
        let told = ack_result(&durability);
        assert!(
            told.as_ref()
                .is_err_and(|e| e.contains("injected journal write failure")),
            "{told:?}"
        );
        assert!(durability.wait().is_err());
        assert_eq!(reopened_after_failure(d, durability, &path), (10, Some(9)));
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
