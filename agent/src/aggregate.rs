//! The hot path: aggregation of `record()` calls into per-thread shards.
//!
//! Owns: the key interner (customer, meter, dimensions → a dense `u32` id) and one shard per
//! recording thread. A shard holds a table from the key's text to its id, one accumulator per
//! id, and the ids touched since the last drain.
//!
//! Guarantees:
//! - A call does no I/O and never waits on another recording thread. It takes the lock of its
//!   own thread's shard, which only that thread and the sealer (once per `flush_interval`, for
//!   the microseconds of a drain) or a metrics scrape ever take; the owner takes it with plain
//!   stores, the others with a swap and a process-wide barrier (`membarrier`, decision 0087).
//!   Shards are separate, 128-byte aligned allocations, so two threads never write the same
//!   cache line. No lock or counter is shared between recording threads.
//! - The thread's shard is found through a thread-local pointer (one load, no borrow), the key
//!   by a seeded multiply hash over customer, meter and dimensions (one multiply per 16 bytes)
//!   and compared with inline loads, not `memcmp` calls.
//! - Once a key has been seen by a thread, a call allocates nothing: the key is found by a hash
//!   of the borrowed strings and compared against its bytes in the shard's arena, the
//!   accumulator is updated in place, and the touched list and the spill list keep their
//!   capacity across drains.
//! - Counts of calls and errors are plain per-shard integers, summed when drained or scraped.
//! - A quantity is counted in exactly one drain: the sealer takes each accumulator under the
//!   shard's lock and resets it.
//! - Keys are validated once, on first sight; the catalog check is re-run only when the catalog
//!   version changes. A caller that keeps a [`KeyCache`] (an entitlement meter slot) records by
//!   the cached id and check while the catalog generation is unchanged (decision 0112).

use crate::error::{RECORD_ERROR_KINDS, RecordError};
use hashbrown::{DefaultHashBuilder, HashTable};
use rust_decimal::Decimal;
use std::cell::{Cell, RefCell, UnsafeCell};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use tally_protocol::batch::{BUCKET_MS, Delta, bucket_start};
use tally_protocol::catalog::Catalog;
use tally_protocol::names::{CustomerId, Dimensions, MAX_DIMENSIONS, MeterName};

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

/// A usage key's id and its catalog check as of one catalog generation, in one word kept by
/// whoever records through the key often (a meter slot keeps it in the line its take reads;
/// decision 0112): `SET | generation (30 bits) << 33 | known << 32 | id`; 0 until resolved.
/// Generations wrap after 2^30 catalog changes in one process (decades at one a second).
#[derive(Debug, Default)]
pub(crate) struct KeyCache(AtomicU64);

const CACHE_SET: u64 = 1 << 63;
const GEN_MASK: u64 = (1 << 30) - 1;

impl KeyCache {
    /// The key's id once resolved (ids never change; the catalog check may).
    pub(crate) fn id(&self) -> Option<u32> {
        let w = self.0.load(Ordering::Relaxed);
        (w & CACHE_SET != 0).then_some(w as u32)
    }

    #[inline(always)]
    fn word(generation: u64, known: bool, id: u32) -> u64 {
        CACHE_SET | ((generation & GEN_MASK) << 33) | (u64::from(known) << 32) | u64::from(id)
    }
}

/// A validated, interned key as a caller that keeps it holds it (a [`Counter`] or an
/// entitlement meter slot): its id and names, and its catalog check. Built by
/// [`Aggregator::intern`] for such a caller; the agent itself keeps a key only as its text in
/// the [`Interner`] (decision 0131).
///
/// [`Counter`]: crate::Counter
#[derive(Debug)]
pub(crate) struct KeyInfo {
    pub(crate) id: u32,
    pub(crate) customer: CustomerId,
    pub(crate) meter: MeterName,
    /// Catalog version `known` was computed for.
    known_version: AtomicU64,
    known: AtomicBool,
}

/// The aggregate of one key in one bucket since the last drain, in 48 bytes, so that it and its
/// key's shard data share one cache line ([`Slot`]). `count == 0` means empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acc {
    /// Start of the bucket, ms since the epoch.
    pub(crate) bucket: i64,
    pub(crate) sum: Decimal,
    pub(crate) last: Decimal,
    /// Calls folded in. A key's 2^32nd call in one bucket starts a new aggregate (the full one
    /// is kept aside, as for a sum that would not fit), so no count is ever lost.
    pub(crate) count: u32,
    /// `first_at - bucket` and `last_at - bucket` (a bucket is 60,000 ms, under 2^16).
    first_off: u16,
    last_off: u16,
}

// The offsets in the bucket fit their u16s.
const _: () = assert!(BUCKET_MS > 0 && BUCKET_MS <= 1 << 16);

impl Acc {
    const EMPTY: Acc = Acc {
        bucket: 0,
        sum: Decimal::ZERO,
        last: Decimal::ZERO,
        count: 0,
        first_off: 0,
        last_off: 0,
    };

    fn one(qty: Decimal, at_ms: i64) -> Acc {
        let bucket = bucket_start(at_ms);
        // In `0..BUCKET_MS` (the bucket holds `at_ms`), so it fits.
        let off = at_ms.wrapping_sub(bucket) as u16;
        Acc {
            bucket,
            sum: qty,
            last: qty,
            count: 1,
            first_off: off,
            last_off: off,
        }
    }

    pub(crate) fn first_at(&self) -> i64 {
        self.bucket.wrapping_add(i64::from(self.first_off))
    }

    pub(crate) fn last_at(&self) -> i64 {
        self.bucket.wrapping_add(i64::from(self.last_off))
    }
}

/// What a shard keeps per key id: the accumulator and, for a key this shard has looked up by
/// its text, where that text is in the arena and the key's catalog check. One cache line, so a
/// `record()` touches the table (8 bytes an entry, small enough to stay cached), this line and
/// the key's bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Slot {
    acc: Acc,
    /// The key's bytes in the shard's arena: customer 0xff meter (0xfe key 0xfd value)*.
    /// These separators never occur in UTF-8, so the encoding is unambiguous.
    off: u32,
    /// At most 128 + 1 + 64 + 4 × (2 + 64 + 256) bytes; 0 while the shard has not stored the
    /// key's text (an encoding is never empty).
    len: u16,
    known: bool,
    /// Low 32 bits of the catalog generation `known` was computed for (a false match needs
    /// exactly 2^32 catalog changes between two lookups of the key).
    known_gen: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

impl Slot {
    const EMPTY: Slot = Slot {
        acc: Acc::EMPTY,
        off: 0,
        len: 0,
        known: false,
        known_gen: 0,
    };
}

struct ShardState {
    /// The key hash's secret seed (random per shard).
    seed: u64,
    /// Key text → id (16k entries for 10k keys: 128 KiB). The text lives in `arena`, where the
    /// id's [`Slot`] says.
    table: KeyTable,
    arena: Vec<u8>,
    /// By key id (the agent's, so a [`KeyCache`] id indexes it directly).
    slots: Vec<Slot>,
    touched: Vec<u32>,
    spill: Vec<(u32, Acc)>,
    records: u64,
    errors: [u64; RECORD_ERROR_KINDS],
}

