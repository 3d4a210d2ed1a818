//! The PostgreSQL backend of cluster mode (`../shared/CLUSTER.md`, issue 17), under
//! construction: so far its schema, as versioned SQL migrations embedded in the binary and
//! applied under an advisory lock (`migrate`), group-commit publishing with idempotency
//! across nodes (`writer`), destination leases with fencing epochs (`leases`), and how new
//! work reaches its owner: NOTIFY on commit, and scans of due deliveries (`notify`). Nothing in the daemon uses it yet; `storage.backend` is not a
//! setting until the backend serves.

pub mod leases;
pub mod migrate;
pub mod notify;
pub mod operator;
pub mod retention;
pub mod writer;
