//! The `latency` mode: a fixed offered rate and ack-to-delivery latency.

use super::*;

pub(crate) async fn latency(opts: &Options) -> Result<()> {
    let seconds = opts.seconds();
    let conns = opts.connections();
    let receiver = Receiver::start().await?;
    let work = Workdir::new(&config_text(opts, &receiver.url(), false))?;
    let daemon = Daemon::start(&work).await?;
    wait_ready(daemon.addr, Instant::now() + START_TIMEOUT).await?;

    let period = Duration::from_secs_f64(conns as f64 / opts.rate as f64);
    println!("dispatchd delivery benchmark: latency");
    print_setup(opts, &work, &receiver.url());
    println!(
        "  load: {} events/s offered on {conns} keep-alive connections (each on a tokio \
         interval of {:.3} ms, staggered), POST /v1/events with a {}-byte JSON event, {}s \
         warm-up + {seconds}s measured",
        opts.rate,
        period.as_secs_f64() * 1000.0,
        EventRequest::body_len(opts.body_bytes),
        WARMUP.as_secs()
    );
    println!();

    let t0 = Instant::now();
    let window = Window {
        start: t0 + WARMUP,
        end: t0 + WARMUP + Duration::from_secs(seconds),
    };
    let sampler = WindowSampler::spawn(daemon.addr, daemon.pid(), window);
    let pubs = run_publishers(
        daemon.addr,
        conns,
        opts.body_bytes,
        1,
        window,
        Some((t0, period)),
    )
    .await?;
    let published_at_end = Instant::now();
    let sample = sampler.await.context("the sampling task panicked")??;
    let keys: Vec<(u128, Instant)> = pubs.acks.clone();
    receiver
        .wait_for(&keys, published_at_end + LATENCY_WAIT)
        .await;
    let arrivals = receiver.arrivals(&keys);

    let mut hist = Histogram::default();
    let (mut measured, mut early, mut missing) = (0u64, 0u64, 0u64);
    for ((_, ack), at) in keys.iter().zip(&arrivals) {
        if !window.contains(*ack) {
            continue;
        }
        measured += 1;
        match at {
            Some(at) if at < ack => {
                early += 1;
                hist.record(Duration::ZERO);
            }
            Some(at) => hist.record(at.saturating_duration_since(*ack)),
            None => missing += 1,
        }
    }
    let secs = seconds as f64;
    let achieved = measured as f64 / secs;
    println!(
        "published (acked in window)  {measured} events: {achieved:.1} events/s of {} offered",
        opts.rate
    );
    println!(
        "publish ack latency          p50 {} ms, p99 {} ms, p99.9 {} ms ({} publish errors{})",
        ms(&pubs.hist, 0.50),
        ms(&pubs.hist, 0.99),
        ms(&pubs.hist, 0.999),
        pubs.errors,
        pubs.first_error
            .as_deref()
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default()
    );
    println!(
        "ack-to-delivery latency      p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms \
         ({} deliveries)",
        ms(&hist, 0.50),
        ms(&hist, 0.99),
        ms(&hist, 0.999),
        ms(&hist, 1.0),
        hist.total
    );
    println!(
        "  delivered before the publisher read the ack (counted as 0 ms): {early}; \
         not delivered {} s after publishing stopped: {missing}",
        LATENCY_WAIT.as_secs()
    );
    receiver.print_checks(keys.len() as u64);
    let after = scrape(daemon.addr).await?;
    print_attempts(&after);
    sample.print(secs);
    let p99_ms = hist
        .percentile(0.99)
        .map_or(f64::NAN, |us| us as f64 / 1000.0);
    println!(
        "target: p99 ack-to-delivery < 25 ms at 10000/s: p99 {p99_ms:.3} ms at {achieved:.0}/s \
         -> {}{}",
        verdict(p99_ms < 25.0 && achieved >= 0.99 * 10_000.0 && missing == 0),
        if opts.rate < 10_000 {
            " (offered rate below the target's)"
        } else {
            ""
        }
    );
    print_machine_note();
    daemon.log.print();
    let stopped = daemon.stop().await?;
    println!(
        "dispatchd stopped cleanly {:.2} s after SIGTERM",
        stopped.as_secs_f64()
    );
    receiver.stop();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mode 3: backlog
