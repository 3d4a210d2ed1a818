//! One tokio task per destination: its queue, token bucket, in-flight limit and circuit
//! breaker. An open breaker defers queued deliveries without spending their attempts; FIFO
//! subscriptions keep one delivery in flight, in event order, and a retrying delivery holds
//! back the ones behind it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinSet};

use super::attempt::{self, Destination, Health, Outcome, Recorded};
use super::client::ErrorKind;
use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::clock::Instant;
use crate::model::{DeliveryId, Micros, micros};
use crate::ratelimit::TokenBucket;
use crate::scheduler::driver::{Job, Msg};
use crate::storage::writer::Next;
use crate::storage::{Snapshot, Store};
use crate::subscriptions::Ordering;

/// Jobs a destination holds in memory before the router stops handing it more.
pub const QUEUE_CAP: usize = 10_000;

/// Outcomes a destination may have waiting for the writer: past this, no attempt starts
/// until some are recorded, so a writer that falls behind slows the attempts down instead of
/// letting outcomes pile up in memory.
pub const UNRECORDED_CAP: usize = 2_048;

/// Cluster mode: how long a destination task uses a view of its deliveries read earlier.
const CACHED_VIEW: Duration = Duration::from_millis(20);
/// Cluster mode: queued jobs whose deliveries one read takes.
const PREFETCH: usize = 256;

/// Cluster mode: whether `job` was made by this node's own commit less than `CACHED_VIEW`
/// before `now`. Such a job comes with its event (the commit had it at hand; a job found by
/// a scan, announced by another node or made by an outcome has none), and is due when the
/// event was received: the commit stamped both with one time, and made the delivery
/// scheduled, due then, with no attempt. That commit is a view of the delivery as recent as
/// a read kept for `CACHED_VIEW` would be, so the job starts on it without a read. (An
/// operator's cancel that lands meanwhile is then as late as one landing during the
/// attempt: the attempt is recorded, and the delivery stays cancelled.) A clock that
/// stepped back makes no job fresh. The caller also checks that no attempt of the delivery
/// started meanwhile (`RecentStarts`): a scan may have handed it over first.
fn committed_here(job: &Job, now: Micros) -> bool {
    job.event.as_ref().is_some_and(|e| {
        e.received_at == job.due
            && (0..micros(CACHED_VIEW)).contains(&now.saturating_sub(e.received_at))
    })
}

/// Cluster mode: the deliveries whose attempts a destination task started in the last
/// `CACHED_VIEW`. A delivery made by this node's commit may also be found by a scan that
/// read the row between the commit and its hand-over; that copy, without its event, is read
/// and may start first. The commit's copy then comes with its event, and is young enough for
/// `committed_here`: it must be read (and dropped as moved on), not started again. Any
/// attempt of a delivery younger than `CACHED_VIEW` started within `CACHED_VIEW`, so this
/// covers them all.
#[derive(Default)]
struct RecentStarts {
    order: std::collections::VecDeque<(Micros, DeliveryId)>,
    at: HashMap<DeliveryId, Micros>,
}

impl RecentStarts {
    fn started(&mut self, id: DeliveryId, now: Micros) {
        while let Some(&(t, old)) = self.order.front() {
            if now.saturating_sub(t) < micros(CACHED_VIEW) {
                break;
            }
            self.order.pop_front();
            if self.at.get(&old) == Some(&t) {
                self.at.remove(&old);
            }
        }
        self.order.push_back((now, id));
        self.at.insert(id, now);
    }

    fn contains(&self, id: DeliveryId) -> bool {
        self.at.contains_key(&id)
    }
}

/// How many jobs a destination holds, shared with the router that feeds it.
#[derive(Debug, Default)]
pub struct Depth {
    /// Sent by the router, not yet taken from the channel.
    in_channel: AtomicUsize,
    /// Queued or parked in the task.
    queued: AtomicUsize,
    /// Attempts under way or waiting to be recorded.
    active: AtomicUsize,
}

impl Depth {
    pub fn sent(&self) {
        self.in_channel.fetch_add(1, AtomicOrdering::Relaxed);
    }

    fn received(&self) {
        self.in_channel.fetch_sub(1, AtomicOrdering::Relaxed);
    }

    /// Whether the task has attempts under way or outcomes not yet recorded.
    pub fn is_active(&self) -> bool {
        self.active.load(AtomicOrdering::Relaxed) > 0
    }

    pub fn is_full(&self) -> bool {
        self.in_channel.load(AtomicOrdering::Relaxed) + self.queued.load(AtomicOrdering::Relaxed)
            >= QUEUE_CAP
    }
}

