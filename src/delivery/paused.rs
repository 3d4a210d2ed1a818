//! The delivery loop under tokio's paused clock: a destination task with a real writer and a
//! real redb file, and a scripted endpoint in place of HTTP; the scheduler with a recording
//! dispatcher. Hours and days of backoff, cooldown and auto-disable pass in milliseconds.
//!
//! The wall clock the writer, the task and the attempts read follows the paused clock
//! (`Clock::following_runtime`). Jobs are handed to the task when they come due, as the
//! scheduler would, by a test that sleeps until each due time: while the writer (a thread of
//! its own) commits, no test timer is pending, so the paused clock only moves to timers the
//! loop itself set.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::attempt::{self, Destination};
use super::client::{ErrorKind, Response};
use super::worker::{Disable, SendAttempt, WorkerEnv};
use super::{EngineConfig, Router, Supervisor};
use crate::clock::{Clock, Instant};
use crate::metrics::Metrics;
use crate::model::{DeliveryId, Micros};
use crate::scheduler::driver::{Dispatch, Job, Msg};
use crate::storage::Store;
use crate::storage::writer::{self, Due, NewEvent, WriterConfig, WriterHandle};
use crate::subscriptions::spec::{self, SubscriptionDefaults};
use crate::subscriptions::{Subscription, SubscriptionSource};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Where the wall clock starts: 2023-11-14T22:13:20Z.
const WALL0: Micros = 1_700_000_000_000_000;
const SEC: Duration = Duration::from_secs(1);

/// What the scripted endpoint answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// A status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    Timeout,
}

/// One attempt the endpoint saw: when (paused clock), which delivery, which attempt.
#[derive(Debug, Clone, Copy)]
struct Call {
    at: Instant,
    delivery: DeliveryId,
    n: u32,
}

/// A destination task over a real writer and database, with a scripted endpoint.
struct Rig {
    _tmp: tempfile::TempDir,
    clock: Clock,
    start: Instant,
    writer: WriterHandle,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    due: mpsc::UnboundedReceiver<Vec<Due>>,
    calls: mpsc::UnboundedReceiver<Call>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    disables: mpsc::UnboundedReceiver<Disable>,
    router: Router,
    supervisor: Arc<Supervisor>,
    metrics: Arc<Metrics>,
    _scheduler: mpsc::UnboundedReceiver<Msg>,
    sub: Arc<Subscription>,
}

/// A subscription from its config text (the `[[subscriptions]]` keys after id, url, secrets).
fn subscription(extra: &str) -> Subscription {
    let text = format!(
        "[[subscriptions]]\nid = \"s\"\nurl = \"http://127.0.0.1:9/\"\nsecrets = [\"{SECRET}\"]\n{extra}\n"
    );
    let raw = match crate::config::parse_str(&text, None) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let defaults = SubscriptionDefaults {
        timeout: 30 * SEC,
        max_attempts: 10,
    };
    match spec::subscription_from_raw(
        raw.subscriptions[0].get_ref(),
        &defaults,
        SubscriptionSource::Config,
    ) {
        Ok(s) => s,
        Err(e) => panic!("{e:?}"),
    }
}

