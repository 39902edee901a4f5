//! The decision table: the merged snapshot indexed for answers from memory, and one
//! [`MeterState`] per (customer, meter) behind its own lock.
//!
//! Layout: customers are spread over [`STRIPES`] cache-line-aligned `RwLock`s by the hash of
//! their key; a stripe holds a hash table of customer slots stored inline (no pointer to
//! follow), laid out by cache line (decisions 0112, 0129): `check` reads the table's control
//! bytes and the slot's first line (name, `known`, two short features' names). A stripe also
//! holds a table of pointers to each customer's first meter slot (`first_meters`), through which
//! `try_consume` fetches that slot's head line (names, `known`, usage-key hint) and its lock-free
//! line at once, without reading the customer slot. Each meter's accounting lives in a
//! [`MeterSlot`]: a `Mutex<MeterState>`, the truth, and a lock-free view of it
//! ([`super::fast`]) from which `try_consume` takes with one compare-and-swap while a lease is
//! open or a soft limit counts locally; that line also caches the usage key's id and catalog
//! check, so recording reads only the accumulator. A call reads its stripe under this thread's
//! mark in the table (two plain stores to a cache line only this thread writes; decision 0088),
//! or under the stripe's read lock where `membarrier` is unavailable; so two callers share no
//! written cache line unless they use the same customer and meter. A writer (the collector
//! session, or a customer seen for the first time) takes the stripe's write lock, turns marked
//! readers to the lock, runs one process-wide barrier and waits for the readers already inside
//! (nanoseconds); it only writes the stripe of a customer whose snapshot changed. Once a
//! customer and meter are known a call allocates nothing.
//!
//! The table does no I/O and reads no clock: callers pass `now_ms`. What must go to the
//! collector (snapshot requests for new customers, lease requests) is queued in a bounded
//! outbox the agent's shell drains; leases to release are returned by [`Table::scan`].
//!
//! Limits: at most [`MAX_CUSTOMERS`] customers, [`MAX_METERS_PER_CUSTOMER`] meters each, and
//! [`MAX_OUTBOX`] queued messages (past it a request is dropped and asked again later).

use super::EntitlementsCache;
use super::decision::{DecidedBy, Decision, Limit};
use super::fast::{Book, Fast, FastTake, MAX_SCALE, units_decimal};
use super::meter::{Booked, Freshness, Hold, Lease, LimitView, MeterState, Take};
use super::policy::{EntitlementsConfig, OfflinePolicy};
use crate::error::RecordError;
use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use rust_decimal::Decimal;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tally_protocol::entitlements::{
    CustomerEntitlements, Enforcement, Feature, LeaseGrant, Source,
};
use tally_protocol::names::{CustomerId, MeterName, PlanName};

/// Stripes of the customer index (a power of two).
pub const STRIPES: usize = 64;
/// Customers the table holds at most; past it new customers are decided by policy alone.
pub const MAX_CUSTOMERS: usize = 1_000_000;
/// Meters per customer at most.
pub const MAX_METERS_PER_CUSTOMER: usize = 512;
/// Messages waiting for the collector at most.
pub const MAX_OUTBOX: usize = 16_384;
/// A new customer's snapshot is asked for again after this long without an answer.
pub const REQUEST_AGAIN_MS: i64 = 1_000;
/// Released lease ids remembered (a grant for one is ignored) at most; the oldest goes first.
pub const MAX_RELEASED_IDS: usize = 65_536;

/// What `try_consume`'s lock-free path reads of a meter slot before its take, in one line
/// beside the take's (decision 0129): the slot is found by its customer's hash in the
/// stripe's [`Index::first_meters`], whose 8-byte buckets stay cached, so this line and the
/// lock-free line are fetched together instead of one after the customer slot's line.
#[derive(Debug)]
#[repr(C, align(64))]
struct Head {
    /// The customer's name (the slot's `customer`), compared without another read.
    customer: Inline,
    /// The meter's name.
    meter: Inline<16>,
    /// The customer's `known` (a snapshot lists it), kept equal under the stripe's write lock.
    known: AtomicBool,
    /// The usage key id this meter records under, once known ([`NO_KEY`] before): only a hint
    /// to prefetch the accumulator with, never trusted for accounting (`Fast::key` is).
    key_hint: AtomicU32,
}

/// One (customer, meter) and its accounting.
#[derive(Debug)]
#[repr(C)]
pub struct MeterSlot {
    /// Names, `known` and the key hint: the line read before the take (decision 0129).
    head: Head,
    /// What calls may take without the lock (the line every take reads, after `head`).
    fast: Fast,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// The accounting, the truth, and the lanes' book: lock it with [`MeterSlot::lock`].
    state: Mutex<Locked>,
    /// Listed among the slots with a lease (for [`Table::scan`]).
    tracked: AtomicBool,
    /// The usage key this meter records under, resolved on first use (the agent's).
    pub(crate) key: OnceLock<Arc<crate::aggregate::KeyInfo>>,
}

// `head` and `fast` are the slot's first two lines: one line each, side by side.
const _: () = {
    assert!(std::mem::size_of::<Head>() == 64);
    assert!(std::mem::offset_of!(MeterSlot, fast) == 64);
};

/// What a meter slot's mutex guards.
#[derive(Debug)]
struct Locked {
    st: MeterState,
    book: Book,
}

/// The meter's state, locked: lock-free takes are folded in first and published again when
/// it is dropped (see [`super::fast`]).
pub struct StateGuard<'a> {
    slot: &'a MeterSlot,
    g: MutexGuard<'a, Locked>,
    now_ms: i64,
}

impl StateGuard<'_> {
    /// A take of `qty` by the calling thread came here (its lane could not answer it): publish
    /// at `qty`'s scale and give the thread's lane a share.
    pub fn wanted(&mut self, qty: Decimal) {
        self.g.book.note_scale(qty);
        self.g.book.want(super::fast::lane());
    }
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = MeterState;
    fn deref(&self) -> &MeterState {
        &self.g.st
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut MeterState {
        &mut self.g.st
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let Locked { st, book } = &mut *self.g;
        self.slot.fast.publish(st, book, self.now_ms);
    }
}

/// A name kept inline (up to `N` bytes; 30 for customers and features, 16 for the first
/// meter, which shares the customer's first cache line) so that comparing it reads no other
/// memory.
#[derive(Debug, Clone, Copy)]
struct Inline<const N: usize = 30> {
    /// Length, or [`LONG`] when the name did not fit (then compare the owned one).
    len: u8,
    source: u8,
    bytes: [u8; N],
}

const LONG: u8 = u8::MAX;

impl<const N: usize> Inline<N> {
    const EMPTY: Self = Inline {
        len: 0,
        source: 0,
        bytes: [0; N],
    };

    fn new(s: &str, source: u8) -> Self {
        let mut bytes = [0; N];
        let len = match bytes.get_mut(..s.len()) {
            Some(b) => {
                b.copy_from_slice(s.as_bytes());
                s.len() as u8
            }
            None => LONG,
        };
        Inline { len, source, bytes }
    }

