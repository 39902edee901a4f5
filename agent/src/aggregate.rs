//! The hot path: aggregation of `record()` calls into per-thread shards.
//!
//! Owns: the key interner (customer, meter, dimensions → a dense `u32` id) and one shard per
//! recording thread. A shard holds a table from the key's text to its id, one accumulator per
//! id, and the ids touched since the last drain.
//!
//! Guarantees:
//! - A call does no I/O and never waits on another recording thread. It takes the lock of its
//!   own thread's shard (one atomic swap; released with a plain store), which only that thread
//!   and the sealer (once per `flush_interval`, for the microseconds of a drain) ever take, so
//!   it is uncontended in practice; shards are separate, 128-byte aligned allocations, so two
//!   threads never write the same cache line. No lock or counter is shared between recording
//!   threads.
//! - Once a key has been seen by a thread, a call allocates nothing: the key is found by a hash
//!   of the borrowed strings and compared against its bytes in the shard's arena, the
//!   accumulator is updated in place, and the touched list and the spill list keep their
//!   capacity across drains.
//! - Counts of calls and errors are plain per-shard integers, summed when drained or scraped.
//! - A quantity is counted in exactly one drain: the sealer takes each accumulator under the
//!   shard's lock and resets it.
//! - Keys are validated once, on first sight; the catalog check is re-run only when the catalog
//!   version changes.

use crate::error::{RECORD_ERROR_KINDS, RecordError};
use hashbrown::{DefaultHashBuilder, HashTable};
use rust_decimal::Decimal;
use std::cell::{RefCell, UnsafeCell};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use tally_protocol::batch::{Delta, bucket_start};
use tally_protocol::catalog::Catalog;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

/// Touched keys in one shard that make the shard ask the sealer to seal early. Memory does not
/// grow with events (one accumulator per key), so this only bounds how large one seal gets; set
/// far above a typical interval's key count, since every early seal costs a signature and an
/// fsync (at 4,096 a 10k-key workload sealed every ~40 ms instead of every 250 ms).
pub(crate) const SEAL_HINT_KEYS: usize = 65_536;

/// Gate states, read with one relaxed load per call.
pub(crate) const GATE_OPEN: u8 = 0;
/// Over the disk budget with `Overflow::Reject`.
pub(crate) const GATE_OVER_BUDGET: u8 = 1;
/// Shut down.
pub(crate) const GATE_CLOSED: u8 = 2;

/// A validated key, interned once per agent.
#[derive(Debug)]
pub(crate) struct KeyInfo {
    pub(crate) id: u32,
    pub(crate) customer: CustomerId,
    pub(crate) meter: MeterName,
    /// The canonical (sorted) dimensions, for sealing.
    pub(crate) dims: Dimensions,
    /// Catalog version `known` was computed for.
    known_version: AtomicU64,
    known: AtomicBool,
}

/// The aggregate of one key in one bucket since the last drain. `count == 0` means empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acc {
    pub(crate) bucket: i64,
    pub(crate) sum: Decimal,
    pub(crate) count: u64,
    pub(crate) last: Decimal,
    pub(crate) first_at: i64,
    pub(crate) last_at: i64,
}

impl Acc {
    const EMPTY: Acc = Acc {
        bucket: 0,
        sum: Decimal::ZERO,
        count: 0,
        last: Decimal::ZERO,
        first_at: 0,
        last_at: 0,
    };

    fn one(qty: Decimal, at_ms: i64) -> Acc {
        Acc {
            bucket: bucket_start(at_ms),
            sum: qty,
            count: 1,
            last: qty,
            first_at: at_ms,
            last_at: at_ms,
        }
    }
}

struct ShardState {
    hasher: DefaultHashBuilder,
    /// Key text → id; the text lives in `arena`, so a lookup touches the table, one run of
    /// bytes and the accumulator, and no pointer chain.
    table: HashTable<Entry>,
    arena: Vec<u8>,
    accs: Vec<Acc>,
    touched: Vec<u32>,
    spill: Vec<(u32, Acc)>,
    records: u64,
    errors: [u64; RECORD_ERROR_KINDS],
}