impl Rig {
    async fn new(sub: Subscription, auto_disable_after: Duration) -> Rig {
        // The destination's HTTP client is built, though no request is sent.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("dispatchd.redb"), 1 << 20, 1 << 20).unwrap();
        let clock = Clock::following_runtime(WALL0).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (due_tx, due) = mpsc::unbounded_channel();
        let (writer, writer_thread) = writer::spawn(
            store.clone(),
            WriterConfig {
                max_batch: 64,
                queue: 1024,
                clock: clock.clone(),
            },
            metrics.clone(),
            Some(due_tx),
        )
        .unwrap();
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let script: Arc<Mutex<VecDeque<Answer>>> = Arc::default();
        let send: SendAttempt = {
            let script = script.clone();
            Arc::new(move |dest: Arc<Destination>, job: Job, n, _event| {
                let answer = script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Answer::Status(200));
                let calls = calls_tx.clone();
                Box::pin(async move {
                    let (started_at, at) = (dest.clock.now_micros(), dest.clock.now());
                    let _ = calls.send(Call {
                        at,
                        delivery: job.delivery,
                        n,
                    });
                    let response = |status, retry_after| Response {
                        status,
                        retry_after,
                        body: Default::default(),
                    };
                    let result = match answer {
                        Answer::Status(c) => Ok(response(c, None)),
                        Answer::RetryAfter(c, s) => Ok(response(c, Some(s.to_string()))),
                        Answer::Timeout => Err((ErrorKind::Timeout, "timed out".to_string())),
                    };
                    attempt::outcome(&dest, job, n, started_at, Duration::ZERO, result)
                })
            })
        };
        let (sched_tx, scheduler) = mpsc::unbounded_channel();
        let (disables_tx, disables) = mpsc::unbounded_channel();
        let supervisor = Arc::new(
            Supervisor::new(
                EngineConfig {
                    allow_private_networks: true,
                    max_response_body: 64,
                    callbacks: Default::default(),
                    defaults: SubscriptionDefaults {
                        timeout: 30 * SEC,
                        max_attempts: 10,
                    },
                },
                WorkerEnv {
                    store,
                    scheduler: sched_tx,
                    auto_disable_after,
                    attempting: Default::default(),
                    disables: disables_tx,
                    clock: clock.clone(),
                    send,
                    leases: None,
                },
                writer.clone(),
                metrics.clone(),
            )
            .unwrap(),
        );
        let sub = Arc::new(sub);
        supervisor.start(std::slice::from_ref(&sub));
        let router = supervisor.router();
        Rig {
            _tmp: tmp,
            start: clock.now(),
            clock,
            writer,
            writer_thread: Some(writer_thread),
            due,
            calls,
            script,
            disables,
            router,
            supervisor,
            metrics,
            _scheduler: scheduler,
            sub,
        }
    }

    fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    /// Publishes `n` events to the subscription; answers their deliveries, due now.
    async fn publish(&mut self, n: usize) -> Vec<Due> {
        let events = (0..n)
            .map(|i| NewEvent {
                id: format!("evt_{i}_{}", self.clock.now_micros()),
                event_type: "t".into(),
                data: "{}".into(),
                subscriptions: vec![Arc::from(self.sub.id.as_str())],
                ..NewEvent::default()
            })
            .collect();
        self.writer.publish(events).await.unwrap();
        self.due.recv().await.unwrap()
    }

    /// The instant of a wall-clock time.
    fn instant(&self, at: Micros) -> Instant {
        let after = u64::try_from(at - WALL0).unwrap_or(0);
        self.start + Duration::from_micros(after)
    }

    /// Hands deliveries to the destination task when they come due, as the scheduler does.
    async fn hand_over(&mut self, due: &[Due]) {
        for d in due {
            tokio::time::sleep_until(self.instant(d.at)).await;
            let job = Job {
                delivery: d.delivery,
                subscription: d.subscription.clone(),
                due: d.at,
                event: d.event.clone(),
                priority: d.priority,
                operator: d.operator,
            };
            assert!(self.router.dispatch(job).is_ok());
        }
    }

    /// The next attempt the endpoint sees.
    async fn call(&mut self) -> Call {
        self.calls.recv().await.unwrap()
    }

    /// The next retry the writer scheduled.
    async fn retry(&mut self) -> Due {
        let mut v = self.due.recv().await.unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    fn since_start(&self, at: Instant) -> Duration {
        at - self.start
    }

    async fn finish(mut self) {
        self.supervisor.shutdown(SEC).await;
        self.writer.stop();
        if let Some(t) = self.writer_thread.take() {
            tokio::task::spawn_blocking(move || t.join().unwrap())
                .await
                .unwrap();
        }
    }
}

