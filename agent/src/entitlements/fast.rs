//! The lock-free part of a meter's accounting: what `try_consume` takes without the meter's
//! lock (decision 0110).
//!
//! The [`MeterState`] behind the slot's mutex stays the one truth. Whenever a locked operation
//! ends, the slot *publishes* what a call may do without the lock, as integers in a scale
//! chosen for the meter (units of 10^-scale):
//! - a hard limit under an open lease: the lease's whole available quantity is *lent* to a
//!   pool (counted as consumed by the state); a call takes from it with one compare-and-swap;
//! - a soft limit, or no limit, with a current snapshot: a call adds to a local count with one
//!   compare-and-swap and computes its overshoot and remaining from the published room.
//!
//! Every locked operation first *reclaims* (empties the pool or the local count into the
//! state), then works on the state as before, then publishes again. So the state machine and
//! its model test are unchanged, and what calls take from a pool never exceeds what was lent,
//! which never exceeds what the lease allowed.
//!
//! What is published is split into [`LANES`] lanes, one line each, and a thread takes only
//! from its own (decision 0132): the lanes that took since the last publication (or came to
//! the lock wanting) share the pool, or the room under a soft limit, between them. A lane
//! that cannot answer takes the lock, which reclaims every lane, so allowing and denying stay
//! exact; a soft limit's overshoot is decided only under the lock or once past the limit, so
//! it stays exact too. Only `remaining` depends on the lanes: a lane answers as if the lanes
//! before it had drawn their whole shares and those after it none.
//!
//! The pool word packs the value (40 bits), the calls between their take and their record
//! (8 bits: a lease is not released while one is unrecorded) and a publication tag (16 bits: a
//! reclaim changes it, so a compare-and-swap prepared before a reclaim fails, and a failed
//! record returns its units only to the publication it took them from; after a reclaim they
//! stay counted as consumed: never more than allowed, at worst a little less).

use super::decision::DecidedBy;
use super::meter::{FastPlan, MeterState};
use crate::aggregate::KeyCache;
use rust_decimal::Decimal;
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

const VALUE_BITS: u32 = 40;
/// The largest value a pool or a local count holds.
pub const VALUE_MAX: u64 = (1 << VALUE_BITS) - 1;
const BUSY_ONE: u64 = 1 << VALUE_BITS;
const BUSY_MAX: u64 = 0xff;
const TAG_SHIFT: u32 = 48;
/// The finest scale published (10^-9).
pub const MAX_SCALE: u32 = 9;

const POW10: [u64; 10] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];

const MODE_SLOW: u64 = 0;
const MODE_LEASE: u64 = 1;
const MODE_LIMITED: u64 = 2;
const MODE_UNLIMITED: u64 = 3;

/// `info`: tag (16 bits) | mode (8) | scale (8) | decider (8) | grant flag (1).
fn info(tag: u64, mode: u64, scale: u32, decider: DecidedBy, grant: bool) -> u64 {
    tag | (mode << 16)
        | (u64::from(scale) << 24)
        | ((decider.index() as u64) << 32)
        | (u64::from(grant) << 40)
}

fn tag_of(word: u64) -> u64 {
    word >> TAG_SHIFT
}

fn busy_of(word: u64) -> u64 {
    (word >> VALUE_BITS) & BUSY_MAX
}

/// `q` in units of 10^-scale, if exact, not negative and at most [`VALUE_MAX`].
///
/// Reads the `Decimal`'s parts directly (flags, then a 96-bit mantissa as three 32-bit words):
/// a quantity whose mantissa fits 64 bits and whose scale is at most `scale` is one multiply by a
/// power of ten, with no 128-bit mantissa built. Exactness: `Decimal::new(u, scale) == q` for
/// every `Some(u)` (`tests::units_match_decimal_arithmetic`).
#[inline]
pub fn to_units(q: Decimal, scale: u32) -> Option<u64> {
    let [
        f0,
        f1,
        f2,
        f3,
        l0,
        l1,
        l2,
        l3,
        m0,
        m1,
        m2,
        m3,
        h0,
        h1,
        h2,
        h3,
    ] = q.serialize();
    let flags = u32::from_le_bytes([f0, f1, f2, f3]);
    let s = (flags >> 16) & 0xff;
    if u32::from_le_bytes([h0, h1, h2, h3]) != 0 || s > scale || scale > MAX_SCALE {
        return None;
    }
    let m = u64::from_le_bytes([l0, l1, l2, l3, m0, m1, m2, m3]);
    // A negative zero is zero; any other negative is refused.
    if flags >> 31 == 1 && m != 0 {
        return None;
    }
    let u = m.checked_mul(*POW10.get((scale - s) as usize)?)?;
    (u <= VALUE_MAX).then_some(u)
}