impl ShardState {
    fn new() -> Self {
        ShardState {
            hasher: DefaultHashBuilder::default(),
            table: HashTable::new(),
            arena: Vec::new(),
            accs: Vec::new(),
            touched: Vec::new(),
            spill: Vec::with_capacity(64),
            records: 0,
            errors: [0; RECORD_ERROR_KINDS],
        }
    }
}

/// A shard's table entry.
struct Entry {
    hash: u64,
    id: u32,
    /// The key's bytes in the shard's arena: customer 0xff meter (0xfe key 0xfd value)*.
    /// These separators never occur in UTF-8, so the encoding is unambiguous.
    off: u32,
    len: u32,
    /// Catalog version `known` was computed for.
    known_version: u64,
    known: bool,
}

fn encode_key(out: &mut Vec<u8>, customer: &str, meter: &str, dims: &[(&str, &str)]) {
    out.extend_from_slice(customer.as_bytes());
    out.push(0xff);
    out.extend_from_slice(meter.as_bytes());
    for (k, v) in dims {
        out.push(0xfe);
        out.extend_from_slice(k.as_bytes());
        out.push(0xfd);
        out.extend_from_slice(v.as_bytes());
    }
}

/// Whether `bytes` is the encoding of the key, without building it.
fn key_matches(bytes: &[u8], customer: &str, meter: &str, dims: &[(&str, &str)]) -> bool {
    let mut rest = bytes;
    let mut eat = |s: &[u8]| match rest.strip_prefix(s) {
        Some(r) => {
            rest = r;
            true
        }
        None => false,
    };
    eat(customer.as_bytes())
        && eat(&[0xff])
        && eat(meter.as_bytes())
        && dims
            .iter()
            .all(|(k, v)| eat(&[0xfe]) && eat(k.as_bytes()) && eat(&[0xfd]) && eat(v.as_bytes()))
        && rest.is_empty()
}

/// One thread's shard. Aligned so that two shards never share a cache line.
#[repr(align(128))]
struct Shard {
    state: ShardCell,
    retired: AtomicBool,
}

/// A minimal lock around a shard's state: taking it is one atomic swap, releasing it a plain
/// release store (a `std::sync::Mutex` also swaps on unlock, to wake waiters, which doubles the
/// cost of an uncontended call). Only the owning thread and the sealer ever take it, so a waiter
/// spins briefly and then yields; it never sleeps in the kernel.
struct ShardCell {
    locked: AtomicBool,
    state: UnsafeCell<ShardState>,
}

// SAFETY: `state` is only reached through a `ShardGuard`, which exists only while `locked` is
// held (acquired with `Acquire`, released with `Release`), so accesses from different threads
// never overlap and each sees the previous holder's writes. `ShardState` is `Send`. Exercised by
// `tests::threads_get_their_own_shards_and_sum_exactly` and `tests::sealer_and_owner_race`.
unsafe impl Sync for ShardCell {}

impl ShardCell {
    fn new(state: ShardState) -> Self {
        ShardCell {
            locked: AtomicBool::new(false),
            state: UnsafeCell::new(state),
        }
    }

    #[inline]
    fn lock(&self) -> ShardGuard<'_> {
        if self.locked.swap(true, Ordering::Acquire) {
            self.lock_contended();
        }
        ShardGuard { cell: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < 128 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if !self.locked.swap(true, Ordering::Acquire) {
                return;
            }
        }
    }
}

struct ShardGuard<'a> {
    cell: &'a ShardCell,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = ShardState;
    fn deref(&self) -> &ShardState {
        // SAFETY: the guard holds the lock, so no other reference to the state exists.
        unsafe { &*self.cell.state.get() }
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut ShardState {
        // SAFETY: the guard holds the lock, so no other reference to the state exists.
        unsafe { &mut *self.cell.state.get() }
    }
}

impl Drop for ShardGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.cell.locked.store(false, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// This thread's shards, one per live aggregator (usually one).
    static LOCAL: RefCell<Vec<(u64, Arc<Shard>)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A key in owned form: customer, meter, dimensions in the caller's order.
type OwnedKey = (String, String, Vec<(String, String)>);

#[derive(Default)]
struct Interner {
    map: HashMap<OwnedKey, Arc<KeyInfo>>,
    keys: Vec<Arc<KeyInfo>>,
}

/// Counts of calls and errors, summed over shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) records: u64,
    pub(crate) errors: [u64; RECORD_ERROR_KINDS],
}