impl ShardState {
    /// Counts a call: recorded, or failed with its error's kind.
    #[inline(always)]
    fn count(&mut self, r: &Result<(), RecordError>) {
        match r {
            Ok(()) => self.records += 1,
            Err(e) => self.errors[e.index()] += 1,
        }
    }

    fn new() -> Self {
        ShardState {
            seed: DefaultHashBuilder::default().hash_one(0x7a11_u64),
            table: KeyTable::new(),
            arena: Vec::new(),
            slots: Vec::new(),
            touched: Vec::new(),
            spill: Vec::with_capacity(64),
            records: 0,
            errors: [0; RECORD_ERROR_KINDS],
        }
    }
}

impl Slot {
    /// The key's bytes, if this shard stored them.
    #[inline(always)]
    fn key<'a>(&self, arena: &'a [u8]) -> Option<&'a [u8]> {
        let off = self.off as usize;
        arena.get(off..off + usize::from(self.len))
    }

    /// Whether this entry is the key (`customer`, `meter`) without dimensions.
    #[inline(always)]
    fn is_plain(&self, arena: &[u8], customer: &str, meter: &str) -> bool {
        let (c, m) = (customer.as_bytes(), meter.as_bytes());
        // The stored key is `c 0xff m` exactly when it has this length, starts with `c` and ends
        // with `m`: neither holds 0xff, 0xfe or 0xfd (not UTF-8), so the stored key's one 0xff
        // is the byte between them and it has no dimension after `m`.
        usize::from(self.len) == c.len() + 1 + m.len()
            && self.key(arena).is_some_and(|k| {
                k.get(..c.len()).is_some_and(|b| bytes_eq(b, c))
                    && k.get(c.len() + 1..).is_some_and(|b| bytes_eq(b, m))
            })
    }
}

/// Byte equality of short names without a call to `memcmp`: two overlapping loads of each
/// (names are mostly 4–32 bytes, where the call's overhead is most of the comparison).
#[inline(always)]
pub(crate) fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a.first() == b.first() && a.get(n / 2) == b.get(n / 2) && a.last() == b.last(),
        4..=7 => {
            a.first_chunk::<4>() == b.first_chunk::<4>()
                && a.last_chunk::<4>() == b.last_chunk::<4>()
        }
        8..=16 => {
            a.first_chunk::<8>() == b.first_chunk::<8>()
                && a.last_chunk::<8>() == b.last_chunk::<8>()
        }
        17..=32 => {
            a.first_chunk::<16>() == b.first_chunk::<16>()
                && a.last_chunk::<16>() == b.last_chunk::<16>()
        }
        _ => a == b,
    }
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

/// A shard's table from a key's text to its id: insert-only open addressing with linear probing
/// over 8-byte entries `tag << 32 | id` (the tag is the hash's high half, so a probe compares
/// a key's bytes only on a 32-bit match), at most 3/4 full. Written here rather than taken
/// from hashbrown, whose lookup calls the comparison through a `dyn FnMut`: a call, its spills
/// and ~60 instructions per `record()`.
struct KeyTable {
    /// A power of two in length, or empty.
    entries: Vec<u64>,
    len: usize,
}

/// An unused entry: no key has id `u32::MAX` ([`KeyTable::insert`] refuses it).
const NO_ENTRY: u64 = u64::MAX;

impl KeyTable {
    const fn new() -> Self {
        KeyTable {
            entries: Vec::new(),
            len: 0,
        }
    }

    /// The id of the key with `hash` for which `eq` holds.
    #[inline(always)]
    fn find(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.entries.len().wrapping_sub(1);
        let tag = hash >> 32;
        let mut i = hash as usize & mask;
        // Ends: at most 3/4 of the entries are used, so an unused one comes (and an empty
        // table's `get` gives `None` at once).
        loop {
            let e = *self.entries.get(i)?;
            if e == NO_ENTRY {
                return None;
            }
            if e >> 32 == tag && eq(e as u32) {
                return Some(e as u32);
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds key `id` (not in the table) with `hash`; growing rehashes every key with `rehash`.
    fn insert(
        &mut self,
        hash: u64,
        id: u32,
        rehash: impl Fn(u32) -> u64,
    ) -> Result<(), RecordError> {
        if id == u32::MAX {
            return Err(RecordError::OverBudget);
        }
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            let cap = (self.entries.len() * 2).max(16);
            let old = std::mem::replace(&mut self.entries, vec![NO_ENTRY; cap]);
            for e in old.into_iter().filter(|&e| e != NO_ENTRY) {
                self.place(rehash(e as u32), e as u32);
            }
        }
        self.place(hash, id);
        self.len += 1;
        Ok(())
    }

    fn place(&mut self, hash: u64, id: u32) {
        let mask = self.entries.len().wrapping_sub(1);
        let mut i = hash as usize & mask;
        while let Some(e) = self.entries.get_mut(i) {
            if *e == NO_ENTRY {
                *e = (hash & !u64::from(u32::MAX)) | u64::from(id);
                return;
            }
            i = (i + 1) & mask;
        }
    }
}

/// The parts of a shard that a key's first sight changes.
struct Insert<'s> {
    seed: u64,
    table: &'s mut KeyTable,
    arena: &'s mut Vec<u8>,
    slots: &'s mut Vec<Slot>,
}

/// The table hash of the key stored for `id` (what [`key_hash`] gave for it), from its bytes in
/// the arena. Only the table's growth asks for it.
fn stored_hash(seed: u64, slots: &[Slot], arena: &[u8], id: u32) -> u64 {
    slots
        .get(id as usize)
        .and_then(|s| s.key(arena))
        .map_or(0, |b| encoded_hash(seed, b))
}

/// [`key_hash`] of an [`encode_key`] encoding: the same pieces, split at the separators.
fn encoded_hash(seed: u64, bytes: &[u8]) -> u64 {
    let (customer, rest) = match bytes.iter().position(|&b| b == 0xff) {
        Some(i) => (bytes.get(..i).unwrap_or_default(), bytes.get(i + 1..)),
        None => (bytes, None),
    };
    let mut h = piece(seed, customer);
    // Meter, then each dimension's key and value.
    for p in rest.unwrap_or_default().split(|&b| b == 0xfe || b == 0xfd) {
        h = piece(h, p);
    }
    h
}

/// One thread's shard. Aligned so that two shards never share a cache line.
#[repr(align(128))]
struct Shard {
    state: ShardCell,
    retired: AtomicBool,
}

/// A minimal lock around a shard's state, asymmetric (decision 0087): its owning thread takes
/// it with plain stores, everyone else (the sealer, a metrics scrape) with an atomic swap and a
/// process-wide barrier.
///
/// The owner marks itself `busy` with a plain store and then reads `locked`; another thread sets
/// `locked` with a swap, then runs `membarrier(PRIVATE_EXPEDITED)`, which makes every running
/// thread of the process execute a full memory barrier, and then waits for `busy` to clear. So
/// either the owner sees `locked` (and waits on the swap like anyone else) or the other thread
/// sees `busy` (and waits for the owner's call to end): never both inside. The owner's call thus
/// has no locked instruction; the cost moves to the sealer, once per shard per drain (a few µs).
/// Where `membarrier` is missing (not Linux, or refused) the owner swaps too. A waiter spins
/// briefly and then yields; it never sleeps in the kernel.
struct ShardCell {
    locked: AtomicBool,
    /// The owner is inside without `locked` (only when [`asymmetric`] holds).
    busy: AtomicBool,
    state: UnsafeCell<ShardState>,
}

// SAFETY: `state` is only reached through a `ShardGuard`, which exists only while the cell is
// held: either `locked` (taken with an `Acquire` swap, released with a `Release` store) or, for
// the owning thread only, `busy` under the asymmetric protocol above (`busy` cleared with
// `Release`, read with `Acquire` by the waiter; the owner reads `locked` with `Acquire`). So
// accesses from different threads never overlap and each sees the previous holder's writes.
// `ShardState` is `Send`. Exercised by `tests::sealer_and_owner_race`,
// `tests::threads_get_their_own_shards_and_sum_exactly` and `tests::scrape_and_owner_race`.
unsafe impl Sync for ShardCell {}

use crate::asym::{asymmetric, init_asymmetric, membarrier};

impl ShardCell {
    fn new(state: ShardState) -> Self {
        ShardCell {
            locked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            state: UnsafeCell::new(state),
        }
    }

