//! The publishers of throughput and latency, and the daemon's answers to a publish.

use super::*;

#[derive(Default)]
pub(crate) struct PubStats {
    /// Every acknowledged event (inside the window or not): its key and when the ack was read.
    pub(crate) acks: Vec<(u128, Instant)>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    /// Publish round trips completed inside the window (2xx only).
    pub(crate) hist: Histogram,
}

impl PubStats {
    pub(crate) fn error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    pub(crate) fn merge(&mut self, o: PubStats) {
        self.acks.extend(o.acks);
        self.errors += o.errors;
        self.first_error = self.first_error.take().or(o.first_error);
        self.hist.merge(&o.hist);
    }
}

/// Runs the mode's publishing connections until the window ends: closed loops, or paced by
/// `pace` = (common start, period per connection).
pub(crate) async fn run_publishers(
    addrs: &[SocketAddr],
    opts: &Options,
    batch: usize,
    window: Window,
    pace: Option<(Instant, Duration)>,
) -> Result<PubStats> {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let conns = opts.connections();
    for id in 0..conns {
        let Some(&addr) = addrs.get(id % addrs.len().max(1)) else {
            bail!("no daemon to publish to");
        };
        // Staggered so the connections do not all send on the same millisecond.
        let ticker = pace.map(|(start, period)| {
            let offset = period.mul_f64(id as f64 / conns as f64);
            (start + offset, period)
        });
        tasks.spawn(publish_loop(
            id,
            addr,
            window,
            ticker,
            sent.clone(),
            EventRequest::typed(addr, id, opts.body_bytes, batch, &opts.event_type(id)),
        ));
    }
    let mut total = PubStats::default();
    while let Some(joined) = tasks.join_next().await {
        total.merge(joined.context("a publishing task panicked")?);
    }
    Ok(total)
}

/// One connection: publish, read the ack, record its id; reconnects after errors.
pub(crate) async fn publish_loop(
    id: usize,
    addr: SocketAddr,
    window: Window,
    ticker: Option<(Instant, Duration)>,
    sent: Arc<AtomicU64>,
    mut req: EventRequest,
) -> PubStats {
    let mut stats = PubStats::default();
    let mut conn = LoadConn::new(id, addr);
    let mut interval = ticker.map(|(start, period)| {
        let mut i = tokio::time::interval_at(start.into(), period);
        i.set_missed_tick_behavior(MissedTickBehavior::Burst);
        i
    });
    while Instant::now() < window.end && sent.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS {
        if let Some(i) = interval.as_mut()
            && tokio::time::timeout_at(window.end.into(), i.tick())
                .await
                .is_err()
        {
            break;
        }
        let reply = match conn.send(&mut req).await {
            Ok(reply) => reply,
            Err(failure) => {
                stats.error(|| failure.describe());
                continue;
            }
        };
        let (resp, done) = (&reply.resp, reply.done);
        if !(200..300).contains(&resp.status) {
            stats.error(|| resp.summary());
            continue;
        }
        let acks = if req.counters.len() == 1 {
            serde_json::from_slice::<Ack>(&resp.body).map(|a| vec![a])
        } else {
            serde_json::from_slice::<BatchAck>(&resp.body).map(|b| b.items)
        };
        match acks {
            Ok(acks) if acks.len() != req.counters.len() => stats.error(|| {
                format!(
                    "sent {} events, got {} results",
                    req.counters.len(),
                    acks.len()
                )
            }),
            Ok(acks) => {
                for ack in acks {
                    if ack.deliveries != 1 {
                        stats.error(|| {
                            format!("event {} made {} deliveries, not 1", ack.id, ack.deliveries)
                        });
                        continue;
                    }
                    stats.acks.push((id_key(&ack.id), done));
                }
                if window.contains(done) {
                    stats.hist.record(done.duration_since(reply.sent_at));
                }
            }
            Err(e) => stats.error(|| format!("unexpected publish response: {e}")),
        }
    }
    stats
}

#[derive(Deserialize)]
pub(crate) struct BatchAck {
    pub(crate) items: Vec<Ack>,
}

/// The answer to one publish (other fields ignored).
#[derive(Deserialize)]
pub(crate) struct Ack {
    pub(crate) id: String,
    pub(crate) deliveries: u32,
    #[serde(default)]
    pub(crate) duplicate: bool,
}
