//! The embedded backend, the default: one redb file on local disk, made durable by the
//! commit journal. The only module that imports redb. Reads happen here from any thread;
//! every write goes through the single writer thread in `writer`.

pub mod backup;
mod expiry;
pub mod inspect;
pub mod journal;
pub mod recovery;
pub mod schema;
pub mod writer;

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata};
use thiserror::Error;

use crate::model::{Attempt, Delivery, DeliveryId, Event, Micros, Seq};
use schema::*;

/// What can go wrong in the storage layer.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("cannot encode record: {0}")]
    Encode(String),
    #[error("cannot decode {0}: {1}")]
    Decode(&'static str, String),
    #[error(
        "the database has schema version {0}, newer than this dispatchd understands ({1}); \
         run a newer dispatchd or restore a backup"
    )]
    SchemaTooNew(u32, u32),
    #[error("cannot create data directory {0}: {1}")]
    DataDir(String, std::io::Error),
    #[error("cannot reopen the database: {0}")]
    Reopen(String),
    #[error(
        "{0} is in use by a running process; copy it with `dispatchd backup` and check the copy"
    )]
    InUse(String),
    #[error("commit journal: {0}")]
    Journal(#[from] journal::JournalError),
    /// The PostgreSQL backend's database failed or could not be reached.
    #[error("database: {0}")]
    Postgres(String),
    /// Asked of a backend that does not have it (a redb-only tool on PostgreSQL).
    #[error("{0}")]
    Unsupported(&'static str),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Event list filters; `since` inclusive, `until` exclusive.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub event_type: Option<String>,
    pub source: Option<String>,
    pub since: Option<Micros>,
    pub until: Option<Micros>,
    pub priority: Option<crate::model::Priority>,
}

/// One page of a list and where the next one starts.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

/// How many rows a list may look at for one page when filters reject most of them; the page
/// then ends early with a cursor, so a request never scans the whole table.
const SCAN_BUDGET: usize = 20_000;

/// Counters the writer resumes from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tips {
    pub last_seq: Seq,
    pub last_received_at: Micros,
    pub last_delivery: DeliveryId,
    pub last_receipt: u64,
}

/// Opens (or creates) the redb file at `path`, through the commit journal when
/// `journal_size` > 0. Every open of a daemon's database goes through here, so a journal left
/// by a crash is always replayed before redb reads the file.
pub(crate) fn open_database(
    path: &Path,
    cache_size: usize,
    journal_size: u64,
) -> Result<Opened, StoreError> {
    let mut builder = redb::Database::builder();
    builder.set_cache_size(cache_size);
    if journal_size == 0 {
        // A journal left by an earlier run with the journal on is replayed first.
        journal::recover(path).or_else(|e| match e {
            journal::JournalError::Io(_, ref io) if io.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            e => Err(e),
        })?;
        return Ok(Opened {
            db: builder.create(path)?,
            durability: None,
        });
    }
    let backend = journal::open(path, journal_size)?;
    let durability = backend.durability();
    Ok(Opened {
        db: builder.create_with_backend(backend)?,
        durability: Some(durability),
    })
}

/// An open database file, and its journal's durability when it has one.
pub(crate) struct Opened {
    pub db: redb::Database,
    pub durability: Option<journal::Durability>,
}

/// A handle on the database for reads; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<recovery::DbHandle>,
}