    /// Locks from the shard's owning thread (the one whose `LOCAL` holds it): no locked
    /// instruction when uncontended.
    #[inline(always)]
    fn lock_owned(&self) -> ShardGuard<'_> {
        if asymmetric() {
            self.busy.store(true, Ordering::Relaxed);
            // With the other side's membarrier this orders the store above before the load
            // below (the compiler must not reorder them; the CPU is made to by the barrier).
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            if !self.locked.load(Ordering::Acquire) {
                return ShardGuard {
                    cell: self,
                    owner: true,
                };
            }
            self.busy.store(false, Ordering::Release);
        }
        self.take_locked();
        ShardGuard {
            cell: self,
            owner: false,
        }
    }

    /// Locks from any thread.
    #[inline]
    fn lock(&self) -> ShardGuard<'_> {
        self.take_locked();
        if asymmetric() {
            membarrier::barrier();
            let mut spins = 0u32;
            while self.busy.load(Ordering::Acquire) {
                spins += 1;
                if spins < 128 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        ShardGuard {
            cell: self,
            owner: false,
        }
    }

    #[inline]
    fn take_locked(&self) {
        if self.locked.swap(true, Ordering::Acquire) {
            self.lock_contended();
        }
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
    /// Held through `busy` (the owner's path), not `locked`.
    owner: bool,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = ShardState;
    fn deref(&self) -> &ShardState {
        // SAFETY: the guard holds the cell, so no other reference to the state exists.
        unsafe { &*self.cell.state.get() }
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut ShardState {
        // SAFETY: the guard holds the cell, so no other reference to the state exists.
        unsafe { &mut *self.cell.state.get() }
    }
}

impl Drop for ShardGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.owner {
            self.cell.busy.store(false, Ordering::Release);
        } else {
            self.cell.locked.store(false, Ordering::Release);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This thread's shards, one per live aggregator (usually one). Dropping it (the thread's exit)
/// clears [`CURRENT`] first, so that never names a shard this thread no longer holds.
struct Local(Vec<(u64, Arc<Shard>)>);

impl Drop for Local {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|c| c.set((0, std::ptr::null())));
    }
}

thread_local! {
    static LOCAL: RefCell<Local> = const { RefCell::new(Local(Vec::new())) };
    /// The shard of the aggregator this thread recorded into last, as (aggregator uid, shard):
    /// a `Cell` without a destructor, so reading it is one TLS load with no state check and no
    /// `RefCell` borrow. Invariant: when the uid is not 0, `LOCAL` holds an `Arc` of the shard
    /// (both are set together, and `Local`'s drop clears this before releasing the `Arc`s).
    static CURRENT: Cell<(u64, *const Shard)> = const { Cell::new((0, std::ptr::null())) };
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// Every key the agent has seen, once each, as the text a shard's arena holds
/// ([`encode_key`]: customer, meter and dimensions in the caller's order), one after another in
/// `text`; ids are dense, in order of first sight. Per key: its bytes, a 4-byte start and a 4-byte
/// id in the table (at most 7/8 full), nothing else: the names a sealed delta carries are built
/// from the text when the key is drained (decision 0131).
struct Interner {
    /// The table hash's secret seed.
    seed: u64,
    /// Ids, hashed by [`key_hash`] of their text (recomputed from `text` when the table grows).
    table: HashTable<u32>,
    /// Where key `id`'s text starts in `text`; it ends where the next key's starts.
    starts: Vec<u32>,
    text: Vec<u8>,
}

impl Interner {
    fn new() -> Self {
        Interner {
            seed: DefaultHashBuilder::default().hash_one(0x1d5_u64),
            table: HashTable::new(),
            starts: Vec::new(),
            text: Vec::new(),
        }
    }

    /// Keys interned so far.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.starts.len()
    }

    /// The text of key `id`.
    fn key(&self, id: u32) -> Option<&[u8]> {
        key_text(&self.starts, &self.text, id)
    }

    /// The id of the key (validated by the caller), interning it on first sight.
    fn id(
        &mut self,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
    ) -> Result<u32, RecordError> {
        let hash = key_hash(self.seed, customer, meter, dims);
        let Interner {
            seed,
            table,
            starts,
            text,
        } = self;
        if let Some(&id) = table.find(hash, |&id| {
            key_text(starts, text, id).is_some_and(|b| key_matches(b, customer, meter, dims))
        }) {
            return Ok(id);
        }
        // `u32::MAX` is the shards' empty table entry: no key has it.
        let id = u32::try_from(starts.len())
            .ok()
            .filter(|&id| id != u32::MAX)
            .ok_or(RecordError::OverBudget)?;
        // Starts are 4 bytes: at most 4 GiB of key text (millions of the longest keys). The
        // key's end fitting implies its start does.
        let start = text.len();
        u32::try_from(start + key_len(customer, meter, dims))
            .map_err(|_| RecordError::OverBudget)?;
        encode_key(text, customer, meter, dims);
        starts.push(start as u32);
        let seed = *seed;
        table.insert_unique(hash, id, |&id| {
            key_text(starts, text, id).map_or(0, |b| encoded_hash(seed, b))
        });
        Ok(id)
    }
}

/// The text of key `id` in an [`Interner`]'s `starts` and `text`.
fn key_text<'t>(starts: &[u32], text: &'t [u8], id: u32) -> Option<&'t [u8]> {
    let id = id as usize;
    let start = *starts.get(id)? as usize;
    let end = starts.get(id + 1).map_or(text.len(), |&e| e as usize);
    text.get(start..end)
}

