//! Operator control of the subscriptions in force: those of the config file and those created
//! over the API (stored in the `subscriptions` table), merged into the registry; pause and
//! resume (stored as run-time state, so config subscriptions have them too); secret rotation
//! with a grace period; and reloading the config file (SIGHUP, `POST /v1/admin/reload`).
//!
//! **Invariant:** every change to the set goes through `apply` under the `changes` lock,
//! including a destination's own disable (410 Gone, auto-disable), which it asks for over a
//! channel (`run_disables`) instead of touching the registry. `apply` swaps the registry
//! whole, then starts, replaces or stops destination tasks to match, and rescans the
//! scheduled deliveries of every destination it (re)started: jobs queued in a replaced task
//! are dropped while their rows stay on disk, and a rescan is what finds them again.
//! Attempts in flight finish on the old task (see `Supervisor::replace`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::Notify;

use super::live::Registry;
use super::spec::{self, SubscriptionDefaults};
use crate::config::{self, Config, ConfigError, ConfigErrors};
use crate::delivery::Supervisor;
use crate::ingest::source::Sources;
use crate::model::{Micros, micros, now_micros};
use crate::scheduler::driver::Msg;
use crate::storage::schema::{StoredSecret, SubscriptionRecord};
use crate::storage::writer::{Due, SubscriptionState, WriteError, WriterHandle};
use crate::storage::{Store, StoreError};
use crate::subscriptions::{Subscription, SubscriptionSource};

/// The run-time state reason that marks a paused subscription.
pub const PAUSED: &str = "paused";

/// Live deliveries read per chunk when rescanning or cancelling a subscription's backlog.
const CHUNK: usize = 1000;

/// A subscription as operators see it: the definition in force and its metadata. Never
/// carries a secret, only the last four characters of each.
#[derive(Debug, Clone)]
pub struct Described {
    pub sub: Arc<Subscription>,
    /// The signing secrets in force, newest first.
    pub secrets: Vec<SecretInfo>,
    pub state: Option<SubscriptionState>,
    pub created_at: Option<Micros>,
    pub updated_at: Option<Micros>,
}

/// What the API shows of one signing secret: never the secret itself.
#[derive(Debug, Clone)]
pub struct SecretInfo {
    pub last4: String,
    pub expires_at: Option<Micros>,
    /// `whpk_…` for a `whsk_` (Ed25519) key: receivers verify `v1a` signatures with it.
    pub public_key: Option<String>,
}

/// Why an operator change was refused or failed.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("no subscription with id {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Each entry is `field: problem`.
    #[error("invalid subscription: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a reload was refused; the old configuration stays in force.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("the daemon was started without a config file: there is nothing to reload")]
    NoFile,
    #[error("{0}")]
    Invalid(ConfigErrors),
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadSummary {
    pub subscriptions: usize,
    pub sources: usize,
    /// API tokens and producer keys now in force.
    pub tokens: usize,
    /// Settings the file changes that only a restart applies (the old values stay).
    pub restart_needed: Vec<&'static str>,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// What `apply` did, by subscription id.
#[derive(Debug, Default)]
struct Applied {
    added: Vec<String>,
    changed: Vec<String>,
    removed: Vec<String>,
}

/// The subscriptions in force and the operations that change them.
pub struct Control {
    store: Store,
    writer: WriterHandle,
    registry: Arc<Registry>,
    supervisor: Arc<Supervisor>,
    config: crate::swap::Swap<Config>,
    /// The configuration the process started with: what only a restart applies keeps these
    /// values, whatever reloads read.
    started: Arc<Config>,
    /// Serialises changes to the set (API calls, reloads, secret expiry).
    changes: tokio::sync::Mutex<()>,
    /// Woken when a secret expiry may have moved earlier.
    expiry: Notify,
}

fn last4(secret: &str) -> String {
    let n = secret.chars().count();
    secret.chars().skip(n.saturating_sub(4)).collect()
}

/// A fresh `whsec_` secret: 24 random bytes.
pub fn generate_secret() -> Result<String, ControlError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ControlError::Store(StoreError::Encode("no system randomness".into())))?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