impl Store {
    /// Opens (or creates) the database file, creating its directory, and checks the schema.
    /// With `journal_size` > 0 commits go through the commit journal (see `journal`), each
    /// of its two files that size; 0 syncs the database file itself on every commit.
    pub fn open(path: &Path, cache_size: usize, journal_size: u64) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::DataDir(dir.display().to_string(), e))?;
        }
        let db = open_database(path, cache_size, journal_size)?;
        schema::init(&db.db)?;
        Ok(Self {
            db: Arc::new(recovery::DbHandle::new(db, path, cache_size, journal_size)),
        })
    }

    pub(crate) fn db(&self) -> &recovery::DbHandle {
        &self.db
    }

    /// Where the writer resumes numbering.
    pub fn tips(&self) -> Result<Tips, StoreError> {
        let r = self.db.begin_read()?;
        let events = r.open_table(EVENTS)?;
        let (last_seq, last_received_at) = match events.last()? {
            Some((k, v)) => {
                let e: Event = decode(v.value(), "event")?;
                (k.value(), e.received_at)
            }
            None => (0, 0),
        };
        let last_delivery = r
            .open_table(DELIVERIES)?
            .last()?
            .map_or(0, |(k, _)| k.value());
        let last_receipt = r
            .open_table(RECEIPTS)?
            .last()?
            .map_or(0, |(k, _)| k.value());
        Ok(Tips {
            last_seq,
            last_received_at,
            last_delivery,
            last_receipt,
        })
    }

    /// Whether a read transaction can be started: part of readiness.
    pub fn readable(&self) -> bool {
        self.db.begin_read().is_ok()
    }

    /// An event by its id.
    pub fn event_by_id(&self, id: &str) -> Result<Option<(Seq, Event)>, StoreError> {
        let r = self.db.begin_read()?;
        let ids = r.open_table(EVENT_IDS)?;
        let Some(seq) = ids.get(id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let events = r.open_table(EVENTS)?;
        match events.get(seq)? {
            Some(v) => Ok(Some((seq, decode(v.value(), "event")?))),
            None => Ok(None),
        }
    }

    /// An event by its sequence number.
    pub fn event_by_seq(&self, seq: Seq) -> Result<Option<Event>, StoreError> {
        let r = self.db.begin_read()?;
        get_record(&r.open_table(EVENTS)?, seq, "event")
    }

    /// An inbound receipt by id.
    pub fn receipt(&self, id: u64) -> Result<Option<crate::model::Receipt>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(RECEIPTS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "receipt")?)),
            None => Ok(None),
        }
    }

    /// Number of stored events.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(EVENTS)?.len()?)
    }

    /// Events in sequence order after the cursor, filtered.
    pub fn list_events(
        &self,
        f: &EventFilter,
        after: Option<Seq>,
        limit: usize,
    ) -> Result<Page<(Seq, Event)>, StoreError> {
        let r = self.db.begin_read()?;
        let events = r.open_table(EVENTS)?;
        let mut start = after.map_or(0, |a| a.saturating_add(1));
        if let Some(since) = f.since {
            start = start.max(first_seq_at_or_after(&events, since)?);
        }
        let end = match f.until {
            Some(until) => first_seq_at_or_after(&events, until)?,
            None => u64::MAX,
        };
        let mut items = Vec::new();
        let mut scanned = 0usize;
        let mut last_scanned = None;
        let keep = |seq: Seq, e: Event, items: &mut Vec<(Seq, Event)>| {
            if f.source
                .as_deref()
                .is_none_or(|s| e.source.as_deref() == Some(s))
                && f.priority.is_none_or(|p| e.priority == p)
            {
                items.push((seq, e));
            }
        };
        if start >= end {
            return Ok(Page { items, next: None });
        }
        match &f.event_type {
            Some(t) => {
                let by_type = r.open_table(EVENTS_BY_TYPE)?;
                for row in by_type.range((t.as_str(), start)..(t.as_str(), end))? {
                    let (k, _) = row?;
                    let seq = k.value().1;
                    if let Some(v) = events.get(seq)? {
                        keep(seq, decode(v.value(), "event")?, &mut items);
                    }
                    scanned += 1;
                    last_scanned = Some(seq);
                    if items.len() >= limit || scanned >= SCAN_BUDGET {
                        break;
                    }
                }
            }
            None => {
                for row in events.range(start..end)? {
                    let (k, v) = row?;
                    let seq = k.value();
                    keep(seq, decode(v.value(), "event")?, &mut items);
                    scanned += 1;
                    last_scanned = Some(seq);
                    if items.len() >= limit || scanned >= SCAN_BUDGET {
                        break;
                    }
                }
            }
        }
        let next = if items.len() >= limit || scanned >= SCAN_BUDGET {
            last_scanned
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// The ids of an event's deliveries.
    pub fn event_delivery_ids(&self, seq: Seq) -> Result<Vec<DeliveryId>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(EVENT_DELIVERIES)?;
        let mut out = Vec::new();
        for row in t.range((seq, 0)..=(seq, u64::MAX))? {
            out.push(row?.0.value().1);
        }
        Ok(out)
    }

    /// A delivery by id.
    pub fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        let r = self.db.begin_read()?;
        get_record(&r.open_table(DELIVERIES)?, id, "delivery")
    }

    /// One read transaction for a run of lookups: a destination starting several attempts
    /// reads their deliveries (and events) without a transaction each.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let r = self.db.begin_read()?;
        Ok(Snapshot {
            deliveries: r.open_table(DELIVERIES)?,
            events: r.open_table(EVENTS)?,
        })
    }

    /// Deliveries by id, skipping missing ones, in one read transaction.
    pub fn deliveries(
        &self,
        ids: &[DeliveryId],
    ) -> Result<Vec<(DeliveryId, Delivery)>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(DELIVERIES)?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(v) = t.get(id)? {
                out.push((id, decode(v.value(), "delivery")?));
            }
        }
        Ok(out)
    }

    /// The attempts of a delivery, oldest first.
    pub fn attempts(&self, id: DeliveryId) -> Result<Vec<(u32, Attempt)>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for row in t.range((id, 0)..=(id, u32::MAX))? {
            let (k, v) = row?;
            out.push((k.value().1, decode(v.value(), "attempt")?));
        }
        Ok(out)
    }

    /// Scheduled deliveries due before `until`, from `from` on, at most `limit`, earliest first.
    pub fn due(
        &self,
        from: Bound<(Micros, DeliveryId)>,
        until: Micros,
        limit: usize,
    ) -> Result<Vec<(Micros, DeliveryId)>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(SCHEDULE)?;
        let mut out = Vec::new();
        let range = (from, Bound::Excluded((until, 0u64)));
        for row in t.range::<(Micros, DeliveryId)>(range)? {
            let (k, _) = row?;
            out.push(k.value());
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Number of scheduled deliveries.
    pub fn scheduled_count(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(SCHEDULE)?.len()?)
    }

    /// Since when every attempt of a subscription has failed, if one has (the writer keeps
    /// it with the attempts).
    pub fn failing_since(&self, subscription: &str) -> Result<Option<Micros>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(META)?;
        Ok(t.get(schema::failing_key(subscription).as_str())?
            .and_then(|v| schema::parse_micros(v.value())))
    }

    /// The enabled switches set at run time, by subscription id.
    pub fn subscription_states(
        &self,
    ) -> Result<std::collections::HashMap<String, writer::SubscriptionState>, StoreError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(SUBSCRIPTION_STATE)?;
        let mut out = std::collections::HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(
                k.value().to_string(),
                decode(v.value(), "subscription state")?,
            );
        }
        Ok(out)
    }
}