/// `units` × 10^-`scale` as a `Decimal`, for published (non-negative, ≤ 2^63) units at a
/// published scale (≤ [`MAX_SCALE`]): built from its parts, inline, where `Decimal::new` is an
/// out-of-line call that checks the scale (a third of the lock-free answer's cost).
#[inline(always)]
pub fn units_decimal(units: u64, scale: u32) -> Decimal {
    debug_assert!(scale <= MAX_SCALE);
    Decimal::from_parts(
        units as u32,
        (units >> 32) as u32,
        0,
        false,
        scale.min(MAX_SCALE),
    )
}

fn to_i64_units(q: Decimal, scale: u32) -> Option<i64> {
    let s = q.scale();
    if s > scale || scale > MAX_SCALE {
        return None;
    }
    let m = i64::try_from(q.mantissa()).ok()?;
    m.checked_mul(POW10[(scale - s) as usize] as i64)
}

/// The scale a quantity needs (its trailing zeros removed).
fn needed_scale(q: Decimal) -> u32 {
    if q.scale() == 0 {
        0
    } else {
        q.normalize().scale()
    }
}

/// A take without the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastTake {
    /// Taken from the lease's pool; end it with [`Fast::end_lease`] once recorded.
    Lease {
        /// The lane taken from.
        lane: usize,
        /// The word's tag when taken.
        tag: u64,
        /// Units taken.
        units: u64,
        /// Remaining after it (limit − used as this agent knows), in the scale.
        remaining: i64,
        /// Whether the pool fell to its low-water mark (a refill is due: take the lock).
        refill: bool,
        /// The scale.
        scale: u32,
    },
    /// Counted locally (soft limit or none).
    Local {
        /// The lane taken from.
        lane: usize,
        /// The word's tag when taken.
        tag: u64,
        /// Units taken.
        units: u64,
        /// Remaining after it, if there is a limit.
        remaining: Option<i64>,
        /// Units past a soft limit this take added.
        overshoot: u64,
        /// What decided.
        decided_by: DecidedBy,
        /// The scale.
        scale: u32,
    },
}

/// Lanes a meter's lock-free accounting is split into (decision 0132): a thread takes from its
/// own lane's line, so two cores taking for the same customer do not hand one line back and
/// forth (25–35 ns a call measured). Each lane is one line; more lanes cost 64 B a meter slot.
pub const LANES: usize = 2;