impl Control {
    pub fn new(
        store: Store,
        writer: WriterHandle,
        registry: Arc<Registry>,
        supervisor: Arc<Supervisor>,
        config: Config,
    ) -> Arc<Self> {
        let started = Arc::new(config);
        Arc::new(Self {
            store,
            writer,
            registry,
            supervisor,
            config: crate::swap::Swap::from_arc(started.clone()),
            started,
            changes: tokio::sync::Mutex::new(()),
            expiry: Notify::new(),
        })
    }

    /// The configuration in force (the last one loaded successfully).
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    fn defaults(&self) -> SubscriptionDefaults {
        let c = self.config();
        SubscriptionDefaults {
            timeout: c.delivery_timeout,
            max_attempts: c.max_attempts,
        }
    }

    /// Refuses, when it is created or changed, a subscription whose URL names a forbidden
    /// address literal. (A stored one is not refused at start: the guard refuses its attempts,
    /// so its deliveries end as dead with the reason instead of waiting.)
    fn refuse_forbidden(&self, sub: &Subscription) -> Result<(), ControlError> {
        spec::refuse_forbidden_destination(&sub.url, self.config().allow_private_networks)
            .map_err(|m| ControlError::Invalid(vec![format!("url: {m}")]))
    }

    /// Validates a definition (a JSON object without `secrets`) with the given secrets.
    fn validate(
        &self,
        spec: &serde_json::Map<String, Value>,
        secrets: &[String],
    ) -> Result<Subscription, Vec<String>> {
        spec::from_json(spec, secrets, &self.defaults(), SubscriptionSource::Api)
    }

    /// Builds the subscription of a stored record with the secrets still active at `now`. A
    /// record that no longer validates becomes an unusable stand-in (see
    /// `spec::unusable_subscription`): skipping it would leave its deliveries with no
    /// destination task, pending for ever.
    fn build(&self, id: &str, rec: &SubscriptionRecord, now: Micros) -> Subscription {
        let spec = match serde_json::from_str::<Value>(&rec.spec) {
            Ok(Value::Object(m)) => m,
            _ => {
                return self.unusable(id, "", "the stored definition is not a JSON object".into());
            }
        };
        let secrets = rec.active_secrets(now);
        match self.validate(&spec, &secrets) {
            Ok(s) => s,
            Err(errs) => {
                let url = spec.get("url").and_then(Value::as_str).unwrap_or("");
                let why = format!(
                    "the stored definition is no longer valid: {}",
                    errs.join("; ")
                );
                self.unusable(id, url, why)
            }
        }
    }

    fn unusable(&self, id: &str, url: &str, why: String) -> Subscription {
        tracing::error!(subscription = id, error = %why, "stored subscription unusable: its deliveries go dead; change or delete it");
        spec::unusable_subscription(id, url, why, &self.defaults(), SubscriptionSource::Api)
    }

    /// The set that should be in force: config subscriptions, then API ones, with their
    /// run-time state (pause, 410 Gone, auto-disable) applied.
    fn effective(&self) -> Result<Vec<Arc<Subscription>>, StoreError> {
        let now = now_micros();
        let states = self.store.subscription_states()?;
        let mut out: Vec<Subscription> = self
            .config()
            .subscriptions
            .iter()
            .map(|s| (**s).clone())
            .collect();
        let config_ids: HashSet<String> = out.iter().map(|s| s.id.clone()).collect();
        for (id, rec) in self.store.subscription_records()? {
            if config_ids.contains(&id) {
                tracing::warn!(subscription = %id, "an API subscription has the id of a config subscription; the config one is in force");
                continue;
            }
            out.push(self.build(&id, &rec, now));
        }
        for s in &mut out {
            match states.get(&s.id) {
                Some(st) if st.reason.as_deref() == Some(PAUSED) => s.paused = true,
                Some(st) => s.enabled = st.enabled,
                None => {}
            }
        }
        Ok(out.into_iter().map(Arc::new).collect())
    }

    /// Makes `set` the subscriptions in force (see the module invariant).
    fn apply(&self, set: Vec<Arc<Subscription>>) -> Applied {
        self.apply_resumed(set, None)
    }