impl Counts {
    fn add(&mut self, st: &ShardState) {
        self.records += st.records;
        for (a, b) in self.errors.iter_mut().zip(st.errors) {
            *a += b;
        }
    }
}

/// The hot-path aggregator of one agent.
pub(crate) struct Aggregator {
    uid: u64,
    shards: Mutex<Vec<Arc<Shard>>>,
    /// Counts of shards whose thread has exited.
    retired_counts: Mutex<Counts>,
    /// Used when this thread's thread-local storage is already destroyed.
    fallback: Shard,
    interner: Mutex<Interner>,
    gate: AtomicU8,
    catalog: RwLock<Option<Arc<Catalog>>>,
    /// 0 while no catalog is known.
    catalog_version: AtomicU64,
    seal_hint: AtomicBool,
    sealer: OnceLock<std::thread::Thread>,
}

fn negative(q: &Decimal) -> bool {
    q.is_sign_negative() && !q.is_zero()
}

impl Aggregator {
    pub(crate) fn new() -> Self {
        Aggregator {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
            retired_counts: Mutex::new(Counts::default()),
            fallback: Shard {
                state: ShardCell::new(ShardState::new()),
                retired: AtomicBool::new(false),
            },
            interner: Mutex::new(Interner::default()),
            gate: AtomicU8::new(GATE_OPEN),
            catalog: RwLock::new(None),
            catalog_version: AtomicU64::new(0),
            seal_hint: AtomicBool::new(false),
            sealer: OnceLock::new(),
        }
    }

