//! The PostgreSQL backend of cluster mode (`../shared/CLUSTER.md`): several nodes share one
//! database.
//!
//! - `migrate`: the schema, as versioned SQL migrations embedded in the binary, applied under
//!   an advisory lock so that nodes starting together migrate once.
//! - `PgStore` (`reads`): every read the daemon makes, as SQL over a pool of connections.
//! - `writer`: group-commit publishing with idempotency across nodes, inbound receipts, and
//!   the other writes, each in one transaction; attempt outcomes fenced by the lease.
//! - `operator`: retry, cancel, replay with the embedded backend's rules.
//! - `leases` and `cluster`: which node runs which destination (rendezvous hashing, leases
//!   with fencing epochs), and how new work reaches its owner (`notify`: NOTIFY on commit and
//!   periodic scans of due deliveries).
//! - `retention`: the sweep, on one node at a time.
//!
//! The daemon reaches all of this through `storage::Store` and `storage::writer::WriterHandle`,
//! as it reaches the embedded backend.

pub mod cluster;
pub mod leases;
pub mod migrate;
pub mod notify;
pub mod operator;
pub mod reads;
pub mod retention;
pub mod writer;

use std::sync::Arc;

pub use cluster::Leases;
pub use reads::PgStore;

use crate::storage::StoreError;

/// A pool of connections to the cluster's database.
pub type Pool = deadpool_postgres::Pool;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(describe(&e))
    }
}

/// A database error for a log or an answer: with the server's own message where there is one
/// (the client's text alone says only "db error").
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {db} ({})", db.code().code()),
        None => e.to_string(),
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Postgres(e.to_string())
    }
}

/// Opens a pool of `size` connections to `url` (made as they are first needed).
pub fn pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    pool_with(url, size, None)
}

/// As `pool`, each session started with these server settings too (`-c name=value …`).
pub fn pool_with(url: &str, size: usize, settings: Option<&str>) -> Result<Pool, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Postgres(e.to_string()))?;
    if let Some(s) = settings {
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {s}"),
            _ => s.to_string(),
        };
        config.options(&options);
    }
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            // A connection that died while idle is found out before it is handed back.
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(5)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::Postgres(e.to_string()))
}

/// Runs `f` to completion from synchronous code on a runtime thread. The daemon's reads are
/// synchronous (redb answers from memory-mapped pages); on PostgreSQL they wait on the
/// network, so the thread hands its other tasks to the runtime while it waits
/// (`block_in_place`). Needs the multi-threaded runtime the daemon runs on.
pub(crate) fn block<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| StoreError::Postgres("no runtime to wait on the database from".into()))?;
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        return Err(StoreError::Postgres(
            "the PostgreSQL backend needs the multi-threaded runtime".into(),
        ));
    }
    tokio::task::block_in_place(|| handle.block_on(f))
}

/// What every part of the backend on one node shares.
#[derive(Clone)]
pub struct Shared {
    pub pool: Pool,
    pub url: Arc<str>,
    pub node: Arc<str>,
    pub leases: Arc<Leases>,
    pub metrics: Arc<crate::metrics::Metrics>,
}
