//! The scheduler task: keeps the timer wheel filled from the durable `schedule` table (the
//! source of truth) for a near horizon, hears of new due times from the writer, and hands
//! due deliveries to the destination tasks.
//!
//! **Invariant:** every schedule row with key below `loaded_until` has been put in the wheel
//! (or dispatched) in this process; rows at or above it are found by a later load. Memory
//! stays bounded by the horizon and `max_wheel`, however large the backlog on disk.

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::wheel::TimerWheel;
use crate::clock::Instant;
use crate::metrics::Metrics;
use crate::model::{DeliveryId, Event, Micros, Priority, micros};
use crate::storage::Store;
use crate::storage::writer::Due;

/// A delivery handed to a destination task.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery: DeliveryId,
    pub subscription: Arc<str>,
    /// The due time it was scheduled for: a job whose stored due time differs is stale.
    pub due: Micros,
    pub event: Option<Arc<Event>>,
    /// The event's priority: a destination sends its due jobs highest priority first.
    pub priority: Priority,
    /// Asked for by an operator: it may go through an open breaker's cooldown.
    pub operator: bool,
}

impl Job {
    /// The same job without its event: what is kept while the attempt runs elsewhere (a job
    /// without its event reads it back from disk if it has to go again).
    pub fn without_event(&self) -> Job {
        Job {
            delivery: self.delivery,
            subscription: self.subscription.clone(),
            due: self.due,
            event: None,
            priority: self.priority,
            operator: self.operator,
        }
    }
}

/// Messages the scheduler takes.
#[derive(Debug)]
pub enum Msg {
    /// Due times committed by the writer.
    Due(Vec<Due>),
    /// Put a job back in the wheel for `at` without touching the disk (deferred in memory).
    Requeue(Job, Micros),
}

/// Where due jobs go. A destination that is full hands the job back (`Err`); it waits in
/// the wheel a little and is offered again.
pub trait Dispatch: Send + 'static {
    fn dispatch(&mut self, job: Job) -> Result<(), Job>;
}

/// How long the scheduler waits before reading the table again after a destination handed
/// jobs back because it was full.
const BUSY_RETRY: Duration = Duration::from_millis(500);

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub horizon: Duration,
    /// Most entries the wheel holds from disk loads.
    pub max_wheel: usize,
    /// Rows read per load.
    pub load_chunk: usize,
    /// Due times are wall-clock micros read from this clock.
    pub clock: crate::clock::Clock,
}

pub struct Scheduler<D: Dispatch> {
    store: Store,
    dispatch: D,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    wheel: TimerWheel<Job>,
    in_wheel: HashSet<(Micros, DeliveryId)>,
    loaded_until: (Micros, DeliveryId),
    origin_wall: Micros,
    origin: Instant,
    /// A count for the `scheduled` gauge is being read (off this task: see `gauge`).
    counting: Arc<std::sync::atomic::AtomicBool>,
}

impl<D: Dispatch> Scheduler<D> {
    pub fn new(store: Store, dispatch: D, cfg: SchedulerConfig, metrics: Arc<Metrics>) -> Self {
        let (origin_wall, origin) = (cfg.clock.now_micros(), cfg.clock.now());
        Self {
            store,
            dispatch,
            cfg,
            metrics,
            wheel: TimerWheel::new(0),
            in_wheel: HashSet::new(),
            loaded_until: (i64::MIN, 0),
            origin_wall,
            origin,
            counting: Arc::default(),
        }
    }

    /// Sets the gauges. The durable schedule is counted on a blocking thread, one count at a
    /// time: on PostgreSQL that is a query over the held destinations' scheduled deliveries
    /// (12-44 ms in a loaded two-node run), and this task dispatching nothing meanwhile
    /// delayed every due delivery by as much.
    fn gauge(&self) {
        use std::sync::atomic::Ordering;
        self.metrics.wheel_size.set(self.wheel.len() as i64);
        if self.counting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, metrics, counting) = (
            self.store.clone(),
            self.metrics.clone(),
            self.counting.clone(),
        );
        tokio::task::spawn_blocking(move || {
            if let Ok(n) = store.scheduled_count() {
                metrics.scheduled.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            counting.store(false, Ordering::Release);
        });
    }