/// A failed attempt schedules the next within the policy's ceiling (full jitter), growing
/// by the multiplier up to `max`; a Retry-After beyond the ceiling is honoured exactly; the
/// last allowed attempt dead-letters the delivery.
#[tokio::test(start_paused = true)]
async fn backoff_grows_within_its_ceilings_and_honours_retry_after() {
    let sub = subscription(
        "retry = { max_attempts = 7, initial = \"10s\", max = \"80s\", multiplier = 2.0 }",
    );
    let mut rig = Rig::new(sub, SEC * 3650 * 86_400).await;
    rig.script([Answer::Status(500); 5]);
    rig.script([Answer::RetryAfter(503, 600), Answer::Timeout]);
    let due = rig.publish(1).await;
    rig.hand_over(&due).await;
    let mut last = rig.call().await;
    assert_eq!((last.n, rig.since_start(last.at)), (1, Duration::ZERO));
    for (n, ceiling) in [(2, 10), (3, 20), (4, 40), (5, 80), (6, 80)] {
        let retry = rig.retry().await;
        rig.hand_over(std::slice::from_ref(&retry)).await;
        let call = rig.call().await;
        assert_eq!(call.n, n);
        let gap = call.at - last.at;
        assert!(gap <= SEC * ceiling, "attempt {n}: {gap:?} > {ceiling}s");
        last = call;
    }
    // Attempt 6 answered 503 with Retry-After: 600, over the 80s ceiling: exactly 600s.
    let retry = rig.retry().await;
    rig.hand_over(std::slice::from_ref(&retry)).await;
    let call = rig.call().await;
    assert_eq!((call.n, call.at - last.at), (7, SEC * 600));
    // The seventh (a timeout) was the last allowed: dead, nothing scheduled. Its outcome is
    // recorded by the task; each probe is a commit queued behind what is already queued.
    let mut dead = None;
    for _ in 0..1000 {
        assert!(rig.writer.probe().await.is_ok());
        let d = rig
            .supervisor
            .env
            .store
            .delivery(call.delivery)
            .unwrap()
            .unwrap();
        if d.status.is_terminal() {
            dead = Some(d);
            break;
        }
        tokio::task::yield_now().await;
    }
    let Some(dead) = dead else {
        panic!("the last attempt was never recorded");
    };
    assert_eq!(dead.status, crate::model::DeliveryStatus::Dead);
    assert_eq!(dead.attempts, 7);
    rig.finish().await;
}

/// The breaker opens after its threshold; queued deliveries wait out the cooldown without
/// spending attempts; then one probe goes (half-open), and its success closes the breaker and
/// lets the rest go at once.
#[tokio::test(start_paused = true)]
async fn breaker_opens_waits_its_cooldown_probes_once_and_closes() {
    let sub = subscription(
        "max_in_flight = 1\nretry = { max_attempts = 10, initial = \"1h\", max = \"1h\" }\n\
         breaker = { failure_threshold = 2, cooldown = \"30s\", min_requests = 1000 }",
    );
    let mut rig = Rig::new(sub, SEC * 3650 * 86_400).await;
    rig.script([Answer::Status(500), Answer::Status(500)]);
    let due = rig.publish(4).await;
    rig.hand_over(&due).await;
    let first = rig.call().await;
    let second = rig.call().await;
    assert_eq!(
        second.at, first.at,
        "one at a time, but no wait between them"
    );
    // Two failures: open. The other two wait 30s, then one probe, then the last.
    let probe = rig.call().await;
    assert_eq!(
        rig.since_start(probe.at),
        SEC * 30,
        "the probe goes when the cooldown ends"
    );
    let last = rig.call().await;
    assert_eq!(last.at, probe.at, "closed by the probe's success");
    let attempted: Vec<u32> = [first, second, probe, last].iter().map(|c| c.n).collect();
    assert_eq!(attempted, vec![1, 1, 1, 1], "waiting spent no attempts");
    let trips = rig.metrics.breaker_trips.with_label_values(&["s"]).get();
    assert_eq!(trips, 1);
    rig.finish().await;
}

