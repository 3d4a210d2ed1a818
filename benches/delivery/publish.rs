//! The publishers and the metrics scrape.

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

/// Runs `conns` publishing connections until the window ends: closed loops, or paced by
/// `pace` = (common start, period per connection).
pub(crate) async fn run_publishers(
    addr: SocketAddr,
    conns: usize,
    body_bytes: usize,
    batch: usize,
    window: Window,
    pace: Option<(Instant, Duration)>,
) -> Result<PubStats> {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for id in 0..conns {
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
            EventRequest::batch(addr, id, body_bytes, batch),
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
    let mut conn: Option<HttpConn> = None;
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
        if conn.is_none() {
            match tokio::time::timeout(REQUEST_TIMEOUT, HttpConn::connect(addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                failed => {
                    stats.error(|| match failed {
                        Ok(Err(e)) => format!("connection {id}: connect: {e}"),
                        _ => format!("connection {id}: connect timed out"),
                    });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let sent_at = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, c.round_trip(req.next())).await;
        let done = Instant::now();
        match outcome {
            Ok(Ok(resp)) => {
                if (200..300).contains(&resp.status) {
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
                                        format!(
                                            "event {} made {} deliveries, not 1",
                                            ack.id, ack.deliveries
                                        )
                                    });
                                    continue;
                                }
                                stats.acks.push((id_key(&ack.id), done));
                            }
                            if window.contains(done) {
                                stats.hist.record(done.duration_since(sent_at));
                            }
                        }
                        Err(e) => stats.error(|| format!("unexpected publish response: {e}")),
                    }
                } else {
                    stats.error(|| {
                        format!(
                            "HTTP {}: {}",
                            resp.status,
                            String::from_utf8_lossy(&resp.body[..resp.body.len().min(300)])
                        )
                    });
                }
                if resp.close {
                    conn = None;
                }
            }
            Ok(Err(e)) => {
                stats.error(|| format!("connection {id}: {e}"));
                conn = None;
            }
            Err(_) => {
                stats.error(|| format!("connection {id}: no response within {REQUEST_TIMEOUT:?}"));
                conn = None;
            }
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// The daemon's metrics

/// One scrape of `/metrics`: (name, labels, value) per sample line.
pub(crate) struct Scrape {
    pub(crate) samples: Vec<(String, String, f64)>,
}

impl Scrape {
    pub(crate) fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, labels, rest) = match (line.find('{'), line.rfind('}')) {
                (Some(open), Some(close)) if open < close => {
                    (&line[..open], &line[open + 1..close], &line[close + 1..])
                }
                _ => match line.split_once(' ') {
                    Some((name, rest)) => (name, "", rest),
                    None => continue,
                },
            };
            if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                samples.push((name.to_owned(), labels.to_owned(), v));
            }
        }
        Self { samples }
    }

    /// The sum of a metric's samples whose labels contain `label` (all when empty).
    pub(crate) fn sum(&self, name: &str, label: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| n == name && l.contains(label))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// A metric's samples summed by the value of one label.
    pub(crate) fn by_label(&self, name: &str, key: &str) -> Vec<(String, f64)> {
        let pattern = format!("{key}=\"");
        let mut out: Vec<(String, f64)> = Vec::new();
        for (n, l, v) in &self.samples {
            if n != name {
                continue;
            }
            let Some(start) = l.find(&pattern).map(|i| i + pattern.len()) else {
                continue;
            };
            let value = l[start..].split('"').next().unwrap_or("").to_owned();
            match out.iter_mut().find(|(k, _)| *k == value) {
                Some((_, sum)) => *sum += v,
                None => out.push((value, *v)),
            }
        }
        out
    }
}

pub(crate) async fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let resp = http_get(addr, "/metrics", REQUEST_TIMEOUT).await?;
    if resp.status != 200 {
        bail!("GET /metrics answered {}", resp.status);
    }
    Ok(Scrape::parse(&String::from_utf8_lossy(&resp.body)))
}

/// One GET on a fresh connection.
pub(crate) async fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let resp = tokio::time::timeout(timeout, async {
        let mut conn = HttpConn::connect(addr).await?;
        conn.round_trip(request.as_bytes()).await
    })
    .await
    .with_context(|| format!("GET {path} timed out"))?
    .with_context(|| format!("GET {path} failed"))?;
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client connection

// ---------------------------------------------------------------------------------------------
// Latency histogram