    /// Wall-clock micros to the wheel's millisecond clock (0 = process start).
    fn wheel_ms(&self, at: Micros) -> u64 {
        u64::try_from(at.saturating_sub(self.origin_wall) / 1000).unwrap_or(0)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn insert(&mut self, job: Job) {
        if self.in_wheel.insert((job.due, job.delivery)) {
            let ms = self.wheel_ms(job.due);
            self.wheel.insert(ms, job);
        }
    }

    /// Reads the next chunk of the schedule table into the wheel when there is room; answers
    /// whether a full chunk came back (more rows are probably waiting).
    fn load(&mut self) -> bool {
        let until = self
            .cfg
            .clock
            .now_micros()
            .saturating_add(micros(self.cfg.horizon));
        if self.loaded_until.0 >= until || self.wheel.len() >= self.cfg.max_wheel {
            return false;
        }
        let room = (self.cfg.max_wheel - self.wheel.len()).min(self.cfg.load_chunk);
        let rows = match self
            .store
            .due_jobs(Bound::Included(self.loaded_until), until, room)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the schedule; retrying");
                return false;
            }
        };
        let full = rows.read >= room;
        let last = rows.last;
        let mut names = std::collections::HashMap::new();
        for (due, id, sub, priority) in rows.jobs {
            let sub = crate::model::intern(&mut names, sub);
            self.insert(Job {
                delivery: id,
                subscription: sub,
                due,
                event: None,
                priority,
                operator: false,
            });
        }
        self.loaded_until = match (full, last) {
            (true, Some((due, id))) => (due, id.saturating_add(1)),
            _ => (until, 0),
        };
        full
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Due(items) => {
                for d in items {
                    // Rows beyond the loaded range are found by a later load; so are rows
                    // that do not fit in a full wheel.
                    if (d.at, d.delivery) >= self.loaded_until {
                        continue;
                    }
                    if self.wheel.len() >= self.cfg.max_wheel {
                        self.rewind(d.at, d.delivery);
                        continue;
                    }
                    self.insert(Job {
                        delivery: d.delivery,
                        subscription: d.subscription,
                        due: d.at,
                        event: d.event,
                        priority: d.priority,
                        operator: d.operator,
                    });
                }
            }
            Msg::Requeue(job, at) => {
                let ms = self.wheel_ms(at);
                if self.in_wheel.insert((job.due, job.delivery)) {
                    self.wheel.insert(ms, job);
                }
            }
        }
    }

    /// Forgets what was loaded from this row on: the next load reads it again from disk.
    fn rewind(&mut self, due: Micros, delivery: DeliveryId) {
        if (due, delivery) < self.loaded_until {
            self.loaded_until = (due, delivery);
        }
    }

    /// Hands due jobs to their destinations; answers whether one was full. A job a full
    /// destination hands back is dropped from memory and its row read again later: memory
    /// stays bounded and no write is spent, however long the destination stays behind.
    fn fire(&mut self, out: &mut Vec<Job>) -> bool {
        let now = self.now_ms();
        self.wheel.advance(now, out);
        let mut busy = false;
        for job in out.drain(..) {
            self.in_wheel.remove(&(job.due, job.delivery));
            if let Err(job) = self.dispatch.dispatch(job) {
                self.rewind(job.due, job.delivery);
                busy = true;
            }
        }
        busy
    }

    /// Runs until `shutdown` resolves or the message channel closes.
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut out = Vec::new();
        // Reloading often keeps the wheel fed; the horizon bounds how far ahead it reads.
        let load_every =
            (self.cfg.horizon / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut next_load = Instant::now();
        let mut next_gauge = Instant::now();
        loop {
            // Messages first: a commit whose rows a load already saw is then de-duplicated.
            while let Ok(m) = rx.try_recv() {
                self.on_msg(m);
            }
            let now = Instant::now();
            if now >= next_load {
                let more = self.load();
                while let Ok(m) = rx.try_recv() {
                    self.on_msg(m);
                }
                // A backlog (after a restart or an outage) is read chunk after chunk, as fast
                // as the wheel has room; otherwise the table is looked at periodically.
                next_load = if more { now } else { now + load_every };
            }
            if self.fire(&mut out) {
                next_load = next_load.max(now + BUSY_RETRY);
            }
            if now >= next_gauge {
                self.gauge();
                next_gauge = now + Duration::from_secs(5);
            }
            let wake = match self.wheel.next_due() {
                Some(ms) => (self.origin + Duration::from_millis(ms)).min(next_load),
                None => next_load,
            };
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.on_msg(m),
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => {}
                () = &mut shutdown => break,
            }
        }
        tracing::debug!("scheduler stopped");
    }
}
