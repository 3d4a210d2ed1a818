//! Consistent copies and checks of the database file: `snapshot` copies everything one read
//! transaction sees into a fresh redb file (what `dispatchd backup` downloads), `verify` opens
//! a file read-only and checks that every record decodes and every index points somewhere.
//!
//! **Invariant:** `TABLES` names every table `schema::init` creates; a copy or a check refuses
//! a file holding a table it does not know rather than silently skipping it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{
    MultimapTableHandle, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle,
};
use serde::de::DeserializeOwned;

use super::schema::*;
use super::writer::SubscriptionState;
use super::{Store, StoreError};
use crate::model::{Attempt, Delivery, Event, Receipt};

/// Rows copied per write transaction of the copy, so a large table never sits in one.
const COPY_CHUNK: u64 = 50_000;

/// How many problems `verify` describes one by one; the rest are only counted.
const MAX_PROBLEMS: usize = 50;

/// Prefix of the temporary snapshot files kept next to the database while they are streamed.
const SNAPSHOT_PREFIX: &str = ".backup-";

/// The names of every table, in `for_each_table` order.
pub fn table_names() -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! name {
        ($t:ident) => {
            out.push($t.name().to_string())
        };
    }
    for_each_table!(name);
    out
}

/// Rows per table as one read transaction sees them.
pub fn table_rows(store: &Store) -> Result<Vec<(String, u64)>, StoreError> {
    let r = store.db().begin_read()?;
    let mut out = Vec::new();
    macro_rules! count {
        ($t:ident) => {
            out.push(($t.name().to_string(), r.open_table($t)?.len()?))
        };
    }
    for_each_table!(count);
    Ok(out)
}

/// A copy of the database in a temporary file next to it, removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    pub path: PathBuf,
    /// File size in bytes.
    pub size: u64,
    /// Rows copied, per table.
    pub tables: Vec<(String, u64)>,
    _running: RunningGuard,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove backup snapshot");
        }
    }
}

/// One snapshot at a time: each one needs as much disk as the database.
static RUNNING: AtomicBool = AtomicBool::new(false);

#[derive(Debug)]
struct RunningGuard;

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Why a snapshot was not made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("another backup is in progress")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Copies everything one read transaction sees into a new redb file next to the database.
/// Writes go on meanwhile; none of them is in the copy, and none of the copy is missing.
pub fn snapshot(store: &Store) -> Result<Snapshot, SnapshotError> {
    if RUNNING.swap(true, Ordering::AcqRel) {
        return Err(SnapshotError::Busy);
    }
    let guard = RunningGuard;
    let db_path = store.db().path();
    let dir = db_path.parent().unwrap_or_else(|| Path::new("."));
    remove_stale_snapshots(dir);
    let path = dir.join(format!(
        "{SNAPSHOT_PREFIX}{}.redb",
        uuid::Uuid::now_v7().simple()
    ));
    // Removes a partial file on any error below.
    let mut snap = Snapshot {
        path: path.clone(),
        size: 0,
        tables: Vec::new(),
        _running: guard,
    };
    snap.tables = copy_into(store, &path)?;
    snap.size = std::fs::metadata(&path)
        .map_err(|e| StoreError::DataDir(path.display().to_string(), e))?
        .len();
    Ok(snap)
}

/// Removes snapshot files a crash left behind. Only called while no snapshot is running.
fn remove_stale_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(SNAPSHOT_PREFIX) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Copies every table of one read transaction into a new database at `dest`.
fn copy_into(store: &Store, dest: &Path) -> Result<Vec<(String, u64)>, StoreError> {
    let r = store.db().begin_read()?;
    check_known_tables(&r, &[])?;
    let dst = redb::Database::builder().create(dest)?;
    let mut out = Vec::new();
    macro_rules! copy_table {
        ($t:ident) => {
            out.push(($t.name().to_string(), copy_table(&r, &dst, $t)?))
        };
    }
    for_each_table!(copy_table);
    drop(dst);
    Ok(out)
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    src: &ReadTransaction,
    dst: &redb::Database,
    def: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let table = src.open_table(def)?;
    let mut rows = table.iter()?;
    let mut n = 0u64;
    loop {
        let w = dst.begin_write()?;
        let mut more = false;
        {
            let mut t = w.open_table(def)?;
            for row in rows.by_ref() {
                let (k, v) = row?;
                t.insert(k.value(), v.value())?;
                n += 1;
                if n.is_multiple_of(COPY_CHUNK) {
                    more = true;
                    break;
                }
            }
        }
        w.commit()?;
        if !more {
            return Ok(n);
        }
    }
}

/// Refuses a file with tables this code does not know: a copy or check would miss them.
/// `retired` names the tables of an older schema version that its migration will delete.
fn check_known_tables(r: &ReadTransaction, retired: &[&str]) -> Result<(), StoreError> {
    let mut known: BTreeSet<String> = table_names().into_iter().collect();
    known.extend(retired.iter().map(|t| t.to_string()));
    let mut unknown = Vec::new();
    for t in r.list_tables()? {
        if !known.contains(t.name()) {
            unknown.push(t.name().to_string());
        }
    }
    for t in r.list_multimap_tables()? {
        unknown.push(t.name().to_string());
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Decode(
            "table list",
            format!(
                "unknown tables {unknown:?}: this dispatchd does not know how to copy or check them"
            ),
        ))
    }
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub schema_version: u32,
    /// Rows per table.
    pub tables: Vec<(String, u64)>,
    /// The first `MAX_PROBLEMS` problems, described.
    pub problems: Vec<String>,
    /// How many problems there were in all.
    pub problem_count: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        }
    }
}