/// The jobs a destination task holds, by delivery, in the order they may go: a FIFO
/// subscription's by delivery id (event order); any other's the operator's first, then by
/// priority, then by delivery id.
struct Queue {
    jobs: HashMap<DeliveryId, Job>,
    order: BTreeSet<(u8, DeliveryId)>,
    fifo: bool,
}

impl Queue {
    fn new(ordering: Ordering) -> Self {
        Self {
            jobs: HashMap::new(),
            order: BTreeSet::new(),
            fifo: ordering == Ordering::Fifo,
        }
    }

    fn rank(&self, job: &Job) -> u8 {
        match (self.fifo, job.operator) {
            (true, _) => 0,
            (false, true) => 0,
            (false, false) => 1 + job.priority.rank(),
        }
    }

    fn len(&self) -> usize {
        self.jobs.len()
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    fn contains(&self, id: DeliveryId) -> bool {
        self.jobs.contains_key(&id)
    }

    fn get(&self, id: DeliveryId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Adds a job, replacing the one of the same delivery.
    fn insert(&mut self, job: Job) {
        let key = (self.rank(&job), job.delivery);
        if let Some(old) = self.jobs.insert(job.delivery, job) {
            let old_key = (self.rank(&old), old.delivery);
            self.order.remove(&old_key);
        }
        self.order.insert(key);
    }

    fn remove(&mut self, id: DeliveryId) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        self.order.remove(&(self.rank(&job), id));
        Some(job)
    }

    /// Of the first `n` jobs in the order they may go, those to read before they start
    /// (not `committed_here` at `now`): delivery, due time, and whether its event has to be
    /// read too.
    fn first(&self, n: usize, now: Micros) -> Vec<(DeliveryId, Micros, bool)> {
        self.order
            .iter()
            .take(n)
            .filter_map(|(_, id)| self.jobs.get(id))
            .filter(|j| !committed_here(j, now))
            .map(|j| (j.delivery, j.due, j.event.is_none()))
            .collect()
    }

    fn pop_first(&mut self) -> Option<Job> {
        let (_, id) = self.order.pop_first()?;
        self.jobs.remove(&id)
    }

    fn clear(&mut self) {
        self.jobs.clear();
        self.order.clear();
    }
}

/// Messages a destination task takes.
#[derive(Debug)]
pub enum WorkerMsg {
    Job(Job),
}

/// Everything a destination task needs besides its destination.
pub struct WorkerEnv {
    pub store: Store,
    pub scheduler: mpsc::UnboundedSender<Msg>,
    pub auto_disable_after: Duration,
    /// Deliveries whose attempt is under way, for the API's `in_flight`.
    pub attempting: Arc<super::attempting::Attempting>,
    /// Where a destination asks for its subscription to be disabled (410 Gone,
    /// auto-disable): the subscriptions' owner does it, under the same lock as every other
    /// change to the set, so a reload racing a 410 cannot enable it again.
    pub disables: mpsc::UnboundedSender<Disable>,
    /// The delivery loop's clock (see `clock`).
    pub clock: crate::clock::Clock,
    /// Sends one attempt: `attempt::run` (tests give a scripted endpoint instead).
    pub send: SendAttempt,
    /// Cluster mode: the leases this node holds. A destination task starts attempts only
    /// while its lease is held; `None` (one node) holds everything.
    pub leases: Option<Arc<crate::storage::postgres::Leases>>,
}

impl WorkerEnv {
    /// The epoch of the lease this node runs `destination` under (`None` when it holds none,
    /// or is handing it over): `Some(0)` with no cluster.
    pub fn lease(&self, destination: &str) -> Option<i64> {
        match &self.leases {
            None => Some(0),
            Some(l) => l.running(destination),
        }
    }
}

/// Sends attempt `n` of a job to its destination and classifies what came back.
pub type SendAttempt = Arc<
    dyn Fn(
            Arc<Destination>,
            Job,
            u32,
            Arc<crate::model::Event>,
        ) -> futures_util::future::BoxFuture<'static, Outcome>
        + Send
        + Sync,
>;

/// The real thing: an HTTP request (`attempt::run`).
pub fn http_attempts() -> SendAttempt {
    Arc::new(|dest, job, n, event| Box::pin(attempt::run(dest, job, n, event)))
}

/// A destination's request to disable its subscription; `done` fires once the change is in
/// force (stored, and the set in force swapped).
#[derive(Debug)]
pub struct Disable {
    pub subscription: Arc<str>,
    pub reason: &'static str,
    pub done: tokio::sync::oneshot::Sender<()>,
}

pub struct Worker {
    dest: Arc<Destination>,
    env: Arc<WorkerEnv>,
    rx: mpsc::UnboundedReceiver<WorkerMsg>,
    stop: watch::Receiver<bool>,
    queue: Queue,
    /// Jobs that arrived while their delivery was in flight (its retry, usually): they join
    /// the queue when the attempt is done, so one delivery never has two attempts at once.
    parked: HashMap<DeliveryId, Job>,
    /// Attempts whose request is under way: what `max_in_flight` bounds.
    tasks: Tracked<Outcome, Started>,
    /// Outcomes on their way to the writer (with their jobs). Their deliveries stay in the
    /// `attempting` set until they are recorded, and a FIFO subscription starts nothing
    /// meanwhile; an unordered one goes on sending, since these no longer occupy the endpoint.
    recording: Tracked<Recorded, Vec<Job>>,
    /// Attempts in `recording`.
    unrecorded: usize,
    breaker: Breaker,
    bucket: Option<TokenBucket>,
    /// The last delivery the rate limiter held back: counted once however often it waits.
    rate_limited: Option<DeliveryId>,
    /// FIFO: the delivery that is retrying and holds back the rest.
    blocked_by: Option<DeliveryId>,
    enabled: bool,
    wake_at: Option<Instant>,
    depth: Arc<Depth>,
    /// The lease epoch this task last ran under (cluster mode).
    epoch: Option<i64>,
    /// Cluster mode: the last view read for a run of attempts, and when (see `snapshot`).
    cached: Option<(Instant, Arc<Snapshot>)>,
    /// Cluster mode: attempts started lately, which `committed_here` jobs must not repeat.
    recent: RecentStarts,
}

impl Worker {
    pub fn new(
        dest: Arc<Destination>,
        env: Arc<WorkerEnv>,
        rx: mpsc::UnboundedReceiver<WorkerMsg>,
        stop: watch::Receiver<bool>,
        depth: Arc<Depth>,
    ) -> Self {
        let b = dest.sub.breaker;
        let breaker = Breaker::new(BreakerConfig {
            failure_threshold: b.failure_threshold,
            failure_rate: b.failure_rate,
            min_requests: b.min_requests,
            window: b.window,
            cooldown: b.cooldown,
            half_open_probes: b.half_open_probes,
        });
        let now = env.clock.now();
        let ordering = dest.sub.ordering;
        let bucket = dest.sub.rate_limit.map(|r| {
            let burst = dest.sub.rate_limit_burst.map_or(r.max(1.0), f64::from);
            TokenBucket::new(r, burst, now)
        });
        // Paused: jobs are dropped and their rows stay on disk until a resume rescans them.
        let enabled = dest.sub.enabled && !dest.sub.paused;
        // FIFO across restarts: the oldest live delivery goes first, even when a newer one
        // comes due (and reaches this task) before it, e.g. while the oldest waits for a retry.
        let blocked_by = match dest.sub.ordering {
            Ordering::Fifo => env
                .store
                .first_live_delivery(&dest.sub_id)
                .unwrap_or_else(|e| {
                    tracing::error!(subscription = %dest.sub_id, error = %e, "cannot read the head of a FIFO subscription");
                    None
                }),
            Ordering::Unordered => None,
        };
        Self {
            dest,
            env,
            rx,
            stop,
            queue: Queue::new(ordering),
            parked: HashMap::new(),
            tasks: Tracked::default(),
            recording: Tracked::default(),
            unrecorded: 0,
            breaker,
            bucket,
            rate_limited: None,
            blocked_by,
            enabled,
            wake_at: None,
            epoch: Some(0),
            cached: None,
            recent: RecentStarts::default(),
            depth,
        }
    }

