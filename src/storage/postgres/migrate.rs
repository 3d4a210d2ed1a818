//! Schema migrations: SQL files embedded in the binary, applied in order at start, each in
//! one transaction that also records the version it reached. Several nodes starting together
//! take a session advisory lock first, so exactly one applies each migration and the others
//! find it done. A database of a newer schema than this binary knows is refused with a clear
//! message, as the embedded backend refuses a newer file.

use thiserror::Error;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_schema.sql"),
    include_str!("migrations/0002_callback_destinations.sql"),
    include_str!("migrations/0003_no_foreign_keys.sql"),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock key every node takes while migrating (`dispatchd` in ASCII); a
/// retention sweep holds it shared, so no migration commits under one.
pub(crate) const LOCK_KEY: i64 = 0x6469_7370_6174_6368;

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(
        "the database has schema version {found}, newer than this dispatchd understands ({known}); run a newer dispatchd"
    )]
    TooNew { found: i64, known: i64 },
    #[error("the database's schema version {0:?} is not a number")]
    BadVersion(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What `migrate` found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version the database had.
    pub from: i64,
    /// The version it has now (`SCHEMA_VERSION`).
    pub to: i64,
}

/// Brings the database to `SCHEMA_VERSION`, under the advisory lock.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Migrated, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply(client).await;
    // Released on every path; a lost connection releases it too.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let migrated = result?;
    unlocked?;
    Ok(migrated)
}

async fn apply(client: &mut tokio_postgres::Client) -> Result<Migrated, MigrateError> {
    let from = version(&*client).await?;
    if from > SCHEMA_VERSION {
        return Err(MigrateError::TooNew {
            found: from,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(from).unwrap_or(0))
    {
        let to = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO dispatchd_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&to.to_string()],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version = to, "database schema migrated");
    }
    Ok(Migrated {
        from,
        to: SCHEMA_VERSION,
    })
}

/// The schema version the database records; 0 for an empty database. On a connection or
/// inside a transaction.
pub async fn version(client: &impl tokio_postgres::GenericClient) -> Result<i64, MigrateError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('dispatchd_meta') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_opt(
            "SELECT value FROM dispatchd_meta WHERE key = 'schema_version'",
            &[],
        )
        .await?;
    match row {
        None => Ok(0),
        Some(r) => {
            let v: String = r.get(0);
            v.parse().map_err(|_| MigrateError::BadVersion(v))
        }
    }
}

/// Whether the server may lose acknowledged commits on its own crash
/// (`synchronous_commit = off`); the daemon warns about it at start.
pub async fn commits_may_be_lost(client: &tokio_postgres::Client) -> Result<bool, MigrateError> {
    let v: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await?
        .get(0);
    Ok(v == "off")
}
