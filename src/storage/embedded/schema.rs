//! Table definitions, record encoding (version byte + postcard) and the schema version check.
//!
//! docs/storage-format.md describes every table; change both together.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::model::Micros;

/// Bumped whenever a table's key or value layout changes; migrations live in `migrate`.
///
/// Version 2 dropped `deliveries_by_subscription` and `deliveries_by_status`: both are
/// answered from `deliveries_by_subscription_status`, and keeping them cost four of the
/// eighteen B-tree operations of every delivery.
///
/// Version 3 added `batches`, and records of version 2 (`RECORD_V2`) appear: events carry a
/// priority, their batch and a callback, deliveries their priority. Upgrading creates the
/// table; records of version 1 are read as they are (see `decode`), not rewritten.
pub const SCHEMA_VERSION: u32 = 3;

/// Version byte of records written before version 2.
pub const RECORD_V1: u8 = 1;

/// Version byte written in front of every postcard record. Version 2 appended fields to
/// `Event` (priority, batch, callback) and `Delivery` (priority); the other records are laid
/// out as in version 1.
pub const RECORD_V2: u8 = 2;

/// Zero bytes read after a version-1 record: postcard reads the fields version 2 appended
/// from them as zero (variant 0, `None`, 0, empty), and a record without appended fields
/// leaves them unread. Covers every field appended so far with room to spare.
const V1_PADDING: [u8; 16] = [0; 16];

pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// seq → Event record.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// event id → seq.
pub const EVENT_IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
/// Idempotency-Key header → seq.
pub const IDEMPOTENCY_KEYS: TableDefinition<&str, u64> = TableDefinition::new("idempotency_keys");
/// (event type, seq) → (): the type filter of the event list.
pub const EVENTS_BY_TYPE: TableDefinition<(&str, u64), ()> = TableDefinition::new("events_by_type");
/// delivery id → Delivery record.
pub const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
/// (seq, delivery id) → (): an event's deliveries.
pub const EVENT_DELIVERIES: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("event_deliveries");
/// (delivery id, attempt number from 1) → Attempt record. Append-only.
pub const ATTEMPTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("attempts");
/// (due time µs, delivery id) → (): every delivery that will be attempted. Source of truth
/// for the scheduler.
pub const SCHEDULE: TableDefinition<(i64, u64), ()> = TableDefinition::new("schedule");
/// delivery id → dead-lettered at (µs): the dead-letter index.
pub const DEAD: TableDefinition<u64, i64> = TableDefinition::new("dead");
/// receipt id → Receipt record (raw inbound request). Immutable.
pub const RECEIPTS: TableDefinition<u64, &[u8]> = TableDefinition::new("receipts");
/// (source id, provider delivery id) → receipt id: inbound de-duplication.
pub const RECEIPT_IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("receipt_ids");
/// subscription id → Subscription record (created over the API).
pub const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");

/// batch id → BatchRecord: the events a `POST /v1/events/batch` stored or found.
pub const BATCHES: TableDefinition<&str, &[u8]> = TableDefinition::new("batches");

/// subscription id → SubscriptionState record: enabled switches set at run time (410 Gone,
/// auto-disable, pause), kept apart from the definitions so config subscriptions have them too.
pub const SUBSCRIPTION_STATE: TableDefinition<&str, &[u8]> =
    TableDefinition::new("subscription_state");

/// (subscription id, status code, delivery id) → (): a subscription's deliveries by status
/// (the operator's most common question: "what is dead / pending for this endpoint?").
pub const DELIVERIES_BY_SUB_STATUS: TableDefinition<(&str, u8, u64), ()> =
    TableDefinition::new("deliveries_by_subscription_status");
/// (event type, delivery id) → (): deliveries by the type of their event.
pub const DELIVERIES_BY_TYPE: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("deliveries_by_type");

/// Calls `$m!(DEFINITION)` for every table, in a fixed order (metadata first).
macro_rules! for_each_table {
    ($m:ident) => {
        $m!(META);
        $m!(EVENTS);
        $m!(EVENT_IDS);
        $m!(IDEMPOTENCY_KEYS);
        $m!(EVENTS_BY_TYPE);
        $m!(DELIVERIES);
        $m!(EVENT_DELIVERIES);
        $m!(ATTEMPTS);
        $m!(SCHEDULE);
        $m!(DEAD);
        $m!(RECEIPTS);
        $m!(RECEIPT_IDS);
        $m!(SUBSCRIPTIONS);
        $m!(SUBSCRIPTION_STATE);
        $m!(DELIVERIES_BY_SUB_STATUS);
        $m!(DELIVERIES_BY_TYPE);
        $m!(BATCHES);
    };
}
pub(crate) use for_each_table;