thread_local! {
    /// This thread's lane (`u8::MAX`: none yet). No destructor: readable until the thread ends.
    static LANE: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Lanes handed out so far: threads get lanes in turn as they first take.
static NEXT_LANE: AtomicUsize = AtomicUsize::new(0);

/// The calling thread's lane, if it was given one.
#[inline]
fn assigned_lane() -> Option<usize> {
    let l = usize::from(LANE.try_with(Cell::get).unwrap_or(0));
    (l < LANES).then_some(l)
}

/// The calling thread's lane (given on its first call).
#[inline]
pub fn lane() -> usize {
    assigned_lane().unwrap_or_else(assign_lane)
}

/// The calling thread's lane if it took before, else lane 0: for a prefetch on paths that
/// may not take, so threads that never take are not handed lanes (which would put two taking
/// threads in one lane).
#[inline]
pub fn lane_hint() -> usize {
    assigned_lane().unwrap_or(0)
}

#[cold]
fn assign_lane() -> usize {
    let l = NEXT_LANE.fetch_add(1, Ordering::Relaxed) % LANES;
    let _ = LANE.try_with(|c| c.set(l as u8));
    l
}

/// Puts the calling thread in lane `l` (tests drive several lanes from one thread).
#[cfg(test)]
pub fn set_lane(l: usize) {
    LANE.with(|c| c.set((l % LANES) as u8));
}

/// What the lock keeps about the lanes (in the slot's mutex beside the state): what
/// [`Fast::reclaim`] found and what takes that came to the lock asked for, read by
/// [`Fast::publish`].
#[derive(Debug, Default)]
pub struct Book {
    /// The finest scale a call asked for (published scales are at least this).
    min_scale: u32,
    /// Units each lane was lent by the last publication (lease mode).
    lent: [u64; LANES],
    /// Lanes the last reclaim found used.
    used: u8,
    /// Lanes whose threads came to the lock for want of what their lane held.
    want: u8,
    /// Lanes the last publication shared among.
    active: u8,
}

impl Book {
    /// Asks that the next publication use at least the scale `q` needs.
    pub fn note_scale(&mut self, q: Decimal) {
        self.min_scale = self.min_scale.max(q.scale().min(MAX_SCALE));
    }

    /// Lane `lane` came to the lock wanting more than it held: share with it next time.
    pub fn want(&mut self, lane: usize) {
        self.want |= 1 << (lane % LANES);
    }

    /// The lanes to share among now: those that took since the last publication or asked,
    /// else the last ones (lane 0 to begin with).
    fn share_among(&mut self) -> u8 {
        let m = self.used | self.want;
        if m != 0 {
            self.active = m;
        } else if self.active == 0 {
            self.active = 1;
        }
        self.used = 0;
        self.want = 0;
        self.active
    }
}

/// `total` split evenly among the lanes in `mask` (the first of them gets the remainder).
fn shares(total: u64, mask: u8) -> [u64; LANES] {
    let n = u64::from(mask.count_ones()).max(1);
    let mut out = [0; LANES];
    let mut first = true;
    for (i, s) in out.iter_mut().enumerate() {
        if mask & (1 << i) != 0 {
            *s = total / n + if first { total % n } else { 0 };
            first = false;
        }
    }
    debug_assert_eq!(
        out.iter().sum::<u64>(),
        total,
        "shares add up to what is shared"
    );
    out
}

/// One lane: the published, lock-free view of one meter as one thread's takes see it. See the
/// module doc.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Lane {
    word: AtomicU64,
    info: AtomicU64,
    /// A take at or after this takes the lock (renewal, a request's timeout, a backoff's end,
    /// and at the latest the lease's expiry or the period's end: `FastPlan::Lease` makes it at
    /// most `until_ms`, so no second deadline is read).
    slow_at_ms: AtomicI64,
    /// Lease: a take that leaves the lane's pool at or below this takes the lock after
    /// (refill); −1: never. Local: the count a take may reach without the lock (this lane's
    /// share of the room under a limit).
    bound: AtomicI64,
    /// Lease: remaining = base + pool. Local: the room under the limit before the lane's count.
    base: AtomicI64,
    /// Local: the count at or past which a plan's limit is drawn from grants.
    grant_at: AtomicI64,
    /// The meter's usage key as the aggregator resolved it (id and catalog check): in this
    /// line, which the take reads anyway, so recording reads no other line of the slot nor the
    /// key's own allocation (decision 0112); one per lane, so no lane reads another's line.
    key: KeyCache,
}

// The take and the record read this one line of the meter slot.
const _: () = assert!(std::mem::size_of::<Lane>() == 64);

/// The published, lock-free view of one meter: one [`Lane`] per [`LANES`].
#[derive(Debug, Default)]
pub struct Fast {
    lanes: [Lane; LANES],
}