    /// Sets the gate state ([`GATE_OPEN`], [`GATE_OVER_BUDGET`], [`GATE_CLOSED`]). Closed is final.
    pub(crate) fn set_gate(&self, state: u8) {
        let _ = self
            .gate
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                (g != GATE_CLOSED).then_some(state)
            });
    }

    pub(crate) fn check_gate(&self) -> Result<(), RecordError> {
        match self.gate.load(Ordering::Relaxed) {
            GATE_OPEN => Ok(()),
            GATE_OVER_BUDGET => Err(RecordError::OverBudget),
            _ => Err(RecordError::Closed),
        }
    }

    /// Registers the sealer thread, which [`SEAL_HINT_KEYS`] wakes early.
    pub(crate) fn set_sealer(&self, t: std::thread::Thread) {
        let _ = self.sealer.set(t);
    }

    /// True (once) when a shard asked for an early seal.
    pub(crate) fn take_seal_hint(&self) -> bool {
        self.seal_hint.swap(false, Ordering::Relaxed)
    }

    /// Replaces the catalog used for the unknown-meter check.
    pub(crate) fn set_catalog(&self, catalog: Catalog) {
        let version = catalog.version.max(1);
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(catalog));
        self.catalog_version.store(version, Ordering::Release);
    }

    /// The catalog, if one is known.
    pub(crate) fn catalog(&self) -> Option<Arc<Catalog>> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `meter` may be recorded under the current catalog.
    pub(crate) fn meter_known(&self, meter: &str) -> bool {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|c| c.meter(meter).is_some())
    }

    fn check_known(&self, key: &KeyInfo) -> Result<(), RecordError> {
        let version = self.catalog_version.load(Ordering::Acquire);
        if key.known_version.load(Ordering::Acquire) != version {
            key.known
                .store(self.meter_known(key.meter.as_str()), Ordering::Relaxed);
            key.known_version.store(version, Ordering::Release);
        }
        if key.known.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(RecordError::UnknownMeter)
        }
    }

    fn with_shard<R>(&self, f: impl FnOnce(&mut ShardState) -> R) -> R {
        let mut f = Some(f);
        let r = LOCAL.try_with(|local| {
            // `f` never touches `LOCAL`, so holding the borrow while it runs is fine.
            {
                let l = local.borrow();
                if let Some((_, s)) = l.iter().find(|(u, _)| *u == self.uid) {
                    return f.take().map(|f| f(&mut s.state.lock()));
                }
            }
            let s = Arc::new(Shard {
                state: ShardCell::new(ShardState::new()),
                retired: AtomicBool::new(false),
            });
            lock(&self.shards).push(s.clone());
            let mut l = local.borrow_mut();
            l.retain(|(_, s)| !s.retired.load(Ordering::Relaxed));
            l.push((self.uid, s.clone()));
            drop(l);
            f.take().map(|f| f(&mut s.state.lock()))
        });
        if let Ok(Some(r)) = r {
            return r;
        }
        // Thread-local storage is gone (a call from a thread-local destructor).
        match f {
            Some(f) => f(&mut self.fallback.state.lock()),
            None => unreachable!("the closure ran but returned nothing"),
        }
    }

    /// Records `qty` for the key at `at_ms`.
    pub(crate) fn record(
        &self,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
        qty: Decimal,
        at_ms: i64,
    ) -> Result<(), RecordError> {
        self.with_shard(|st| {
            let r = self.record_in(st, customer, meter, dims, qty, at_ms);
            match &r {
                Ok(()) => st.records += 1,
                Err(e) => st.errors[e.index()] += 1,
            }
            r
        })
    }

    fn record_in(
        &self,
        st: &mut ShardState,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
        qty: Decimal,
        at_ms: i64,
    ) -> Result<(), RecordError> {
        self.check_gate()?;
        if negative(&qty) {
            return Err(RecordError::NegativeQuantity);
        }
        let ShardState {
            hasher,
            table,
            arena,
            accs,
            touched,
            spill,
            ..
        } = st;
        let hash = key_hash(hasher, customer, meter, dims);
        let version = self.catalog_version.load(Ordering::Acquire);
        let found = table.find_mut(hash, |e| {
            e.hash == hash
                && arena
                    .get(e.off as usize..e.off as usize + e.len as usize)
                    .is_some_and(|b| key_matches(b, customer, meter, dims))
        });
        let id = match found {
            Some(e) => {
                if e.known_version != version {
                    e.known = self.meter_known(meter);
                    e.known_version = version;
                }
                if !e.known {
                    return Err(RecordError::UnknownMeter);
                }
                e.id
            }
            None => {
                let key = self.intern(customer, meter, dims)?;
                let known = self.meter_known(meter);
                let off = u32::try_from(arena.len()).map_err(|_| RecordError::OverBudget)?;
                encode_key(arena, customer, meter, dims);
                let len = u32::try_from(arena.len() - off as usize)
                    .map_err(|_| RecordError::OverBudget)?;
                table.insert_unique(
                    hash,
                    Entry {
                        hash,
                        id: key.id,
                        off,
                        len,
                        known_version: version,
                        known,
                    },
                    |e| e.hash,
                );
                if !known {
                    return Err(RecordError::UnknownMeter);
                }
                key.id
            }
        };
        self.add(accs, touched, spill, id, qty, at_ms);
        Ok(())
    }

    /// Records through a kept key (no lookup).
    pub(crate) fn record_key(
        &self,
        key: &KeyInfo,
        qty: Decimal,
        at_ms: i64,
    ) -> Result<(), RecordError> {
        self.with_shard(|st| {
            let r = self.check_gate().and_then(|()| {
                if negative(&qty) {
                    return Err(RecordError::NegativeQuantity);
                }
                self.check_known(key)
            });
            match &r {
                Ok(()) => {
                    st.records += 1;
                    let ShardState {
                        accs,
                        touched,
                        spill,
                        ..
                    } = st;
                    self.add(accs, touched, spill, key.id, qty, at_ms);
                }
                Err(e) => st.errors[e.index()] += 1,
            }
            r
        })
    }

    fn add(
        &self,
        accs: &mut Vec<Acc>,
        touched: &mut Vec<u32>,
        spill: &mut Vec<(u32, Acc)>,
        id: u32,
        qty: Decimal,
        at_ms: i64,
    ) {
        let idx = id as usize;
        if idx >= accs.len() {
            accs.resize(idx + 1, Acc::EMPTY);
        }
        let acc = &mut accs[idx];
        if acc.count == 0 {
            *acc = Acc::one(qty, at_ms);
            touched.push(id);
            if touched.len() + spill.len() == SEAL_HINT_KEYS {
                self.hint();
            }
            return;
        }
        let sum = acc.sum.checked_add(qty);
        match sum {
            Some(sum) if acc.bucket == bucket_start(at_ms) => {
                acc.sum = sum;
                acc.count += 1;
                if at_ms >= acc.last_at {
                    acc.last = qty;
                    acc.last_at = at_ms;
                }
                acc.first_at = acc.first_at.min(at_ms);
            }
            // Another bucket, or a sum that would overflow: keep the old aggregate aside.
            _ => {
                spill.push((id, *acc));
                *acc = Acc::one(qty, at_ms);
            }
        }
    }

    /// Asks the sealer to seal early.
    pub(crate) fn hint(&self) {
        self.seal_hint.store(true, Ordering::Relaxed);
        self.wake_sealer();
    }

    /// Wakes the sealer thread (allocates nothing).
    pub(crate) fn wake_sealer(&self) {
        if let Some(t) = self.sealer.get() {
            t.unpark();
        }
    }

    /// Validates and interns a key (slow path; allocates).
    pub(crate) fn intern(
        &self,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
    ) -> Result<Arc<KeyInfo>, RecordError> {
        CustomerId::validate(customer).map_err(RecordError::InvalidCustomer)?;
        MeterName::validate(meter).map_err(RecordError::InvalidMeter)?;
        let canonical =
            Dimensions::from_strs(dims.iter().copied()).map_err(RecordError::InvalidDimensions)?;
        let owned = (
            customer.to_owned(),
            meter.to_owned(),
            dims.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>(),
        );
        let mut interner = lock(&self.interner);
        if let Some(k) = interner.map.get(&owned) {
            return Ok(k.clone());
        }
        let id = u32::try_from(interner.keys.len()).map_err(|_| RecordError::OverBudget)?;
        let key = Arc::new(KeyInfo {
            id,
            customer: CustomerId::new(customer).map_err(RecordError::InvalidCustomer)?,
            meter: MeterName::new(meter).map_err(RecordError::InvalidMeter)?,
            dims: canonical,
            known_version: AtomicU64::new(u64::MAX),
            known: AtomicBool::new(true),
        });
        interner.keys.push(key.clone());
        interner.map.insert(owned, key.clone());
        Ok(key)
    }

    /// Takes every accumulator filled since the last drain, as deltas. Shards of exited threads
    /// are drained one last time and dropped.
    pub(crate) fn drain(&self) -> Vec<Delta> {
        let mut raw: Vec<(u32, Acc)> = Vec::new();
        {
            let mut shards = lock(&self.shards);
            let mut retired = lock(&self.retired_counts);
            shards.retain(|s| {
                drain_shard(s, &mut raw);
                // Only the registry holds it: its thread has exited.
                let alive = Arc::strong_count(s) > 1;
                if !alive {
                    retired.add(&s.state.lock());
                }
                alive
            });
            drain_shard(&self.fallback, &mut raw);
        }
        if raw.is_empty() {
            return Vec::new();
        }
        let interner = lock(&self.interner);
        raw.into_iter()
            .filter_map(|(id, a)| {
                let k = interner.keys.get(id as usize)?;
                Some(Delta {
                    customer: k.customer.clone(),
                    meter: k.meter.clone(),
                    dimensions: k.dims.clone(),
                    bucket_start_ms: a.bucket,
                    sum: a.sum,
                    count: a.count,
                    last: a.last,
                    first_at_ms: a.first_at,
                    last_at_ms: a.last_at,
                })
            })
            .collect()
    }

    /// Calls and errors so far, summed over every shard.
    pub(crate) fn counts(&self) -> Counts {
        let mut c = *lock(&self.retired_counts);
        for s in lock(&self.shards).iter() {
            c.add(&s.state.lock());
        }
        c.add(&self.fallback.state.lock());
        c
    }

    /// Counts an error that happened outside a shard (e.g. in `record_event`).
    pub(crate) fn count_error(&self, e: &RecordError) {
        self.with_shard(|st| st.errors[e.index()] += 1);
    }

    /// Counts a call that was recorded outside a shard.
    pub(crate) fn count_record(&self) {
        self.with_shard(|st| st.records += 1);
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        for s in lock(&self.shards).iter() {
            s.retired.store(true, Ordering::Relaxed);
        }
    }
}