/// An API subscription as stored in `SUBSCRIPTIONS` (postcard). The subscriptions owner
/// (`subscriptions::control`) makes and reads these; storage keeps them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    /// The definition as the API received it (the JSON of a config `[[subscriptions]]` table)
    /// without its secrets, which are kept apart with their expiry.
    pub spec: String,
    pub secrets: Vec<StoredSecret>,
    pub created_at: Micros,
    pub updated_at: Micros,
}

impl SubscriptionRecord {
    /// The secrets that still sign at `now` (those rotated out stop at their expiry).
    pub fn active_secrets(&self, now: Micros) -> Vec<String> {
        self.secrets
            .iter()
            .filter(|s| s.expires_at.is_none_or(|t| t > now))
            .map(|s| s.secret.clone())
            .collect()
    }
}

/// A signing secret of an API subscription. One with an expiry is on its way out after a
/// rotation: it keeps signing until then.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSecret {
    pub secret: String,
    pub added_at: Micros,
    pub expires_at: Option<Micros>,
}

/// A batch as stored in `BATCHES`: when it was published and the seqs of its events (new or
/// duplicate), sorted. Its status is counted from those events' deliveries when asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchRecord {
    pub created_at: Micros,
    pub seqs: Vec<crate::model::Seq>,
}

/// Tables of version 1 that version 2 dropped; `migrate` deletes them.
pub const RETIRED_IN_V2: [&str; 2] = ["deliveries_by_subscription", "deliveries_by_status"];

const SCHEMA_KEY: &str = "schema_version";

/// Encodes a record as one version byte followed by its postcard bytes.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(256);
    out.push(RECORD_V2);
    postcard::to_extend(value, out).map_err(|e| StoreError::Encode(e.to_string()))
}

/// Writes a record as `encode` would, straight into the space its table reserves for the
/// row: the encoded size is computed first, so no buffer is allocated, grown or copied.
pub fn insert_record<'k, K: redb::Key + 'static, T: Serialize>(
    table: &mut redb::Table<'_, K, &'static [u8]>,
    key: impl std::borrow::Borrow<K::SelfType<'k>>,
    value: &T,
) -> Result<(), StoreError> {
    let encode_err = |e: postcard::Error| StoreError::Encode(e.to_string());
    let size = postcard::experimental::serialized_size(value).map_err(encode_err)?;
    let mut row = table.insert_reserve(key, 1 + size)?;
    let Some((version, rest)) = row.as_mut().split_first_mut() else {
        return Err(StoreError::Encode("no room reserved for the record".into()));
    };
    *version = RECORD_V2;
    postcard::to_slice(value, rest).map_err(encode_err)?;
    Ok(())
}

/// Decodes a record written by `encode`, refusing unknown versions.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_V2, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StoreError::Decode(what, e.to_string()))
        }
        Some((&RECORD_V1, rest)) => {
            let mut padded = Vec::with_capacity(rest.len() + V1_PADDING.len());
            padded.extend_from_slice(rest);
            padded.extend_from_slice(&V1_PADDING);
            postcard::from_bytes(&padded).map_err(|e| StoreError::Decode(what, e.to_string()))
        }
        Some((v, _)) => Err(StoreError::Decode(
            what,
            format!("unknown record version {v}"),
        )),
        None => Err(StoreError::Decode(what, "empty record".into())),
    }
}

/// Creates every table and records the schema version in a new file; checks it in an old one.
pub fn init(db: &redb::Database) -> Result<(), StoreError> {
    let found = {
        let r = db.begin_read()?;
        match r.open_table(META) {
            Ok(t) => version_in(&t)?,
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        }
    };
    match found {
        Some(v) if v > SCHEMA_VERSION => return Err(StoreError::SchemaTooNew(v, SCHEMA_VERSION)),
        Some(v) if v < SCHEMA_VERSION => migrate(db, v)?,
        _ => {}
    }
    let w = db.begin_write()?;
    macro_rules! create {
        ($t:ident) => {
            w.open_table($t)?;
        };
    }
    for_each_table!(create);
    write_version(&w, SCHEMA_VERSION)?;
    w.commit()?;
    Ok(())
}

/// Records `v` as the file's schema version.
fn write_version(w: &redb::WriteTransaction, v: u32) -> Result<(), StoreError> {
    w.open_table(META)?
        .insert(SCHEMA_KEY, v.to_le_bytes().as_slice())?;
    Ok(())
}