    /// `apply`, where an operator just resumed subscription `resumed`: its due deliveries
    /// are handed over as the operator's, so they go now even through an open breaker.
    fn apply_resumed(&self, set: Vec<Arc<Subscription>>, resumed: Option<&str>) -> Applied {
        let old = self.registry.snapshot();
        let old_by_id: HashMap<&str, &Arc<Subscription>> =
            old.iter().map(|s| (s.id.as_str(), s)).collect();
        self.registry.replace(set.clone());
        let mut applied = Applied::default();
        for s in &set {
            let fresh = match old_by_id.get(s.id.as_str()) {
                None => {
                    applied.added.push(s.id.clone());
                    true
                }
                Some(o) if ***o != **s => {
                    applied.changed.push(s.id.clone());
                    true
                }
                Some(_) => false,
            };
            if !fresh {
                continue;
            }
            self.supervisor.replace(s.clone());
            if s.enabled && !s.paused {
                self.rescan(&s.id, resumed == Some(s.id.as_str()));
            }
        }
        let ids: HashSet<&str> = set.iter().map(|s| s.id.as_str()).collect();
        for o in old.iter() {
            if !ids.contains(o.id.as_str()) {
                self.supervisor.stop_destination(&o.id);
                applied.removed.push(o.id.clone());
            }
        }
        if !(applied.added.is_empty() && applied.changed.is_empty() && applied.removed.is_empty()) {
            tracing::info!(added = ?applied.added, changed = ?applied.changed, removed = ?applied.removed, "subscriptions updated");
        }
        applied
    }

