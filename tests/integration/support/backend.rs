//! The storage backend a behaviour test runs on. The tests that describe behaviour (publish,
//! duplicates, delivery, retries, dead letters, replay, redrive, inbound, operator routes,
//! kill -9 durability) are written once, taking a `Backend`, and `both!` makes two tests of
//! each: `name::redb` (a redb file in the daemon's temp dir) and `name::postgres` (a
//! PostgreSQL server the harness starts for that test, stopped at its end).

use std::path::Path;
use std::sync::Arc;

use super::Daemon;
use super::postgres::Postgres;

/// Where a test's daemons keep their state.
#[derive(Clone)]
pub enum Backend {
    Redb,
    /// One server per test; every daemon the test starts (restarts too) uses its database.
    Postgres(Arc<Postgres>),
}

impl Backend {
    /// A PostgreSQL server of this test's own.
    pub fn postgres() -> Backend {
        Backend::Postgres(Arc::new(Postgres::start()))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }

    /// `config` with the backend's settings added: on PostgreSQL the server's database and
    /// a fixed node name, so a restarted daemon is the same node and keeps its leases.
    pub fn config(&self, config: &str) -> String {
        self.node_config(config, "node-1")
    }

    /// `config` for node `node` of a cluster on this backend's database.
    pub fn node_config(&self, config: &str, node: &str) -> String {
        let Backend::Postgres(pg) = self else {
            return config.to_string();
        };
        let mut t: toml::Table = match config.parse() {
            Ok(t) => t,
            Err(e) => panic!("test config is not TOML: {e}\n{config}"),
        };
        let storage = t
            .entry("storage")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(s) = storage.as_table_mut() {
            s.insert("backend".into(), "postgres".into());
            s.insert("postgres_url".into(), pg.url("postgres").into());
            s.insert("postgres_pool".into(), 8.into());
        }
        let cluster = t
            .entry("cluster")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(c) = cluster.as_table_mut() {
            c.insert("node_id".into(), node.into());
            c.entry("lease").or_insert_with(|| "3s".into());
            c.entry("scan_interval").or_insert_with(|| "500ms".into());
        }
        match toml::to_string(&t) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// `Daemon::start` on this backend.
    pub fn start(&self, config: &str) -> Daemon {
        Daemon::start(&self.config(config))
    }

    /// `Daemon::start_in` on this backend (a restart on the same data dir and database).
    pub fn start_in(&self, dir: &Path, config: &str) -> Daemon {
        Daemon::start_in(dir, &self.config(config))
    }
}

/// Makes each named `async fn(Backend)` two tests, `name::redb` and `name::postgres`.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redb() {
                super::$name($crate::support::backend::Backend::Redb).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::support::backend::Backend::postgres()).await
            }
        }
    )*};
}