    /// Whether `s` is this name (`owned`: the full name, read only for long ones).
    #[inline]
    fn is(&self, s: &str, owned: impl FnOnce() -> bool) -> bool {
        if self.len == LONG {
            return s.len() > self.bytes.len() && owned();
        }
        usize::from(self.len) == s.len()
            && self
                .bytes
                .get(..s.len())
                .is_some_and(|b| crate::aggregate::bytes_eq(b, s.as_bytes()))
    }
}

fn source_index(s: Source) -> u8 {
    match s {
        Source::Plan => 0,
        Source::Override => 1,
        Source::Stripe => 2,
    }
}

const SOURCES: [Source; 3] = [Source::Plan, Source::Override, Source::Stripe];

/// Features whose names are kept in the slot's second line.
const INLINE_FEATURES: usize = 2;
/// In `inline_features`: more features than fit inline (in `more_feature_names`).
const MORE_FEATURES: u8 = 0x80;
/// `Head::key_hint` before the key is known.
const NO_KEY: u32 = u32::MAX;

/// Laid out by cache line (`repr(C)`, 64-byte aligned; decisions 0112, 0129): line 0 holds
/// all that `check` reads for a customer whose first two features have short names — the
/// name, `known`, those names —, line 1 the same two names up to 30 bytes (read only when one
/// is longer than [`SHORT_FEATURE`] bytes), line 2 the first meter's name and slot (read by
/// `try_consume` only when the stripe's `first_meters` did not answer). The rest (more meters
/// and features, the owned copies) comes after and is read only by slower calls.
#[derive(Debug)]
#[repr(C, align(64))]
struct CustomerSlot {
    name: Inline,
    /// Whether a snapshot listed this customer.
    known: bool,
    /// How many of `feature_names` are in use, with [`MORE_FEATURES`] set when there are more
    /// (in `more_feature_names`).
    inline_features: u8,
    /// `feature_names` again when at most [`SHORT_FEATURE`] bytes long (else marked long:
    /// compare `feature_names`), so that `check` reads one line.
    short_features: [Inline<SHORT_FEATURE>; INLINE_FEATURES],
    /// Features' names inline with their source (index into [`SOURCES`]), in `features` order.
    feature_names: [Inline; INLINE_FEATURES],
    meter0_name: Inline<16>,
    /// The first meter with accounting (the others: `more_meters`).
    meter0: Option<Arc<MeterSlot>>,
    more_feature_names: Vec<Inline>,
    more_meters: Vec<(Inline, Arc<MeterSlot>)>,
    requested_at_ms: AtomicI64,
    hash: u64,
    customer: CustomerId,
    plan: Option<PlanName>,
    features: Vec<Feature>,
}

/// Bytes of a feature's name kept in the customer's first line.
const SHORT_FEATURE: usize = 13;

const _: () = {
    assert!(
        std::mem::offset_of!(CustomerSlot, short_features)
            + std::mem::size_of::<[Inline<SHORT_FEATURE>; INLINE_FEATURES]>()
            == 64
    );
    assert!(std::mem::offset_of!(CustomerSlot, feature_names) == 64);
    assert!(std::mem::offset_of!(CustomerSlot, meter0_name) == 128);
    assert!(std::mem::offset_of!(CustomerSlot, meter0) + 8 <= 192);
};

impl CustomerSlot {
    fn new(customer: CustomerId, hash: u64, now_ms: i64) -> Self {
        CustomerSlot {
            name: Inline::new(customer.as_str(), 0),
            known: false,
            inline_features: 0,
            short_features: [Inline::EMPTY; INLINE_FEATURES],
            feature_names: [Inline::EMPTY; INLINE_FEATURES],
            meter0_name: Inline::EMPTY,
            meter0: None,
            more_feature_names: Vec::new(),
            more_meters: Vec::new(),
            requested_at_ms: AtomicI64::new(now_ms),
            hash,
            customer,
            plan: None,
            features: Vec::new(),
        }
    }

    #[inline]
    fn is(&self, customer: &str) -> bool {
        self.name
            .is(customer, || self.customer.as_str() == customer)
    }

    #[inline]
    fn meter(&self, meter: &str) -> Option<&Arc<MeterSlot>> {
        if let Some(m) = &self.meter0
            && self.meter0_name.is(meter, || m.meter.as_str() == meter)
        {
            return Some(m);
        }
        self.more_meter(meter)
    }

    #[cold]
    fn more_meter(&self, meter: &str) -> Option<&Arc<MeterSlot>> {
        self.more_meters
            .iter()
            .find(|(n, m)| n.is(meter, || m.meter.as_str() == meter))
            .map(|(_, m)| m)
    }

    fn meters(&self) -> impl Iterator<Item = &Arc<MeterSlot>> {
        self.meter0
            .iter()
            .chain(self.more_meters.iter().map(|(_, m)| m))
    }

    fn meter_count(&self) -> usize {
        usize::from(self.meter0.is_some()) + self.more_meters.len()
    }

    /// Adds a meter; the first one is also listed in the stripe's `first_meters` under this
    /// customer's hash.
    fn push_meter(
        &mut self,
        first_meters: &mut HashTable<Arc<MeterSlot>>,
        hasher: &DefaultHashBuilder,
        name: &str,
        slot: Arc<MeterSlot>,
    ) {
        slot.head.known.store(self.known, Ordering::Relaxed);
        if self.meter0.is_none() {
            debug_assert!(
                first_meters
                    .find(self.hash, |m| m.customer == self.customer)
                    .is_none(),
                "one first meter per customer"
            );
            first_meters.insert_unique(self.hash, slot.clone(), |m| {
                hasher.hash_one(m.customer.as_str())
            });
            self.meter0_name = Inline::new(name, 0);
            self.meter0 = Some(slot);
        } else {
            self.more_meters.push((Inline::new(name, 0), slot));
        }
    }

    /// Sets `known` here and in every meter slot's head (what the lock-free path reads).
    fn set_known(&mut self, known: bool) {
        self.known = known;
        for m in self.meters() {
            m.head.known.store(known, Ordering::Relaxed);
        }
    }

    /// Whether feature `i`'s full name is `feature` (read only for names too long to inline).
    fn owned_feature(&self, i: usize, feature: &str) -> bool {
        self.features
            .get(i)
            .is_some_and(|f| f.name.as_str() == feature)
    }

    /// The source index of `feature` if the customer has it. Reads line 0 only, unless one
    /// of the first two features' names is long or the customer has more features.
    #[inline]
    fn feature(&self, feature: &str) -> Option<u8> {
        let n = usize::from(self.inline_features & !MORE_FEATURES);
        for (i, (short, f)) in self
            .short_features
            .iter()
            .zip(self.feature_names.iter())
            .enumerate()
            .take(n)
        {
            if short.is(feature, || f.is(feature, || self.owned_feature(i, feature))) {
                // The short copy's source: `f`'s is the same, on line 1.
                return Some(short.source);
            }
        }
        if self.inline_features & MORE_FEATURES == 0 {
            return None;
        }
        self.more_feature(feature)
    }