/// A rate limit spaces attempts at its rate once its burst is spent.
#[tokio::test(start_paused = true)]
async fn rate_limit_spaces_attempts_at_the_rate() {
    let sub = subscription("rate_limit = \"4/s\"\nrate_limit_burst = 2");
    let mut rig = Rig::new(sub, SEC * 3650 * 86_400).await;
    let due = rig.publish(6).await;
    rig.hand_over(&due).await;
    let mut at = Vec::new();
    for _ in 0..6 {
        let call = rig.call().await;
        at.push(rig.since_start(call.at));
    }
    let ms = |v: u64| Duration::from_millis(v);
    assert_eq!(at, vec![ms(0), ms(0), ms(250), ms(500), ms(750), ms(1000)]);
    rig.finish().await;
}

/// FIFO: while the oldest delivery retries, the newer ones wait behind it, and they go in
/// event order once it succeeds.
#[tokio::test(start_paused = true)]
async fn fifo_holds_the_line_behind_a_retrying_head() {
    let sub = subscription(
        "ordering = \"fifo\"\nretry = { max_attempts = 5, initial = \"1m\", max = \"1m\" }",
    );
    let mut rig = Rig::new(sub, SEC * 3650 * 86_400).await;
    rig.script([Answer::Status(500), Answer::Status(500)]);
    let due = rig.publish(3).await;
    let ids: Vec<DeliveryId> = due.iter().map(|d| d.delivery).collect();
    rig.hand_over(&due).await;
    let mut seen = vec![rig.call().await];
    for _ in 0..2 {
        let retry = rig.retry().await;
        assert_eq!(retry.delivery, ids[0]);
        rig.hand_over(std::slice::from_ref(&retry)).await;
        seen.push(rig.call().await);
    }
    seen.push(rig.call().await);
    seen.push(rig.call().await);
    let order: Vec<(DeliveryId, u32)> = seen.iter().map(|c| (c.delivery, c.n)).collect();
    assert_eq!(
        order,
        vec![
            (ids[0], 1),
            (ids[0], 2),
            (ids[0], 3),
            (ids[1], 1),
            (ids[2], 1)
        ]
    );
    assert!(seen[3].at >= seen[2].at, "the others waited for the head");
    rig.finish().await;
}

/// FIFO: a head handed over twice (a commit and a scan can both hand over one delivery)
/// goes once; the stale copy found after its attempt failed leaves the head retrying in
/// front, so a newer delivery still waits for it.
#[tokio::test(start_paused = true)]
async fn fifo_head_handed_over_twice_still_holds_the_line() {
    let sub = subscription(
        "ordering = \"fifo\"\nretry = { max_attempts = 5, initial = \"1m\", max = \"1m\" }",
    );
    let mut rig = Rig::new(sub, SEC * 3650 * 86_400).await;
    rig.script([Answer::Status(500)]);
    let due = rig.publish(2).await;
    let (head, newer) = (due[0].clone(), due[1].clone());
    rig.hand_over(std::slice::from_ref(&head)).await;
    let first = rig.call().await;
    // The same job again, while its attempt is under way or just recorded: now stale.
    rig.hand_over(std::slice::from_ref(&head)).await;
    let retry = rig.retry().await;
    assert_eq!(retry.delivery, head.delivery);
    rig.hand_over(std::slice::from_ref(&newer)).await;
    rig.hand_over(std::slice::from_ref(&retry)).await;
    let then = [rig.call().await, rig.call().await];
    let order: Vec<(DeliveryId, u32)> = std::iter::once(first)
        .chain(then)
        .map(|c| (c.delivery, c.n))
        .collect();
    assert_eq!(
        order,
        vec![(head.delivery, 1), (head.delivery, 2), (newer.delivery, 1)]
    );
    rig.finish().await;
}