/// The names of a key from its [`encode_key`] text, dimensions in canonical order: what a
/// sealed delta carries. `None` only if the text is not an encoding of a valid key, which the
/// interner never stores (it validates before it stores).
fn decode_key(bytes: &[u8]) -> Option<(CustomerId, MeterName, Dimensions)> {
    fn text(b: &[u8]) -> Option<&str> {
        std::str::from_utf8(b).ok()
    }
    let sep = bytes.iter().position(|&b| b == 0xff)?;
    let customer = text(bytes.get(..sep)?)?;
    let mut fields = bytes.get(sep + 1..)?.split(|&b| b == 0xfe);
    let meter = text(fields.next()?)?;
    let mut pairs = [("", ""); MAX_DIMENSIONS];
    let mut n = 0;
    for f in fields {
        let mut kv = f.splitn(2, |&b| b == 0xfd);
        *pairs.get_mut(n)? = (text(kv.next()?)?, text(kv.next()?)?);
        n += 1;
    }
    Some((
        CustomerId::new(customer).ok()?,
        MeterName::new(meter).ok()?,
        Dimensions::from_strs(pairs.get(..n)?.iter().copied()).ok()?,
    ))
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
    /// Bumped by every catalog change (after `catalog_version`): what a [`KeyCache`] was
    /// resolved for.
    catalog_gen: AtomicU64,
    seal_hint: AtomicBool,
    sealer: OnceLock<std::thread::Thread>,
}

/// `a + b` exactly, or `None` when it does not fit in a `Decimal` at that scale. The usual case
/// (two non-negative quantities of one scale) is one 128-bit add; otherwise
/// `Decimal::checked_add`. `None` keeps the old aggregate aside, so a sum is never rounded.
#[inline(always)]
fn add_exact(a: Decimal, b: Decimal) -> Option<Decimal> {
    if a.scale() == b.scale() && !a.is_sign_negative() && !b.is_sign_negative() {
        // Each mantissa is below 2^96: the i128 sum cannot overflow.
        return Decimal::try_from_i128_with_scale(a.mantissa() + b.mantissa(), a.scale()).ok();
    }
    let sum = a.checked_add(b)?;
    // `checked_add` may round to fit (a lower scale); refuse that instead.
    (sum - a == b).then_some(sum)
}

fn negative(q: &Decimal) -> bool {
    q.is_sign_negative() && !q.is_zero()
}

impl Aggregator {
    pub(crate) fn new() -> Self {
        init_asymmetric();
        Aggregator {
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::new(Vec::new()),
            retired_counts: Mutex::new(Counts::default()),
            fallback: Shard {
                state: ShardCell::new(ShardState::new()),
                retired: AtomicBool::new(false),
            },
            interner: Mutex::new(Interner::new()),
            gate: AtomicU8::new(GATE_OPEN),
            catalog: RwLock::new(None),
            catalog_version: AtomicU64::new(0),
            catalog_gen: AtomicU64::new(0),
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
        self.catalog_gen.fetch_add(1, Ordering::AcqRel);
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

    #[inline]
    fn with_shard<R>(&self, f: impl FnOnce(&mut ShardState) -> R) -> R {
        match self.current_shard() {
            Some(shard) => f(&mut shard.state.lock_owned()),
            None => self.with_shard_slow(f),
        }
    }

    /// This thread's shard of this aggregator, if it is the one it used last (one TLS load).
    /// The reference is for the current call only: do not keep it across a call that may
    /// reach `with_shard_slow`.
    #[inline(always)]
    fn current_shard(&self) -> Option<&Shard> {
        let (uid, shard) = CURRENT.with(Cell::get);
        // SAFETY: `CURRENT` names a shard that this thread's `LOCAL` holds an `Arc` of (see
        // its invariant), so it is alive for this call: `LOCAL` is only changed by this
        // thread, in `with_shard_slow`, which does not run meanwhile. Uids are never
        // reused, so a shard of a dropped aggregator is never matched. Exercised by
        // `tests::threads_get_their_own_shards_and_sum_exactly` and
        // `tests::two_aggregators_on_one_thread_keep_their_own_shards`.
        (uid == self.uid).then(|| unsafe { &*shard })
    }

    #[cold]
    fn with_shard_slow<R>(&self, f: impl FnOnce(&mut ShardState) -> R) -> R {
        let mut f = Some(f);
        let r = LOCAL.try_with(|local| {
            let s = {
                let mut l = local.borrow_mut();
                match l.0.iter().find(|(u, _)| *u == self.uid) {
                    Some((_, s)) => s.clone(),
                    None => {
                        let s = Arc::new(Shard {
                            state: ShardCell::new(ShardState::new()),
                            retired: AtomicBool::new(false),
                        });
                        lock(&self.shards).push(s.clone());
                        l.0.retain(|(_, s)| !s.retired.load(Ordering::Relaxed));
                        l.0.push((self.uid, s.clone()));
                        s
                    }
                }
            };
            // `LOCAL` holds `s` (just found or pushed there).
            CURRENT.with(|c| c.set((self.uid, Arc::as_ptr(&s))));
            f.take().map(|f| f(&mut s.state.lock_owned()))
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
    #[inline(always)]
    pub(crate) fn record(
        &self,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
        qty: Decimal,
        at_ms: i64,
    ) -> Result<(), RecordError> {
        // Not through `with_shard`'s closure: inlined whole into the caller, the call builds
        // no closure and has one frame (~40 instructions fewer).
        match self.current_shard() {
            Some(shard) => self.record_counted(
                &mut shard.state.lock_owned(),
                customer,
                meter,
                dims,
                qty,
                at_ms,
            ),
            None => self
                .with_shard_slow(|st| self.record_counted(st, customer, meter, dims, qty, at_ms)),
        }
    }

    #[inline(always)]
    fn record_counted(
        &self,
        st: &mut ShardState,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
        qty: Decimal,
        at_ms: i64,
    ) -> Result<(), RecordError> {
        let r = self.record_in(st, customer, meter, dims, qty, at_ms);
        st.count(&r);
        r
    }

    #[inline(always)]
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
            seed,
            table,
            arena,
            slots,
            touched,
            spill,
            ..
        } = st;
        let hash = key_hash(*seed, customer, meter, dims);
        // Truncated: see `Slot::known_gen`.
        let generation = self.catalog_gen.load(Ordering::Acquire) as u32;
        let found = if dims.is_empty() {
            table.find(hash, |id| {
                slots
                    .get(id as usize)
                    .is_some_and(|s| s.is_plain(arena, customer, meter))
            })
        } else {
            table.find(hash, |id| {
                slots
                    .get(id as usize)
                    .and_then(|s| s.key(arena))
                    .is_some_and(|b| key_matches(b, customer, meter, dims))
            })
        };
        let (id, slot) = match found.and_then(|id| Some((id, slots.get_mut(id as usize)?))) {
            Some((id, slot)) => {
                if slot.known_gen != generation {
                    // The catalog as of now, at least as new as `generation`.
                    slot.known = self.meter_known(meter);
                    slot.known_gen = generation;
                }
                (id, slot)
            }
            None => self.insert(
                Insert {
                    seed: *seed,
                    table,
                    arena,
                    slots,
                },
                hash,
                generation,
                customer,
                meter,
                dims,
            )?,
        };
        if !slot.known {
            return Err(RecordError::UnknownMeter);
        }
        self.add(&mut slot.acc, id, touched, spill, qty, at_ms);
        Ok(())
    }

    /// First sight of a key in this shard: interns it (validating it), stores its text and
    /// catalog check and adds it to the table. Returns its id and slot.
    #[cold]
    #[inline(never)]
    fn insert<'s>(
        &self,
        at: Insert<'s>,
        hash: u64,
        generation: u32,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
    ) -> Result<(u32, &'s mut Slot), RecordError> {
        let Insert {
            seed,
            table,
            arena,
            slots,
        } = at;
        let id = self.intern_id(customer, meter, dims)?;
        let known = self.meter_known(meter);
        let off = u32::try_from(arena.len()).map_err(|_| RecordError::OverBudget)?;
        // Validated by `intern_id`: the key has at most ~1.5 kB.
        let len =
            u16::try_from(key_len(customer, meter, dims)).map_err(|_| RecordError::OverBudget)?;
        let idx = id as usize;
        if idx >= slots.len() {
            grow(slots, idx);
        }
        encode_key(arena, customer, meter, dims);
        let slot = slots.get_mut(idx).ok_or(RecordError::OverBudget)?;
        slot.off = off;
        slot.len = len;
        slot.known = known;
        slot.known_gen = generation;
        // Growing the table rehashes every key from its bytes.
        table.insert(hash, id, |id| stored_hash(seed, slots, arena, id))?;
        let slot = slots.get_mut(idx).ok_or(RecordError::OverBudget)?;
        Ok((id, slot))
    }

    /// Records through a kept key (no lookup).
    pub(crate) fn record_key(
        &self,
        key: &KeyInfo,
        qty: Decimal,
        at_ms: i64,
    ) -> Result<(), RecordError> {
        // The same errors in the same order as before: `record_id` checks the gate and the
        // sign before `known`.
        let known = self.check_known(key).is_ok();
        self.record_id(key.id, known, qty, at_ms)
    }

    /// Records through a key cached in `cache` (see [`KeyCache`]): while the catalog is the one
    /// it was resolved for, no lookup and no read of the key's [`KeyInfo`]; otherwise `key`
    /// gives the key (interned on first use), its catalog check runs and the cache is refreshed.
    #[inline]
    pub(crate) fn record_cached<'k>(
        &self,
        cache: &KeyCache,
        qty: Decimal,
        at_ms: i64,
        key: impl FnOnce() -> Result<&'k KeyInfo, RecordError>,
    ) -> Result<(), RecordError> {
        let generation = self.catalog_gen.load(Ordering::Acquire);
        let w = cache.0.load(Ordering::Relaxed);
        if w & !((1 << 33) - 1) != KeyCache::word(generation, false, 0) {
            return self.record_uncached(cache, generation, qty, at_ms, key);
        }
        self.record_id(w as u32, w & (1 << 32) != 0, qty, at_ms)
    }

    /// Asks the CPU to fetch the accumulator of key `id` in this thread's shard, so that a
    /// record a little later does not wait for it. A hint: does nothing on a thread without a
    /// shard yet, for an id the shard has not seen, or off x86-64.
    #[inline]
    pub(crate) fn prefetch(&self, id: u32) {
        let Some(shard) = self.current_shard() else {
            return;
        };
        let st = shard.state.lock_owned();
        if let Some(slot) = st.slots.get(id as usize) {
            prefetch_line(slot);
        }
    }

    /// Records under key `id`, whose meter the catalog knows (`known`) or not.
    #[inline(always)]
    fn record_id(&self, id: u32, known: bool, qty: Decimal, at_ms: i64) -> Result<(), RecordError> {
        self.with_shard(|st| {
            let r = self.check_gate().and_then(|()| {
                if negative(&qty) {
                    Err(RecordError::NegativeQuantity)
                } else if known {
                    Ok(())
                } else {
                    Err(RecordError::UnknownMeter)
                }
            });
            if r.is_ok() {
                let ShardState {
                    slots,
                    touched,
                    spill,
                    ..
                } = &mut *st;
                let idx = id as usize;
                if idx >= slots.len() {
                    grow(slots, idx);
                }
                if let Some(slot) = slots.get_mut(idx) {
                    self.add(&mut slot.acc, id, touched, spill, qty, at_ms);
                }
            }
            st.count(&r);
            r
        })
    }

    #[cold]
    fn record_uncached<'k>(
        &self,
        cache: &KeyCache,
        generation: u64,
        qty: Decimal,
        at_ms: i64,
        key: impl FnOnce() -> Result<&'k KeyInfo, RecordError>,
    ) -> Result<(), RecordError> {
        let key = key()?;
        // The check reads the catalog as of now, at least as new as `generation`: a newer one
        // has bumped the generation already, so the next call resolves again.
        let known = self.meter_known(key.meter.as_str());
        cache
            .0
            .store(KeyCache::word(generation, known, key.id), Ordering::Relaxed);
        self.record_id(key.id, known, qty, at_ms)
    }