    /// Whether another attempt may start: FIFO waits until the last one is recorded (its
    /// outcome decides what goes next); unordered counts requests under way.
    fn has_room(&self) -> bool {
        match self.dest.sub.ordering {
            Ordering::Fifo => self.tasks.is_empty() && self.unrecorded == 0,
            Ordering::Unordered => {
                self.tasks.len() < self.dest.sub.max_in_flight as usize
                    && self.unrecorded < UNRECORDED_CAP
            }
        }
    }

    fn gauges(&self) {
        let series = &self.dest.series;
        self.depth.queued.store(
            self.queue.len() + self.parked.len(),
            AtomicOrdering::Relaxed,
        );
        self.note_active();
        series.queue_depth.set(self.queue.len() as i64);
        series.in_flight.set(self.tasks.len() as i64);
        let state = match self.breaker.state(self.env.clock.now()) {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        series.breaker_state.set(state);
    }

    /// Tells the router (and a lease hand-over) how many attempts are under way or unrecorded.
    fn note_active(&self) {
        self.depth
            .active
            .store(self.tasks.len() + self.unrecorded, AtomicOrdering::Relaxed);
    }

    /// Runs until stopped; then lets in-flight attempts finish.
    pub async fn run(mut self) {
        loop {
            self.pump();
            self.gauges();
            let wake = self.wake_at;
            tokio::select! {
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    // Every attempt that has ended by now goes to the writer in one command.
                    let mut outcomes = Vec::new();
                    self.answered(done, &mut outcomes);
                    while let Some(done) = self.tasks.try_join_next() {
                        self.answered(done, &mut outcomes);
                    }
                    self.record(outcomes);
                }
                Some(done) = self.recording.join_next(), if !self.recording.is_empty() => match done {
                    Ok(r) => self.recorded(r).await,
                    Err((e, jobs)) => {
                        tracing::error!(subscription = %self.dest.sub_id, error = %e, "recording task failed; its deliveries will be attempted again");
                        self.unrecorded = self.unrecorded.saturating_sub(jobs.len());
                        self.not_recorded(jobs);
                    }
                },
                msg = self.rx.recv() => match msg {
                    Some(WorkerMsg::Job(job)) => {
                        self.depth.received();
                        self.enqueue(job);
                        // Everything already sent joins the queue before the next run of
                        // attempts, which then reads their deliveries once for all of them.
                        while let Ok(WorkerMsg::Job(job)) = self.rx.try_recv() {
                            self.depth.received();
                            self.enqueue(job);
                        }
                    }
                    None => break,
                },
                () = sleep_until_opt(wake) => {}
                _ = self.stop.changed() => break,
            }
        }
        // Drain: no new attempts; the ones in flight finish and are recorded.
        let mut outcomes = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            self.answered(done, &mut outcomes);
        }
        self.record(outcomes);
        while let Some(done) = self.recording.join_next().await {
            match done {
                Ok(r) => self.recorded(r).await,
                // Stopping: the rows stay scheduled on disk for the next start.
                Err((_, jobs)) => jobs
                    .iter()
                    .for_each(|j| self.env.attempting.end(j.delivery)),
            }
        }
        self.queue.clear();
        self.gauges();
    }

