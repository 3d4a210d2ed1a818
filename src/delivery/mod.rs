//! The delivery engine: a supervisor that runs one destination task per subscription and
//! routes due deliveries from the scheduler to them.

pub mod attempt;
pub mod attempting;
pub mod client;
pub mod ssrf;
pub mod worker;

#[cfg(test)]
mod paused;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::scheduler::driver::{Dispatch, Job, Msg};
use crate::signing::parse_secret;
use crate::storage::writer::WriterHandle;
use crate::subscriptions::Subscription;
use attempt::Destination;
use client::ErrorKind;
use reqwest::header::HeaderMap;
use worker::{Depth, Worker, WorkerEnv, WorkerMsg};

/// Settings shared by every destination.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub allow_private_networks: bool,
    pub max_response_body: usize,
    /// Callback hosts' destinations, started on first use.
    pub callbacks: crate::callbacks::CallbackSettings,
    pub defaults: crate::subscriptions::spec::SubscriptionDefaults,
}

/// Owns the destination tasks.
pub struct Supervisor {
    routes: Arc<Mutex<HashMap<Arc<str>, Route>>>,
    tasks: Mutex<JoinSet<()>>,
    stop: watch::Sender<bool>,
    client: reqwest::Client,
    env: Arc<WorkerEnv>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    cfg: EngineConfig,
    /// Per subscription, turns true when its latest destination task has ended.
    done: Mutex<HashMap<Arc<str>, watch::Receiver<bool>>>,
}

/// The way to one destination task, with how much it holds.
#[derive(Clone)]
struct Route {
    tx: mpsc::UnboundedSender<WorkerMsg>,
    depth: Arc<Depth>,
}

/// The scheduler's view of the supervisor: routes jobs by subscription id, and starts a
/// callback host's destination task when its first job comes due.
#[derive(Clone)]
pub struct Router {
    routes: Arc<Mutex<HashMap<Arc<str>, Route>>>,
    supervisor: std::sync::Weak<Supervisor>,
    /// Cluster mode: the leases this node holds (`None`: one node, every destination).
    leases: Option<Arc<crate::storage::postgres::Leases>>,
}

impl Router {
    fn route(&self, id: &str) -> Option<Route> {
        match self.routes.lock() {
            Ok(r) => r.get(id).cloned(),
            Err(p) => p.into_inner().get(id).cloned(),
        }
    }
}

impl Dispatch for Router {
    fn dispatch(&mut self, job: Job) -> Result<(), Job> {
        // Cluster mode: a destination held by another node is that node's to run.
        if let Some(leases) = &self.leases
            && !leases.holds(&job.subscription)
        {
            return Ok(());
        }
        let mut route = self.route(&job.subscription);
        if route.is_none()
            && crate::callbacks::is_callback(&job.subscription)
            && let Some(sup) = self.supervisor.upgrade()
        {
            sup.start_callback(&job.subscription);
            route = self.route(&job.subscription);
        }
        match route {
            // A destination holding a full queue takes no more: the job waits in the wheel
            // (memory only), which in turn stops loading from disk when full.
            Some(r) if r.depth.is_full() => Err(job),
            Some(r) => {
                r.depth.sent();
                let _ = r.tx.send(WorkerMsg::Job(job));
                Ok(())
            }
            // No destination task (unknown or deleted subscription): the row stays on disk.
            None => {
                tracing::debug!(delivery = job.delivery, subscription = %job.subscription, "no destination for due delivery");
                Ok(())
            }
        }
    }
}

impl Supervisor {
    pub fn new(
        cfg: EngineConfig,
        env: WorkerEnv,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let client = client::build(cfg.allow_private_networks)?;
        let (stop, _) = watch::channel(false);
        Ok(Self {
            routes: Default::default(),
            tasks: Mutex::new(JoinSet::new()),
            stop,
            client,
            env: Arc::new(env),
            writer,
            metrics,
            cfg,
            done: Mutex::default(),
        })
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router {
            routes: self.routes.clone(),
            supervisor: Arc::downgrade(self),
            leases: self.env.leases.clone(),
        }
    }

    /// Starts the destination task of a callback host (`callbacks::destination_id`), unless
    /// it runs already. Callback destinations are never stopped while the daemon runs.
    pub fn start_callback(&self, id: &str) {
        let running = match self.routes.lock() {
            Ok(r) => r.contains_key(id),
            Err(p) => p.into_inner().contains_key(id),
        };
        if !running {
            let sub = crate::callbacks::destination(id, &self.cfg.callbacks, &self.cfg.defaults);
            tracing::info!(destination = id, "callback destination started");
            self.spawn(Arc::new(sub));
        }
    }

    /// Whether destination `id` has attempts under way or outcomes not yet recorded.
    pub fn busy(&self, id: &str) -> bool {
        let routes = match self.routes.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        routes.get(id).is_some_and(|r| r.depth.is_active())
    }