fn drain_shard(s: &Shard, out: &mut Vec<(u32, Acc)>) {
    let mut st = s.state.lock();
    let ShardState {
        accs,
        touched,
        spill,
        ..
    } = &mut *st;
    out.append(spill);
    for &id in touched.iter() {
        if let Some(a) = accs.get_mut(id as usize) {
            let taken = std::mem::replace(a, Acc::EMPTY);
            if taken.count > 0 {
                out.push((id, taken));
            }
        }
    }
    touched.clear();
}

fn key_hash(h: &DefaultHashBuilder, customer: &str, meter: &str, dims: &[(&str, &str)]) -> u64 {
    let mut s = h.build_hasher();
    s.write(customer.as_bytes());
    s.write_u8(0xff);
    s.write(meter.as_bytes());
    for (k, v) in dims {
        s.write_u8(0xfe);
        s.write(k.as_bytes());
        s.write_u8(0xfd);
        s.write(v.as_bytes());
    }
    s.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sum_of(deltas: &[Delta]) -> Decimal {
        deltas.iter().map(|d| d.sum).sum()
    }

    #[test]
    fn accumulators_keep_bucket_edges_exact() {
        let t = 1_699_999_980_000 + 59_999; // last ms of a bucket
        let a = Aggregator::new();
        a.record("c", "m", &[], Decimal::ONE, t).unwrap();
        a.record("c", "m", &[], Decimal::TWO, t - 59_999).unwrap();
        a.record("c", "m", &[], Decimal::TEN, t + 1).unwrap(); // next bucket
        let mut d = a.drain();
        d.sort_by_key(|d| d.bucket_start_ms);
        assert_eq!((d[0].first_at_ms, d[0].last_at_ms), (t - 59_999, t));
        assert_eq!((d[0].last, d[0].count), (Decimal::ONE, 2));
        assert_eq!((d[1].first_at_ms, d[1].sum), (t + 1, Decimal::TEN));
        for x in &d {
            x.validate().unwrap();
        }
    }

    #[test]
    fn key_encoding_is_unambiguous() {
        let mut b = Vec::new();
        encode_key(&mut b, "ab", "c", &[("k", "v")]);
        assert!(key_matches(&b, "ab", "c", &[("k", "v")]));
        assert!(!key_matches(&b, "a", "bc", &[("k", "v")]));
        assert!(!key_matches(&b, "ab", "c", &[]));
        assert!(!key_matches(&b, "ab", "c", &[("k", "v"), ("k", "v")]));
        assert!(!key_matches(&b, "ab", "c", &[("kv", "")]));
    }

    #[test]
    fn aggregates_per_key_and_bucket() {
        let a = Aggregator::new();
        let t = 1_700_000_000_000;
        a.record("acme", "api_calls", &[], Decimal::ONE, t).unwrap();
        a.record("acme", "api_calls", &[], Decimal::TWO, t + 5)
            .unwrap();
        a.record("acme", "api_calls", &[], Decimal::TEN, t + 60_000)
            .unwrap();
        a.record("acme", "tokens", &[("model", "gpt")], Decimal::ONE, t)
            .unwrap();
        let mut d = a.drain();
        d.sort_by_key(|d| (d.meter.clone(), d.bucket_start_ms));
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].sum, Decimal::from(3));
        assert_eq!(d[0].count, 2);
        assert_eq!(d[0].last, Decimal::TWO);
        assert_eq!((d[0].first_at_ms, d[0].last_at_ms), (t, t + 5));
        assert_eq!(d[1].sum, Decimal::TEN);
        assert_eq!(d[2].dimensions.pairs().len(), 1);
        assert!(a.drain().is_empty());
        assert_eq!(a.counts().records, 4);
    }

    #[test]
    fn errors_are_typed_and_counted() {
        let a = Aggregator::new();
        let t = 0;
        let e = |c, m, q| a.record(c, m, &[], q, t).unwrap_err();
        assert!(matches!(
            e("", "m", Decimal::ONE),
            RecordError::InvalidCustomer(_)
        ));
        assert!(matches!(
            e("c", "Bad", Decimal::ONE),
            RecordError::InvalidMeter(_)
        ));
        assert_eq!(
            e("c", "m", Decimal::NEGATIVE_ONE),
            RecordError::NegativeQuantity
        );
        assert!(matches!(
            a.record("c", "m", &[("k", "1"), ("k", "2")], Decimal::ONE, t),
            Err(RecordError::InvalidDimensions(_))
        ));
        a.record("c", "m", &[], Decimal::ZERO, t).unwrap();
        a.set_gate(GATE_OVER_BUDGET);
        assert_eq!(e("c", "m", Decimal::ONE), RecordError::OverBudget);
        a.set_gate(GATE_CLOSED);
        a.set_gate(GATE_OPEN);
        assert_eq!(e("c", "m", Decimal::ONE), RecordError::Closed);
        let c = a.counts();
        assert_eq!(c.records, 1);
        assert_eq!(c.errors.iter().sum::<u64>(), 6);
    }

    #[test]
    fn unknown_meter_once_catalog_is_known() {
        let a = Aggregator::new();
        a.record("c", "api_calls", &[], Decimal::ONE, 0).unwrap();
        a.record("c", "other", &[], Decimal::ONE, 0).unwrap();
        let mut cat = Catalog {
            version: 3,
            ..Catalog::default()
        };
        let def = tally_protocol::catalog::MeterDef {
            name: MeterName::new("api_calls").unwrap(),
            aggregation: tally_protocol::catalog::Aggregation::Sum,
            event_type: "api_call".into(),
            value_property: Some("$.count".into()),
            group_by: Default::default(),
            stripe_event_name: None,
            stripe_unit_scale: Decimal::ONE,
        };
        cat.meters = tally_protocol::bounded::BoundedVec::new(vec![def]).unwrap();
        a.set_catalog(cat);
        a.record("c", "api_calls", &[], Decimal::ONE, 0).unwrap();
        assert_eq!(
            a.record("c", "other", &[], Decimal::ONE, 0),
            Err(RecordError::UnknownMeter)
        );
        assert_eq!(sum_of(&a.drain()), Decimal::from(3));
    }

    #[test]
    fn sealer_and_owner_race() {
        // One thread records while another drains as fast as it can: nothing is lost or
        // counted twice.
        let a = Arc::new(Aggregator::new());
        let stop = Arc::new(AtomicBool::new(false));
        let drainer = {
            let (a, stop) = (a.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut total = Decimal::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    total += sum_of(&a.drain());
                }
                total
            })
        };
        for i in 0..200_000u32 {
            let c = if i % 2 == 0 { "a" } else { "b" };
            a.record(c, "m", &[], Decimal::new(1, 2), 0).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let total = drainer.join().unwrap() + sum_of(&a.drain());
        assert_eq!(total, Decimal::from(2000));
    }

    #[test]
    fn threads_get_their_own_shards_and_sum_exactly() {
        let a = Arc::new(Aggregator::new());
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for j in 0..1000 {
                        let c = format!("c{}", j % 10);
                        a.record(&c, "m", &[], Decimal::new(i + 1, 1), 0).unwrap();
                    }
                })
            })
            .collect();
        let mut total = Decimal::ZERO;
        for h in hs {
            total += sum_of(&a.drain());
            h.join().unwrap();
        }
        total += sum_of(&a.drain());
        // 1000 × (0.1 + 0.2 + 0.3 + 0.4)
        assert_eq!(total, Decimal::from(1000));
        assert_eq!(a.counts().records, 4000);
        // The exited threads' shards were dropped from the registry, their counts kept.
        a.drain();
        assert_eq!(lock(&a.shards).len(), 0);
        assert_eq!(a.counts().records, 4000);
    }
}