    fn enqueue(&mut self, job: Job) {
        if !self.enabled {
            // Disabled: the row stays on disk until the subscription is enabled again.
            return;
        }
        if self.env.attempting.contains(job.delivery) {
            // A second copy of a delivery under way: it is read again once the attempt is
            // recorded, never started on the event it may carry.
            let mut job = job;
            job.event = None;
            self.parked.insert(job.delivery, job);
            return;
        }
        if job.operator {
            // An operator asked for an attempt now: an open breaker lets a probe go at once.
            self.breaker.probe_now(self.env.clock.now());
        }
        if self.queue.len() >= QUEUE_CAP && !self.queue.contains(job.delivery) {
            // The router keeps this rare (it stops at QUEUE_CAP); what still overflows waits
            // in the scheduler's wheel, in memory, without its payload.
            let mut job = job;
            job.event = None;
            let _ = self.env.scheduler.send(Msg::Requeue(
                job,
                self.env.clock.now_micros().saturating_add(200_000),
            ));
            return;
        }
        // A newer due time for a queued delivery replaces the stale one.
        match self.queue.get(job.delivery) {
            Some(q) if q.due >= job.due => {}
            _ => self.queue.insert(job),
        }
    }

    /// The next job allowed to start: FIFO order, or else the operator's and then the
    /// highest priority first.
    fn pick(&mut self) -> Option<Job> {
        match (self.dest.sub.ordering, self.blocked_by) {
            (Ordering::Fifo, Some(head)) => self.queue.remove(head),
            _ => self.queue.pop_first(),
        }
    }