    #[cold]
    fn more_feature(&self, feature: &str) -> Option<u8> {
        self.more_feature_names
            .iter()
            .enumerate()
            .find(|(i, f)| f.is(feature, || self.owned_feature(INLINE_FEATURES + i, feature)))
            .map(|(_, f)| f.source)
    }

    fn set_features(&mut self, features: Vec<Feature>) {
        let mut names = features
            .iter()
            .map(|f| Inline::new(f.name.as_str(), source_index(f.source)));
        self.inline_features = 0;
        for (short, slot) in self
            .short_features
            .iter_mut()
            .zip(self.feature_names.iter_mut())
        {
            match names.next() {
                Some(n) => {
                    *short = features
                        .get(usize::from(self.inline_features))
                        .map_or(Inline::EMPTY, |f| Inline::new(f.name.as_str(), n.source));
                    *slot = n;
                    self.inline_features += 1;
                }
                None => (*short, *slot) = (Inline::EMPTY, Inline::EMPTY),
            }
        }
        self.more_feature_names = names.collect();
        if !self.more_feature_names.is_empty() {
            self.inline_features |= MORE_FEATURES;
        }
        self.features = features;
    }
}

/// One stripe's tables: the customers (what `Deref` gives), and each customer's first meter
/// slot by the customer's hash (decision 0129). A `first_meters` bucket is a pointer (8 bytes
/// a customer, so the table stays in cache where the customers' slots do not), from which
/// `try_consume` fetches the slot's head line and lock-free line at once; through `customers`
/// it would read the customer's line first and only then know where the slot is.
struct Index {
    customers: HashTable<CustomerSlot>,
    /// Invariant: holds exactly the `meter0` of every customer in `customers` that has one,
    /// under that customer's hash (added by [`CustomerSlot::push_meter`]; neither is removed).
    first_meters: HashTable<Arc<MeterSlot>>,
}

impl std::ops::Deref for Index {
    type Target = HashTable<CustomerSlot>;
    #[inline]
    fn deref(&self) -> &HashTable<CustomerSlot> {
        &self.customers
    }
}

impl std::ops::DerefMut for Index {
    fn deref_mut(&mut self) -> &mut HashTable<CustomerSlot> {
        &mut self.customers
    }
}

/// One stripe of the customer index: its tables behind a `RwLock`, which writers and readers
/// without a [`ReaderSlot`] take, and the flag that turns readers with one away (decision 0088).
#[repr(align(128))]
struct Stripe {
    lock: RwLock<Index>,
    /// A writer holds `lock` and is waiting for, or past, the readers without the lock.
    writing: AtomicBool,
}

/// One thread's mark in one table: which stripe it reads without the stripe's lock, if any.
/// Only that thread writes it (plain stores); writers read it. Aligned so that two threads'
/// marks never share a cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct ReaderSlot {
    /// 0: not reading; otherwise 1 + the stripe it reads.
    active: AtomicUsize,
    /// The table was dropped: the thread forgets the slot on its next registration.
    retired: AtomicBool,
}

/// This thread's reader slots, one per live table (usually one). Dropping it (the thread's
/// exit) clears [`READER`] first, so that never names a slot this thread no longer holds.
struct Readers(Vec<(u64, Arc<ReaderSlot>)>);

impl Drop for Readers {
    fn drop(&mut self) {
        let _ = READER.try_with(|c| c.set((0, std::ptr::null())));
    }
}

thread_local! {
    static READERS: RefCell<Readers> = const { RefCell::new(Readers(Vec::new())) };
    /// The slot of the table this thread read last, as (table uid, slot): one TLS load, no
    /// destructor, no borrow. Invariant: when the uid is not 0, `READERS` holds an `Arc` of the
    /// slot (both are set together, and `Readers`' drop clears this before releasing them).
    static READER: Cell<(u64, *const ReaderSlot)> = const { Cell::new((0, std::ptr::null())) };
}

static NEXT_TABLE_UID: AtomicU64 = AtomicU64::new(1);

/// A stripe's table, read with its lock or, on the usual path, with the reader's mark.
enum StripeRead<'a> {
    Marked {
        slot: &'a ReaderSlot,
        table: &'a Index,
    },
    Locked(RwLockReadGuard<'a, Index>),
}

impl std::ops::Deref for StripeRead<'_> {
    type Target = Index;
    #[inline]
    fn deref(&self) -> &Index {
        match self {
            StripeRead::Marked { table, .. } => table,
            StripeRead::Locked(g) => g,
        }
    }
}

impl Drop for StripeRead<'_> {
    #[inline]
    fn drop(&mut self) {
        if let StripeRead::Marked { slot, .. } = self {
            slot.active.store(0, Ordering::Release);
        }
    }
}

/// A stripe's table, written: its lock held, and no reader inside without it.
struct StripeWrite<'a> {
    stripe: &'a Stripe,
    guard: RwLockWriteGuard<'a, Index>,
}

impl std::ops::Deref for StripeWrite<'_> {
    type Target = Index;
    fn deref(&self) -> &Index {
        &self.guard
    }
}

impl std::ops::DerefMut for StripeWrite<'_> {
    fn deref_mut(&mut self) -> &mut Index {
        &mut self.guard
    }
}

impl Drop for StripeWrite<'_> {
    fn drop(&mut self) {
        // Readers may come back; the lock (dropped right after) publishes what was written.
        self.stripe.writing.store(false, Ordering::Release);
    }
}

/// A message for the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Ask for this customer's snapshot.
    Snapshot(CustomerId),
    /// Ask for (more of) a lease.
    Lease {
        /// The customer.
        customer: CustomerId,
        /// The meter.
        meter: MeterName,
        /// The period the agent believes current.
        period_start_ms: i64,
        /// How much more.
        quantity: Decimal,
    },
}

/// A lease closed and ready to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToRelease {
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// The lease as it ended.
    pub lease: Lease,
}

/// What the table knows of one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerView {
    /// Whether a snapshot listed the customer.
    pub known: bool,
    /// Whether the answers come from a stale snapshot or none.
    pub stale: bool,
    /// The offline rule that decides, when not current.
    pub decided_by: Option<DecidedBy>,
    /// The plan.
    pub plan: Option<PlanName>,
    /// Features the customer has.
    pub features: Vec<Feature>,
    /// Meters with accounting (those with a limit, and those consumed).
    pub meters: Vec<MeterName>,
}

/// Counts for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Denials by decider (index: [`DecidedBy::ALL`]).
    pub denials: [AtomicU64; 7],
    /// Lease requests queued.
    pub lease_requests: AtomicU64,
    /// Lease grants applied.
    pub lease_grants: AtomicU64,
    /// Messages dropped because the outbox was full.
    pub outbox_dropped: AtomicU64,
    /// Soft-limit overshoot counted under the meters' locks, total quantity.
    overshoot: Mutex<Decimal>,
    /// Soft-limit overshoot counted without a lock, in units of 10^-index.
    overshoot_units: [AtomicU64; MAX_SCALE as usize + 1],
}

