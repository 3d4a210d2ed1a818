//! The `backlog` mode: RSS with a large scheduled-retry backlog, and restart time.

use super::*;

pub(crate) async fn backlog(opts: &Options) -> Result<()> {
    let n = opts.events;
    let conns = opts.connections();
    // A port nobody listens on: bind one, then let it go.
    let closed_port = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("cannot bind a port to close")?;
        l.local_addr()?.port()
    };
    let url = format!("http://127.0.0.1:{closed_port}/hook");
    let (work, daemon) = start_run(opts, &url).await?;
    println!(
        "  load: {n} events in batches of {} on {conns} keep-alive connections \
         (POST /v1/events/batch), {}-byte JSON events; the endpoint refuses connections, so \
         every first attempt fails and is rescheduled 0-1 h later (full jitter)",
        opts.batch(),
        BatchRequest::event_len(opts.body_bytes)
    );
    println!();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.wait_secs);
    let published = publish_backlog(
        daemon.addr,
        conns,
        n,
        opts.batch(),
        opts.body_bytes,
        deadline,
    )
    .await
    .context("publishing the backlog failed")?;
    let publish_time = started.elapsed();
    println!(
        "published                    {} events ({} deliveries) in {:.1} s: {:.0} events/s",
        published.events,
        published.deliveries,
        publish_time.as_secs_f64(),
        published.events as f64 / publish_time.as_secs_f64()
    );
    println!(
        "  RSS right after publishing: {}",
        memory(daemon.pid()).rss_text()
    );
    if published.deliveries != n {
        bail!(
            "expected {n} deliveries, the daemon created {}",
            published.deliveries
        );
    }

    // Wait for every first attempt to be made (a few attempts counted may be early retries).
    let sub_label = format!("subscription=\"{SUBSCRIPTION}\"");
    let before_attempts = scrape(daemon.addr).await?;
    let attempts_from = Instant::now();
    let mut next_progress = Instant::now() + Duration::from_secs(15);
    let mut polls = 0u64;
    let reached = loop {
        polls += 1;
        let m = scrape(daemon.addr).await.ok();
        let attempts = m.as_ref().map_or(0.0, |m| {
            m.sum("dispatchd_delivery_attempts_total", &sub_label)
        });
        if attempts >= n as f64 {
            break Some(started.elapsed());
        }
        if Instant::now() >= deadline || polls > opts.wait_secs * 4 + 100 {
            break None;
        }
        if Instant::now() >= next_progress {
            let gauge = |name: &str| m.as_ref().map_or(f64::NAN, |m| m.sum(name, &sub_label));
            println!(
                "  ... {:.0} s: {attempts:.0} of {n} attempts; destination queue {:.0}, in \
                 flight {:.0}",
                started.elapsed().as_secs_f64(),
                gauge("dispatchd_destination_queue_depth"),
                gauge("dispatchd_destination_in_flight"),
            );
            next_progress += Duration::from_secs(15);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let Some(reached) = reached else {
        daemon.log.print();
        bail!(
            "dispatchd_delivery_attempts_total did not reach {n} within {} s",
            opts.wait_secs
        );
    };
    println!(
        "attempts reached {n}           {:.1} s after publishing began",
        reached.as_secs_f64()
    );
    let after_attempts = scrape(daemon.addr).await?;
    print_phase(
        &before_attempts,
        &after_attempts,
        attempts_from.elapsed(),
        "while attempting",
    );
    // The scheduled gauge refreshes every 5 s: let it catch up.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = scrape(daemon.addr).await?;
    let mem = memory(daemon.pid());
    let scheduled = m.sum("dispatchd_scheduled_deliveries", "");
    println!(
        "holding the backlog          RSS {} (peak {}), dispatchd_scheduled_deliveries {:.0}, \
         dispatchd_timer_wheel_entries {:.0}",
        mem.rss_text(),
        mem.hwm_text(),
        scheduled,
        m.sum("dispatchd_timer_wheel_entries", "")
    );
    print_attempts(&m);
    print_overdue(daemon.addr).await;
    println!(
        "database file                {:.1} MiB",
        file_mib(&work.db_file())
    );
    daemon.log.print();

    let pid = daemon.pid();
    let stopped = stop_daemon(daemon).await?;
    println!(
        "SIGTERM                      exited cleanly after {:.2} s",
        stopped.as_secs_f64()
    );

    let restarted = start_daemon(&work, opts.node_workers).await?;
    let ready_at = wait_ready(restarted.addr, restarted.spawned + START_TIMEOUT).await?;
    let to_ready = ready_at.saturating_duration_since(restarted.spawned);
    println!(
        "restart                      `listening on` {:.3} s after spawn, GET /readyz 200 \
         {:.3} s after spawn (pid {} -> {})",
        restarted.listening_after.as_secs_f64(),
        to_ready.as_secs_f64(),
        pid,
        restarted.pid()
    );
    // The reload: when the scheduled gauge shows the backlog again (bounded).
    let mut reloaded = None;
    let mut seen = 0.0;
    for _ in 0..1000 {
        if let Ok(m) = scrape(restarted.addr).await {
            seen = m.sum("dispatchd_scheduled_deliveries", "");
            if seen >= scheduled {
                reloaded = Some(restarted.spawned.elapsed());
                break;
            }
        }
        if restarted.spawned.elapsed() > START_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match reloaded {
        Some(t) => println!(
            "  dispatchd_scheduled_deliveries back at {seen:.0} {:.3} s after spawn",
            t.as_secs_f64()
        ),
        None => println!(
            "  dispatchd_scheduled_deliveries still {seen:.0} (not {scheduled:.0}) {:.0} s after \
             spawn",
            restarted.spawned.elapsed().as_secs_f64()
        ),
    }
    tokio::time::sleep_until((restarted.spawned + SETTLE_AFTER_RESTART).into()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m2 = scrape(restarted.addr).await?;
    let mem2 = memory(restarted.pid());
    println!(
        "after restart (+{} s)         RSS {} (peak {}), dispatchd_scheduled_deliveries {:.0}, \
         dispatchd_timer_wheel_entries {:.0}, attempts since restart {:.0} (early retries \
         coming due)",
        SETTLE_AFTER_RESTART.as_secs() + 1,
        mem2.rss_text(),
        mem2.hwm_text(),
        m2.sum("dispatchd_scheduled_deliveries", ""),
        m2.sum("dispatchd_timer_wheel_entries", ""),
        m2.sum(
            "dispatchd_delivery_attempts_total",
            &format!("subscription=\"{SUBSCRIPTION}\"")
        )
    );
    print_overdue(restarted.addr).await;
    let rss_mb = mem.rss_kb.map_or(f64::NAN, |kb| kb as f64 / 1024.0);
    println!(
        "target: RSS < 250 MB holding 1000000 scheduled retries: {rss_mb:.1} MiB holding \
         {scheduled:.0} -> {}{}",
        verdict(rss_mb < 250.0 && scheduled >= n as f64),
        caveat(n < 1_000_000, " (fewer events than the target's)")
    );
    println!(
        "target: restart serving within 3 s: {:.3} s -> {}",
        to_ready.as_secs_f64(),
        verdict(to_ready < Duration::from_secs(3))
    );
    finish(restarted).await
}

#[derive(Default)]
pub(crate) struct BacklogStats {
    pub(crate) events: u64,
    pub(crate) deliveries: u64,
}

/// Publishes `total` events in batches on `conns` connections; any failure ends the run (a
/// retried batch would publish its events twice, since the daemon makes the ids).
pub(crate) async fn publish_backlog(
    addr: SocketAddr,
    conns: usize,
    total: u64,
    batch: usize,
    body_bytes: usize,
    deadline: Instant,
) -> Result<BacklogStats> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let next = next.clone();
        tasks.spawn(async move {
            let mut stats = BacklogStats::default();
            let mut conn = HttpConn::connect(addr).await?;
            let most = total / batch as u64 + 1;
            for _ in 0..most {
                let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                if first >= total {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("publishing did not finish in time");
                }
                let count = usize::try_from((total - first).min(batch as u64))?;
                let req = BatchRequest::build(addr, first, count, body_bytes);
                let resp = tokio::time::timeout(BATCH_TIMEOUT, conn.round_trip(&req))
                    .await
                    .context("POST /v1/events/batch timed out")??;
                if resp.status != 202 {
                    bail!(
                        "POST /v1/events/batch answered {}: {}",
                        resp.status,
                        resp.body_head()
                    );
                }
                let acks: BatchAck =
                    serde_json::from_slice(&resp.body).context("unexpected batch response")?;
                if acks.items.len() != count {
                    bail!("sent {count} events, got {} results", acks.items.len());
                }
                stats.events += acks.items.iter().filter(|a| !a.duplicate).count() as u64;
                stats.deliveries += acks
                    .items
                    .iter()
                    .map(|a| u64::from(a.deliveries))
                    .sum::<u64>();
                if resp.close {
                    conn = HttpConn::connect(addr).await?;
                }
            }
            Ok::<_, anyhow::Error>(stats)
        });
    }
    let mut all = BacklogStats::default();
    while let Some(joined) = tasks.join_next().await {
        let s = joined.context("a publishing task panicked")??;
        all.events += s.events;
        all.deliveries += s.deliveries;
    }
    Ok(all)
}

/// One `POST /v1/events/batch` of `count` events of about `body_bytes` each.
pub(crate) struct BatchRequest;

impl BatchRequest {
    pub(crate) fn event_head(n: u64) -> String {
        format!(r#"{{"type":"bench.backlog","data":{{"n":{n},"pad":""#)
    }

    pub(crate) fn event_len(body_bytes: usize) -> usize {
        body_bytes.max(Self::event_head(0).len() + 3)
    }

    pub(crate) fn build(addr: SocketAddr, first: u64, count: usize, body_bytes: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(count * (body_bytes + 1) + 16);
        body.extend_from_slice(br#"{"events":["#);
        for i in 0..count {
            if i > 0 {
                body.push(b',');
            }
            let head = Self::event_head(first + i as u64);
            let pad = body_bytes.saturating_sub(head.len() + 3);
            body.extend_from_slice(head.as_bytes());
            body.extend((0..pad).map(|j| b'a' + (j % 26) as u8));
            body.extend_from_slice(br#""}}"#);
        }
        body.extend_from_slice(b"]}");
        let mut req = format!(
            "POST /v1/events/batch HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req
    }
}