    /// Starts every attempt the limits allow.
    fn pump(&mut self) {
        self.wake_at = None;
        if !self.enabled {
            self.queue.clear();
            return;
        }
        if !self.leased() {
            return;
        }
        // One read transaction for the whole run of attempts started here (on PostgreSQL,
        // one query for the jobs that can start now, but those `committed_here`).
        let clustered = self.env.leases.is_some();
        let mut view: Option<Arc<Snapshot>> = None;
        // The job a view was last read again for: it is not read for twice.
        let mut reread = None;
        while !self.queue.is_empty() && self.has_room() {
            let snap = match &view {
                Some(s) => s.clone(),
                None => match self.snapshot() {
                    Ok(s) => view.insert(s).clone(),
                    Err(e) => {
                        tracing::error!(subscription = %self.dest.sub_id, error = %e, "cannot read deliveries");
                        self.wake_at = Some(self.env.clock.now() + Duration::from_secs(1));
                        return;
                    }
                },
            };
            if let Some(head) = self.blocked_by.filter(|h| !self.queue.contains(*h)) {
                // The retrying head is not due yet: everything behind it waits, unless an
                // operator ended it meanwhile.
                match snap.delivery(head) {
                    Ok(Some(d)) if !d.status.is_terminal() => return,
                    Err(_) => return,
                    _ => self.blocked_by = None,
                }
            }
            let Some(job) = self.pick() else { return };
            let here = clustered
                && committed_here(&job, self.env.clock.now_micros())
                && !self.recent.contains(job.delivery);
            if !here
                && !snap.answers(job.delivery, job.event.is_none())
                && reread != Some(job.delivery)
            {
                // Past what the view was read for: the queue held more than one read takes
                // (a scan handing over jobs already done, say). The next stretch of the
                // queue is read in one query, not each job in a query of its own.
                reread = Some(job.delivery);
                self.queue.insert(job);
                self.cached = None;
                view = None;
                continue;
            }
            let loaded = match &job.event {
                Some(e) if here => Some((1, e.clone())),
                _ => self.load(&snap, &job),
            };
            let Some((n, event)) = loaded else {
                // Stale (moved on, cancelled, rescheduled): drop it. A FIFO head stops
                // holding the rest back only once it has ended: a stale copy of its job
                // (one handed over twice, say by a commit and by a scan, and run once)
                // leaves a head that is now retrying in place.
                if self.blocked_by == Some(job.delivery) {
                    let ended = match snap.delivery(job.delivery) {
                        Ok(Some(d)) => d.status.is_terminal(),
                        Ok(None) => true,
                        Err(_) => false,
                    };
                    if ended {
                        self.blocked_by = None;
                    }
                }
                continue;
            };
            let now = self.env.clock.now();
            if let Some(b) = &mut self.bucket
                && let Err(wait) = b.try_take(now)
            {
                if self.rate_limited.replace(job.delivery) != Some(job.delivery) {
                    self.dest.series.rate_limited.inc();
                }
                self.queue.insert(job);
                // A bucket that never refills answers Duration::MAX: bounded, so the sum
                // cannot overflow.
                self.wake_at = Some(now + wait.min(crate::model::MAX_DURATION));
                return;
            }
            if !self.breaker.try_acquire(now) {
                // Open: queued deliveries wait, their attempts unspent.
                self.queue.insert(job);
                self.wake_at = self.breaker.retry_at(now);
                return;
            }
            self.env.attempting.start(job.delivery);
            if clustered {
                self.recent
                    .started(job.delivery, self.env.clock.now_micros());
            }
            if let Some(c) = self
                .dest
                .series
                .by_priority
                .get(usize::from(job.priority.rank()))
            {
                c.inc();
            }
            let started = Started {
                job: job.without_event(),
                n,
                at: self.env.clock.now_micros(),
            };
            let dest = self.dest.clone();
            self.tasks
                .spawn((self.env.send)(dest, job, n, event), started);
            // At once, not at the next gauge update: a lease hand-over waits for this.
            self.note_active();
        }
    }

    /// The reads for a run of attempts. On the embedded backend, a read transaction. On
    /// PostgreSQL, the queued jobs' deliveries (and missing events) read in one query and
    /// kept for a few milliseconds: attempts end one at a time, and a query per attempt
    /// would bound a destination's rate by the database's round trip. A kept view is used
    /// only while it has every job about to start at the due time the job carries (so a
    /// job is never dropped as stale on an old view), and only until this task records an
    /// outcome (so a delivery whose outcome was just recorded is never attempted again on
    /// an old view of it). Jobs `committed_here` are not read: their commit is their view.
    fn snapshot(&mut self) -> Result<Arc<Snapshot>, crate::storage::StoreError> {
        if self.env.leases.is_none() {
            return Ok(Arc::new(self.env.store.snapshot()?));
        }
        let now = self.env.clock.now();
        let now_micros = self.env.clock.now_micros();
        if let Some((at, s)) = &self.cached
            && now.saturating_duration_since(*at) < CACHED_VIEW
            && s.covers(&self.queue.first(self.room(), now_micros))
        {
            return Ok(s.clone());
        }
        let mut ids: Vec<(DeliveryId, bool)> = self
            .queue
            .first(PREFETCH, now_micros)
            .into_iter()
            .map(|(id, _, needs_event)| (id, needs_event))
            .collect();
        if let Some(head) = self.blocked_by {
            // With its event when its job is queued and will start first (FIFO).
            let needs_event = self.queue.get(head).is_some_and(|j| j.event.is_none());
            ids.push((head, needs_event));
        }
        let s = Arc::new(self.env.store.snapshot_for(&ids)?);
        self.cached = Some((now, s.clone()));
        Ok(s)
    }