    /// Hands a subscription's scheduled deliveries to the scheduler again, in chunks, off the
    /// async threads. Jobs that are stale by the time they run are dropped by the worker.
    fn rescan(&self, id: &str, operator: bool) {
        let store = self.store.clone();
        let scheduler = self.supervisor.scheduler();
        let id: Arc<str> = Arc::from(id);
        tokio::task::spawn_blocking(move || {
            let mut cursor = None;
            loop {
                let crate::storage::inspect::LiveChunk { items, next } = match store
                    .live_deliveries(&id, cursor, CHUNK)
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(subscription = %id, error = %e, "cannot rescan scheduled deliveries");
                        return;
                    }
                };
                let due: Vec<Due> = items
                    .into_iter()
                    .filter_map(|(delivery, d)| {
                        d.next_attempt_at.map(|at| Due {
                            at,
                            delivery,
                            subscription: id.clone(),
                            event: None,
                            attempts: d.attempts,
                            priority: d.priority,
                            operator,
                        })
                    })
                    .collect();
                if !due.is_empty() && scheduler.send(Msg::Due(due)).is_err() {
                    return;
                }
                match next {
                    Some(c) => cursor = Some(c),
                    None => return,
                }
            }
        });
    }

    /// Puts the set in force at start: the config file's subscriptions and those stored by
    /// the API, with their run-time state, each with its destination task. Their scheduled
    /// deliveries are not rescanned: the scheduler's first load finds them.
    pub fn start(&self) -> Result<(), StoreError> {
        let set = self.effective()?;
        self.registry.replace(set.clone());
        self.supervisor.start(&set);
        Ok(())
    }

    /// Recomputes the set from the config in force and the database, and applies it.
    pub async fn refresh(&self) -> Result<(), ControlError> {
        let _g = self.changes.lock().await;
        let set = self.effective()?;
        self.apply(set);
        Ok(())
    }

    /// Every subscription in force, config ones first.
    pub fn describe_all(&self) -> Result<Vec<Described>, StoreError> {
        let records: HashMap<String, SubscriptionRecord> =
            self.store.subscription_records()?.into_iter().collect();
        let states = self.store.subscription_states()?;
        Ok(self
            .registry
            .snapshot()
            .iter()
            .map(|s| describe(s.clone(), records.get(&s.id), states.get(&s.id)))
            .collect())
    }

    /// One subscription in force.
    pub fn describe(&self, id: &str) -> Result<Described, ControlError> {
        let sub = self
            .registry
            .get(id)
            .ok_or_else(|| ControlError::NotFound(id.to_string()))?;
        let record = self.record(id)?;
        let states = self.store.subscription_states()?;
        Ok(describe(sub, record.as_ref(), states.get(id)))
    }

    fn record(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        self.store.subscription_record(id)
    }

    fn refuse_config(&self, id: &str) -> Result<(), ControlError> {
        if self.config().subscriptions.iter().any(|s| s.id == id) {
            return Err(ControlError::Conflict(format!(
                "subscription {id:?} comes from the config file; change it there and reload"
            )));
        }
        Ok(())
    }

    /// Creates an API subscription from a JSON definition. Without `secrets`, one is
    /// generated and answered (the only time a secret is ever shown).
    pub async fn create(&self, body: Value) -> Result<(Described, Option<String>), ControlError> {
        let Value::Object(mut spec) = body else {
            return Err(ControlError::Invalid(vec![
                "body: expected a JSON object".into(),
            ]));
        };
        let given = take_secrets(&mut spec)?;
        let generated = if given.is_empty() {
            Some(generate_secret()?)
        } else {
            None
        };
        let secrets: Vec<String> = generated.iter().cloned().chain(given).collect();
        let sub = self
            .validate(&spec, &secrets)
            .map_err(ControlError::Invalid)?;
        self.refuse_forbidden(&sub)?;
        let _g = self.changes.lock().await;
        if self.registry.get(&sub.id).is_some() || self.record(&sub.id)?.is_some() {
            return Err(ControlError::Conflict(format!(
                "a subscription with id {:?} exists",
                sub.id
            )));
        }
        let now = now_micros();
        let rec = SubscriptionRecord {
            spec: Value::Object(spec).to_string(),
            secrets: secrets
                .iter()
                .map(|s| StoredSecret {
                    secret: s.clone(),
                    added_at: now,
                    expires_at: None,
                })
                .collect(),
            created_at: now,
            updated_at: now,
        };
        self.writer.put_subscription(sub.id.clone(), &rec).await?;
        let set = self.effective()?;
        self.apply(set);
        drop(_g);
        Ok((self.describe(&sub.id)?, generated))
    }

    /// Replaces an API subscription's definition. Without `secrets` in the body the current
    /// secrets are kept (rotation is `rotate`); with them, they replace all at once.
    pub async fn update(&self, id: &str, body: Value) -> Result<Described, ControlError> {
        let Value::Object(mut spec) = body else {
            return Err(ControlError::Invalid(vec![
                "body: expected a JSON object".into(),
            ]));
        };
        match spec.get("id") {
            None => {
                spec.insert("id".into(), Value::from(id));
            }
            Some(Value::String(s)) if s == id => {}
            Some(other) => {
                return Err(ControlError::Invalid(vec![format!(
                    "id: {other} differs from the id in the path ({id:?}); ids cannot change"
                )]));
            }
        }
        let given = take_secrets(&mut spec)?;
        self.refuse_config(id)?;
        let _g = self.changes.lock().await;
        let Some(mut rec) = self.record(id)? else {
            return Err(ControlError::NotFound(id.to_string()));
        };
        // The API shows the URL with its password and query values masked: a definition sent
        // back as it was shown keeps the stored URL.
        if let Some(Value::String(shown)) = spec.get("url")
            && let Ok(Value::Object(stored)) = serde_json::from_str::<Value>(&rec.spec)
            && let Some(Value::String(url)) = stored.get("url")
            && url != shown
            && crate::redact::url_str(url) == *shown
        {
            spec.insert("url".into(), Value::from(url.as_str()));
        }
        let now = now_micros();
        if !given.is_empty() {
            rec.secrets = given
                .into_iter()
                .map(|s| StoredSecret {
                    secret: s,
                    added_at: now,
                    expires_at: None,
                })
                .collect();
        }
        let active = rec.active_secrets(now);
        let sub = self
            .validate(&spec, &active)
            .map_err(ControlError::Invalid)?;
        self.refuse_forbidden(&sub)?;
        rec.spec = Value::Object(spec).to_string();
        rec.updated_at = now;
        self.writer.put_subscription(id.to_string(), &rec).await?;
        let set = self.effective()?;
        self.apply(set);
        drop(_g);
        self.expiry.notify_one();
        self.describe(id)
    }

    /// Deletes an API subscription and cancels its deliveries still to be attempted;
    /// answers how many were cancelled.
    pub async fn delete(&self, id: &str) -> Result<u64, ControlError> {
        self.refuse_config(id)?;
        let _g = self.changes.lock().await;
        if !self.writer.delete_subscription(id.to_string()).await? {
            return Err(ControlError::NotFound(id.to_string()));
        }
        let set = self.effective()?;
        self.apply(set);
        drop(_g);
        let mut cancelled = 0u64;
        loop {
            let items = self.store.live_deliveries(id, None, CHUNK)?.items;
            if items.is_empty() {
                break;
            }
            let ids = items.into_iter().map(|(d, _)| d).collect();
            let outcomes = self
                .writer
                .cancel_deliveries(ids, Some(format!("subscription {id:?} was deleted")))
                .await?;
            let n = outcomes
                .iter()
                .filter(|o| matches!(o, crate::storage::writer::CancelOutcome::Cancelled(_)))
                .count();
            if n == 0 {
                break;
            }
            cancelled += n as u64;
        }
        Ok(cancelled)
    }

    /// Pauses (deliveries are made and kept, none is attempted) or resumes a subscription.
    /// Resuming also re-enables one disabled by 410 Gone or the auto-disable period.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<Described, ControlError> {
        let _g = self.changes.lock().await;
        if self.registry.get(id).is_none() {
            return Err(ControlError::NotFound(id.to_string()));
        }
        let state = SubscriptionState {
            enabled: !paused,
            reason: Some(if paused { PAUSED } else { "resumed" }.to_string()),
            changed_at: now_micros(),
        };
        self.writer
            .set_subscription_state(id.to_string(), state)
            .await?;
        let set = self.effective()?;
        self.apply_resumed(set, (!paused).then_some(id));
        drop(_g);
        tracing::info!(
            subscription = id,
            paused,
            "subscription {}",
            if paused { "paused" } else { "resumed" }
        );
        self.describe(id)
    }

    /// Disables a subscription at its destination's request (410 Gone, auto-disable): stored
    /// as its run-time state, then the set in force swapped, under the lock every change
    /// takes. A resume enables it again.
    pub async fn disable(&self, id: &str, reason: &str) -> Result<(), ControlError> {
        let _g = self.changes.lock().await;
        let state = SubscriptionState {
            enabled: false,
            reason: Some(reason.to_string()),
            changed_at: now_micros(),
        };
        self.writer
            .set_subscription_state(id.to_string(), state)
            .await?;
        let set = self.effective()?;
        self.apply(set);
        Ok(())
    }

    /// Serves destinations' requests to disable their subscription until `stop` resolves.
    pub async fn run_disables(
        self: Arc<Self>,
        mut requests: tokio::sync::mpsc::UnboundedReceiver<crate::delivery::worker::Disable>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let req = tokio::select! {
                r = requests.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                () = &mut stop => return,
            };
            match self.disable(&req.subscription, req.reason).await {
                Ok(()) => {
                    let _ = req.done.send(());
                }
                Err(e) => {
                    tracing::error!(subscription = %req.subscription, error = %e, "cannot disable the subscription");
                }
            }
        }
    }

    /// Adds a signing secret (generated unless given) in front of the others; the others keep
    /// signing for `grace` and are then dropped. Answers the new secret and when the old ones
    /// stop signing.
    pub async fn rotate(
        &self,
        id: &str,
        secret: Option<String>,
        grace: Duration,
    ) -> Result<(Described, String, Micros), ControlError> {
        self.refuse_config(id)?;
        let secret = match secret {
            Some(s) => {
                crate::signing::parse_secret(&s)
                    .map_err(|e| ControlError::Invalid(vec![format!("secret: {e}")]))?;
                s
            }
            None => generate_secret()?,
        };
        let _g = self.changes.lock().await;
        let Some(mut rec) = self.record(id)? else {
            return Err(ControlError::NotFound(id.to_string()));
        };
        let now = now_micros();
        let until = now.saturating_add(micros(grace));
        for s in &mut rec.secrets {
            if s.secret == secret {
                return Err(ControlError::Conflict(
                    "the new secret is already one of this subscription's secrets".into(),
                ));
            }
            s.expires_at = Some(s.expires_at.map_or(until, |t| t.min(until)));
        }
        rec.secrets.insert(
            0,
            StoredSecret {
                secret: secret.clone(),
                added_at: now,
                expires_at: None,
            },
        );
        rec.updated_at = now;
        self.writer.put_subscription(id.to_string(), &rec).await?;
        let set = self.effective()?;
        self.apply(set);
        drop(_g);
        self.expiry.notify_one();
        tracing::info!(subscription = id, "signing secret rotated");
        Ok((self.describe(id)?, secret, until))
    }

    /// Re-reads the config file and puts its subscriptions, sources, tokens and certificate
    /// in force. An invalid file changes nothing. Settings only a restart applies keep the
    /// values the process started with; the answer and the log name those the file changed.
    pub async fn reload(
        &self,
        sources: &Sources,
        auth: &crate::auth::Auth,
        tls: Option<&crate::tls::Certs>,
    ) -> Result<ReloadSummary, ReloadError> {
        let _g = self.changes.lock().await;
        let old = self.config();
        let Some(path) = old.file.clone() else {
            return Err(ReloadError::NoFile);
        };
        // Read as at start: the environment and the flags still win over the file.
        let overrides = old.overrides.clone();
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || config::load(Some(&path), &overrides)).await
        };
        let mut new = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(ReloadError::Invalid(e)),
            Err(e) => {
                return Err(ReloadError::Invalid(ConfigErrors(vec![ConfigError {
                    file: Some(path),
                    line: None,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                }])));
            }
        };
        let api_ids: HashSet<String> = self
            .store
            .subscription_records()
            .map_err(ControlError::from)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let clashes: Vec<ConfigError> = new
            .subscriptions
            .iter()
            .filter(|s| api_ids.contains(&s.id))
            .map(|s| ConfigError {
                file: Some(path.clone()),
                line: None,
                key: "subscriptions".into(),
                message: format!(
                    "id {:?} is taken by a subscription created over the API; delete that one first or pick another id",
                    s.id
                ),
            })
            .collect();
        if !clashes.is_empty() {
            return Err(ReloadError::Invalid(ConfigErrors(clashes)));
        }
        // Against the start, not the last reload: a change stays pending until a restart.
        let restart_needed = restart_needed(&self.started, &new);
        new.listen = self.started.listen;
        new.data_dir.clone_from(&self.started.data_dir);
        if !restart_needed.is_empty() {
            tracing::warn!(settings = ?restart_needed, "reload cannot apply these changes; restart to apply them");
        }
        let n_sources = new.sources.len();
        let n_tokens = new.tokens.len() + new.keys.len();
        sources.replace(&new.sources, crate::clock::now());
        auth.replace(&new.tokens, &new.keys, new.key_tolerance);
        // The files were read (and checked) when the new config was loaded.
        if let (Some(certs), Some(t)) = (tls, &new.tls) {
            certs.set_arc(t.certified.clone());
        }
        self.config.set(new);
        let set = self.effective().map_err(ControlError::from)?;
        let n = set.len();
        let applied = self.apply(set);
        drop(_g);
        self.expiry.notify_one();
        tracing::info!(file = %path.display(), subscriptions = n, sources = n_sources, tokens = n_tokens, "configuration reloaded");
        Ok(ReloadSummary {
            subscriptions: n,
            sources: n_sources,
            tokens: n_tokens,
            restart_needed,
            added: applied.added,
            changed: applied.changed,
            removed: applied.removed,
        })
    }

    /// Drops rotated-out secrets when their grace period ends, until `stop` resolves.
    pub async fn run_expiry(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let wait = match self.next_expiry() {
                Ok(Some(t)) => Duration::from_micros(
                    u64::try_from(t.saturating_sub(now_micros())).unwrap_or(0),
                ),
                Ok(None) => Duration::from_secs(3600),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read subscription secrets");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.expiry.notified() => continue,
                () = &mut stop => return,
            }
            if let Err(e) = self.drop_expired().await {
                tracing::error!(error = %e, "cannot drop expired secrets; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }

    fn next_expiry(&self) -> Result<Option<Micros>, StoreError> {
        Ok(self
            .store
            .subscription_records()?
            .iter()
            .flat_map(|(_, r)| r.secrets.iter().filter_map(|s| s.expires_at))
            .min())
    }

    async fn drop_expired(&self) -> Result<(), ControlError> {
        let _g = self.changes.lock().await;
        let now = now_micros();
        let mut changed = false;
        for (id, mut rec) in self.store.subscription_records()? {
            let before = rec.secrets.len();
            rec.secrets.retain(|s| s.expires_at.is_none_or(|t| t > now));
            if rec.secrets.len() != before {
                self.writer.put_subscription(id.clone(), &rec).await?;
                tracing::info!(subscription = %id, dropped = before - rec.secrets.len(), "rotated-out signing secrets expired");
                changed = true;
            }
        }
        if changed {
            let set = self.effective()?;
            self.apply(set);
        }
        Ok(())
    }
}

/// Takes over SIGHUP (whose default action ends the process). Call it before telling anyone
/// the daemon is up, so a reload request never kills it.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; reload with POST /v1/admin/reload");
            None
        }
    }
}

