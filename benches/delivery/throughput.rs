//! The `throughput` mode: closed-loop publishing, deliveries/s at the receiver, and an in-process reference.

use super::*;

pub(crate) async fn throughput(opts: &Options) -> Result<()> {
    let seconds = opts.seconds();
    let conns = opts.connections();
    let run = Run::start(opts).await?;
    println!(
        "  load: {conns} keep-alive connections, closed loop, {} with {}-byte JSON events, {}s \
         warm-up + {seconds}s measured",
        match opts.batch() {
            1 => "POST /v1/events".to_owned(),
            n => format!("POST /v1/events/batch of {n} events"),
        },
        EventRequest::body_len(opts.body_bytes),
        WARMUP.as_secs()
    );
    println!();

    // The backlog left at the end of the window: wait for every acknowledged event.
    let published = run.publish(opts, opts.batch(), None, DRAIN_LIMIT).await?;
    let Published {
        window,
        pubs,
        missing,
        arrivals,
        ..
    } = &published;
    let (window, missing, keys) = (*window, *missing, &pubs.acks);
    let (in_window, per_second) = run.receiver.first_arrivals_in(window);

    let secs = seconds as f64;
    let acked_in_window = pubs
        .acks
        .iter()
        .filter(|(_, t)| window.contains(*t))
        .count();
    let pending_at_end = arrivals
        .iter()
        .filter(|a| a.is_none_or(|t| t > window.end))
        .count();
    let last_arrival = arrivals.iter().flatten().max().copied();
    // Over the events acknowledged in the window, like every other figure here: the warm-up
    // is left out (in cluster mode it holds the new owner's first moments with the lease).
    let mut e2e = Histogram::default();
    for ((_, ack), at) in keys.iter().zip(arrivals) {
        if let Some(at) = at
            && window.contains(*ack)
        {
            e2e.record(at.saturating_duration_since(*ack));
        }
    }

    println!(
        "published (acked in window)  {acked_in_window:>10} events      {:>10.1} events/s",
        acked_in_window as f64 / secs
    );
    println!(
        "delivered (received in window){in_window:>9} deliveries  {:>10.1} deliveries/s",
        in_window as f64 / secs
    );
    print_per_second(&per_second);
    pubs.print_ack_latency();
    println!(
        "pending at window end        {pending_at_end} of {} acknowledged events not yet \
         received",
        keys.len()
    );
    match (missing, last_arrival) {
        (0, Some(last)) => println!(
            "backlog drained              {:.3} s after the window ended",
            last.saturating_duration_since(window.end).as_secs_f64()
        ),
        (0, None) => println!("backlog drained              nothing was published"),
        (n, _) => println!(
            "backlog NOT drained          {n} acknowledged events still not received {} s \
             after publishing stopped",
            DRAIN_LIMIT.as_secs()
        ),
    }
    println!(
        "ack-to-delivery (saturated)  p50 {} ms, p99 {} ms, max {} ms (queueing included)",
        ms(&e2e, 0.50),
        ms(&e2e, 0.99),
        ms(&e2e, 1.0)
    );
    run.print_daemon(&published, secs).await?;
    let rate = in_window as f64 / secs;
    println!(
        "target: >= 25000 deliveries/s sustained for 30 s: {:.1}/s over {seconds} s -> {}{}",
        rate,
        verdict(rate >= 25_000.0 && missing == 0),
        caveat(
            seconds < 30,
            " (window shorter than the 30 s of the target)"
        )
    );
    run.finish().await?;
    let reference = reference_rate(opts.body_bytes).await?;
    println!(
        "reference (same run)         reqwest, {REFERENCE_CONCURRENCY} in flight, against a bare \
         hyper server, both in this process: {reference:.0} requests/s over {} s; \
         deliveries/s / reference = {:.3}",
        REFERENCE_TIME.as_secs(),
        rate / reference.max(1.0)
    );
    Ok(())
}

/// Requests in flight of the reference client.
pub(crate) const REFERENCE_CONCURRENCY: usize = 64;
/// How long the reference client runs.
pub(crate) const REFERENCE_TIME: Duration = Duration::from_secs(5);

/// What this machine does with no product logic: reqwest POSTs of a `body_bytes` body to a
/// hyper server that reads it and answers 200, both in this process, for `REFERENCE_TIME`.
/// The delivery figure is quoted as a ratio of it, since absolute figures drift here.
pub(crate) async fn reference_rate(body_bytes: usize) -> Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        for _ in 0..MAX_ACCEPTS {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await?;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    // The same TLS provider as the daemon's; only plain HTTP is used here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(REFERENCE_CONCURRENCY)
        .build()?;
    let url = format!("http://{addr}/");
    let body = Bytes::from(vec![b'a'; body_bytes]);
    let start = Instant::now();
    let end = start + REFERENCE_TIME;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..REFERENCE_CONCURRENCY {
        let (client, url, body, sent) = (client.clone(), url.clone(), body.clone(), sent.clone());
        tasks.spawn(async move {
            let mut ok = 0u64;
            while Instant::now() < end && sent.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS {
                let resp = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    client.post(url.as_str()).body(body.clone()).send(),
                )
                .await;
                if let Ok(Ok(r)) = resp
                    && r.status().is_success()
                    && r.bytes().await.is_ok()
                {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0u64;
    while let Some(n) = tasks.join_next().await {
        ok += n.context("a reference task panicked")?;
    }
    let secs = start.elapsed().as_secs_f64();
    server.abort();
    Ok(ok as f64 / secs)
}

pub(crate) fn print_per_second(per_second: &[u64]) {
    if per_second.is_empty() {
        return;
    }
    let mut sorted = per_second.to_vec();
    sorted.sort_unstable();
    println!(
        "  per second in the window: min {}, median {}, max {}; each: {}",
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        per_second
            .iter()
            .map(|n| format!("{:.1}k", *n as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
}