/// Opens a database file read-only and checks it: the schema version is one this code reads
/// (its own, or an older one it upgrades at start), every record decodes, and every index row points at a record.
/// Fails outright when the file cannot be opened (in use by a running daemon, not a redb
/// file) or has another schema version.
pub fn verify(path: &Path) -> Result<VerifyReport, StoreError> {
    // What a crash left in the commit journal belongs to the file: replayed first, as the
    // daemon would at start. A running daemon holds the journal's lock.
    match super::journal::recover(path) {
        Ok(()) => {}
        Err(super::journal::JournalError::Locked(_)) => {
            return Err(StoreError::InUse(path.display().to_string()));
        }
        Err(e) => return Err(e.into()),
    }
    let db = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::InUse(path.display().to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    let r = db.begin_read()?;
    let mut rep = VerifyReport::default();
    let Some(version) = version_in(&r.open_table(META)?)? else {
        return Err(StoreError::Decode(
            "schema version",
            "missing: not a dispatchd database".into(),
        ));
    };
    rep.schema_version = version;
    // Version 1 differs only by two index tables that its upgrade deletes: the records and
    // the tables they share read the same.
    let retired: &[&str] = match rep.schema_version {
        1 => &RETIRED_IN_V2,
        // Version 2 lacks only `batches`, which its upgrade creates.
        2 | SCHEMA_VERSION => &[],
        v => {
            return Err(StoreError::Decode(
                "schema version",
                format!(
                    "the file has schema version {v}, this dispatchd reads versions 1 to {SCHEMA_VERSION}"
                ),
            ));
        }
    };
    check_known_tables(&r, retired)?;
    // A table added by a later version is missing from an older file: none of its rows.
    let older = rep.schema_version < SCHEMA_VERSION;
    macro_rules! count {
        ($t:ident) => {
            let rows = match r.open_table($t) {
                Ok(t) => t.len()?,
                Err(redb::TableError::TableDoesNotExist(_)) if older => 0,
                Err(e) => return Err(e.into()),
            };
            rep.tables.push(($t.name().to_string(), rows))
        };
    }
    for_each_table!(count);

    let events = r.open_table(EVENTS)?;
    let deliveries = r.open_table(DELIVERIES)?;
    let receipts = r.open_table(RECEIPTS)?;
    for row in events.iter()? {
        let (k, v) = row?;
        let seq = k.value();
        match decode_as::<Event>(v.value(), "event") {
            Ok(e) => {
                if let Some(rid) = e.receipt
                    && receipts.get(rid)?.is_none()
                {
                    rep.problem(format!("event {seq} points at missing receipt {rid}"));
                }
            }
            Err(e) => rep.problem(format!("events[{seq}]: {e}")),
        }
    }
    check_values::<Delivery, u64>(&r, DELIVERIES, "delivery", &mut rep)?;
    check_values::<Receipt, u64>(&r, RECEIPTS, "receipt", &mut rep)?;
    check_values::<SubscriptionRecord, &str>(&r, SUBSCRIPTIONS, "subscription", &mut rep)?;
    if rep.schema_version >= 3 {
        check_values::<BatchRecord, &str>(&r, BATCHES, "batch", &mut rep)?;
    }
    check_values::<SubscriptionState, &str>(
        &r,
        SUBSCRIPTION_STATE,
        "subscription state",
        &mut rep,
    )?;
    for row in r.open_table(ATTEMPTS)?.iter()? {
        let (k, v) = row?;
        let (id, n) = k.value();
        if let Err(e) = decode_as::<Attempt>(v.value(), "attempt") {
            rep.problem(format!("attempts[({id}, {n})]: {e}"));
        }
        if deliveries.get(id)?.is_none() {
            rep.problem(format!("attempt ({id}, {n}) of missing delivery {id}"));
        }
    }

    // Indexes point at rows that exist.
    for row in r.open_table(EVENT_IDS)?.iter()? {
        let (k, v) = row?;
        if events.get(v.value())?.is_none() {
            rep.problem(format!(
                "event_ids[{:?}] points at missing event {}",
                k.value(),
                v.value()
            ));
        }
    }
    for row in r.open_table(IDEMPOTENCY_KEYS)?.iter()? {
        let (k, v) = row?;
        if events.get(v.value())?.is_none() {
            rep.problem(format!(
                "idempotency_keys[{:?}] points at missing event {}",
                k.value(),
                v.value()
            ));
        }
    }
    for row in r.open_table(EVENTS_BY_TYPE)?.iter()? {
        let (k, _) = row?;
        let (t, seq) = k.value();
        if events.get(seq)?.is_none() {
            rep.problem(format!(
                "events_by_type[({t:?}, {seq})] points at a missing event"
            ));
        }
    }
    for row in r.open_table(EVENT_DELIVERIES)?.iter()? {
        let (k, _) = row?;
        let (seq, id) = k.value();
        if events.get(seq)?.is_none() || deliveries.get(id)?.is_none() {
            rep.problem(format!(
                "event_deliveries[({seq}, {id})] points at a missing row"
            ));
        }
    }
    for row in r.open_table(DELIVERIES_BY_SUB_STATUS)?.iter()? {
        let (k, _) = row?;
        let (sub, st, id) = k.value();
        if deliveries.get(id)?.is_none() {
            rep.problem(format!(
                "deliveries_by_subscription_status[({sub:?}, {st}, {id})] points at a missing delivery"
            ));
        }
    }
    for row in r.open_table(DELIVERIES_BY_TYPE)?.iter()? {
        let (k, _) = row?;
        let (t, id) = k.value();
        if deliveries.get(id)?.is_none() {
            rep.problem(format!(
                "deliveries_by_type[({t:?}, {id})] points at a missing delivery"
            ));
        }
    }
    for row in r.open_table(SCHEDULE)?.iter()? {
        let (k, _) = row?;
        let (at, id) = k.value();
        if deliveries.get(id)?.is_none() {
            rep.problem(format!(
                "schedule[({at}, {id})] points at a missing delivery"
            ));
        }
    }
    for row in r.open_table(DEAD)?.iter()? {
        let (k, _) = row?;
        if deliveries.get(k.value())?.is_none() {
            rep.problem(format!("dead[{}] points at a missing delivery", k.value()));
        }
    }
    for row in r.open_table(RECEIPT_IDS)?.iter()? {
        let (k, v) = row?;
        let (src, did) = k.value();
        if receipts.get(v.value())?.is_none() {
            rep.problem(format!(
                "receipt_ids[({src:?}, {did:?})] points at missing receipt {}",
                v.value()
            ));
        }
    }
    Ok(rep)
}

fn decode_as<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    decode(bytes, what)
}

