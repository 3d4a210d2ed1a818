//! Storage, one folder per backend.
//!
//! - `embedded/`: the default. One redb file on the node's disk, written by one writer thread
//!   with group commit through the commit journal; reads from any thread. Everything the
//!   daemon runs on today.
//! - `postgres/`: cluster mode (`../shared/CLUSTER.md`), under construction: several nodes on
//!   one PostgreSQL database, with destination leases. Not yet something the daemon can run
//!   on.
//!
//! The rest of the daemon reaches storage through `Store` (reads) and `writer::WriterHandle`
//! (every write, as commands); that pair is the seam the PostgreSQL backend is to implement.
//! They are re-exported here so callers name `storage::…`, not a backend.

pub mod embedded;
pub mod postgres;

pub use embedded::*;
