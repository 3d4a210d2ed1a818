//! Hierarchical hashed timer wheel: owns millisecond-resolution scheduling of opaque items.
//!
//! Six levels of 64 slots; a level-`l` slot spans `64^l` ms, so the wheel covers the current
//! aligned block of `2^36` ms (about two years). Items due in a later block wait in an overflow
//! list that is re-examined when time reaches the block of its earliest item.

use std::mem;

const SLOT_BITS: u32 = 6;
const SLOTS: usize = 1 << SLOT_BITS;
const LEVELS: usize = 6;
/// Dues that differ from the wheel's time at or above this bit live in the overflow list.
const WHEEL_BITS: u32 = SLOT_BITS * LEVELS as u32;

/// One bucket; `min_due` is exact because items only leave a slot when it is drained whole.
struct Slot<T> {
    min_due: u64,
    items: Vec<(u64, T)>,
}

impl<T> Slot<T> {
    fn new() -> Self {
        Self {
            min_due: u64::MAX,
            items: Vec::new(),
        }
    }

    /// Empties the slot, releasing its allocation so memory tracks the live item count.
    fn take(&mut self) -> Vec<(u64, T)> {
        self.min_due = u64::MAX;
        mem::take(&mut self.items)
    }
}

/// Bit `s` of `occupied` is set iff `slots[s]` is non-empty.
struct Level<T> {
    occupied: u64,
    slots: [Slot<T>; SLOTS],
}

/// Where the next piece of work lies: a wheel slot or the overflow list.
enum Expiry {
    Slot {
        level: usize,
        slot: usize,
        deadline: u64,
    },
    Overflow {
        deadline: u64,
    },
}

/// A hierarchical timer wheel with 1 ms ticks, generic over the scheduled item.
///
/// Invariants, with `now` the wheel's time:
/// - `ready` holds items inserted with `due <= now`; any `advance` releases them.
/// - An item in `levels[l].slots[s]` has `due > now`, the highest set bit of `due ^ now` lies in
///   bit group `l` (bits `6l..6l+6`), and `s` is that group of `due`. Hence `s` is strictly
///   greater than the same group of `now`, and every item on a lower level is due before every
///   item on a higher level.
/// - Overflow items have `due ^ now >= 2^36`: they are due in a later `2^36` ms block.
/// - `len` counts items in all of the above.
pub struct TimerWheel<T> {
    now: u64,
    len: usize,
    levels: Box<[Level<T>; LEVELS]>,
    ready: Vec<(u64, T)>,
    overflow: Vec<(u64, T)>,
    overflow_min: u64,
}

impl<T> TimerWheel<T> {
    /// Creates an empty wheel whose clock starts at `now_ms` (any monotonic millisecond origin).
    pub fn new(now_ms: u64) -> Self {
        Self {
            now: now_ms,
            len: 0,
            levels: Box::new(std::array::from_fn(|_| Level {
                occupied: 0,
                slots: std::array::from_fn(|_| Slot::new()),
            })),
            ready: Vec::new(),
            overflow: Vec::new(),
            overflow_min: u64::MAX,
        }
    }

    /// Schedules `item` at `due_ms`; a due time not after the wheel's time fires on the next advance.
    pub fn insert(&mut self, due_ms: u64, item: T) {
        self.len += 1;
        if due_ms <= self.now {
            self.ready.push((due_ms, item));
        } else {
            self.place(due_ms, item);
        }
    }