/// Decodes every value of a record table.
fn check_values<T: DeserializeOwned, K: redb::Key + 'static>(
    r: &ReadTransaction,
    def: TableDefinition<K, &'static [u8]>,
    what: &'static str,
    rep: &mut VerifyReport,
) -> Result<(), StoreError>
where
    for<'a> K::SelfType<'a>: std::fmt::Debug,
{
    for row in r.open_table(def)?.iter()? {
        let (k, v) = row?;
        if let Err(e) = decode_as::<T>(v.value(), what) {
            rep.problem(format!("{}[{:?}]: {e}", def.name(), k.value()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Store {
        match Store::open(&dir.join("dispatchd.redb"), 1 << 20, 1 << 20) {
            Ok(s) => s,
            Err(e) => panic!("open: {e}"),
        }
    }

    #[test]
    fn every_table_init_creates_is_known() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let r = s.db().begin_read().unwrap();
        let mut created: Vec<String> = r
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .collect();
        created.sort();
        let mut known = table_names();
        known.sort();
        assert_eq!(created, known);
    }

    #[test]
    fn snapshot_of_empty_store_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let snap = snapshot(&s).unwrap();
        assert!(snap.size > 0);
        let rep = verify(&snap.path).unwrap();
        assert!(rep.ok(), "{:?}", rep.problems);
        assert_eq!(rep.schema_version, SCHEMA_VERSION);
        assert_eq!(rep.tables.len(), table_names().len());
        // One snapshot at a time.
        assert!(matches!(snapshot(&s), Err(SnapshotError::Busy)));
        let path = snap.path.clone();
        drop(snap);
        assert!(!path.exists());
        assert!(snapshot(&s).is_ok());
    }

    #[test]
    fn verify_reports_undecodable_records_and_dangling_indexes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("dispatchd.redb");
        {
            let s = store(tmp.path());
            let w = s.db().begin_write().unwrap();
            {
                let mut ev = w.open_table(EVENTS).unwrap();
                ev.insert(1, [9u8, 1, 2].as_slice()).unwrap();
                let mut ids = w.open_table(EVENT_IDS).unwrap();
                ids.insert("evt_gone", 7).unwrap();
            }
            w.commit().unwrap();
        }
        let rep = verify(&path).unwrap();
        assert_eq!(rep.problem_count, 2, "{:?}", rep.problems);
        assert!(
            rep.problems
                .iter()
                .any(|p| p.contains("events[1]") && p.contains("unknown record version 9"))
        );
        assert!(rep.problems.iter().any(|p| p.contains("evt_gone")));
    }

    #[test]
    fn verify_refuses_another_schema_version() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("dispatchd.redb");
        {
            let s = store(tmp.path());
            let w = s.db().begin_write().unwrap();
            {
                let mut meta = w.open_table(META).unwrap();
                meta.insert("schema_version", 99u32.to_le_bytes().as_slice())
                    .unwrap();
            }
            w.commit().unwrap();
        }
        let e = verify(&path).unwrap_err().to_string();
        assert!(e.contains("schema version 99"), "{e}");
    }
}
