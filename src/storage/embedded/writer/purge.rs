//! Retention inside the writer: removes an old event with everything hanging off it (its
//! receipt, deliveries, attempts, every index row, and the batch that stored it) once all its
//! deliveries are terminal.
//!
//! The sweeper (`crate::retention`) only proposes sequence numbers; this code decides again
//! inside the write transaction, so an operator's retry or a replay that lands between the
//! sweeper's read and this write keeps the event. The newest event, the newest delivery and the
//! newest receipt are always kept: `Store::tips` resumes numbering from them after a restart.

use redb::ReadableTable;
use tokio::sync::oneshot;

use super::{Command, Effects, Tables, WriteError, Writer, WriterHandle};
use crate::model::{Delivery, DeliveryId, Event, Micros, Receipt, Seq};
use crate::storage::StoreError;
use crate::storage::schema::decode;

/// A request to remove old events, answered with what went.
pub(super) struct Purge {
    seqs: Vec<Seq>,
    cutoff: Micros,
    reply: oneshot::Sender<Result<Purged, WriteError>>,
}

impl Purge {
    pub(super) fn fail(self, err: WriteError) {
        drop(self.reply.send(Err(err)));
    }
}

/// What one purge removed, in rows of the record tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub events: u64,
    pub deliveries: u64,
    pub attempts: u64,
    pub receipts: u64,
    /// Proposed events that stay (a live or recent delivery, the newest rows, already gone).
    pub kept: u64,
}

impl WriterHandle {
    /// Removes those of `seqs` whose event and deliveries all changed before `cutoff` and whose
    /// deliveries are all terminal; resolves after the commit.
    pub async fn purge(&self, seqs: Vec<Seq>, cutoff: Micros) -> Result<Purged, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Purge(Purge {
            seqs,
            cutoff,
            reply,
        }))?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

/// An event found removable, with what hangs off it.
struct Doomed {
    seq: Seq,
    event: Event,
    receipt: Option<(u64, Receipt)>,
    deliveries: Vec<(DeliveryId, Delivery)>,
}

impl Writer {
    pub(super) fn apply_purge(
        &mut self,
        t: &mut Tables<'_>,
        p: Purge,
        fx: &mut Effects,
    ) -> Result<(), StoreError> {
        let mut out = Purged::default();
        for &seq in &p.seqs {
            // Reading and deciding changes nothing, so a record that does not decode only
            // keeps its event; a failed removal fails the batch like any write.
            let doomed = match self.removable(t, seq, p.cutoff) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    out.kept += 1;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(seq, error = %e, "retention keeps an event it cannot read");
                    out.kept += 1;
                    continue;
                }
            };
            if let Err(e) = remove(t, &doomed, &mut out) {
                drop(p.reply.send(Err(WriteError::Storage(e.to_string()))));
                return Err(e);
            }
        }
        let reply = p.reply;
        fx.replies
            .push(Box::new(move |r| drop(reply.send(r.map(|()| out)))));
        Ok(())
    }

    /// The event at `seq` and what hangs off it, when all of it may go.
    fn removable(
        &self,
        t: &Tables<'_>,
        seq: Seq,
        cutoff: Micros,
    ) -> Result<Option<Doomed>, StoreError> {
        if seq >= self.tips.last_seq {
            return Ok(None);
        }
        let Some(v) = t.events.get(seq)? else {
            return Ok(None);
        };
        let event: Event = decode(v.value(), "event")?;
        drop(v);
        if event.received_at >= cutoff {
            return Ok(None);
        }
        let receipt = match event.receipt {
            Some(rid) if rid == self.tips.last_receipt => return Ok(None),
            Some(rid) => match t.receipts.get(rid)? {
                Some(v) => Some((rid, decode::<Receipt>(v.value(), "receipt")?)),
                None => None,
            },
            None => None,
        };
        let mut ids = Vec::new();
        for row in t.event_deliveries.range((seq, 0)..=(seq, u64::MAX))? {
            ids.push(row?.0.value().1);
        }
        let mut deliveries = Vec::with_capacity(ids.len());
        for id in ids {
            if id == self.tips.last_delivery {
                return Ok(None);
            }
            let Some(v) = t.deliveries.get(id)? else {
                continue;
            };
            let d: Delivery = decode(v.value(), "delivery")?;
            if !d.status.is_terminal() || d.updated_at >= cutoff {
                return Ok(None);
            }
            deliveries.push((id, d));
        }
        Ok(Some(Doomed {
            seq,
            event,
            receipt,
            deliveries,
        }))
    }
}