    /// Moves time to `now_ms` and appends every item due by then to `out`, earliest first.
    ///
    /// Time never moves backwards: an earlier `now_ms` only releases items inserted already due.
    /// Work is proportional to the non-empty slots crossed, not to the milliseconds elapsed.
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<T>) {
        if !self.ready.is_empty() {
            let mut ready = mem::take(&mut self.ready);
            ready.sort_by_key(|&(due, _)| due);
            self.len -= ready.len();
            out.extend(ready.into_iter().map(|(_, item)| item));
        }
        // Each pass drains the earliest slot (or the overflow list), so the loop runs at most
        // once per non-empty slot reached; items fire in due order because, by the level
        // invariant, nothing elsewhere is due before a slot's start.
        while let Some(expiry) = self.next_expiry() {
            match expiry {
                Expiry::Slot {
                    level,
                    slot,
                    deadline,
                } if deadline <= now_ms => {
                    let lvl = &mut self.levels[level];
                    lvl.occupied &= !(1u64 << slot);
                    let items = lvl.slots[slot].take();
                    self.now = deadline;
                    for (due, item) in items {
                        self.settle(due, item, out);
                    }
                }
                Expiry::Overflow { deadline } if deadline <= now_ms => {
                    self.now = deadline;
                    self.overflow_min = u64::MAX;
                    for (due, item) in mem::take(&mut self.overflow) {
                        self.settle(due, item, out);
                    }
                }
                _ => break,
            }
        }
        // Every remaining slot starts after `now_ms`, so the invariants hold at the new time.
        self.now = self.now.max(now_ms);
    }

    /// The earliest due time among scheduled items (exact), or `None` when empty.
    pub fn next_due(&self) -> Option<u64> {
        if let Some(due) = self.ready.iter().map(|&(due, _)| due).min() {
            return Some(due);
        }
        // The lowest non-empty level's first slot holds the earliest item (level invariant).
        match self.next_expiry()? {
            Expiry::Slot { level, slot, .. } => Some(self.levels[level].slots[slot].min_due),
            Expiry::Overflow { .. } => Some(self.overflow_min),
        }
    }

    /// Number of scheduled items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no items are scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fires an item that is due at the wheel's time, otherwise files it one level lower.
    fn settle(&mut self, due: u64, item: T, out: &mut Vec<T>) {
        if due <= self.now {
            self.len -= 1;
            out.push(item);
        } else {
            self.place(due, item);
        }
    }

    /// Files an item with `due > now` by the highest bit in which `due` differs from `now`.
    fn place(&mut self, due: u64, item: T) {
        debug_assert!(due > self.now);
        let diff = due ^ self.now;
        if diff >> WHEEL_BITS != 0 {
            self.overflow_min = self.overflow_min.min(due);
            self.overflow.push((due, item));
            return;
        }
        // `| (SLOTS - 1)` maps every difference below 64 to level 0.
        let top_bit = 63 - (diff | (SLOTS as u64 - 1)).leading_zeros();
        let level = (top_bit / SLOT_BITS) as usize;
        let slot = (due >> (SLOT_BITS * level as u32)) as usize & (SLOTS - 1);
        let lvl = &mut self.levels[level];
        lvl.occupied |= 1u64 << slot;
        let s = &mut lvl.slots[slot];
        s.min_due = s.min_due.min(due);
        s.items.push((due, item));
    }

    /// The earliest slot start among wheel items, else the start of the overflow's earliest block.
    fn next_expiry(&self) -> Option<Expiry> {
        for (level, lvl) in self.levels.iter().enumerate() {
            if lvl.occupied != 0 {
                // All occupied slots lie ahead of `now`'s slot in this level, so the lowest set
                // bit is the next one reached and no wrap-around is possible.
                let slot = lvl.occupied.trailing_zeros() as usize;
                let shift = SLOT_BITS * level as u32;
                let block = (self.now >> (shift + SLOT_BITS)) << (shift + SLOT_BITS);
                let deadline = block | ((slot as u64) << shift);
                debug_assert!(deadline > self.now);
                return Some(Expiry::Slot {
                    level,
                    slot,
                    deadline,
                });
            }
        }
        if self.overflow.is_empty() {
            return None;
        }
        let deadline = (self.overflow_min >> WHEEL_BITS) << WHEEL_BITS;
        Some(Expiry::Overflow { deadline })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap, HashSet};

    use crate::testrng::Rng;

    fn drain(wheel: &mut TimerWheel<u32>, now: u64) -> Vec<u32> {
        let mut out = Vec::new();
        wheel.advance(now, &mut out);
        out
    }

    #[test]
    fn empty_wheel() {
        let mut w: TimerWheel<u32> = TimerWheel::new(1000);
        assert!(w.is_empty());
        assert_eq!(w.len(), 0);
        assert_eq!(w.next_due(), None);
        assert!(drain(&mut w, u64::MAX).is_empty());
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn fires_exactly_at_due_not_before() {
        for delta in [
            1,
            2,
            63,
            64,
            65,
            4095,
            4096,
            4097,
            1 << 30,
            (1 << 36) - 1,
            1 << 36,
            1 << 40,
        ] {
            let start = 12_345;
            let mut w = TimerWheel::new(start);
            w.insert(start + delta, 7);
            assert_eq!(w.next_due(), Some(start + delta), "delta {delta}");
            assert!(drain(&mut w, start + delta - 1).is_empty(), "delta {delta}");
            assert_eq!(w.next_due(), Some(start + delta), "delta {delta}");
            assert_eq!(drain(&mut w, start + delta), vec![7], "delta {delta}");
            assert!(w.is_empty());
        }
    }

    #[test]
    fn overdue_and_current_items_fire_on_next_advance() {
        let mut w = TimerWheel::new(100);
        w.insert(100, 1);
        w.insert(3, 2);
        assert_eq!(w.next_due(), Some(3));
        assert_eq!(drain(&mut w, 100), vec![2, 1]);

        // Even a backwards advance releases items that were already due when inserted.
        w.insert(50, 3);
        assert_eq!(drain(&mut w, 10), vec![3]);
        assert!(w.is_empty());
    }

    #[test]
    fn backwards_advance_does_not_move_time() {
        let mut w = TimerWheel::new(1_000);
        w.insert(1_005, 1);
        assert!(drain(&mut w, 900).is_empty());
        assert!(drain(&mut w, 1_004).is_empty());
        // Still in the future relative to the wheel's unchanged clock.
        w.insert(1_004, 2);
        assert_eq!(drain(&mut w, 0), vec![2]);
        assert_eq!(drain(&mut w, 1_005), vec![1]);
    }

    #[test]
    fn one_advance_fires_in_due_order() {
        let mut w = TimerWheel::new(0);
        let dues = [5_000_000u64, 3, 70, 64, 1 << 37, 4_096, 1, 262_144, 63];
        for (i, &due) in dues.iter().enumerate() {
            w.insert(due, i as u32);
        }
        let fired = drain(&mut w, u64::MAX);
        let got: Vec<u64> = fired.iter().map(|&i| dues[i as usize]).collect();
        let mut want = dues.to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn extremes_of_the_clock() {
        let mut w = TimerWheel::new(0);
        w.insert(u64::MAX, 1);
        w.insert(u64::MAX - 1, 2);
        assert_eq!(w.next_due(), Some(u64::MAX - 1));
        assert_eq!(drain(&mut w, u64::MAX - 1), vec![2]);
        assert_eq!(drain(&mut w, u64::MAX), vec![1]);

        let mut w = TimerWheel::new(u64::MAX);
        w.insert(u64::MAX, 3);
        assert_eq!(drain(&mut w, u64::MAX), vec![3]);
    }

    #[test]
    fn overflow_items_across_many_blocks() {
        let mut w = TimerWheel::new(0);
        let dues: Vec<u64> = (1..=40u64).map(|k| (k << 36) * 3 + k).collect();
        for (i, &due) in dues.iter().enumerate().rev() {
            w.insert(due, i as u32);
        }
        for (i, &due) in dues.iter().enumerate() {
            assert_eq!(w.next_due(), Some(due));
            assert!(drain(&mut w, due - 1).is_empty());
            assert_eq!(drain(&mut w, due), vec![i as u32]);
        }
        assert!(w.is_empty());
    }

    #[test]
    fn hourly_steps_over_two_years() {
        const HOUR: u64 = 3_600_000;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut w = TimerWheel::new(0);
        let mut dues = Vec::new();
        for i in 0..5_000u32 {
            let due = rng.below(2 * 365 * 24 * HOUR);
            dues.push(due);
            w.insert(due, i);
        }
        let mut fired = 0;
        let mut t = 0;
        while !w.is_empty() {
            t += HOUR;
            for i in drain(&mut w, t) {
                let due = dues[i as usize];
                assert!(
                    due <= t && due + HOUR > t,
                    "item {i} due {due} fired at {t}"
                );
                fired += 1;
            }
        }
        assert_eq!(fired, dues.len());
    }

    #[test]
    fn drained_wheel_releases_slot_memory() {
        let mut w = TimerWheel::new(0);
        for i in 0..1_000u32 {
            w.insert(u64::from(i) * 997 + (u64::from(i) << 30), i);
        }
        assert_eq!(drain(&mut w, u64::MAX).len(), 1_000);
        for lvl in w.levels.iter() {
            assert_eq!(lvl.occupied, 0);
            assert!(lvl.slots.iter().all(|s| s.items.capacity() == 0));
        }
        assert_eq!(w.overflow.capacity(), 0);
    }

    /// Random inserts and advances checked against a `BTreeSet<(due, id)>` reference model.
    #[test]
    fn matches_reference_model() {
        let origins = [0, (1 << 36) - 3, 1 << 40, u64::MAX - (1 << 20), 0xDEAD_BEEF];
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let mut now = origins[(seed % origins.len() as u64) as usize];
            let mut wheel = TimerWheel::new(now);
            let mut model: BTreeSet<(u64, u32)> = BTreeSet::new();
            let mut due_of: HashMap<u32, u64> = HashMap::new();
            let mut seen: HashSet<u32> = HashSet::new();
            let mut next_id = 0u32;

            for _ in 0..1_500 {
                if rng.below(10) < 6 {
                    let due = match rng.below(8) {
                        0 => now.saturating_add(rng.below(64)),
                        1 => now.saturating_add(rng.below(5_000)),
                        2 => now.saturating_add(rng.below(1 << 24)),
                        3 => now.saturating_add(rng.below(1 << 40)),
                        4 => now.saturating_sub(rng.below(100)),
                        5 => now.saturating_add(1 << 36).saturating_sub(rng.below(8)),
                        6 => rng.next(),
                        _ => now.saturating_add(1),
                    };
                    wheel.insert(due, next_id);
                    model.insert((due, next_id));
                    due_of.insert(next_id, due);
                    next_id += 1;
                } else {
                    let target = match rng.below(7) {
                        0 => now.saturating_add(rng.below(3)),
                        1 => now.saturating_add(rng.below(200)),
                        2 => now.saturating_add(rng.below(1 << 20)),
                        3 => now.saturating_add(rng.below(1 << 38)),
                        4 => now.saturating_sub(rng.below(50)),
                        5 => wheel.next_due().unwrap_or(now),
                        _ => wheel.next_due().map_or(now, |d| d.saturating_sub(1)),
                    };
                    now = now.max(target);
                    let mut out = Vec::new();
                    wheel.advance(target, &mut out);
                    let mut prev = 0;
                    for &id in &out {
                        let due = due_of[&id];
                        assert!(
                            due <= now,
                            "seed {seed}: {id} due {due} fired early at {now}"
                        );
                        assert!(due >= prev, "seed {seed}: out of order");
                        assert!(seen.insert(id), "seed {seed}: {id} fired twice");
                        assert!(model.remove(&(due, id)));
                        prev = due;
                    }
                    assert!(
                        model.first().is_none_or(|&(due, _)| due > now),
                        "seed {seed}: an item due by {now} was not fired"
                    );
                }
                assert_eq!(wheel.len(), model.len(), "seed {seed}");
                assert_eq!(
                    wheel.next_due(),
                    model.first().map(|&(d, _)| d),
                    "seed {seed}"
                );
            }

            let mut out = Vec::new();
            wheel.advance(u64::MAX, &mut out);
            for id in out {
                assert!(seen.insert(id), "seed {seed}: {id} fired twice");
            }
            assert_eq!(seen.len(), next_id as usize, "seed {seed}: items lost");
            assert!(wheel.is_empty());
        }
    }
}