impl Fast {
    /// Calls between their take and their record (the lease cannot be released meanwhile).
    pub fn busy(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| busy_of(l.word.load(Ordering::Acquire)))
            .sum()
    }

    /// `lane`'s line (what a take of that lane reads first: prefetch it).
    #[inline]
    pub fn line(&self, lane: usize) -> &impl Sized {
        &self.lanes[lane % LANES]
    }

    /// The usage key cache of `lane`.
    #[inline]
    pub(crate) fn key(&self, lane: usize) -> &KeyCache {
        &self.lanes[lane % LANES].key
    }

    /// Takes `qty` from `lane` without the lock if what was published allows it; `None`: take
    /// the lock. `current`: the customer's snapshot is current (a local count needs it).
    #[inline]
    pub fn take(&self, lane: usize, qty: Decimal, current: bool, now_ms: i64) -> Option<FastTake> {
        let l = &self.lanes[lane % LANES];
        let mut w = l.word.load(Ordering::Acquire);
        loop {
            let i = l.info.load(Ordering::Acquire);
            let tag = tag_of(w);
            if i & 0xffff != tag || tag & 1 == 1 {
                return None;
            }
            let mode = (i >> 16) & 0xff;
            let scale = ((i >> 24) & 0xff) as u32;
            if mode == MODE_SLOW || now_ms >= l.slow_at_ms.load(Ordering::Relaxed) {
                return None;
            }
            let units = to_units(qty, scale)?;
            let value = w & VALUE_MAX;
            let new = match mode {
                MODE_LEASE => {
                    if value < units || busy_of(w) == BUSY_MAX {
                        return None;
                    }
                    w - units + BUSY_ONE
                }
                _ if !current => return None,
                _ => {
                    let count = value + units;
                    if count > VALUE_MAX || count as i64 > l.bound.load(Ordering::Relaxed) {
                        return None;
                    }
                    w + units
                }
            };
            match l
                .word
                .compare_exchange_weak(w, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(l.taken(lane, i, tag, units, value)),
                Err(x) => w = x,
            }
        }
    }

    /// Ends a lease take of `lane`: recorded (`ok`) or not (its units go back to the pool they
    /// came from, if it was not reclaimed since).
    pub fn end_lease(&self, lane: usize, tag: u64, units: u64, ok: bool) {
        let l = &self.lanes[lane % LANES];
        if ok {
            l.word.fetch_sub(BUSY_ONE, Ordering::AcqRel);
            return;
        }
        let mut w = l.word.load(Ordering::Acquire);
        loop {
            let back = if tag_of(w) == tag { units } else { 0 };
            match l.word.compare_exchange_weak(
                w,
                w - BUSY_ONE + back,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(x) => w = x,
            }
        }
    }

    /// Undoes a local take of `lane` whose record failed; false when it was reclaimed since
    /// (then the caller undoes it in the state, under the lock).
    pub fn undo_local(&self, lane: usize, tag: u64, units: u64) -> bool {
        let l = &self.lanes[lane % LANES];
        let mut w = l.word.load(Ordering::Acquire);
        loop {
            if tag_of(w) != tag || (w & VALUE_MAX) < units {
                return false;
            }
            match l
                .word
                .compare_exchange_weak(w, w - units, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(x) => w = x,
            }
        }
    }

    /// Under the state's lock: stops lock-free takes in every lane and folds what they did
    /// into `st`.
    pub fn reclaim(&self, st: &mut MeterState, book: &mut Book, now_ms: i64) {
        let (mut sum, mut mode, mut scale) = (0u64, MODE_SLOW, 0u32);
        for (n, l) in self.lanes.iter().enumerate() {
            let i = l.info.load(Ordering::Acquire);
            let mut w = l.word.load(Ordering::Acquire);
            let old = loop {
                // An odd tag: closed until the next publication.
                let tag = (tag_of(w) | 1) & 0xffff;
                let new = (tag << TAG_SHIFT) | (w & (BUSY_MAX << VALUE_BITS));
                match l
                    .word
                    .compare_exchange_weak(w, new, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => break w,
                    Err(x) => w = x,
                }
            };
            if tag_of(old) & 1 == 1 || i & 0xffff != tag_of(old) {
                continue;
            }
            // Every lane was published together: one mode and scale.
            (mode, scale) = ((i >> 16) & 0xff, ((i >> 24) & 0xff) as u32);
            let value = old & VALUE_MAX;
            sum += value;
            let used = match mode {
                MODE_LEASE => value < book.lent[n],
                _ => value > 0,
            };
            book.used |= u8::from(used) << n;
        }
        book.lent = [0; LANES];
        let value = Decimal::new(sum as i64, scale);
        match mode {
            MODE_LEASE => st.unlend(value, now_ms),
            MODE_LIMITED | MODE_UNLIMITED => st.absorb_local(value),
            _ => {}
        }
    }

    /// Under the state's lock, after [`Fast::reclaim`] and the operation: publishes what calls
    /// may do without the lock now, shared among the lanes in use.
    pub fn publish(&self, st: &mut MeterState, book: &mut Book, now_ms: i64) {
        let w = self.lanes[0].word.load(Ordering::Acquire);
        // Even: open. Reclaim made it odd, so this is the next even tag.
        let tag = ((tag_of(w) | 1) + 1) & 0xffff;
        let mask = book.share_among();
        let (mode, scale, decider, grant) = match st.fast_plan(now_ms) {
            FastPlan::Lease {
                available,
                base,
                until_ms,
                slow_at_ms,
                low_water,
            } => {
                debug_assert!(slow_at_ms <= until_ms, "the take reads one deadline");
                let scale = book
                    .min_scale
                    .max(needed_scale(available))
                    .max(needed_scale(base));
                let Some(base_u) = to_i64_units(base.normalize(), scale) else {
                    return self.publish_slow(tag);
                };
                let cap = Decimal::new(VALUE_MAX as i64, scale);
                let lend = available.min(cap);
                // `to_units` refuses a scale past `MAX_SCALE`.
                let Some(lend_u) = to_units(lend.normalize(), scale) else {
                    return self.publish_slow(tag);
                };
                // Low water in units, rounded down (a refill is asked a little late at worst
                // by less than one unit).
                let lw = match low_water {
                    None => -1,
                    Some(l) => {
                        let l = l.max(Decimal::ZERO) * Decimal::from(POW10[scale as usize]);
                        i64::try_from(l.trunc().mantissa()).unwrap_or(i64::MAX)
                    }
                };
                st.lend(lend);
                let lent = shares(lend_u, mask);
                // Remaining as a lane answers it: what the state does not count as consumed
                // (base − lent), the lane's pool, and the pools of the lanes after it (as if
                // lanes were drawn in order).
                let mut before = 0u64;
                for (l, share) in self.lanes.iter().zip(lent) {
                    before += share;
                    // Each lane refills at its share of the low-water mark.
                    let bound = if lw < 0 || lend_u == 0 {
                        lw
                    } else {
                        let b = i128::from(lw) * i128::from(share) / i128::from(lend_u);
                        i64::try_from(b).unwrap_or(i64::MAX)
                    };
                    l.slow_at_ms.store(slow_at_ms, Ordering::Relaxed);
                    l.bound.store(bound, Ordering::Relaxed);
                    l.base.store(base_u - before as i64, Ordering::Relaxed);
                }
                book.lent = lent;
                (MODE_LEASE, scale, DecidedBy::Lease, false)
            }
            FastPlan::Local {
                room,
                grant_at,
                decided_by,
            } => {
                let scale = book
                    .min_scale
                    .max(room.map_or(0, needed_scale))
                    .max(grant_at.map_or(0, needed_scale));
                let room_u = match room {
                    None => Some(i64::MAX),
                    Some(r) => to_i64_units(r.normalize(), scale),
                };
                let grant_u = match grant_at {
                    None => Some(i64::MAX),
                    Some(g) => to_i64_units(g.normalize(), scale),
                };
                let (Some(room_u), Some(grant_u)) = (room_u, grant_u) else {
                    return self.publish_slow(tag);
                };
                // Nothing lent: `reclaim` emptied `book.lent`.
                if scale > MAX_SCALE {
                    return self.publish_slow(tag);
                }
                // Under a limit with room left, each lane counts up to its share of the room,
                // so no take without the lock passes the limit (overshoot is decided under the
                // lock, exactly); past the limit, or with none, lanes count freely.
                let split = room.is_some() && room_u > 0;
                let share = shares(if split { room_u as u64 } else { 0 }, mask);
                let mut before = 0i64;
                for (l, s) in self.lanes.iter().zip(share) {
                    let (bound, offset) = if split {
                        (s as i64, before)
                    } else {
                        (i64::MAX, 0)
                    };
                    before += s as i64;
                    l.slow_at_ms.store(i64::MAX, Ordering::Relaxed);
                    l.bound.store(bound, Ordering::Relaxed);
                    l.base
                        .store(room_u.saturating_sub(offset), Ordering::Relaxed);
                    l.grant_at
                        .store(grant_u.saturating_sub(offset), Ordering::Relaxed);
                }
                let mode = if room.is_some() {
                    MODE_LIMITED
                } else {
                    MODE_UNLIMITED
                };
                (mode, scale, decided_by, grant_at.is_some())
            }
            FastPlan::Slow => return self.publish_slow(tag),
        };
        for (l, value) in self.lanes.iter().zip(book.lent) {
            l.info
                .store(info(tag, mode, scale, decider, grant), Ordering::Release);
            l.open(tag, value);
        }
    }

    fn publish_slow(&self, tag: u64) {
        for l in &self.lanes {
            l.info.store(
                info(tag, MODE_SLOW, 0, DecidedBy::Plan, false),
                Ordering::Release,
            );
            l.open(tag, 0);
        }
    }
}

