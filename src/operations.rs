//! Operator operations over stored deliveries: replay, redrive, cancelling an event, and the
//! attempts under way. The API parses a request, calls one of these and renders what it
//! answers; they change state only through writer commands, in bounded chunks so a big
//! operation never holds ingest up for long, and never touch destination tasks.

use std::sync::Arc;

use thiserror::Error;

use crate::delivery::attempting::Attempting;
use crate::model::{Delivery, DeliveryId, DeliveryStatus, Event, Origin, Seq};
use crate::storage::inspect::{DeadFilter, DeliveryFilter};
use crate::storage::writer::{CancelOutcome, RetryOutcome, WriteError, WriterHandle};
use crate::storage::{Page, Store, StoreError};
use crate::subscriptions::live::fan_out;
use crate::subscriptions::{Subscription, TypePattern};

/// Deliveries a replay or redrive hands the writer per command.
const WRITE_CHUNK: usize = 500;
/// Events a replay reads per chunk (their data can be large).
const READ_CHUNK: usize = 200;

/// Why an operation failed.
#[derive(Debug, Error)]
pub enum OpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The events a replay covers: one event, or the seqs `[from, to)`.
pub enum Selection {
    One(Seq, Box<Event>),
    Range(Seq, Seq),
}

/// What a replay made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    pub deliveries: u64,
    pub events: u64,
}

/// Which destinations a replay makes deliveries for.
pub struct Targets<'a> {
    /// Subscriptions: each gets the events its patterns and filters want.
    pub subscriptions: &'a [Arc<Subscription>],
    /// Also each event's own callback, to its host's destination.
    pub callbacks: bool,
    /// Only the callbacks to this host's destination (`callback:…`).
    pub callback_host: Option<&'a str>,
}

/// Makes new deliveries of the selected events to the targets (with `patterns`, only events
/// of those types).
pub async fn replay(
    store: &Store,
    writer: &WriterHandle,
    targets: Targets<'_>,
    patterns: Option<&[TypePattern]>,
    selection: Selection,
) -> Result<Replayed, OpError> {
    let mut pending: Vec<(Seq, Arc<str>)> = Vec::new();
    let mut out = Replayed::default();
    let mut add = |seq: Seq, e: &Event, pending: &mut Vec<(Seq, Arc<str>)>| {
        out.events += 1;
        if patterns.is_some_and(|ps| !ps.iter().any(|p| p.matches(&e.event_type))) {
            return;
        }
        for s in fan_out(targets.subscriptions, &e.event_type, &e.data) {
            pending.push((seq, Arc::from(s.id.as_str())));
        }
        let callback = e.callback.as_ref().filter(|_| targets.callbacks);
        if let Some(url) = callback.and_then(|c| reqwest::Url::parse(&c.url).ok()) {
            let id = crate::callbacks::destination_id(&url);
            if targets.callback_host.is_none_or(|h| h == &*id) {
                pending.push((seq, id));
            }
        }
    };
    let mut made = 0u64;
    match selection {
        Selection::One(seq, e) => add(seq, &e, &mut pending),
        Selection::Range(from, to) => {
            let mut at = from;
            while at < to {
                let chunk = store.events_in_range(at, to, READ_CHUNK)?;
                let Some(&(last, _)) = chunk.last() else {
                    break;
                };
                for (seq, e) in &chunk {
                    add(*seq, e, &mut pending);
                }
                while pending.len() >= WRITE_CHUNK {
                    let rest = pending.split_off(WRITE_CHUNK);
                    let batch = std::mem::replace(&mut pending, rest);
                    made += u64::from(writer.create_deliveries(batch, Origin::Replay).await?);
                }
                at = last + 1;
            }
        }
    }
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(WRITE_CHUNK));
        let batch = std::mem::replace(&mut pending, rest);
        made += u64::from(writer.create_deliveries(batch, Origin::Replay).await?);
    }
    out.deliveries = made;
    tracing::info!(
        deliveries = made,
        events = out.events,
        "replay made new deliveries"
    );
    Ok(out)
}

/// Attempts the dead letters `filter` selects again now, of the destinations `in_force`
/// accepts (nothing would attempt the others); answers how many moved. The cursor only moves
/// forward, so a delivery that dies again during the redrive is not picked up twice.
pub async fn redrive(
    store: &Store,
    writer: &WriterHandle,
    filter: &DeadFilter,
    in_force: impl Fn(&str) -> bool,
) -> Result<u64, OpError> {
    let mut cursor = None;
    let mut moved = 0u64;
    loop {
        let page = store.list_dead_letters(filter, cursor, WRITE_CHUNK)?;
        let ids: Vec<DeliveryId> = page
            .items
            .iter()
            .filter(|d| in_force(&d.delivery.subscription))
            .map(|d| d.id)
            .collect();
        if !ids.is_empty() {
            let out = writer
                .retry_deliveries(ids, Some(DeliveryStatus::Dead))
                .await?;
            moved += out
                .iter()
                .filter(|o| matches!(o, RetryOutcome::Scheduled(_)))
                .count() as u64;
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    tracing::info!(
        deliveries = moved,
        subscription = filter.subscription.as_deref().unwrap_or("*"),
        "dead letters redriven"
    );
    Ok(moved)
}

/// Cancels every delivery of the event at `seq` that is not terminal yet; answers how many.
pub async fn cancel_event(
    store: &Store,
    writer: &WriterHandle,
    seq: Seq,
    reason: String,
) -> Result<u64, OpError> {
    let live: Vec<DeliveryId> = store
        .delivery_statuses(&[seq])?
        .into_iter()
        .filter(|(_, s)| !s.is_terminal())
        .map(|(d, _)| d)
        .collect();
    if live.is_empty() {
        return Ok(0);
    }
    let outcomes = writer.cancel_deliveries(live, Some(reason)).await?;
    Ok(outcomes
        .iter()
        .filter(|o| matches!(o, CancelOutcome::Cancelled(_)))
        .count() as u64)
}

/// `status=in_flight`: not on disk, so the attempts under way right now, read and filtered
/// here, in id order after `after`.
pub fn attempts_under_way(
    store: &Store,
    attempting: &Attempting,
    f: &DeliveryFilter,
    mut after: Option<DeliveryId>,
    limit: usize,
) -> Result<Page<(DeliveryId, Delivery)>, OpError> {
    let mut items = Vec::new();
    loop {
        let ids = attempting.after(after, 256);
        let Some(&last) = ids.last() else {
            return Ok(Page { items, next: None });
        };
        after = Some(last);
        for (id, d) in store.deliveries(&ids)? {
            let wanted = !d.status.is_terminal()
                && f.subscription.as_ref().is_none_or(|s| *s == d.subscription)
                && f.since.is_none_or(|t| d.created_at >= t)
                && f.until.is_none_or(|t| d.created_at < t)
                && f.priority.is_none_or(|p| d.priority == p)
                && match &f.event_type {
                    None => true,
                    Some(t) => store
                        .event_by_seq(d.event_seq)?
                        .is_some_and(|e| e.event_type == *t),
                };
            if wanted && attempting.contains(id) {
                items.push((id, d));
                if items.len() == limit {
                    return Ok(Page {
                        items,
                        next: Some(id),
                    });
                }
            }
        }
    }
}