    pub fn scheduler(&self) -> mpsc::UnboundedSender<Msg> {
        self.env.scheduler.clone()
    }

    /// Starts a destination task for each subscription.
    pub fn start(&self, subs: &[Arc<Subscription>]) {
        for s in subs {
            self.spawn(s.clone());
        }
    }

    /// Every subscription gets a task, usable or not, so no delivery waits unattempted for
    /// want of one.
    fn spawn(&self, sub: Arc<Subscription>) {
        // Validation refuses what cannot be used; a definition that gets here anyway (one
        // stored by an older version, say, which control marks `unusable`) still gets a task,
        // whose deliveries go dead at their first attempt with the reason rather than wait
        // for ever.
        let mut unusable: Vec<String> = sub.unusable.iter().cloned().collect();
        let url = match reqwest::Url::parse(&sub.url) {
            Ok(u) => Some(u),
            Err(e) => {
                if sub.unusable.is_none() {
                    unusable.push(format!("invalid url: {e}"));
                }
                None
            }
        };
        let keys = sub
            .secrets
            .iter()
            .filter_map(|s| {
                parse_secret(s)
                    .map_err(|e| unusable.push(format!("invalid secret: {e}")))
                    .ok()
            })
            .collect();
        let headers = attempt::fixed_headers(&sub).unwrap_or_else(|e| {
            unusable.push(e);
            HeaderMap::new()
        });
        let target = match url {
            Some(url) if unusable.is_empty() => {
                match ssrf::check_url_host(&url, self.cfg.allow_private_networks) {
                    Ok(()) => Ok(url),
                    Err(e) => Err((ErrorKind::RefusedAddress, e.to_string())),
                }
            }
            _ => {
                let why = unusable.join("; ");
                tracing::error!(subscription = %sub.id, error = %why, "destination unusable: its deliveries go dead");
                Err((ErrorKind::Unusable, why))
            }
        };
        let r = sub.retry;
        let policy = RetryPolicy {
            max_attempts: r.max_attempts,
            initial: r.initial,
            max: r.max,
            multiplier: r.multiplier,
        };
        let sub_id: Arc<str> = Arc::from(sub.id.as_str());
        let dest = Arc::new(Destination {
            sub,
            sub_id: sub_id.clone(),
            target,
            keys,
            headers,
            policy,
            client: self.client.clone(),
            writer: self.writer.clone(),
            series: attempt::Series::new(&self.metrics, &sub_id),
            metrics: self.metrics.clone(),
            max_response_body: self.cfg.max_response_body,
            allow_private_networks: self.cfg.allow_private_networks,
            clock: self.env.clock.clone(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let depth = Arc::new(Depth::default());
        let w = Worker::new(
            dest,
            self.env.clone(),
            rx,
            self.stop.subscribe(),
            depth.clone(),
        );
        let route = Route { tx, depth };
        match self.routes.lock() {
            Ok(mut r) => r.insert(sub_id.clone(), route),
            Err(p) => p.into_inner().insert(sub_id.clone(), route),
        };
        // A replaced destination's attempts in flight finish on its old task (which ends once
        // its sender above is gone); the new task starts only after that, so one delivery
        // never has two attempts at once.
        let (done_tx, done_rx) = watch::channel(false);
        let previous = match self.done.lock() {
            Ok(mut d) => d.insert(sub_id, done_rx),
            Err(p) => p.into_inner().insert(sub_id, done_rx),
        };
        let run = async move {
            if let Some(mut p) = previous {
                let _ = p.wait_for(|ended| *ended).await;
            }
            w.run().await;
            let _ = done_tx.send(true);
        };
        match self.tasks.lock() {
            Ok(mut t) => t.spawn(run),
            Err(p) => p.into_inner().spawn(run),
        };
    }

    /// Starts the destination task of a subscription, or replaces the running one with a
    /// task built from this definition (new URL, secrets, limits, pause switch). Jobs queued
    /// in the old task are dropped (their rows stay on disk: rescan them); its attempts in
    /// flight finish and are recorded before the new task starts.
    pub fn replace(&self, sub: Arc<Subscription>) {
        self.spawn(sub);
    }

    /// Stops a subscription's destination task: no new attempts; those in flight finish and
    /// are recorded. Its scheduled deliveries stay on disk. Answers whether one was running.
    pub fn stop_destination(&self, id: &str) -> bool {
        let removed = match self.routes.lock() {
            Ok(mut r) => r.remove(id),
            Err(p) => p.into_inner().remove(id),
        };
        removed.is_some()
    }

    /// Stops starting attempts and waits up to `deadline` for those in flight to be recorded.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.stop.send(true);
        let mut tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                "attempts still in flight after the drain deadline; they stay scheduled on disk"
            );
        }
    }
}