    /// How many attempts may start now.
    fn room(&self) -> usize {
        match self.dest.sub.ordering {
            Ordering::Fifo => 1,
            Ordering::Unordered => {
                (self.dest.sub.max_in_flight as usize).saturating_sub(self.tasks.len())
            }
        }
    }

    /// Cluster mode: whether this node holds the destination's lease. Without it the queue is
    /// dropped (the owner has the rows); on a lease newly taken a FIFO subscription finds its
    /// head again, since the previous owner moved it on meanwhile.
    fn leased(&mut self) -> bool {
        let epoch = self.env.lease(&self.dest.sub_id);
        if epoch != self.epoch {
            self.epoch = epoch;
            if epoch.is_some() && self.dest.sub.ordering == Ordering::Fifo {
                self.blocked_by = self
                    .env
                    .store
                    .first_live_delivery(&self.dest.sub_id)
                    .unwrap_or_else(|e| {
                        tracing::error!(subscription = %self.dest.sub_id, error = %e, "cannot read the head of a FIFO subscription");
                        None
                    });
            }
        }
        if epoch.is_none() {
            self.queue.clear();
            self.parked.clear();
            return false;
        }
        true
    }

    /// The number of the attempt to make and the event to send; None when the job is stale
    /// (the delivery moved on, was cancelled, or its due time changed since the job was made).
    fn load(&self, snap: &Snapshot, job: &Job) -> Option<(u32, Arc<crate::model::Event>)> {
        let d = match snap.delivery(job.delivery) {
            Ok(Some(d)) => d,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(delivery = job.delivery, error = %e, "cannot read delivery");
                let _ = self.env.scheduler.send(Msg::Requeue(
                    job.clone(),
                    self.env.clock.now_micros().saturating_add(1_000_000),
                ));
                return None;
            }
        };
        if d.status.is_terminal() || d.next_attempt_at != Some(job.due) {
            return None;
        }
        let event = match &job.event {
            Some(e) => e.clone(),
            None => match snap.event_by_seq(d.event_seq) {
                Ok(Some(e)) => Arc::new(e),
                Ok(None) => {
                    tracing::error!(
                        delivery = job.delivery,
                        "delivery points at a missing event"
                    );
                    return None;
                }
                Err(e) => {
                    tracing::error!(delivery = job.delivery, error = %e, "cannot read event");
                    return None;
                }
            },
        };
        Some((d.attempts + 1, event))
    }

    /// An attempt's request is over: the breaker learns how the endpoint did at once, and
    /// the outcome joins those going to the writer.
    fn answered(&mut self, done: Result<Outcome, (JoinError, Started)>, out: &mut Vec<Outcome>) {
        let o = match done {
            Ok(o) => o,
            Err((e, s)) => {
                // Recorded as a failed attempt of its own (the retry policy decides what
                // next), so a delivery that makes its attempt fail every time still ends.
                tracing::error!(subscription = %self.dest.sub_id, delivery = s.job.delivery, error = %e, "attempt task failed");
                let why = format!("the attempt task failed: {e}");
                let failed = Err((ErrorKind::Internal, why));
                out.push(attempt::outcome(
                    &self.dest,
                    s.job,
                    s.n,
                    s.at,
                    Duration::from_micros(
                        u64::try_from(self.env.clock.now_micros().saturating_sub(s.at))
                            .unwrap_or(0),
                    ),
                    failed,
                ));
                return;
            }
        };
        let now = self.env.clock.now();
        let before = self.breaker.trips();
        match o.health {
            Health::Up => self.breaker.on_success(now),
            Health::Down => self.breaker.on_failure(now),
        }
        if self.breaker.trips() > before {
            self.dest
                .metrics
                .breaker_trips
                .with_label_values(&[&self.dest.sub_id])
                .inc();
            tracing::warn!(subscription = %self.dest.sub_id, "circuit breaker opened");
        }
        out.push(o);
    }

    /// Hands outcomes to the writer in one command.
    fn record(&mut self, outcomes: Vec<Outcome>) {
        if outcomes.is_empty() {
            return;
        }
        self.unrecorded += outcomes.len();
        let jobs = outcomes.iter().map(|o| o.job.without_event()).collect();
        let writer = self.dest.writer.clone();
        // FIFO starts nothing until this is recorded; unordered attempts go on meanwhile.
        let awaited = self.dest.sub.ordering == Ordering::Fifo;
        self.recording
            .spawn(attempt::record(writer, outcomes, awaited), jobs);
    }

    /// Outcomes that did not reach the disk: their deliveries go again shortly.
    fn not_recorded(&mut self, jobs: Vec<Job>) {
        self.cached = None;
        for job in jobs {
            self.env.attempting.end(job.delivery);
            if let Some(parked) = self.parked.remove(&job.delivery) {
                self.enqueue(parked);
            }
            let _ = self.env.scheduler.send(Msg::Requeue(
                job,
                self.env.clock.now_micros().saturating_add(1_000_000),
            ));
        }
    }

    /// Outcomes are on disk (or could not be written): the deliveries are free to go again.
    async fn recorded(&mut self, r: Recorded) {
        // Outcomes changed rows a kept view may hold: the next run of attempts reads again.
        self.cached = None;
        self.unrecorded = self.unrecorded.saturating_sub(r.finished.len());
        if !r.ok {
            self.not_recorded(r.finished.into_iter().map(|f| f.job).collect());
            return;
        }
        let mut failed = false;
        for f in r.finished {
            self.env.attempting.end(f.job.delivery);
            if let Some(job) = self.parked.remove(&f.job.delivery) {
                self.enqueue(job);
            }
            if self.dest.sub.ordering == Ordering::Fifo {
                self.blocked_by = match f.next {
                    Next::Retry { .. } => Some(f.job.delivery),
                    Next::Succeeded | Next::Dead => None,
                };
            }
            failed |= f.next != Next::Succeeded;
            if f.gone {
                self.disable("gone", "the endpoint answered 410 Gone").await;
            }
        }
        if failed {
            self.disable_if_failing_too_long().await;
        }
    }

    /// Disables the subscription once every attempt has failed for `auto_disable_after`.
    /// The streak is the one stored with the attempts (`schema::failing_key`), not one kept
    /// by this task, so neither a restart nor the new task of a changed subscription starts
    /// the count again; only a success or a state switch does.
    async fn disable_if_failing_too_long(&mut self) {
        if !self.enabled {
            return;
        }
        let since = match self.env.store.failing_since(&self.dest.sub_id) {
            Ok(Some(since)) => since,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(subscription = %self.dest.sub_id, error = %e, "cannot read since when the destination fails");
                return;
            }
        };
        if self.env.clock.now_micros().saturating_sub(since) > micros(self.env.auto_disable_after) {
            self.disable(
                "auto_disabled",
                "every delivery failed for the auto-disable period",
            )
            .await;
        }
    }

    async fn disable(&mut self, reason: &'static str, why: &str) {
        // A callback host is no subscription: a 410 or a failing streak ends that delivery
        // (dead, with its reason), never the other events' callbacks to the host.
        if !self.enabled
            || self.dest.sub.source == crate::subscriptions::SubscriptionSource::Callback
        {
            return;
        }
        self.enabled = false;
        self.queue.clear();
        tracing::warn!(subscription = %self.dest.sub_id, reason, "subscription disabled: {why}");
        let (done, applied) = tokio::sync::oneshot::channel();
        let asked = self.env.disables.send(Disable {
            subscription: self.dest.sub_id.clone(),
            reason,
            done,
        });
        // Counted once the change is in force, so whoever sees the count sees the change.
        if asked.is_err() || applied.await.is_err() {
            tracing::error!(subscription = %self.dest.sub_id, "the subscription could not be disabled (shutting down?)");
            return;
        }
        self.dest
            .metrics
            .subscriptions_disabled
            .with_label_values(&[reason])
            .inc();
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// What an attempt was started with: enough to record it as failed if its task fails.
pub struct Started {
    job: Job,
    n: u32,
    at: Micros,
}

/// A `JoinSet` that gives back what each task was started with when the task fails (panics
/// or is cancelled), so its delivery is not left marked as under way.
pub struct Tracked<T, M> {
    set: JoinSet<T>,
    meta: HashMap<tokio::task::Id, M>,
}

impl<T, M> Default for Tracked<T, M> {
    fn default() -> Self {
        Self {
            set: JoinSet::new(),
            meta: HashMap::new(),
        }
    }
}

impl<T: Send + 'static, M> Tracked<T, M> {
    pub fn spawn<F>(&mut self, task: F, meta: M)
    where
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let h = self.set.spawn(task);
        self.meta.insert(h.id(), meta);
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// The next task to end: its output, or why it failed and what it was started with.
    /// None when no task is left.
    pub async fn join_next(&mut self) -> Option<Result<T, (JoinError, M)>> {
        loop {
            let done = self.set.join_next_with_id().await?;
            if let Some(r) = self.settle(done) {
                return Some(r);
            }
        }
    }

    /// Like `join_next`, for a task that has already ended; None when none has.
    pub fn try_join_next(&mut self) -> Option<Result<T, (JoinError, M)>> {
        loop {
            let done = self.set.try_join_next_with_id()?;
            if let Some(r) = self.settle(done) {
                return Some(r);
            }
        }
    }

    fn settle(
        &mut self,
        done: Result<(tokio::task::Id, T), JoinError>,
    ) -> Option<Result<T, (JoinError, M)>> {
        match done {
            Ok((id, out)) => {
                self.meta.remove(&id);
                Some(Ok(out))
            }
            // Every task is spawned with its metadata, so this finds it.
            Err(e) => self.meta.remove(&e.id()).map(|m| Err((e, m))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_task_gives_back_what_it_was_started_with() {
        let mut t: Tracked<u32, &str> = Tracked::default();
        t.spawn(async { 1 }, "one");
        t.spawn(
            async {
                let fail = true;
                if fail {
                    panic!("attempt failed");
                }
                2
            },
            "two",
        );
        t.spawn(async { 3 }, "three");
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        while let Some(done) = t.join_next().await {
            match done {
                Ok(v) => ok.push(v),
                Err((e, m)) => {
                    assert!(e.is_panic(), "{e}");
                    failed.push(m);
                }
            }
        }
        ok.sort_unstable();
        assert_eq!(ok, vec![1, 3]);
        assert_eq!(failed, vec!["two"]);
        assert!(t.is_empty());
        assert!(t.meta.is_empty(), "metadata left behind");
    }

    #[test]
    fn only_a_job_this_node_committed_a_moment_ago_starts_without_a_read() {
        let at: Micros = 1_700_000_000_000_000;
        let job = |due: Micros, event: bool| Job {
            delivery: 1,
            subscription: "s".into(),
            due,
            event: event.then(|| {
                Arc::new(crate::model::Event {
                    id: "e".into(),
                    event_type: "t".into(),
                    source: None,
                    data: "{}".into(),
                    received_at: at,
                    idempotency_key: None,
                    receipt: None,
                    priority: Default::default(),
                    batch: None,
                    callback: None,
                })
            }),
            priority: Default::default(),
            operator: false,
        };
        let view = micros(CACHED_VIEW);
        // Made by this node's commit: due when received, with its event in hand, for as
        // long as a kept view would be used.
        assert!(committed_here(&job(at, true), at));
        assert!(committed_here(&job(at, true), at + view - 1));
        assert!(!committed_here(&job(at, true), at + view));
        // Found by a scan, announced, or made by an outcome: no event in hand.
        assert!(!committed_here(&job(at, false), at));
        // Due at another time than its event's receipt: not a fresh delivery.
        assert!(!committed_here(&job(at + 1_000_000, true), at + 1_000_000));
        // A clock that stepped back makes nothing fresh.
        assert!(!committed_here(&job(at, true), at - 1));
        // An attempt started lately is remembered for CACHED_VIEW after it, so a second
        // copy of its job is read, not started; then forgotten as later ones start.
        let mut recent = RecentStarts::default();
        recent.started(1, at);
        recent.started(2, at + view - 1);
        assert!(recent.contains(1) && recent.contains(2) && !recent.contains(3));
        recent.started(3, at + view);
        assert!(!recent.contains(1) && recent.contains(2) && recent.contains(3));
        // Started again: the later start counts.
        recent.started(2, at + view + 1);
        recent.started(4, at + 2 * view);
        assert!(recent.contains(2) && !recent.contains(3) && recent.contains(4));
        assert_eq!(recent.order.len(), 2);
        // The queue's reads leave such jobs out, and only them.
        let mut q = Queue::new(Ordering::Fifo);
        q.insert(job(at, true));
        let mut other = job(at, false);
        other.delivery = 2;
        q.insert(other);
        assert_eq!(q.first(10, at), vec![(2, at, true)]);
        assert_eq!(q.first(10, at + view), vec![(1, at, false), (2, at, true)]);
    }
}