impl Lane {
    /// The answer to a take of `units` from `value` under publication `i`.
    #[inline]
    fn taken(&self, lane: usize, i: u64, tag: u64, units: u64, value: u64) -> FastTake {
        let mode = (i >> 16) & 0xff;
        let scale = ((i >> 24) & 0xff) as u32;
        let base = self.base.load(Ordering::Relaxed);
        if mode == MODE_LEASE {
            let left = value - units;
            let lw = self.bound.load(Ordering::Relaxed);
            return FastTake::Lease {
                lane,
                tag,
                units,
                remaining: base.saturating_add(left as i64).max(0),
                refill: lw >= 0 && left as i64 <= lw,
                scale,
            };
        }
        let before = value as i64;
        let decided_by = if (i >> 40) & 1 == 1 && before >= self.grant_at.load(Ordering::Relaxed) {
            DecidedBy::Grant
        } else {
            DecidedBy::ALL[((i >> 32) & 0xff) as usize]
        };
        let (remaining, overshoot) = if mode == MODE_LIMITED {
            let room = base.saturating_sub(before);
            let within = room.clamp(0, units as i64) as u64;
            (Some((room - units as i64).max(0)), units - within)
        } else {
            (None, 0)
        };
        FastTake::Local {
            lane,
            tag,
            units,
            remaining,
            overshoot,
            decided_by,
            scale,
        }
    }