/// A destination whose every attempt fails is disabled once that has lasted
/// `auto_disable_after` (5 days here, attempts an hour apart), not before.
#[tokio::test(start_paused = true)]
async fn auto_disable_fires_after_days_of_failures_and_not_before() {
    const DAYS: u32 = 5;
    let sub = subscription("retry = { max_attempts = 1000, initial = \"1h\", max = \"1h\" }");
    let mut rig = Rig::new(sub, SEC * DAYS * 86_400).await;
    rig.script([Answer::Status(500); 1000]);
    let due = rig.publish(1).await;
    rig.hand_over(&due).await;
    let first = rig.call().await;
    // After each failed attempt: its retry, handed over when due, unless the subscription
    // was disabled meanwhile. No timer of the test is pending while the writer records.
    let disabled = loop {
        let retry = rig.retry().await;
        let when = rig.instant(retry.at);
        tokio::select! {
            d = rig.disables.recv() => break d.unwrap(),
            () = tokio::time::sleep_until(when) => {}
        }
        rig.hand_over(std::slice::from_ref(&retry)).await;
        tokio::select! {
            d = rig.disables.recv() => break d.unwrap(),
            c = rig.calls.recv() => {
                let call = c.unwrap();
                // Every attempt until the period ends finds the subscription enabled.
                assert!(call.at - first.at <= SEC * (DAYS * 86_400 + 3600), "{call:?}");
            }
        }
    };
    assert_eq!(disabled.reason, "auto_disabled");
    let at = rig.clock.now() - first.at;
    assert!(at > SEC * DAYS * 86_400, "disabled after {at:?}");
    assert!(
        at <= SEC * (DAYS * 86_400 + 2 * 3600),
        "disabled after {at:?}"
    );
    rig.finish().await;
}

/// Hands out what it is given, with when (paused clock).
struct Recorder(mpsc::UnboundedSender<(Instant, Job)>);

impl Dispatch for Recorder {
    fn dispatch(&mut self, job: Job) -> Result<(), Job> {
        let _ = self.0.send((crate::clock::now(), job));
        Ok(())
    }
}

/// The scheduler hands each stored delivery out when it comes due — a second, an hour,
/// three days ahead — reading them from the schedule table as its horizon reaches them.
#[tokio::test(start_paused = true)]
async fn the_scheduler_hands_out_jobs_when_they_come_due_days_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("dispatchd.redb"), 1 << 20, 1 << 20).unwrap();
    let clock = Clock::following_runtime(WALL0).unwrap();
    let start = clock.now();
    let metrics = Arc::new(Metrics::new().unwrap());
    let (writer, thread) = writer::spawn(
        store.clone(),
        WriterConfig {
            max_batch: 64,
            queue: 64,
            clock: clock.clone(),
        },
        metrics.clone(),
        None,
    )
    .unwrap();
    let events = (0..4)
        .map(|i| NewEvent {
            id: format!("evt_{i}"),
            event_type: "t".into(),
            data: "{}".into(),
            subscriptions: vec![Arc::from("s")],
            ..NewEvent::default()
        })
        .collect();
    writer.publish(events).await.unwrap();
    let after = [SEC, SEC * 3600, SEC * 3 * 86_400, SEC * 59];
    for (id, wait) in (1..).zip(after) {
        let at = WALL0 + crate::model::micros(wait);
        writer.reschedule(id, Arc::from("s"), at).await.unwrap();
    }
    writer.stop();
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();

    let (tx, mut handed) = mpsc::unbounded_channel();
    let scheduler = crate::scheduler::driver::Scheduler::new(
        store,
        Recorder(tx),
        crate::scheduler::driver::SchedulerConfig {
            horizon: 60 * SEC,
            max_wheel: 1000,
            load_chunk: 100,
            clock,
        },
        metrics,
    );
    let (_msgs, rx) = mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(scheduler.run(rx, async move {
        let _ = stopped.await;
    }));
    let mut got = Vec::new();
    for _ in 0..4 {
        let (at, job) = handed.recv().await.unwrap();
        got.push((job.delivery, at - start));
    }
    assert_eq!(
        got,
        vec![
            (1, SEC),
            (4, SEC * 59),
            (2, SEC * 3600),
            (3, SEC * 3 * 86_400)
        ]
    );
    let _ = stop.send(());
    task.await.unwrap();
}