/// The settings in which `new` differs from the configuration the process started with
/// that a reload cannot apply. Subscriptions, sources, tokens, the certificate files, the
/// delivery defaults subscriptions inherit and the replay cap are applied; the listener,
/// storage, engine and logging are set up once at start.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    // Each setting only a restart applies, by the key the file writes it under.
    macro_rules! changed {
        ($($field:ident).+ => $key:literal) => {
            (new.$($field).+ != old.$($field).+).then_some($key)
        };
    }
    let tls =
        (new.tls.is_some() != old.tls.is_some()).then_some("server.tls (turning HTTPS on or off)");
    [
        changed!(listen => "server.listen"),
        changed!(data_dir => "storage.data_dir"),
        changed!(backend => "storage.backend, storage.postgres_url, storage.postgres_pool or [cluster]"),
        tls,
        changed!(limits.max_connections => "server.max_connections"),
        changed!(limits.header_read_timeout => "server.header_read_timeout"),
        changed!(limits.body_read_timeout => "server.body_read_timeout"),
        changed!(limits.response_write_timeout => "server.response_write_timeout"),
        changed!(max_body => "server.max_body"),
        changed!(max_batch => "server.max_batch"),
        changed!(shutdown_timeout => "server.shutdown_timeout"),
        changed!(callbacks => "delivery.callbacks"),
        changed!(retention => "storage.retention"),
        changed!(commit_batch => "storage.commit_batch"),
        changed!(cache_size => "storage.cache_size"),
        changed!(journal_size => "storage.journal_size"),
        changed!(sweep_interval => "storage.sweep_interval"),
        changed!(allow_private_networks => "delivery.allow_private_networks"),
        changed!(max_response_body => "delivery.max_response_body"),
        changed!(scheduler_horizon => "delivery.scheduler_horizon"),
        changed!(auto_disable_after => "delivery.auto_disable_after"),
        changed!(log_format => "log.format"),
        changed!(log_level => "log.level"),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Reloads the config file on every SIGHUP until `stop` resolves. A refused reload is logged
/// with every problem; the old configuration stays in force.
pub async fn reload_on_sighup(
    control: Arc<Control>,
    sources: Arc<Sources>,
    auth: Arc<crate::auth::Auth>,
    tls: Option<Arc<crate::tls::Certs>>,
    hangups: Option<tokio::signal::unix::Signal>,
    stop: impl std::future::Future<Output = ()>,
) {
    let Some(mut hup) = hangups else {
        return;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            () = &mut stop => return,
        }
        tracing::info!("SIGHUP received: reloading the configuration");
        match control.reload(&sources, &auth, tls.as_deref()).await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the old configuration stays in force")
            }
        }
    }
}