/// The `meta` key under which a subscription's failing mark is kept: since when every
/// attempt of its destination has failed (i64 little-endian micros), for auto-disable.
pub fn failing_key(subscription: &str) -> String {
    format!("failing_since/{subscription}")
}

/// Decodes a failing mark.
pub fn parse_micros(bytes: &[u8]) -> Option<i64> {
    bytes.try_into().ok().map(i64::from_le_bytes)
}

/// The schema version a `meta` table records, if it records one.
pub fn version_in(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<u32>, StoreError> {
    match meta.get(SCHEMA_KEY)? {
        Some(v) => Ok(Some(parse_version(v.value())?)),
        None => Ok(None),
    }
}

fn parse_version(bytes: &[u8]) -> Result<u32, StoreError> {
    let arr: [u8; 4] = bytes
        .try_into()
        .map_err(|_| StoreError::Decode("schema version", "not 4 bytes".into()))?;
    Ok(u32::from_le_bytes(arr))
}

/// Upgrades an older file in place, one version at a time, each step in one transaction
/// that also records the version it reached (a crash leaves the file at a version, never
/// between two).
fn migrate(db: &redb::Database, from: u32) -> Result<(), StoreError> {
    let mut v = from;
    while v < SCHEMA_VERSION {
        let w = db.begin_write()?;
        match v {
            1 => {
                for name in RETIRED_IN_V2 {
                    // Untyped: the definitions are gone from this code.
                    let def: TableDefinition<(), ()> = TableDefinition::new(name);
                    w.delete_table(def)?;
                }
            }
            2 => {
                w.open_table(BATCHES)?;
            }
            _ => {
                return Err(StoreError::Decode(
                    "schema version",
                    format!("no migration from version {v} to {SCHEMA_VERSION}"),
                ));
            }
        }
        v += 1;
        write_version(&w, v)?;
        w.commit()?;
        tracing::info!(version = v, "database schema upgraded");
    }
    Ok(())
}

/// Writes a schema version, for tests of the version check.
pub fn force_schema_version(db: &redb::Database, v: u32) -> Result<(), StoreError> {
    let w = db.begin_write()?;
    write_version(&w, v)?;
    w.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::{ReadableDatabase, ReadableTableMetadata, TableHandle};

    use super::*;

    fn version(db: &redb::Database) -> Result<Option<u32>, StoreError> {
        version_in(&db.begin_read()?.open_table(META)?)
    }

    /// A new file with every table of this version, at schema version `v`.
    fn file_at_version(dir: &tempfile::TempDir, v: u32) -> Result<redb::Database, StoreError> {
        let db = redb::Database::create(dir.path().join("t.redb"))?;
        init(&db)?;
        force_schema_version(&db, v)?;
        Ok(db)
    }

    fn tempdir() -> Result<tempfile::TempDir, StoreError> {
        tempfile::tempdir().map_err(|e| StoreError::Encode(e.to_string()))
    }

    #[test]
    fn a_record_written_in_place_has_the_bytes_encode_gives() -> Result<(), StoreError> {
        let dir = tempdir()?;
        let db = file_at_version(&dir, SCHEMA_VERSION)?;
        let event = crate::model::Event {
            id: "evt_1".into(),
            event_type: "order.created".into(),
            source: Some("shop".into()),
            data: format!(r#"{{"pad":"{}"}}"#, "x".repeat(3000)),
            received_at: 1_700_000_000_000_000,
            idempotency_key: None,
            receipt: Some(7),
            priority: crate::model::Priority::High,
            batch: Some("bat_1".into()),
            callback: None,
        };
        let w = db.begin_write()?;
        insert_record(&mut w.open_table(EVENTS)?, 1, &event)?;
        // Replacing a row works the same way.
        insert_record(&mut w.open_table(EVENTS)?, 1, &event)?;
        w.commit()?;
        let r = db.begin_read()?;
        let events = r.open_table(EVENTS)?;
        let Some(row) = events.get(1)? else {
            panic!("the row is missing");
        };
        assert_eq!(row.value(), encode(&event)?.as_slice());
        let back: crate::model::Event = decode(row.value(), "event")?;
        assert_eq!(back.data, event.data);
        assert_eq!(back.receipt, Some(7));
        Ok(())
    }

    /// A record written before version 2 appended fields reads them as zero: an event as
    /// normal priority without batch or callback, a delivery as normal priority; every other
    /// field as written.
    #[test]
    fn a_version_1_record_reads_its_appended_fields_as_zero() -> Result<(), StoreError> {
        #[derive(Serialize)]
        struct EventV1 {
            id: String,
            event_type: String,
            source: Option<String>,
            data: String,
            received_at: i64,
            idempotency_key: Option<String>,
            receipt: Option<u64>,
        }
        #[derive(Serialize)]
        struct DeliveryV1 {
            event_seq: u64,
            event_id: String,
            subscription: String,
            status: crate::model::DeliveryStatus,
            attempts: u32,
            next_attempt_at: Option<i64>,
            last_error: Option<String>,
            created_at: i64,
            updated_at: i64,
            origin: crate::model::Origin,
        }
        let v1 = |bytes: Vec<u8>| {
            let mut b = bytes;
            b[0] = RECORD_V1;
            b
        };
        let old = EventV1 {
            id: "evt_1".into(),
            event_type: "t".into(),
            source: Some("s".into()),
            data: "{}".into(),
            received_at: 5,
            idempotency_key: Some("k".into()),
            receipt: Some(3),
        };
        let e: crate::model::Event = decode(&v1(encode(&old)?), "event")?;
        assert_eq!(
            (e.id.as_str(), e.idempotency_key.as_deref(), e.receipt),
            ("evt_1", Some("k"), Some(3))
        );
        assert_eq!(e.priority, crate::model::Priority::Normal);
        assert_eq!((e.batch, e.callback), (None, None));
        let old = DeliveryV1 {
            event_seq: 9,
            event_id: "evt_1".into(),
            subscription: "crm".into(),
            status: crate::model::DeliveryStatus::Retrying,
            attempts: 2,
            next_attempt_at: Some(7),
            last_error: Some("timeout".into()),
            created_at: 1,
            updated_at: 2,
            origin: crate::model::Origin::Redrive,
        };
        let d: crate::model::Delivery = decode(&v1(encode(&old)?), "delivery")?;
        assert_eq!((d.event_seq, d.attempts, d.updated_at), (9, 2, 2));
        assert_eq!(d.origin, crate::model::Origin::Redrive);
        assert_eq!(d.priority, crate::model::Priority::Normal);
        // Records whose layout did not change read the same from either version.
        let state = super::super::writer::SubscriptionState {
            enabled: false,
            reason: Some("gone".into()),
            changed_at: 4,
        };
        let back: super::super::writer::SubscriptionState = decode(&v1(encode(&state)?), "state")?;
        assert_eq!(back, state);
        Ok(())
    }

    #[test]
    fn a_version_2_file_gets_the_batches_table() -> Result<(), StoreError> {
        let dir = tempdir()?;
        let db = file_at_version(&dir, 2)?;
        let w = db.begin_write()?;
        w.delete_table(BATCHES)?;
        w.commit()?;
        init(&db)?;
        assert_eq!(version(&db)?, Some(SCHEMA_VERSION));
        assert_eq!(db.begin_read()?.open_table(BATCHES)?.len()?, 0);
        Ok(())
    }

    #[test]
    fn a_version_1_file_loses_its_retired_tables_and_keeps_the_rest() -> Result<(), StoreError> {
        let dir = tempdir()?;
        let db = file_at_version(&dir, 1)?;
        // Make it look as version 1 wrote it: the retired tables hold rows.
        let w = db.begin_write()?;
        {
            let mut by_status: redb::Table<(u8, u64), ()> =
                w.open_table(TableDefinition::new(RETIRED_IN_V2[1]))?;
            by_status.insert((2, 7), ())?;
            let mut by_sub: redb::Table<(&str, u64), ()> =
                w.open_table(TableDefinition::new(RETIRED_IN_V2[0]))?;
            by_sub.insert(("crm", 7), ())?;
            w.open_table(DELIVERIES_BY_SUB_STATUS)?
                .insert(("crm", 2, 7), ())?;
        }
        w.commit()?;

        init(&db)?;
        assert_eq!(version(&db)?, Some(SCHEMA_VERSION));
        let r = db.begin_read()?;
        let names: Vec<String> = r.list_tables()?.map(|t| t.name().to_string()).collect();
        for gone in RETIRED_IN_V2 {
            assert!(!names.iter().any(|n| n == gone), "{gone}: {names:?}");
        }
        assert_eq!(r.open_table(DELIVERIES_BY_SUB_STATUS)?.len()?, 1);
        Ok(())
    }

    #[test]
    fn a_version_without_a_migration_is_refused() -> Result<(), StoreError> {
        let dir = tempdir()?;
        let db = file_at_version(&dir, 0)?;
        assert!(
            matches!(init(&db), Err(StoreError::Decode(_, m)) if m.contains("no migration from version 0"))
        );
        assert_eq!(version(&db)?, Some(0));
        Ok(())
    }
}