/// Removes an event, its receipt, deliveries, attempts and their index rows.
fn remove(t: &mut Tables<'_>, d: &Doomed, out: &mut Purged) -> Result<(), StoreError> {
    let seq = d.seq;
    let ev = &d.event;
    for (id, dl) in &d.deliveries {
        let id = *id;
        let sub = dl.subscription.as_str();
        let code = dl.status.code();
        t.deliveries.remove(id)?;
        t.event_deliveries.remove((seq, id))?;
        t.deliveries_by_sub_status.remove((sub, code, id))?;
        t.deliveries_by_type.remove((ev.event_type.as_str(), id))?;
        t.dead.remove(id)?;
        if let Some(at) = dl.next_attempt_at {
            t.schedule.remove((at, id))?;
        }
        let mut attempts = Vec::new();
        for row in t.attempts.range((id, 0)..=(id, u32::MAX))? {
            attempts.push(row?.0.value());
        }
        for k in &attempts {
            t.attempts.remove(*k)?;
        }
        out.attempts += attempts.len() as u64;
        out.deliveries += 1;
    }
    // Index rows of deliveries already gone (none are expected) would dangle: sweep them too.
    let mut stray = Vec::new();
    for row in t.event_deliveries.range((seq, 0)..=(seq, u64::MAX))? {
        stray.push(row?.0.value());
    }
    for k in stray {
        t.event_deliveries.remove(k)?;
    }
    t.events.remove(seq)?;
    if points_at(t.event_ids.get(ev.id.as_str())?.map(|g| g.value()), seq) {
        t.event_ids.remove(ev.id.as_str())?;
    }
    if let Some(k) = &ev.idempotency_key
        && points_at(t.idempotency_keys.get(k.as_str())?.map(|g| g.value()), seq)
    {
        t.idempotency_keys.remove(k.as_str())?;
    }
    t.events_by_type.remove((ev.event_type.as_str(), seq))?;
    // Its batch is as old as it is: the batch's status goes with the first of its events.
    if let Some(batch) = &ev.batch {
        t.batches.remove(batch.as_str())?;
    }
    if let Some((rid, r)) = &d.receipt {
        // Its delivery id and its body's fingerprint, where they still point at it.
        let fp = crate::model::body_fingerprint(&r.body);
        for key in r.delivery_id.iter().chain(std::iter::once(&fp)) {
            let key = (r.source.as_str(), key.as_str());
            if points_at(t.receipt_ids.get(key)?.map(|g| g.value()), *rid) {
                t.receipt_ids.remove(key)?;
            }
        }
        t.receipts.remove(*rid)?;
        out.receipts += 1;
    }
    out.events += 1;
    Ok(())
}

fn points_at(found: Option<u64>, want: u64) -> bool {
    found == Some(want)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{AttemptRecord, NewEvent, Next};
    use super::*;

    use crate::model::now_micros;

    fn event(n: u32) -> NewEvent {
        NewEvent {
            id: format!("evt_{n}"),
            event_type: "t".into(),
            source: None,
            data: "{}".into(),
            idempotency_key: Some(format!("key-{n}")),
            subscriptions: vec![Arc::from("s")],
            ..NewEvent::default()
        }
    }

    fn succeeded(delivery: DeliveryId) -> AttemptRecord {
        AttemptRecord::answered(delivery, "s", 200, Next::Succeeded)
    }

    #[tokio::test]
    async fn the_writer_decides_again_and_removes_everything_hanging_off_an_event() {
        let (tmp, store, w, thread) = super::super::testing::open(16);
        w.publish_batch(vec![event(1), event(2)], "bat_1".into())
            .await
            .unwrap();
        w.publish(vec![event(3)]).await.unwrap();
        assert_eq!(
            store.batch("bat_1").unwrap().map(|b| b.seqs),
            Some(vec![1, 2])
        );
        let later = now_micros() + 3_600_000_000;

        // Pending deliveries keep their events, whatever the sweeper proposed.
        let p = w.purge(vec![1, 2, 3], later).await.unwrap();
        assert_eq!((p.events, p.kept), (0, 3));

        w.record_attempts(vec![succeeded(1), succeeded(2), succeeded(3)])
            .await
            .unwrap();
        // Changed after the cutoff: kept.
        let p = w
            .purge(vec![1], now_micros() - 3_600_000_000)
            .await
            .unwrap();
        assert_eq!((p.events, p.kept), (0, 1));
        // Old enough and terminal: events 1 and 2 go; 3 is the newest and stays.
        let p = w.purge(vec![1, 2, 3, 99], later).await.unwrap();
        assert_eq!(
            p,
            Purged {
                events: 2,
                deliveries: 2,
                attempts: 2,
                receipts: 0,
                kept: 2
            }
        );
        assert!(store.event_by_seq(1).unwrap().is_none());
        assert!(store.event_by_id("evt_2").unwrap().is_none());
        assert!(store.delivery(1).unwrap().is_none());
        assert!(store.attempts(2).unwrap().is_empty());
        assert!(store.event_delivery_ids(1).unwrap().is_empty());
        assert!(store.event_by_id("evt_3").unwrap().is_some());
        assert!(
            store.batch("bat_1").unwrap().is_none(),
            "the batch goes with its events"
        );
        // Idempotency keys go with their events: the key may be used again.
        let again = w.publish(vec![event(1)]).await.unwrap();
        assert!(matches!(
            again[0],
            super::super::Published::Created { seq: 4, .. }
        ));
        w.stop();
        drop(w);
        thread.join().unwrap();
        // And what is left checks clean.
        drop(store);
        let rep = crate::storage::backup::verify(&tmp.path().join("dispatchd.redb")).unwrap();
        assert!(rep.ok(), "{:?}", rep.problems);
    }
}