    fn open(&self, tag: u64, value: u64) {
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let new = (tag << TAG_SHIFT) | (w & (BUSY_MAX << VALUE_BITS)) | value;
            match self
                .word
                .compare_exchange_weak(w, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(x) => w = x,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn any_decimal() -> impl Strategy<Value = Decimal> {
        let mantissa = prop_oneof![
            (0u32..2_000).prop_map(|lo| (lo, 0, 0)),
            (any::<u32>(), 0u32..0x200).prop_map(|(lo, mid)| (lo, mid, 0)),
            (any::<u32>(), any::<u32>()).prop_map(|(lo, mid)| (lo, mid, 0)),
            (any::<u32>(), any::<u32>(), any::<u32>()),
        ];
        (mantissa, any::<bool>(), 0u32..=28)
            .prop_map(|((lo, mid, hi), neg, s)| Decimal::from_parts(lo, mid, hi, neg, s))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4_000, ..ProptestConfig::default() })]

        /// `to_units` reads the `Decimal`'s parts; it must agree with `Decimal` arithmetic:
        /// `Some(u)` exactly when the quantity is not negative, has no finer scale than asked
        /// and is at most `VALUE_MAX` units, and then `u` units are the quantity.
        #[test]
        fn units_match_decimal_arithmetic(q in any_decimal(), scale in 0u32..=MAX_SCALE + 1) {
            let got = to_units(q, scale);
            let negative = q.is_sign_negative() && !q.is_zero();
            let fits = scale <= MAX_SCALE
                && q.scale() <= scale
                && q.checked_mul(Decimal::from(10u64.pow(scale)))
                    .is_some_and(|u| u <= Decimal::from(VALUE_MAX));
            prop_assert_eq!(got.is_some(), !negative && fits, "{} at {}", q, scale);
            if let Some(u) = got {
                prop_assert_eq!(Decimal::new(u as i64, scale), q);
                prop_assert_eq!(units_decimal(u, scale), q);
            }
        }

        /// The inline constructor is `Decimal::new` for every published value and scale.
        #[test]
        fn units_decimal_is_decimal_new(u in 0u64..=i64::MAX as u64, scale in 0u32..=MAX_SCALE) {
            prop_assert_eq!(units_decimal(u, scale), Decimal::new(u as i64, scale));
        }
    }

    #[test]
    fn units_are_exact_or_refused() {
        assert_eq!(to_units(Decimal::ONE, 0), Some(1));
        assert_eq!(to_units(Decimal::new(15, 1), 3), Some(1_500));
        assert_eq!(units_decimal(1_500, 3), Decimal::new(1_500, 3));
        assert_eq!(
            units_decimal(VALUE_MAX, 9),
            Decimal::new(VALUE_MAX as i64, 9)
        );
        assert_eq!(
            units_decimal(u64::MAX >> 1, 0),
            Decimal::from(u64::MAX >> 1)
        );
        assert_eq!(to_units(Decimal::new(15, 1), 0), None);
        assert_eq!(to_units(Decimal::new(-1, 0), 0), None);
        assert_eq!(to_units(Decimal::ZERO, 0), Some(0));
        assert_eq!(to_units(Decimal::from(VALUE_MAX) + Decimal::ONE, 0), None);
        assert_eq!(to_i64_units(Decimal::new(-25, 1), 2), Some(-250));
    }
}