/// Takes `secrets` out of a definition: absent or a list of strings.
/// Takes the secrets out of an API definition: `"secrets": [..]`, or the common single
/// `"secret": ".."` as shorthand for a list of one (not both).
fn take_secrets(spec: &mut serde_json::Map<String, Value>) -> Result<Vec<String>, ControlError> {
    let invalid = |m: &str| ControlError::Invalid(vec![m.to_string()]);
    let list = match spec.remove("secrets") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(invalid("secrets: must be a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(invalid("secrets: must be a list of strings")),
    };
    let one = match spec.remove("secret") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(invalid("secret: must be a string")),
    };
    match (list, one) {
        (Some(_), Some(_)) => Err(invalid(
            "secret: give either \"secret\" or \"secrets\", not both",
        )),
        (Some(l), None) => Ok(l),
        (None, Some(s)) => Ok(vec![s]),
        (None, None) => Ok(Vec::new()),
    }
}

fn describe(
    sub: Arc<Subscription>,
    record: Option<&SubscriptionRecord>,
    state: Option<&SubscriptionState>,
) -> Described {
    // The secrets in force (those the destination signs with), with their expiry if stored.
    let secrets = sub
        .secrets
        .iter()
        .map(|s| {
            let expires = record
                .and_then(|r| r.secrets.iter().find(|x| x.secret == *s))
                .and_then(|x| x.expires_at);
            SecretInfo {
                last4: last4(s),
                expires_at: expires,
                public_key: crate::signing::parse_secret(s)
                    .ok()
                    .and_then(|k| k.public_key()),
            }
        })
        .collect();
    Described {
        secrets,
        state: state.cloned(),
        created_at: record.map(|r| r.created_at),
        updated_at: record.map(|r| r.updated_at),
        sub,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_four_characters_only() {
        assert_eq!(last4("whsec_abcdefgh"), "efgh");
        assert_eq!(last4("ab"), "ab");
    }

    #[test]
    fn generated_secrets_sign() {
        let s = match generate_secret() {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert!(s.starts_with("whsec_"));
        assert!(crate::signing::parse_secret(&s).is_ok());
        assert_ne!(generate_secret().ok(), Some(s));
    }

    #[test]
    fn secrets_are_taken_out_of_a_definition() {
        let mut m = serde_json::Map::new();
        m.insert("secrets".into(), serde_json::json!(["whsec_a", "whsec_b"]));
        m.insert("id".into(), serde_json::json!("x"));
        assert_eq!(
            take_secrets(&mut m).ok(),
            Some(vec!["whsec_a".to_string(), "whsec_b".to_string()])
        );
        assert!(!m.contains_key("secrets"));
        m.insert("secrets".into(), serde_json::json!("whsec_a"));
        assert!(take_secrets(&mut m).is_err());
    }

    fn loaded(text: &str, overrides: &config::Overrides) -> Config {
        let raw = config::parse_str(text, None).unwrap_or_else(|e| panic!("{e}"));
        config::validate(raw, text, None, overrides).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A reload reads the file under the overrides of the start: a listener or data directory
    /// moved in the file is named as needing a restart, unless a flag or the environment
    /// fixed it (then the file's value never counted).
    #[test]
    fn a_moved_listener_or_data_dir_needs_a_restart_unless_overridden() {
        let start = "[server]\nlisten = \"127.0.0.1:8080\"\n[storage]\ndata_dir = \"/srv/a\"\n";
        let edited = "[server]\nlisten = \"127.0.0.1:9090\"\n[storage]\ndata_dir = \"/srv/b\"\nretention = \"3d\"\n";
        let none = config::Overrides::default();
        assert_eq!(
            restart_needed(&loaded(start, &none), &loaded(edited, &none)),
            vec!["server.listen", "storage.data_dir", "storage.retention"]
        );
        let flags = config::Overrides {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some("/srv/flag".into()),
            postgres_url: None,
        };
        assert_eq!(
            restart_needed(&loaded(start, &flags), &loaded(edited, &flags)),
            vec!["storage.retention"]
        );
    }
}
