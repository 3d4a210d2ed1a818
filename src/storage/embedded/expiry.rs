//! Reads for retention: which events are old enough to go, with every delivery terminal.
//! Removal itself happens in the writer (`writer::purge`), which checks again.

use super::schema::*;
use super::{Store, StoreError, first_seq_at_or_after};
use crate::model::{Delivery, Micros, Seq};

/// One stretch of the scan for expired events.
#[derive(Debug, Default)]
pub struct ExpiredScan {
    /// Events received before the cutoff whose deliveries are all terminal and unchanged since.
    pub seqs: Vec<Seq>,
    /// Where the next stretch starts; `None` once the scan reached events newer than the cutoff.
    pub next: Option<Seq>,
}

impl Store {
    /// Scans events from `from` on, oldest first, for those received before `cutoff` whose
    /// deliveries are all terminal and last changed before it. Stops after `limit` finds or
    /// `budget` events looked at, so one read transaction stays short.
    pub fn expired_events(
        &self,
        cutoff: Micros,
        from: Seq,
        limit: usize,
        budget: usize,
    ) -> Result<ExpiredScan, StoreError> {
        let r = self.db.begin_read()?;
        let events = r.open_table(EVENTS)?;
        let event_deliveries = r.open_table(EVENT_DELIVERIES)?;
        let deliveries = r.open_table(DELIVERIES)?;
        let end = first_seq_at_or_after(&events, cutoff)?;
        let mut out = ExpiredScan::default();
        if from >= end {
            return Ok(out);
        }
        let mut scanned = 0usize;
        for row in events.range(from..end)? {
            let seq = row?.0.value();
            scanned += 1;
            let mut expired = true;
            for row in event_deliveries.range((seq, 0)..=(seq, u64::MAX))? {
                let id = row?.0.value().1;
                let Some(v) = deliveries.get(id)? else {
                    continue;
                };
                let d: Delivery = decode(v.value(), "delivery")?;
                if !d.status.is_terminal() || d.updated_at >= cutoff {
                    expired = false;
                    break;
                }
            }
            if expired {
                out.seqs.push(seq);
            }
            if out.seqs.len() >= limit || scanned >= budget {
                out.next = Some(seq + 1).filter(|&n| n < end);
                break;
            }
        }
        Ok(out)
    }
}