impl Stats {
    /// Soft-limit overshoot counted by this agent, total quantity.
    pub fn overshoot(&self) -> Decimal {
        let mut total = *self.overshoot.lock();
        for (scale, u) in self.overshoot_units.iter().enumerate() {
            let u = u.load(Ordering::Relaxed);
            if u > 0 {
                total += Decimal::from(u) / Decimal::from(10u64.pow(scale as u32));
            }
        }
        total
    }
}

/// The decision table. See the module doc.
pub struct Table {
    cfg: EntitlementsConfig,
    /// `cfg.stale_after` in ms (converted once: every call without a connection compares it).
    stale_after_ms: i64,
    uid: u64,
    /// Every thread's reader slot in this table (threads that exited are dropped by writers).
    readers: Mutex<Vec<Arc<ReaderSlot>>>,
    hasher: DefaultHashBuilder,
    stripes: Box<[Stripe]>,
    customers: AtomicUsize,
    connected: AtomicBool,
    /// When the snapshot was last known current (ms).
    synced_at_ms: AtomicI64,
    outbox: Mutex<VecDeque<Outgoing>>,
    leased: Mutex<Vec<Arc<MeterSlot>>>,
    displaced: Mutex<Vec<ToRelease>>,
    /// Leases released (or being released): a grant that crossed the release is not consumed.
    released: Mutex<(std::collections::HashSet<u64>, VecDeque<u64>)>,
    wake: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Counts for metrics.
    pub stats: Stats,
}