/// Deliveries and events as of one read transaction (see [`Store::snapshot`]).
pub struct Snapshot {
    deliveries: redb::ReadOnlyTable<u64, &'static [u8]>,
    events: redb::ReadOnlyTable<u64, &'static [u8]>,
}

impl Snapshot {
    pub fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        get_record(&self.deliveries, id, "delivery")
    }

    pub fn event_by_seq(&self, seq: Seq) -> Result<Option<Event>, StoreError> {
        get_record(&self.events, seq, "event")
    }
}

/// The record stored under `key` in a table of encoded records (see `schema::encode`).
pub(crate) fn get_record<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    key: u64,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    match table.get(key)? {
        Some(v) => Ok(Some(decode(v.value(), what)?)),
        None => Ok(None),
    }
}

/// The smallest seq whose event was received at or after `t` (one past the last if none).
/// Sequence numbers are dense apart from retention gaps and received times never decrease
/// with seq (the writer enforces it), so a binary search over seq finds it.
fn first_seq_at_or_after(
    events: &redb::ReadOnlyTable<u64, &[u8]>,
    t: Micros,
) -> Result<Seq, StoreError> {
    let (Some((first, _)), Some((last, _))) = (events.first()?, events.last()?) else {
        return Ok(0);
    };
    let (mut lo, mut hi) = (first.value(), last.value() + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // The first existing event at or after `mid` (gaps left by retention).
        let Some(row) = events.range(mid..hi)?.next() else {
            hi = mid;
            continue;
        };
        let (k, v) = row?;
        let e: Event = decode(v.value(), "event")?;
        if e.received_at < t {
            lo = k.value() + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}
