//! The receiving endpoint: a hyper server that records first arrivals and checks signatures.

use super::*;

/// A hyper 1.x server on 127.0.0.1 that answers 200 and records first arrivals by webhook-id.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<RecvState>,
    pub(crate) stop: watch::Sender<bool>,
}

pub(crate) struct RecvState {
    pub(crate) shards: Vec<Mutex<HashMap<u128, Instant>>>,
    pub(crate) requests: AtomicU64,
    pub(crate) unique: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) checked: AtomicU64,
    pub(crate) bad: AtomicU64,
    pub(crate) first_problem: Mutex<Option<String>>,
    pub(crate) secret: Vec<u8>,
}

impl RecvState {
    pub(crate) fn shard(&self, key: u128) -> &Mutex<HashMap<u128, Instant>> {
        &self.shards[(key % SHARDS as u128) as usize]
    }

    pub(crate) fn arrive(&self, key: u128, at: Instant) {
        match lock(self.shard(key)).entry(key) {
            Entry::Occupied(_) => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Entry::Vacant(v) => {
                v.insert(at);
                self.unique.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn problem(&self, what: String) {
        self.bad.fetch_add(1, Ordering::Relaxed);
        let mut p = lock(&self.first_problem);
        if p.is_none() {
            *p = Some(what);
        }
    }
}

impl Receiver {
    pub(crate) async fn start() -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("receiver: cannot bind")?;
        let addr = listener.local_addr()?;
        let secret = B64
            .decode(&SECRET["whsec_".len()..])
            .context("the bench secret is not base64")?;
        let state = Arc::new(RecvState {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            requests: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            first_problem: Mutex::new(None),
            secret,
        });
        let (stop, mut stopped) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let mut http = http1::Builder::new();
            http.keep_alive(true);
            for _ in 0..MAX_ACCEPTS {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            eprintln!("receiver: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = stopped.changed() => break,
                };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                let conn = http.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| receive(st.clone(), req)),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self { addr, state, stop })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until every key has arrived or `deadline`; returns how many have not.
    pub(crate) async fn wait_for(&self, keys: &[(u128, Instant)], deadline: Instant) -> usize {
        let mut missing = keys.len();
        for _ in 0..1_000_000 {
            if self.state.unique.load(Ordering::Relaxed) >= keys.len() as u64 {
                missing = self.arrivals(keys).iter().filter(|a| a.is_none()).count();
                if missing == 0 {
                    return 0;
                }
            }
            if Instant::now() >= deadline {
                return self.arrivals(keys).iter().filter(|a| a.is_none()).count();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        missing
    }

    /// The first arrival of each key.
    pub(crate) fn arrivals(&self, keys: &[(u128, Instant)]) -> Vec<Option<Instant>> {
        let shards: Vec<_> = self.state.shards.iter().map(lock).collect();
        keys.iter()
            .map(|(k, _)| shards[(k % SHARDS as u128) as usize].get(k).copied())
            .collect()
    }

    /// First arrivals inside the window, in total and per whole second of it.
    pub(crate) fn first_arrivals_in(&self, w: Window) -> (u64, Vec<u64>) {
        let secs = w.end.saturating_duration_since(w.start).as_secs();
        let mut per_second = vec![0u64; usize::try_from(secs).unwrap_or(0)];
        let mut total = 0;
        for shard in &self.state.shards {
            for at in lock(shard).values() {
                if w.contains(*at) {
                    total += 1;
                    let i = at.saturating_duration_since(w.start).as_secs();
                    if let Some(c) = usize::try_from(i).ok().and_then(|i| per_second.get_mut(i)) {
                        *c += 1;
                    }
                }
            }
        }
        (total, per_second)
    }

    pub(crate) fn print_checks(&self, acked: u64) {
        let s = &self.state;
        let requests = s.requests.load(Ordering::Relaxed);
        let unique = s.unique.load(Ordering::Relaxed);
        println!(
            "receiver                     {requests} requests, {unique} distinct webhook-ids \
             ({acked} events acknowledged), {} duplicates",
            s.duplicates.load(Ordering::Relaxed)
        );
        println!(
            "  sampled checks (1 in {SAMPLE_EVERY}): {} deliveries verified (hmac+sha2 \
             signature, timestamp, body id), {} bad{}",
            s.checked.load(Ordering::Relaxed),
            s.bad.load(Ordering::Relaxed),
            lock(&s.first_problem)
                .as_deref()
                .map(|p| format!("; first: {p}"))
                .unwrap_or_default()
        );
    }
}

pub(crate) async fn receive(
    st: Arc<RecvState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let at = Instant::now();
    let n = st.requests.fetch_add(1, Ordering::Relaxed);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let id = header("webhook-id");
    let signed = n
        .is_multiple_of(SAMPLE_EVERY)
        .then(|| (header("webhook-timestamp"), header("webhook-signature")));
    let body = req.into_body().collect().await?.to_bytes();
    match id {
        None => st.problem("a request without a webhook-id".to_owned()),
        Some(id) => {
            st.arrive(id_key(&id), at);
            if let Some((ts, sig)) = signed {
                st.checked.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = verify(&st.secret, &id, ts.as_deref(), sig.as_deref(), &body) {
                    st.problem(format!("webhook-id {id}: {why}"));
                }
            }
        }
    }
    Ok(Response::new(Full::new(Bytes::new())))
}

/// Checks one delivery independently of the daemon's code: Standard Webhooks signature with
/// the hmac + sha2 crates, a current timestamp, and a body whose `id` is the webhook-id.
pub(crate) fn verify(
    secret: &[u8],
    id: &str,
    ts: Option<&str>,
    sig: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    let ts = ts.ok_or("no webhook-timestamp")?;
    let sig = sig.ok_or("no webhook-signature")?;
    let secs: i64 = ts
        .parse()
        .map_err(|_| format!("bad webhook-timestamp {ts:?}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if (now - secs).abs() > 300 {
        return Err(format!("webhook-timestamp {ts} is {} s off", now - secs));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = B64.encode(mac.finalize().into_bytes());
    if !sig
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
    {
        return Err(format!("webhook-signature {sig:?} does not verify"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if v.get("id").and_then(|i| i.as_str()) != Some(id) {
        return Err("the body's id is not the webhook-id".to_owned());
    }
    for field in ["type", "timestamp", "data"] {
        if v.get(field).is_none() {
            return Err(format!("the body has no {field:?}"));
        }
    }
    Ok(())
}

/// A compact key for an event id: the 128 bits of `evt_<uuid>` ids, a hash of anything else.
pub(crate) fn id_key(id: &str) -> u128 {
    if let Some(hex) = id.strip_prefix("evt_")
        && hex.len() == 32
        && let Ok(v) = u128::from_str_radix(hex, 16)
    {
        return v;
    }
    let half = |seed: u8| {
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

// ---------------------------------------------------------------------------------------------
// The publishers (throughput and latency)