impl Drop for Table {
    fn drop(&mut self) {
        for s in self.readers.lock().iter() {
            s.retired.store(true, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("customers", &self.customers.load(Ordering::Relaxed))
            .finish()
    }
}

impl MeterSlot {
    /// The usage key's id and catalog check, cached in the line a take reads.
    pub(crate) fn key_cache(&self) -> &crate::aggregate::KeyCache {
        self.fast.key(super::fast::lane())
    }

    /// The usage key id to prefetch the accumulator by (`u32::MAX` until set): a hint only.
    pub(crate) fn key_hint(&self) -> &AtomicU32 {
        &self.head.key_hint
    }

    fn new(
        customer: CustomerId,
        meter: MeterName,
        limit: Option<LimitView>,
        policy: OfflinePolicy,
        now_ms: i64,
    ) -> Arc<Self> {
        let slot = Arc::new(MeterSlot {
            head: Head {
                customer: Inline::new(customer.as_str(), 0),
                meter: Inline::new(meter.as_str(), 0),
                known: AtomicBool::new(false),
                key_hint: AtomicU32::new(NO_KEY),
            },
            fast: Fast::default(),
            customer,
            meter,
            state: Mutex::new(Locked {
                st: MeterState::new(limit, policy),
                book: Book::default(),
            }),
            tracked: AtomicBool::new(false),
            key: OnceLock::new(),
        });
        drop(slot.lock(now_ms));
        slot
    }

    /// Locks the state (lock-free takes folded in; published again when the guard drops).
    /// Waits for lock-free takes between their take and their record (a few ns: they hold no
    /// lock meanwhile), so no operation under the lock, such as releasing the lease, runs while
    /// one is unrecorded.
    pub fn lock(&self, now_ms: i64) -> StateGuard<'_> {
        let mut g = self.state.lock();
        let Locked { st, book } = &mut *g;
        self.fast.reclaim(st, book, now_ms);
        let mut spins = 0u32;
        while self.fast.busy() > 0 {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        StateGuard {
            slot: self,
            g,
            now_ms,
        }
    }
}

impl Table {
    /// An empty table.
    pub fn new(cfg: EntitlementsConfig) -> Self {
        crate::asym::init_asymmetric();
        Table {
            stale_after_ms: i64::try_from(cfg.stale_after.as_millis()).unwrap_or(i64::MAX),
            cfg,
            uid: NEXT_TABLE_UID.fetch_add(1, Ordering::Relaxed),
            readers: Mutex::new(Vec::new()),
            hasher: DefaultHashBuilder::default(),
            stripes: (0..STRIPES)
                .map(|_| Stripe {
                    lock: RwLock::new(Index {
                        customers: HashTable::new(),
                        first_meters: HashTable::new(),
                    }),
                    writing: AtomicBool::new(false),
                })
                .collect(),
            customers: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            synced_at_ms: AtomicI64::new(i64::MIN),
            outbox: Mutex::new(VecDeque::new()),
            leased: Mutex::new(Vec::new()),
            displaced: Mutex::new(Vec::new()),
            released: Mutex::new((std::collections::HashSet::new(), VecDeque::new())),
            wake: OnceLock::new(),
            stats: Stats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EntitlementsConfig {
        &self.cfg
    }

    /// Called whenever the outbox gets a message (the shell wakes its sender).
    pub fn set_waker(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.wake.set(f);
    }

    fn hash(&self, customer: &str) -> u64 {
        self.hasher.hash_one(customer)
    }

    fn stripe_index(hash: u64) -> usize {
        // High bits: the hash table uses the low ones.
        (hash >> 58) as usize % STRIPES
    }

    /// Reads the stripe of `hash`: with this thread's mark when the asymmetric protocol is
    /// available (plain stores, no shared cache line written), else with the stripe's read lock.
    #[inline]
    fn read(&self, hash: u64) -> StripeRead<'_> {
        self.read_stripe(Self::stripe_index(hash))
    }

    #[inline]
    fn read_stripe(&self, idx: usize) -> StripeRead<'_> {
        let stripe = &self.stripes[idx % STRIPES];
        if crate::asym::asymmetric()
            && let Some(slot) = self.reader_slot()
        {
            slot.active.store(idx % STRIPES + 1, Ordering::Relaxed);
            // With the writer's membarrier this orders the mark above before the load below.
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            if !stripe.writing.load(Ordering::Acquire) {
                // SAFETY: no writer is inside and none can enter while the mark is up: a
                // writer sets `writing` (holding the write lock), runs a process-wide barrier
                // and then waits for every mark on this stripe to clear, so either it sees this
                // mark and waits, or this load saw its `writing` (crate::asym). Seeing
                // `writing` false with `Acquire` after a writer's `Release` clear orders its
                // writes before these reads. Exercised by `tests::marked_readers_and_writers_race`.
                let table = unsafe { &*stripe.lock.data_ptr() };
                return StripeRead::Marked { slot, table };
            }
            slot.active.store(0, Ordering::Release);
        }
        StripeRead::Locked(stripe.lock.read())
    }

    /// This thread's reader slot in this table; `None` while thread-local storage is being torn
    /// down.
    #[inline]
    fn reader_slot(&self) -> Option<&ReaderSlot> {
        let (uid, slot) = READER.with(Cell::get);
        if uid == self.uid {
            // SAFETY: `READER` names a slot this thread's `READERS` holds an `Arc` of (its
            // invariant), alive for this call: `READERS` changes only in `reader_slot_slow` on
            // this thread. Uids are never reused.
            return Some(unsafe { &*slot });
        }
        self.reader_slot_slow()
    }

    #[cold]
    fn reader_slot_slow(&self) -> Option<&ReaderSlot> {
        READERS
            .try_with(|r| {
                let mut r = r.borrow_mut();
                let slot = match r.0.iter().find(|(u, _)| *u == self.uid) {
                    Some((_, s)) => s.clone(),
                    None => {
                        let s = Arc::new(ReaderSlot::default());
                        self.readers.lock().push(s.clone());
                        r.0.retain(|(_, s)| !s.retired.load(Ordering::Relaxed));
                        r.0.push((self.uid, s.clone()));
                        s
                    }
                };
                READER.with(|c| c.set((self.uid, Arc::as_ptr(&slot))));
                // SAFETY: as in `reader_slot`: `READERS` holds this `Arc` (found or pushed).
                unsafe { &*Arc::as_ptr(&slot) }
            })
            .ok()
    }

    /// Writes the stripe of `hash`: its write lock, then (asymmetric protocol) `writing` set, a
    /// process-wide barrier, and a wait for the marked readers of this stripe to leave.
    fn write(&self, hash: u64) -> StripeWrite<'_> {
        self.write_stripe(Self::stripe_index(hash))
    }

    fn write_stripe(&self, idx: usize) -> StripeWrite<'_> {
        let idx = idx % STRIPES;
        let stripe = &self.stripes[idx];
        let guard = stripe.lock.write();
        if crate::asym::asymmetric() {
            stripe.writing.store(true, Ordering::Relaxed);
            crate::asym::membarrier::barrier();
            let mut readers = self.readers.lock();
            // Slots whose thread exited (only this registry holds them) never read again.
            readers.retain(|s| Arc::strong_count(s) > 1);
            for s in readers.iter() {
                let mut spins = 0u32;
                while s.active.load(Ordering::Acquire) == idx + 1 {
                    spins += 1;
                    if spins < 128 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
        StripeWrite { stripe, guard }
    }

    /// The collector connection is up (snapshots are current) or down (they age from now).
    pub fn set_connected(&self, up: bool, now_ms: i64) {
        self.synced_at_ms.store(now_ms, Ordering::Relaxed);
        self.connected.store(up, Ordering::Relaxed);
    }

    #[inline]
    fn freshness(&self, c: &CustomerSlot, now_ms: i64) -> Freshness {
        self.freshness_known(c.known, now_ms)
    }

    /// The freshness of a customer that a snapshot lists (`known`) or not.
    #[inline]
    fn freshness_known(&self, known: bool, now_ms: i64) -> Freshness {
        if !known {
            return Freshness::NoSnapshot;
        }
        if self.connected.load(Ordering::Relaxed) {
            return Freshness::Current;
        }
        let age = now_ms.saturating_sub(self.synced_at_ms.load(Ordering::Relaxed));
        if age > self.stale_after_ms {
            Freshness::Stale
        } else {
            Freshness::Current
        }
    }

    fn push(&self, m: Outgoing) -> bool {
        let mut q = self.outbox.lock();
        if q.len() >= MAX_OUTBOX {
            self.stats.outbox_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push_back(m);
        drop(q);
        if let Some(w) = self.wake.get() {
            w();
        }
        true
    }

    /// Takes up to `max` queued messages, oldest first.
    pub fn drain_outbox(&self, max: usize) -> Vec<Outgoing> {
        let mut q = self.outbox.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    fn maybe_request(&self, c: &CustomerSlot, now_ms: i64) {
        let last = c.requested_at_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= REQUEST_AGAIN_MS
            && c.requested_at_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.push(Outgoing::Snapshot(c.customer.clone()));
        }
    }

    fn policy_decision(&self, fresh: Freshness) -> Decision {
        let decided_by = if fresh == Freshness::NoSnapshot {
            DecidedBy::NoSnapshot
        } else {
            DecidedBy::StaleSnapshot
        };
        Decision {
            allowed: self.cfg.default_policy != OfflinePolicy::Deny,
            decided_by,
            stale: true,
        }
    }

    /// Whether `customer` has `feature`.
    pub fn check(&self, customer: &str, feature: &str, now_ms: i64) -> Decision {
        let hash = self.hash(customer);
        {
            let t = self.read(hash);
            if let Some(c) = t.find(hash, |s| s.is(customer)) {
                let fresh = self.freshness(c, now_ms);
                if fresh != Freshness::Current {
                    if !c.known {
                        self.maybe_request(c, now_ms);
                    }
                    return self.policy_decision(fresh);
                }
                return match c.feature(feature) {
                    Some(source) => Decision {
                        allowed: true,
                        decided_by: DecidedBy::from_source(
                            SOURCES[usize::from(source) % SOURCES.len()],
                        ),
                        stale: false,
                    },
                    None => Decision {
                        allowed: false,
                        decided_by: DecidedBy::Plan,
                        stale: false,
                    },
                };
            }
        }
        if let Ok(id) = CustomerId::new(customer) {
            self.placeholder(id, hash, now_ms);
        }
        self.policy_decision(Freshness::NoSnapshot)
    }

    /// Whether the customer is listed by a snapshot (decisions about it are not by policy).
    pub fn known(&self, customer: &str) -> bool {
        let hash = self.hash(customer);
        let t = self.read(hash);
        t.find(hash, |s| s.is(customer)).is_some_and(|c| c.known)
    }

    /// The limit of `customer` on `meter`.
    pub fn limit(&self, customer: &str, meter: &str, now_ms: i64) -> Limit {
        let hash = self.hash(customer);
        {
            let t = self.read(hash);
            if let Some(c) = t.find(hash, |s| s.is(customer)) {
                let fresh = self.freshness(c, now_ms);
                if !c.known {
                    self.maybe_request(c, now_ms);
                }
                let stale = fresh != Freshness::Current;
                return match c.meter(meter) {
                    Some(m) => {
                        let st = m.lock(now_ms);
                        let lim = st.limit();
                        Limit {
                            limit: lim.map(|l| l.limit),
                            used: st.used(),
                            remaining: st.remaining(),
                            enforcement: lim.map(|l| l.enforcement),
                            stale,
                            decided_by: st.decider(fresh, now_ms),
                            leased_available: lim
                                .filter(|l| l.enforcement == Enforcement::Hard)
                                .map(|_| st.available(now_ms)),
                        }
                    }
                    None => Limit {
                        limit: None,
                        used: Decimal::ZERO,
                        remaining: None,
                        enforcement: None,
                        stale,
                        decided_by: MeterState::new(None, OfflinePolicy::Deny)
                            .decider(fresh, now_ms),
                        leased_available: None,
                    },
                };
            }
        }
        if let Ok(id) = CustomerId::new(customer) {
            self.placeholder(id, hash, now_ms);
        }
        Limit {
            limit: None,
            used: Decimal::ZERO,
            remaining: None,
            enforcement: None,
            stale: true,
            decided_by: DecidedBy::NoSnapshot,
            leased_available: None,
        }
    }

    /// Adds an unknown customer (and asks for its snapshot) unless it is there or the table is
    /// full.
    fn placeholder(&self, id: CustomerId, hash: u64, now_ms: i64) {
        let mut t = self.write(hash);
        if t.find(hash, |s| s.customer == id).is_some() {
            return;
        }
        if self.customers.load(Ordering::Relaxed) >= MAX_CUSTOMERS {
            return;
        }
        t.insert_unique(hash, CustomerSlot::new(id.clone(), hash, now_ms), |s| {
            s.hash
        });
        self.customers.fetch_add(1, Ordering::Relaxed);
        drop(t);
        self.push(Outgoing::Snapshot(id));
    }

    /// Adds the meter slot of `customer` (and the customer) if missing.
    fn add_meter(
        &self,
        customer: &str,
        meter: &str,
        hash: u64,
        now_ms: i64,
    ) -> Result<(), RecordError> {
        let id = CustomerId::new(customer).map_err(RecordError::InvalidCustomer)?;
        let meter = MeterName::new(meter).map_err(RecordError::InvalidMeter)?;
        self.placeholder(id, hash, now_ms);
        let mut t = self.write(hash);
        let Index {
            customers,
            first_meters,
        } = &mut *t;
        let Some(c) = customers.find_mut(hash, |s| s.is(customer)) else {
            return Ok(());
        };
        if c.meter(meter.as_str()).is_some() || c.meter_count() >= MAX_METERS_PER_CUSTOMER {
            return Ok(());
        }
        let slot = MeterSlot::new(
            c.customer.clone(),
            meter.clone(),
            None,
            self.cfg.policy(meter.as_str()),
            now_ms,
        );
        c.push_meter(first_meters, &self.hasher, meter.as_str(), slot);
        Ok(())
    }

    /// Runs `f` on the slot of (`customer`, `meter`), creating it on first use.
    pub fn with_slot<R>(
        &self,
        customer: &str,
        meter: &str,
        now_ms: i64,
        f: impl FnOnce(&Arc<MeterSlot>, Freshness) -> R,
    ) -> Result<R, RecordError> {
        let hash = self.hash(customer);
        let mut f = Some(f);
        for _ in 0..2 {
            {
                let t = self.read(hash);
                // A known customer's first meter: no read of the customer slot (decision 0129).
                if let Some(m) = Self::first_meter(&t, hash, customer, super::fast::lane_hint())
                    && m.head.meter.is(meter, || m.meter.as_str() == meter)
                    && m.head.known.load(Ordering::Relaxed)
                {
                    let fresh = self.freshness_known(true, now_ms);
                    if let Some(f) = f.take() {
                        return Ok(f(m, fresh));
                    }
                }
                if let Some(c) = t.find(hash, |s| s.is(customer)) {
                    if let Some(m) = c.meter(meter) {
                        let fresh = self.freshness(c, now_ms);
                        if !c.known {
                            self.maybe_request(c, now_ms);
                        }
                        if let Some(f) = f.take() {
                            return Ok(f(m, fresh));
                        }
                    }
                }
            }
            self.add_meter(customer, meter, hash, now_ms)?;
        }
        // The table is full: decide by a policy that cannot be counted, without state.
        let policy = match self.cfg.policy(meter) {
            OfflinePolicy::AllowUpTo(_) => OfflinePolicy::Deny,
            p => p,
        };
        let slot = MeterSlot::new(
            CustomerId::new(customer).map_err(RecordError::InvalidCustomer)?,
            MeterName::new(meter).map_err(RecordError::InvalidMeter)?,
            None,
            policy,
            now_ms,
        );
        let f = f.ok_or(RecordError::Closed)?;
        Ok(f(&slot, Freshness::NoSnapshot))
    }

    /// After a take: queue a refill, count a denial or an overshoot.
    pub(crate) fn after_take(&self, slot: &MeterSlot, t: &Take, refill: Option<(i64, Decimal)>) {
        if !t.allowed {
            self.stats.denials[t.decided_by.index()].fetch_add(1, Ordering::Relaxed);
        }
        if t.overshoot > Decimal::ZERO {
            *self.stats.overshoot.lock() += t.overshoot;
        }
        if let Some((period_start_ms, quantity)) = refill {
            self.request_lease(slot, period_start_ms, quantity);
        }
    }

    /// Consumes `qty` if allowed and then runs `record` under the meter's lock (so a lease is
    /// never released between the decision and the recording); a failed `record` undoes it.
    /// Returns the take and whether a lease or snapshot answer is pending (worth waiting for).
    pub fn try_consume(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
        now_ms: i64,
        record: impl FnOnce(&MeterSlot) -> Result<(), RecordError>,
    ) -> Result<(Take, bool), RecordError> {
        self.try_consume_warm(customer, meter, qty, now_ms, |_| {}, record)
    }

    /// [`Table::try_consume`], first calling `warm` with the slot, before its lock-free line is
    /// read: the agent prefetches the accumulator `record` will write by the slot's key hint,
    /// so that miss overlaps the slot's (decisions 0112, 0129).
    pub(crate) fn try_consume_warm(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
        now_ms: i64,
        warm: impl FnOnce(&MeterSlot),
        record: impl FnOnce(&MeterSlot) -> Result<(), RecordError>,
    ) -> Result<(Take, bool), RecordError> {
        self.with_slot(customer, meter, now_ms, |slot, fresh| {
            warm(slot);
            let lane = super::fast::lane();
            if let Some(f) = slot
                .fast
                .take(lane, qty, fresh == Freshness::Current, now_ms)
            {
                return self.fast_taken(slot, f, qty, fresh, now_ms, record);
            }
            let mut st = slot.lock(now_ms);
            st.wanted(qty);
            let t = st.take(qty, Hold::Consume, fresh, now_ms);
            if t.allowed
                && let Err(e) = record(slot)
            {
                st.untake(t.booked, qty);
                return Err(e);
            }
            let refill = st.want_refill(qty, fresh, now_ms);
            let pending =
                !t.allowed && (fresh == Freshness::NoSnapshot || st.request_pending(now_ms));
            drop(st);
            self.after_take(slot, &t, refill);
            Ok((t, pending))
        })?
    }

    /// `try_consume`'s lock-free answer for a known customer and meter with something
    /// published, without the closures, retries and answer types of the general path (a fifth
    /// of its instructions). `None`: nothing was taken, take [`Table::try_consume_warm`] (it
    /// looks again and decides the same way or under the lock). `Some`: final, the quantity was
    /// taken and `record` ran: what decided and what remains, or `record`'s error (undone).
    #[inline]
    pub(crate) fn try_consume_lockfree(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
        now_ms: i64,
        warm: impl FnOnce(&MeterSlot),
        record: impl FnOnce(&MeterSlot) -> Result<(), RecordError>,
    ) -> Option<Result<(DecidedBy, Option<Decimal>), RecordError>> {
        let hash = self.hash(customer);
        let lane = super::fast::lane();
        let t = self.read(hash);
        let slot = match Self::first_meter(&t, hash, customer, lane) {
            Some(first) if first.head.meter.is(meter, || first.meter.as_str() == meter) => &**first,
            // Another meter of the customer: through its slot (no customer without a first
            // meter has others).
            Some(_) => t.find(hash, |s| s.is(customer))?.more_meter(meter)?,
            None => return None,
        };
        if !slot.head.known.load(Ordering::Relaxed) {
            return None;
        }
        let fresh = self.freshness_known(true, now_ms);
        warm(slot);
        let f = slot
            .fast
            .take(lane, qty, fresh == Freshness::Current, now_ms)?;
        Some(
            self.fast_taken(slot, f, qty, fresh, now_ms, record)
                .map(|(t, _)| (t.decided_by, t.remaining)),
        )
    }

    /// The first meter slot of `customer`, through the stripe's table of pointers: its head and
    /// lock-free lines are requested together (the prefetch in the comparison), not the
    /// lock-free one after the customer slot's line (decision 0129).
    #[inline]
    fn first_meter<'t>(
        t: &'t Index,
        hash: u64,
        customer: &str,
        lane: usize,
    ) -> Option<&'t Arc<MeterSlot>> {
        t.first_meters.find(hash, |m| {
            crate::aggregate::prefetch_line(m.fast.line(lane));
            m.head
                .customer
                .is(customer, || m.customer.as_str() == customer)
        })
    }

    /// Records a lock-free take and answers it; a lease running low takes the lock to refill.
    #[inline]
    fn fast_taken(
        &self,
        slot: &MeterSlot,
        f: FastTake,
        qty: Decimal,
        fresh: Freshness,
        now_ms: i64,
        record: impl FnOnce(&MeterSlot) -> Result<(), RecordError>,
    ) -> Result<(Take, bool), RecordError> {
        match f {
            FastTake::Lease {
                lane,
                tag,
                units,
                remaining,
                refill,
                scale,
            } => {
                let r = record(slot);
                slot.fast.end_lease(lane, tag, units, r.is_ok());
                r?;
                if refill {
                    let mut st = slot.lock(now_ms);
                    let want = st.want_refill(qty, fresh, now_ms);
                    drop(st);
                    if let Some((period_start_ms, quantity)) = want {
                        self.request_lease(slot, period_start_ms, quantity);
                    }
                }
                Ok((
                    Take {
                        allowed: true,
                        decided_by: DecidedBy::Lease,
                        remaining: Some(units_decimal(remaining.max(0) as u64, scale)),
                        // Recorded already: nothing to undo or release under it.
                        booked: Booked::None,
                        overshoot: Decimal::ZERO,
                    },
                    false,
                ))
            }
            FastTake::Local {
                lane,
                tag,
                units,
                remaining,
                overshoot,
                decided_by,
                scale,
            } => {
                if let Err(e) = record(slot) {
                    if !slot.fast.undo_local(lane, tag, units) {
                        slot.lock(now_ms).untake(Booked::Local, qty);
                    }
                    return Err(e);
                }
                if overshoot > 0
                    && let Some(c) = self.stats.overshoot_units.get(scale as usize)
                {
                    c.fetch_add(overshoot, Ordering::Relaxed);
                }
                Ok((
                    Take {
                        allowed: true,
                        decided_by,
                        remaining: remaining.map(|r| units_decimal(r.max(0) as u64, scale)),
                        booked: Booked::Local,
                        overshoot: units_decimal(overshoot, scale),
                    },
                    false,
                ))
            }
        }
    }

    fn request_lease(&self, slot: &MeterSlot, period_start_ms: i64, quantity: Decimal) {
        self.stats.lease_requests.fetch_add(1, Ordering::Relaxed);
        self.push(Outgoing::Lease {
            customer: slot.customer.clone(),
            meter: slot.meter.clone(),
            period_start_ms,
            quantity,
        });
    }

    /// Takes `qty` for a durable record (consumption, or a hold for a reservation); a taken
    /// consumption is marked in flight until [`Table::end_inflight`]. Returns the slot, the take
    /// and whether an answer is pending.
    pub fn take_slot(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
        hold: Hold,
        now_ms: i64,
    ) -> Result<(Arc<MeterSlot>, Take, bool), RecordError> {
        self.with_slot(customer, meter, now_ms, |slot, fresh| {
            let mut st = slot.lock(now_ms);
            let t = st.take(qty, hold, fresh, now_ms);
            if t.allowed && hold == Hold::Consume {
                st.begin_inflight(t.booked);
            }
            let refill = st.want_refill(qty, fresh, now_ms);
            let pending =
                !t.allowed && (fresh == Freshness::NoSnapshot || st.request_pending(now_ms));
            drop(st);
            self.after_take(slot, &t, refill);
            (slot.clone(), t, pending)
        })
    }

    /// The freshness of `customer` now.
    pub fn freshness_of(&self, customer: &str, now_ms: i64) -> Freshness {
        let hash = self.hash(customer);
        let t = self.read(hash);
        t.find(hash, |s| s.is(customer))
            .map_or(Freshness::NoSnapshot, |c| self.freshness(c, now_ms))
    }

    /// A durable record under `booked` ended; `ok == false` undoes it.
    pub fn end_inflight(
        &self,
        slot: &MeterSlot,
        booked: Booked,
        qty: Decimal,
        ok: bool,
        now_ms: i64,
    ) {
        slot.lock(now_ms).end_inflight(booked, qty, ok);
    }

    /// Applies a snapshot update: the customers it lists (all others become unknown when
    /// `full`). The snapshot is current as of `now_ms`.
    pub fn apply(&self, customers: &[CustomerEntitlements], full: bool, now_ms: i64) {
        if full {
            let listed: std::collections::HashSet<&str> =
                customers.iter().map(|c| c.customer.as_str()).collect();
            let mut gone = Vec::new();
            for i in 0..STRIPES {
                for c in self.read_stripe(i).iter() {
                    if c.known && !listed.contains(c.customer.as_str()) {
                        gone.push(c.customer.clone());
                    }
                }
            }
            let gone: Vec<(CustomerId, Option<&CustomerEntitlements>)> =
                gone.into_iter().map(|c| (c, None)).collect();
            self.upsert_all(gone.iter().map(|(c, ce)| (c, *ce)), now_ms);
        }
        self.upsert_all(customers.iter().map(|c| (&c.customer, Some(c))), now_ms);
        self.synced_at_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// Loads a cache kept on disk; it was current when the collector built it.
    pub fn load(&self, cache: &EntitlementsCache) {
        self.upsert_all(
            cache.customers.iter().map(|c| (&c.customer, Some(c))),
            cache.built_at_ms,
        );
        self.synced_at_ms
            .store(cache.built_at_ms, Ordering::Relaxed);
    }

    /// Upserts many customers, taking each stripe's write side once (one barrier per stripe,
    /// not per customer).
    fn upsert_all<'a>(
        &self,
        customers: impl Iterator<Item = (&'a CustomerId, Option<&'a CustomerEntitlements>)>,
        now_ms: i64,
    ) {
        let mut by_stripe: Vec<Vec<(u64, &CustomerId, Option<&CustomerEntitlements>)>> =
            (0..STRIPES).map(|_| Vec::new()).collect();
        for (id, ce) in customers {
            let hash = self.hash(id.as_str());
            if let Some(v) = by_stripe.get_mut(Self::stripe_index(hash)) {
                v.push((hash, id, ce));
            }
        }
        for (i, v) in by_stripe.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let mut t = self.write_stripe(i);
            for (hash, id, ce) in v {
                self.upsert_in(&mut t, *hash, id, *ce, now_ms);
            }
        }
    }

    fn upsert_in(
        &self,
        t: &mut Index,
        hash: u64,
        id: &CustomerId,
        ce: Option<&CustomerEntitlements>,
        now_ms: i64,
    ) {
        let Index {
            customers: t,
            first_meters,
        } = t;
        if t.find(hash, |s| s.customer == *id).is_none() {
            if self.customers.load(Ordering::Relaxed) >= MAX_CUSTOMERS {
                tracing::warn!(customer = %id, "entitlement table full; customer decided by policy");
                return;
            }
            self.customers.fetch_add(1, Ordering::Relaxed);
            t.insert_unique(hash, CustomerSlot::new(id.clone(), hash, now_ms), |s| {
                s.hash
            });
        }
        let Some(c) = t.find_mut(hash, |s| s.customer == *id) else {
            return;
        };
        for m in c.meters() {
            let lim = ce.and_then(|c| c.limits.iter().find(|l| l.meter == m.meter));
            m.lock(now_ms).on_snapshot(lim.map(LimitView::from));
        }
        if let Some(ce) = ce {
            for l in ce.limits.iter() {
                if c.meter_count() < MAX_METERS_PER_CUSTOMER && c.meter(l.meter.as_str()).is_none()
                {
                    let slot = MeterSlot::new(
                        id.clone(),
                        l.meter.clone(),
                        Some(LimitView::from(l)),
                        self.cfg.policy(l.meter.as_str()),
                        now_ms,
                    );
                    c.push_meter(first_meters, &self.hasher, l.meter.as_str(), slot);
                }
            }
        }
        c.set_known(ce.is_some());
        c.plan = ce.and_then(|c| c.plan.clone());
        c.set_features(ce.map(|c| c.features.to_vec()).unwrap_or_default());
    }

    /// Remembers leases as released: a grant for one of them (a request that crossed the
    /// release) is never consumed under.
    pub fn note_released(&self, ids: impl IntoIterator<Item = u64>) {
        let mut r = self.released.lock();
        for id in ids {
            if r.0.insert(id) {
                r.1.push_back(id);
            }
            while r.1.len() > MAX_RELEASED_IDS {
                if let Some(old) = r.1.pop_front() {
                    r.0.remove(&old);
                }
            }
        }
    }

    /// Applies a lease grant.
    pub fn on_grant(&self, g: &LeaseGrant, now_ms: i64) {
        self.stats.lease_grants.fetch_add(1, Ordering::Relaxed);
        let stale = self.released.lock().0.contains(&g.lease_id);
        let r = self.with_slot(g.customer.as_str(), g.meter.as_str(), now_ms, |slot, _| {
            if stale {
                slot.lock(now_ms).on_stale_grant();
                return;
            }
            let displaced = slot.lock(now_ms).on_grant(g, now_ms);
            if let Some(lease) = displaced {
                self.displaced.lock().push(ToRelease {
                    customer: slot.customer.clone(),
                    meter: slot.meter.clone(),
                    lease,
                });
            }
            if !slot.tracked.swap(true, Ordering::Relaxed) {
                self.leased.lock().push(slot.clone());
            }
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "lease grant for a customer the table cannot hold");
        }
    }

    /// Closes leases that expired or whose period ended (all of them when `force`), and returns
    /// those ready to release (nothing in flight under them).
    pub fn scan(&self, now_ms: i64, force: bool) -> Vec<ToRelease> {
        let out = self.scan_inner(now_ms, force);
        self.note_released(out.iter().map(|r| r.lease.id));
        out
    }

    fn scan_inner(&self, now_ms: i64, force: bool) -> Vec<ToRelease> {
        let mut out = std::mem::take(&mut *self.displaced.lock());
        let mut leased = self.leased.lock();
        leased.retain(|slot| {
            let mut st = slot.lock(now_ms);
            if let Some(lease) = st.due_release(now_ms, force) {
                out.push(ToRelease {
                    customer: slot.customer.clone(),
                    meter: slot.meter.clone(),
                    lease,
                });
            }
            let keep = st.lease().is_some();
            if !keep {
                slot.tracked.store(false, Ordering::Relaxed);
            }
            keep
        });
        out
    }

    /// Everything the table knows of `customer` (its snapshot is asked for when new).
    pub fn describe(&self, customer: &str, now_ms: i64) -> CustomerView {
        let hash = self.hash(customer);
        let found = {
            let t = self.read(hash);
            t.find(hash, |s| s.is(customer)).map(|c| {
                if !c.known {
                    self.maybe_request(c, now_ms);
                }
                let fresh = self.freshness(c, now_ms);
                CustomerView {
                    known: c.known,
                    stale: fresh != Freshness::Current,
                    decided_by: match fresh {
                        Freshness::Current => None,
                        Freshness::NoSnapshot => Some(DecidedBy::NoSnapshot),
                        Freshness::Stale => Some(DecidedBy::StaleSnapshot),
                    },
                    plan: c.plan.clone(),
                    features: c.features.clone(),
                    meters: c.meters().map(|m| m.meter.clone()).collect(),
                }
            })
        };
        if let Some(v) = found {
            return v;
        }
        if let Ok(id) = CustomerId::new(customer) {
            self.placeholder(id, hash, now_ms);
        }
        CustomerView {
            known: false,
            stale: true,
            decided_by: Some(DecidedBy::NoSnapshot),
            plan: None,
            features: Vec::new(),
            meters: Vec::new(),
        }
    }

    /// Checks [`Index::first_meters`]' invariant: exactly each customer's first meter, under
    /// its hash, with the customer's `known` in every meter's head.
    #[cfg(test)]
    pub(crate) fn assert_first_meters(&self) {
        for i in 0..STRIPES {
            let t = self.read_stripe(i);
            let mut firsts = 0;
            for c in t.customers.iter() {
                for m in c.meters() {
                    assert_eq!(m.head.known.load(Ordering::Relaxed), c.known);
                    assert!(m.head.customer.is(c.customer.as_str(), || true));
                }
                if let Some(m0) = &c.meter0 {
                    firsts += 1;
                    let found = t.first_meters.find(c.hash, |m| m.customer == c.customer);
                    assert!(found.is_some_and(|m| Arc::ptr_eq(m, m0)));
                }
            }
            assert_eq!(t.first_meters.len(), firsts);
        }
    }

    /// Customers listed by a snapshot, up to `max` (asked for again on reconnect).
    pub fn known_customers(&self, max: usize) -> Vec<CustomerId> {
        let mut out = Vec::new();
        for i in 0..STRIPES {
            for c in self.read_stripe(i).iter() {
                if out.len() >= max {
                    return out;
                }
                out.push(c.customer.clone());
            }
        }
        out
    }
}
