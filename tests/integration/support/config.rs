//! A typed builder for the daemon's config file, so tests say what they set instead of
//! formatting TOML by hand: values are TOML values (strings escaped by the `toml` crate),
//! keys are dotted paths as the config documents them.
//!
//! ```ignore
//! let cfg = Config::new()
//!     .private_networks()
//!     .set("delivery.auto_disable_after", "2s")
//!     .subscription(Sub::new("crm", &rx.url("/")).set("retry.max_attempts", 5))
//!     .to_toml();
//! ```

use toml::{Table, Value};

/// The signing secret test subscriptions use unless they set their own.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Sets `path` (`a.b.c`) in `table`, making the tables on the way.
fn set_path(table: &mut Table, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        return;
    };
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        t = match entry.as_table_mut() {
            Some(t) => t,
            None => unreachable!("made a table just above"),
        };
    }
    t.insert(last.to_string(), value);
}

/// A whole config file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    table: Table,
    subscriptions: Vec<Table>,
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one key by its dotted path: `.set("delivery.timeout", "5s")`.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Self {
        set_path(&mut self.table, path, value.into());
        self
    }

    /// Deliveries may go to loopback (every test receiver listens there).
    pub fn private_networks(self) -> Self {
        self.set("delivery.allow_private_networks", true)
    }

    /// An API token with these scopes.
    pub fn token(mut self, token: &str, scopes: &[&str]) -> Self {
        let mut t = Table::new();
        t.insert("token".into(), token.into());
        t.insert("scopes".into(), scopes.to_vec().into());
        push(&mut self.table, "auth", "tokens", t);
        self
    }

    /// A producer's HMAC key with these scopes.
    pub fn key(mut self, id: &str, secret: &str, scopes: &[&str]) -> Self {
        let mut t = Table::new();
        t.insert("id".into(), id.into());
        t.insert("secret".into(), secret.into());
        t.insert("scopes".into(), scopes.to_vec().into());
        push(&mut self.table, "auth", "keys", t);
        self
    }

    pub fn subscription(mut self, s: Sub) -> Self {
        self.subscriptions.push(s.0);
        self
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let mut t = self.table.clone();
        if !self.subscriptions.is_empty() {
            let subs: Vec<Value> = self
                .subscriptions
                .iter()
                .cloned()
                .map(Value::Table)
                .collect();
            t.insert("subscriptions".into(), Value::Array(subs));
        }
        match toml::to_string(&t) {
            Ok(s) => s,
            Err(e) => panic!("the test config does not serialize: {e}"),
        }
    }
}

/// Appends a table to the array `section.key`.
fn push(table: &mut Table, section: &str, key: &str, item: Table) {
    let path = format!("{section}.{key}");
    let mut items = table
        .get(section)
        .and_then(|s| s.get(key))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    items.push(Value::Table(item));
    set_path(table, &path, Value::Array(items));
}

/// One `[[subscriptions]]` table.
#[derive(Debug, Clone)]
pub struct Sub(Table);

impl Sub {
    /// Subscription `id` to `url`, signed with `SECRET`.
    pub fn new(id: &str, url: &str) -> Self {
        let mut t = Table::new();
        t.insert("id".into(), id.into());
        t.insert("url".into(), url.into());
        t.insert("secrets".into(), vec![SECRET].into());
        Sub(t)
    }

    /// Sets one key by its dotted path: `.set("retry.max_attempts", 3)`.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Self {
        set_path(&mut self.0, path, value.into());
        self
    }

    /// Adds the keys of a TOML fragment (`"max_in_flight = 1\nordering = \"fifo\""`), for the
    /// few settings a test writes as the config file spells them.
    pub fn with_toml(mut self, fragment: &str) -> Self {
        let extra: Table = match toml::from_str(fragment) {
            Ok(t) => t,
            Err(e) => panic!("bad TOML fragment {fragment:?}: {e}"),
        };
        for (k, v) in extra {
            match (self.0.get_mut(&k), v) {
                (Some(Value::Table(mine)), Value::Table(theirs)) => mine.extend(theirs),
                (_, v) => {
                    self.0.insert(k, v);
                }
            }
        }
        self
    }

    /// This subscription alone, as the text of a `[[subscriptions]]` table.
    pub fn to_toml(&self) -> String {
        Config::new().subscription(self.clone()).to_toml()
    }

    /// Retries: `attempts` in all, the backoff between `initial` and `max`.
    pub fn retry(self, attempts: i64, initial: &str, max: &str) -> Self {
        self.set("retry.max_attempts", attempts)
            .set("retry.initial", initial)
            .set("retry.max", max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_writes_what_the_daemon_reads() {
        let text = Config::new()
            .private_networks()
            .token("tok-0123456789abcdef", &["admin"])
            .subscription(
                Sub::new("a", "http://127.0.0.1:9/\"quoted\"")
                    .retry(3, "10ms", "20ms")
                    .set("headers.X-Tenant", "7"),
            )
            .to_toml();
        let raw = match dispatchd::config::parse_str(&text, None) {
            Ok(r) => r,
            Err(e) => panic!("{e}\n{text}"),
        };
        assert_eq!(raw.subscriptions.len(), 1, "{text}");
        let s = raw.subscriptions[0].get_ref();
        assert_eq!(s.url, "http://127.0.0.1:9/\"quoted\"");
        assert_eq!(s.retry.max_attempts, Some(3));
        assert_eq!(s.headers.get("X-Tenant").map(String::as_str), Some("7"));
        assert!(raw.delivery.allow_private_networks);
        assert_eq!(raw.auth.tokens.len(), 1);
    }
}
