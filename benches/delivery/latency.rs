//! The `latency` mode: a fixed offered rate and ack-to-delivery latency.

use super::*;

pub(crate) async fn latency(opts: &Options) -> Result<()> {
    let seconds = opts.seconds();
    let conns = opts.connections();
    let run = Run::start(opts).await?;
    let period = Duration::from_secs_f64(conns as f64 / opts.rate as f64);
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

    let published = run.publish(opts, 1, Some(period), LATENCY_WAIT).await?;
    let Published {
        window,
        pubs,
        arrivals,
        ..
    } = &published;
    let keys = &pubs.acks;

    let mut hist = Histogram::default();
    let (mut measured, mut early, mut missing) = (0u64, 0u64, 0u64);
    for ((_, ack), at) in keys.iter().zip(arrivals) {
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
    pubs.print_ack_latency();
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
    run.print_daemon(&published, secs).await?;
    let p99_ms = hist
        .percentile(0.99)
        .map_or(f64::NAN, |us| us as f64 / 1000.0);
    println!(
        "target: p99 ack-to-delivery < 25 ms at 10000/s: p99 {p99_ms:.3} ms at {achieved:.0}/s \
         -> {}{}",
        verdict(p99_ms < 25.0 && achieved >= 0.99 * 10_000.0 && missing == 0),
        caveat(opts.rate < 10_000, " (offered rate below the target's)")
    );
    run.finish().await
}