    /// Folds `qty` at `at_ms` into the accumulator of key `id`.
    #[inline(always)]
    fn add(
        &self,
        acc: &mut Acc,
        id: u32,
        touched: &mut Vec<u32>,
        spill: &mut Vec<(u32, Acc)>,
        qty: Decimal,
        at_ms: i64,
    ) {
        // In the bucket exactly when in `0..BUCKET_MS` (no division on this path).
        let off = at_ms.wrapping_sub(acc.bucket) as u64;
        if off < BUCKET_MS as u64 && acc.count.wrapping_sub(1) < u32::MAX - 1 {
            // Non-empty, and one more call fits the count.
            if let Some(sum) = add_exact(acc.sum, qty) {
                let off = off as u16;
                acc.sum = sum;
                acc.count += 1;
                if off >= acc.last_off {
                    acc.last = qty;
                    acc.last_off = off;
                }
                acc.first_off = acc.first_off.min(off);
                return;
            }
        }
        self.add_other(acc, id, touched, spill, qty, at_ms);
    }

    /// [`Self::add`] into an empty accumulator, or one that cannot take `qty`: another bucket,
    /// a sum that would not fit, a full count. The old aggregate is kept aside, so nothing is
    /// rounded or lost.
    #[inline(never)]
    fn add_other(
        &self,
        acc: &mut Acc,
        id: u32,
        touched: &mut Vec<u32>,
        spill: &mut Vec<(u32, Acc)>,
        qty: Decimal,
        at_ms: i64,
    ) {
        if acc.count == 0 {
            touched.push(id);
        } else {
            spill.push((id, *acc));
        }
        *acc = Acc::one(qty, at_ms);
        if touched.len() + spill.len() == SEAL_HINT_KEYS {
            self.hint();
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

    /// Validates and interns a key, and builds its [`KeyInfo`] for a caller that keeps it
    /// (slow path; allocates).
    pub(crate) fn intern(
        &self,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
    ) -> Result<Arc<KeyInfo>, RecordError> {
        let id = self.intern_id(customer, meter, dims)?;
        Ok(Arc::new(KeyInfo {
            id,
            customer: CustomerId::new(customer).map_err(RecordError::InvalidCustomer)?,
            meter: MeterName::new(meter).map_err(RecordError::InvalidMeter)?,
            known_version: AtomicU64::new(u64::MAX),
            known: AtomicBool::new(true),
        }))
    }

    /// Validates and interns a key: its id (slow path; allocates only to store a new key).
    fn intern_id(
        &self,
        customer: &str,
        meter: &str,
        dims: &[(&str, &str)],
    ) -> Result<u32, RecordError> {
        CustomerId::validate(customer).map_err(RecordError::InvalidCustomer)?;
        MeterName::validate(meter).map_err(RecordError::InvalidMeter)?;
        // The canonical form is built again when the key is drained.
        Dimensions::from_strs(dims.iter().copied()).map_err(RecordError::InvalidDimensions)?;
        lock(&self.interner).id(customer, meter, dims)
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
                let Some((customer, meter, dimensions)) = interner.key(id).and_then(decode_key)
                else {
                    // Unreachable: ids come from the interner, which stores valid keys only.
                    tracing::error!(
                        id,
                        "a drained key is not in the interner; its usage is lost"
                    );
                    return None;
                };
                Some(Delta {
                    customer,
                    meter,
                    dimensions,
                    bucket_start_ms: a.bucket,
                    sum: a.sum,
                    count: u64::from(a.count),
                    last: a.last,
                    first_at_ms: a.first_at(),
                    last_at_ms: a.last_at(),
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

/// Makes room for the slot of key `idx` (the first record of a key in this shard).
#[cold]
fn grow(slots: &mut Vec<Slot>, idx: usize) {
    slots.resize(idx + 1, Slot::EMPTY);
}

fn drain_shard(s: &Shard, out: &mut Vec<(u32, Acc)>) {
    let mut st = s.state.lock();
    let ShardState {
        slots,
        touched,
        spill,
        ..
    } = &mut *st;
    out.append(spill);
    for &id in touched.iter() {
        if let Some(slot) = slots.get_mut(id as usize) {
            let taken = std::mem::replace(&mut slot.acc, Acc::EMPTY);
            if taken.count > 0 {
                out.push((id, taken));
            }
        }
    }
    touched.clear();
}

/// Starts fetching the cache line of `p` (a hint: no fault, no change to memory).
#[inline(always)]
pub(crate) fn prefetch_line<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of the x86-64 baseline, so the instruction exists; a prefetch
        // never faults and writes nothing, and `p` is a live reference anyway. Exercised by
        // every `Agent::try_consume` test (e.g. `tests/alloc.rs`, `tests/entitlements.rs`).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(p).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Bytes of [`encode_key`]'s encoding.
fn key_len(customer: &str, meter: &str, dims: &[(&str, &str)]) -> usize {
    customer.len()
        + 1
        + meter.len()
        + dims
            .iter()
            .map(|(k, v)| 2 + k.len() + v.len())
            .sum::<usize>()
}

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;

/// The folded 64 × 64 → 128-bit multiply (as foldhash and wyhash mix).
#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

#[inline(always)]
fn le8(b: Option<&[u8; 8]>) -> u64 {
    b.map_or(0, |b| u64::from_le_bytes(*b))
}

#[inline(always)]
fn le4(b: Option<&[u8; 4]>) -> u64 {
    b.map_or(0, |b| u64::from(u32::from_le_bytes(*b)))
}

/// Folds one piece of the key (its bytes and its length) into `h`: one multiply for up to 16
/// bytes, read as two overlapping words (the length makes the pieces' boundaries part of the
/// hash, so no separator is hashed).
#[inline(always)]
fn piece(mut h: u64, s: &[u8]) -> u64 {
    let n = s.len();
    let (a, b) = if n > 16 {
        let mut rest = s;
        while rest.len() > 16 {
            let (x, y) = (
                le8(rest.first_chunk::<8>()),
                le8(rest.get(8..16).and_then(|r| r.first_chunk::<8>())),
            );
            h = fold(x ^ K0, y ^ h);
            rest = rest.get(16..).unwrap_or_default();
        }
        (
            le8(s.last_chunk::<16>().and_then(|r| r.first_chunk::<8>())),
            le8(s.last_chunk::<8>()),
        )
    } else if n >= 8 {
        (le8(s.first_chunk::<8>()), le8(s.last_chunk::<8>()))
    } else if n >= 4 {
        (le4(s.first_chunk::<4>()), le4(s.last_chunk::<4>()))
    } else {
        let byte = |i: usize| s.get(i).map_or(0, |&b| u64::from(b));
        if n == 0 {
            (0, 0)
        } else {
            (byte(0) | (byte(n / 2) << 8), byte(n - 1))
        }
    };
    fold(a ^ h ^ K0, b ^ K1 ^ n as u64)
}

/// The key's hash in the shard's table: one multiply per piece of up to 16 bytes, seeded with
/// the shard's secret (as the table's default hasher is), over customer, meter and dimensions.
#[inline(always)]
fn key_hash(seed: u64, customer: &str, meter: &str, dims: &[(&str, &str)]) -> u64 {
    let mut h = piece(seed, customer.as_bytes());
    h = piece(h, meter.as_bytes());
    for (k, v) in dims {
        h = piece(h, k.as_bytes());
        h = piece(h, v.as_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    fn sum_of(deltas: &[Delta]) -> Decimal {
        deltas.iter().map(|d| d.sum).sum()
    }

    #[test]
    fn sums_are_exact_or_kept_apart() {
        let big = Decimal::from_i128_with_scale((1i128 << 95) + 1, 2);
        assert_eq!(
            add_exact(Decimal::ONE, Decimal::TWO),
            Some(Decimal::from(3))
        );
        assert_eq!(
            add_exact(Decimal::new(15, 1), Decimal::new(25, 2)),
            Some(Decimal::new(175, 2))
        );
        assert_eq!(add_exact(big, big), None);
        // Past 96 bits at this scale: two aggregates, no rounding.
        let a = Aggregator::new();
        a.record("c", "m", &[], big, 0).unwrap();
        a.record("c", "m", &[], big, 0).unwrap();
        let d = a.drain();
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.sum == big));
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
    fn keys_are_stored_once_and_sealed_with_canonical_dimensions() {
        let a = Aggregator::new();
        let t = 1_700_000_000_000;
        // One key, two orders of its dimensions: two ids (a shard matches the caller's order),
        // the same names once drained, and one delta once merged.
        a.record("c", "m", &[("b", "2"), ("a", "")], Decimal::ONE, t)
            .unwrap();
        a.record("c", "m", &[("a", ""), ("b", "2")], Decimal::TWO, t)
            .unwrap();
        // A kept key is the one `record` interned: it adds to the same accumulator.
        let kept = a.intern("c", "m", &[("a", ""), ("b", "2")]).unwrap();
        assert_eq!(
            a.intern("c", "m", &[("a", ""), ("b", "2")]).unwrap().id,
            kept.id
        );
        a.record_key(&kept, Decimal::TEN, t).unwrap();
        a.record("c", "m", &[], Decimal::ONE, t).unwrap();
        assert_eq!(lock(&a.interner).len(), 3);
        let mut d = a.drain();
        assert_eq!(d.len(), 3);
        d.sort_by_key(|d| d.sum);
        let names = |d: &Delta| -> Vec<(String, String)> {
            d.dimensions
                .pairs()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
                .collect()
        };
        let ab = vec![
            ("a".to_owned(), String::new()),
            ("b".to_owned(), "2".to_owned()),
        ];
        assert_eq!((d[0].sum, names(&d[0])), (Decimal::ONE, ab.clone()));
        assert_eq!((d[1].sum, names(&d[1]).len()), (Decimal::ONE, 0));
        assert_eq!((d[2].sum, names(&d[2])), (Decimal::from(12), ab));
        assert!(
            d.iter()
                .all(|d| d.customer.as_str() == "c" && d.meter.as_str() == "m")
        );
        let merged = crate::sealer::merge_deltas(d);
        assert_eq!(merged.len(), 2);
        assert_eq!(sum_of(&merged), Decimal::from(14));
    }

    #[test]
    fn decoding_refuses_what_the_interner_never_stores() {
        assert!(decode_key(b"c").is_none(), "no meter");
        assert!(decode_key(b"\xffm").is_none(), "empty customer");
        assert!(decode_key(b"c\xffM").is_none(), "invalid meter");
        assert!(
            decode_key(b"c\xffm\xfek").is_none(),
            "a dimension without a value"
        );
        let mut five = b"c\xffm".to_vec();
        for k in [b"a", b"b", b"c", b"d", b"e"] {
            five.extend_from_slice(b"\xfe");
            five.extend_from_slice(k);
            five.extend_from_slice(b"\xfdv");
        }
        assert!(decode_key(&five).is_none(), "five dimensions");
        assert!(decode_key(&five[..five.len() - 4]).is_some(), "four");
    }

    #[test]
    fn a_cached_key_follows_catalog_changes() {
        let a = Aggregator::new();
        let cache = KeyCache::default();
        let key = a.intern("c", "api_calls", &[]).unwrap();
        let resolved = std::cell::Cell::new(0);
        let rec = |q| {
            a.record_cached(&cache, q, 0, || {
                resolved.set(resolved.get() + 1);
                Ok(&*key)
            })
        };
        rec(Decimal::ONE).unwrap();
        rec(Decimal::ONE).unwrap();
        assert_eq!(resolved.get(), 1, "resolved once, then read from the cache");
        let catalog = |names: &[&str]| Catalog {
            version: 7,
            meters: tally_protocol::bounded::BoundedVec::new(
                names
                    .iter()
                    .map(|n| tally_protocol::catalog::MeterDef {
                        name: MeterName::new(*n).unwrap(),
                        aggregation: tally_protocol::catalog::Aggregation::Sum,
                        event_type: "e".into(),
                        value_property: None,
                        group_by: Default::default(),
                        stripe_event_name: None,
                        stripe_unit_scale: Decimal::ONE,
                    })
                    .collect(),
            )
            .unwrap(),
        };
        // The same version number twice: the generation, not the version, invalidates.
        a.set_catalog(catalog(&["tokens"]));
        assert_eq!(rec(Decimal::ONE), Err(RecordError::UnknownMeter));
        assert_eq!(rec(Decimal::ONE), Err(RecordError::UnknownMeter));
        a.set_catalog(catalog(&["tokens", "api_calls"]));
        rec(Decimal::TWO).unwrap();
        assert_eq!(
            rec(Decimal::NEGATIVE_ONE),
            Err(RecordError::NegativeQuantity)
        );
        assert_eq!(resolved.get(), 3);
        assert_eq!(sum_of(&a.drain()), Decimal::from(4));
        let c = a.counts();
        assert_eq!((c.records, c.errors.iter().sum::<u64>()), (3, 3));
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
    fn scrape_and_owner_race() {
        // Counts and drains from two other threads while the owner records: every call is
        // counted once and every quantity drained once.
        let a = Arc::new(Aggregator::new());
        let stop = Arc::new(AtomicBool::new(false));
        let others: Vec<_> = (0..2)
            .map(|_| {
                let (a, stop) = (a.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut total = Decimal::ZERO;
                    let mut last = 0;
                    while !stop.load(Ordering::Relaxed) {
                        total += sum_of(&a.drain());
                        let c = a.counts().records;
                        assert!(c >= last, "counts never go back");
                        last = c;
                    }
                    total
                })
            })
            .collect();
        for i in 0..300_000u32 {
            let c = if i % 3 == 0 { "a" } else { "b" };
            a.record(c, "m", &[], Decimal::new(1, 2), 0).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = sum_of(&a.drain());
        for o in others {
            total += o.join().unwrap();
        }
        assert_eq!(total, Decimal::from(3000));
        assert_eq!(a.counts().records, 300_000);
    }

    #[test]
    fn two_aggregators_on_one_thread_keep_their_own_shards() {
        // Alternating calls switch the thread's current shard back and forth; a dropped
        // aggregator's shard is never used by a later one.
        let a = Aggregator::new();
        for i in 0..100 {
            let b = Aggregator::new();
            a.record("c", "m", &[], Decimal::ONE, 0).unwrap();
            b.record("c", "m", &[], Decimal::TWO, 0).unwrap();
            a.record("c", "m", &[], Decimal::ONE, 0).unwrap();
            assert_eq!(sum_of(&b.drain()), Decimal::TWO, "round {i}");
        }
        assert_eq!(sum_of(&a.drain()), Decimal::from(200));
        assert_eq!(a.counts().records, 200);
    }

    #[test]
    fn plain_and_dimensioned_keys_never_match_each_other() {
        let a = Aggregator::new();
        type Key<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
        let keys: [Key; 6] = [
            ("ab", "c", &[]),
            ("a", "bc", &[]),
            ("ab", "c", &[("k", "v")]),
            ("ab", "c", &[("kv", "")]),
            (
                "customer-with-a-long-name-over-32-bytes",
                "meter_with_a_long_name",
                &[],
            ),
            (
                "customer-with-a-long-name-over-32-bytes",
                "meter_with_a_long_namf",
                &[],
            ),
        ];
        for (i, (c, m, d)) in keys.iter().enumerate() {
            for _ in 0..=i {
                a.record(c, m, d, Decimal::ONE, 0).unwrap();
            }
        }
        let mut got: Vec<(String, String, usize, Decimal)> = a
            .drain()
            .into_iter()
            .map(|d| {
                (
                    d.customer.as_str().to_owned(),
                    d.meter.as_str().to_owned(),
                    d.dimensions.pairs().len(),
                    d.sum,
                )
            })
            .collect();
        got.sort_by_key(|g| g.3);
        let sums: Vec<Decimal> = got.iter().map(|g| g.3).collect();
        assert_eq!(sums, (1..=6).map(Decimal::from).collect::<Vec<_>>());
        assert_eq!((got[1].0.as_str(), got[1].1.as_str()), ("a", "bc"));
        assert_eq!(got[2].2, 1);
    }

    #[test]
    fn short_name_comparison_is_byte_equality() {
        let names = [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "abcdefg",
            "abcdefgh",
            "abcdefghijklmnop",
            "abcdefghijklmnopq",
            "abcdefghijklmnopqrstuvwxyz012345",
            "abcdefghijklmnopqrstuvwxyz0123456",
        ];
        for x in names {
            for y in names {
                assert_eq!(bytes_eq(x.as_bytes(), y.as_bytes()), x == y);
                // One byte changed anywhere.
                for i in 0..y.len() {
                    let mut z = y.as_bytes().to_vec();
                    z[i] ^= 1;
                    assert_eq!(bytes_eq(x.as_bytes(), &z), x.as_bytes() == z.as_slice());
                }
            }
        }
    }

    #[test]
    fn a_full_count_starts_a_new_aggregate() {
        let a = Aggregator::new();
        let t = 1_700_000_000_000;
        a.record("c", "m", &[], Decimal::ONE, t).unwrap();
        let id = a.intern("c", "m", &[]).unwrap().id as usize;
        // As after 2^32 - 2 more calls (too many to make here).
        a.with_shard(|st| st.slots[id].acc.count = u32::MAX - 1);
        a.record("c", "m", &[], Decimal::TWO, t + 1).unwrap();
        assert_eq!(a.with_shard(|st| st.slots[id].acc.count), u32::MAX);
        a.record("c", "m", &[], Decimal::TEN, t + 2).unwrap();
        let mut d = a.drain();
        d.sort_by_key(|d| d.count);
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].count, d[0].sum, d[0].last),
            (1, Decimal::TEN, Decimal::TEN)
        );
        assert_eq!((d[0].first_at_ms, d[0].last_at_ms), (t + 2, t + 2));
        assert_eq!(d[1].count, u64::from(u32::MAX));
        assert_eq!((d[1].sum, d[1].last), (Decimal::from(3), Decimal::TWO));
        assert_eq!((d[1].first_at_ms, d[1].last_at_ms), (t, t + 1));
        // The new aggregate takes further calls.
        a.record("c", "m", &[], Decimal::ONE, t).unwrap();
        a.record("c", "m", &[], Decimal::ONE, t).unwrap();
        assert_eq!(a.drain()[0].count, 2);
    }

    #[test]
    fn table_growth_rehashes_from_the_arena() {
        // 3,000 keys (plain and with dimensions) grow the table from empty several times; every
        // key is still found after each growth (its hash recomputed from its stored bytes).
        let a = Aggregator::new();
        let names: Vec<(String, String)> = (0..3000)
            .map(|i| (format!("cust-{i}"), format!("v{}", i % 7)))
            .collect();
        for round in 0..2 {
            for (i, (c, v)) in names.iter().enumerate() {
                let dims: &[(&str, &str)] = if i % 3 == 0 {
                    &[("k", v), ("z", "")]
                } else {
                    &[]
                };
                a.record(c, "m", dims, Decimal::from(i), 0).unwrap();
            }
            assert_eq!(a.drain().len(), 3000, "round {round}");
        }
        a.with_shard(|st| assert_eq!(st.table.len, 3000));
        assert_eq!(lock(&a.interner).len(), 3000);
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

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            // Any text, including the empty string and multi-byte characters.
            "\\PC{0,40}"
        }

        proptest! {
            #[test]
            fn stored_bytes_hash_as_the_key(
                seed in any::<u64>(),
                customer in name(),
                meter in name(),
                dims in proptest::collection::vec((name(), name()), 0..5),
            ) {
                let dims: Vec<(&str, &str)> =
                    dims.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let mut b = Vec::new();
                encode_key(&mut b, &customer, &meter, &dims);
                prop_assert_eq!(b.len(), key_len(&customer, &meter, &dims));
                prop_assert_eq!(
                    encoded_hash(seed, &b),
                    key_hash(seed, &customer, &meter, &dims)
                );
            }

            /// A valid key's stored text gives back its names, dimensions sorted: what the
            /// old interner kept beside the text.
            #[test]
            fn stored_text_decodes_to_the_canonical_key(
                customer in "\\PC{1,30}",
                meter in "[a-z0-9_.-]{1,20}",
                dims in proptest::collection::btree_map("[A-Za-z0-9_.-]{1,8}", "\\PC{0,20}", 0..=4),
                rotate in 0usize..4,
            ) {
                let mut dims: Vec<(&str, &str)> =
                    dims.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                if !dims.is_empty() {
                    let r = rotate % dims.len();
                    dims.rotate_left(r);
                }
                let a = Aggregator::new();
                let id = a.intern_id(&customer, &meter, &dims).unwrap();
                let interner = lock(&a.interner);
                let (c, m, d) = decode_key(interner.key(id).unwrap()).unwrap();
                prop_assert_eq!(c, CustomerId::new(customer.as_str()).unwrap());
                prop_assert_eq!(m, MeterName::new(meter.as_str()).unwrap());
                prop_assert_eq!(d, Dimensions::from_strs(dims.iter().copied()).unwrap());
            }

            /// Whatever the order, times and quantities of the calls, the drained aggregates of
            /// each key and bucket hold exactly its calls: their sum, count, first and last times
            /// and last quantity.
            #[test]
            fn drained_aggregates_are_the_calls(
                calls in proptest::collection::vec(
                    (0usize..5, 0u64..1_000_000_000_000, 0u32..7, 0i64..200_000),
                    1..300,
                ),
            ) {
                type Key = (&'static str, &'static str, &'static [(&'static str, &'static str)]);
                const KEYS: [Key; 5] = [
                    ("a", "m", &[]),
                    ("b", "m", &[]),
                    ("a", "n", &[]),
                    ("a", "m", &[("k", "v")]),
                    ("a-customer-name-over-sixteen-bytes", "m", &[("k", "")]),
                ];
                let base = 1_699_999_980_000;
                let a = Aggregator::new();
                type Model = (Decimal, u64, i64, i64, Decimal);
                let mut model: HashMap<(usize, i64), Model> = HashMap::new();
                for &(k, m, scale, dt) in &calls {
                    let (c, meter, dims) = KEYS[k];
                    let q = Decimal::new(m as i64, scale);
                    let at = base + dt;
                    a.record(c, meter, dims, q, at).unwrap();
                    let e = model.entry((k, bucket_start(at))).or_insert((
                        Decimal::ZERO, 0, at, at, q,
                    ));
                    e.0 += q;
                    e.1 += 1;
                    e.2 = e.2.min(at);
                    if at >= e.3 {
                        e.3 = at;
                        e.4 = q;
                    }
                }
                let mut got: HashMap<(usize, i64), Model> = HashMap::new();
                let mut latest: HashMap<(usize, i64), (i64, Decimal)> = HashMap::new();
                for d in a.drain() {
                    prop_assert!(d.validate().is_ok());
                    let k = KEYS
                        .iter()
                        .position(|(c, m, dims)| {
                            d.customer.as_str() == *c
                                && d.meter.as_str() == *m
                                && d.dimensions.pairs().len() == dims.len()
                        })
                        .unwrap();
                    let e = got.entry((k, d.bucket_start_ms)).or_insert((
                        Decimal::ZERO, 0, d.first_at_ms, d.last_at_ms, d.last,
                    ));
                    e.0 += d.sum;
                    e.1 += d.count;
                    e.2 = e.2.min(d.first_at_ms);
                    e.3 = e.3.max(d.last_at_ms);
                    // A key and bucket split over several aggregates (after a call in another
                    // bucket): they drain oldest first, and the last quantity is that of the
                    // latest call (of the newest aggregate on a tie).
                    let l = latest.entry((k, d.bucket_start_ms)).or_insert((d.last_at_ms, d.last));
                    if d.last_at_ms >= l.0 {
                        *l = (d.last_at_ms, d.last);
                    }
                }
                prop_assert_eq!(got.len(), model.len());
                for (key, m) in &model {
                    let g = got[key];
                    prop_assert_eq!((g.0, g.1, g.2, g.3), (m.0, m.1, m.2, m.3));
                    prop_assert_eq!(latest[key], (m.3, m.4));
                }
            }
        }
    }
}
