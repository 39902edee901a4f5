//! The agent's local store: one redb file, `data_dir/agent.redb`.
//!
//! Owns everything the agent must not lose: sealed batches until they are acknowledged, the
//! durable event log of `record_durable`, the event-id dedup set, the epoch and the next `seq`,
//! and the collector's catalog and entitlement snapshots.
//!
//! # Format (version 1)
//!
//! | table          | key               | value                                             |
//! |----------------|-------------------|---------------------------------------------------|
//! | `meta`         | `&str`            | `u64`: `format`, `epoch`, `next_seq`, `next_log_key`, `log_folded` |
//! | `batches`      | `u64` seq         | postcard [`StoredBatch`] (sealed time + signed batch) |
//! | `log`          | `u64` log key     | postcard [`LoggedEvent`] (legacy: drained, no longer written by the agent) |
//! | `snapshots`    | `&str`            | postcard `Catalog` (`catalog`) or [`EntitlementsCache`] (`entitlements`) |
//! | `dedup.<b>`    | `&str` event id   | `()`; one table per time bucket `b` of the dedup window |
//! | `leases`       | `u64` lease id    | postcard `LeaseGrant`: the last grant of a lease not yet released |
//! | `quarantine`   | `u64` seq         | postcard [`QuarantinedBatch`]: a batch this agent can no longer ship, and why |
//!
//! # Guarantees
//! - Every mutating method is one redb write transaction committed with
//!   `Durability::Immediate`: when it returns `Ok`, the change is fsynced; after a crash the
//!   store is exactly as after the last committed call (redb's copy-on-write commit with
//!   checksums).
//! - `epoch` is drawn at random when the file is created and never changes; `seq` counts up from
//!   1 within it and is never reused: [`Store::commit_seal`] refuses a seq below `next_seq`.
//! - [`Store::commit_seal`] inserts the new batches, advances `next_seq`, moves the segment
//!   log's `log_folded` watermark past the records they fold in (`crate::seglog`; refused if it
//!   would not move forward), deletes the legacy log rows they fold in and records their event
//!   ids, all in one transaction: a logged event is in exactly one sealed batch, or still in the
//!   log, never both and never neither.
//! - A batch leaves `batches` only through [`Store::ack`] or [`Store::quarantine`], which moves
//!   it whole into `quarantine` in one transaction: a batch signed with a key the agent no longer
//!   holds (its key was replaced) is kept there, never sent, listed by [`Store::quarantined`] for
//!   export, and does not hold up the batches after it (decision 0086).
//! - A batch is checked against the agent's key before it is written (the sealer asserts
//!   [`check_batch`]) and after it is read for shipping ([`Store::batch_for_shipping`]): its body
//!   decodes, its seq and epoch are the row's, its signature verifies. A mismatch on read is
//!   [`ForShipping::Unshippable`] with the reason (for the quarantine), never a panic.
//! - [`Store::seen_id`] asks an in-memory Bloom filter per dedup bucket first (built from the
//!   tables at open, fed by every seal before its commit, dropped with its bucket): an id never
//!   seen costs no disk read, and memory stays bounded at 512 KiB per bucket in the window.
//! - The dedup set remembers an id for at least the dedup window and at most the window plus
//!   one bucket (a seventh of the window): ids live in per-bucket tables and the oldest table is
//!   dropped whole once it is entirely outside the window, so memory and disk stay bounded.
//! - A lease is on disk before anything is consumed under it ([`Store::put_lease`] commits
//!   before the agent applies the grant) and leaves only once its release was handed to the
//!   session: a restarted agent releases every lease it finds here.

use crate::error::StoreError;
use parking_lot::{Mutex, RwLock};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use serde::{Deserialize, Serialize};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tally_protocol::Decimal;
use tally_protocol::batch::{BatchBody, SignedBatch};
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::LeaseGrant;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
const DEDUP_PREFIX: &str = "dedup.";

/// The store format this code writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// The dedup window is cut into this many buckets.
pub const DEDUP_BUCKETS: i64 = 7;

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::db(e)
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A sealed batch as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
    /// When it was sealed, ms since the Unix epoch.
    pub sealed_at_ms: i64,
    /// The signed batch, exactly as it is sent.
    pub batch: SignedBatch,
}

/// An event written by `record_durable`, waiting in the log to be sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// Who pays.
    pub customer: CustomerId,
    /// What was used.
    pub meter: MeterName,
    /// Dimensions.
    pub dimensions: Dimensions,
    /// Event time, ms since the Unix epoch.
    pub at_ms: i64,
    /// The quantity.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub quantity: Decimal,
    /// The idempotency key, if any.
    pub id: Option<String>,
    /// When the agent accepted it (the dedup bucket of `id`).
    pub accepted_at_ms: i64,
}

/// A batch taken out of shipping: kept whole, with why and when, until an operator exports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedBatch {
    /// The batch exactly as it was stored.
    pub stored: StoredBatch,
    /// Why it cannot be shipped (lowercase, no secrets).
    pub reason: String,
    /// When it was quarantined, ms since the Unix epoch.
    pub at_ms: i64,
}

/// What the shipper finds when it reads a batch to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForShipping {
    /// The batch, checked against the agent's key: send it.
    Ready(StoredBatch),
    /// Not in the store (acknowledged or quarantined meanwhile).
    Missing,
    /// In the store but not shippable under the agent's key (signed by an earlier key, or
    /// damaged): the reason, for [`Store::quarantine`].
    Unshippable(String),
}

pub use crate::entitlements::EntitlementsCache;

/// Size and age of one unacknowledged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    /// Its seq.
    pub seq: u64,
    /// Bytes of the stored row.
    pub bytes: u64,
    /// When it was sealed.
    pub sealed_at_ms: i64,
}

/// Everything one seal writes, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct SealCommit {
    /// The new batches, in seq order.
    pub batches: Vec<(u64, StoredBatch)>,
    /// `next_seq` after them.
    pub next_seq: u64,
    /// Durable-log rows with keys up to this one are folded in and deleted.
    pub log_upto: Option<u64>,
    /// Segment-log records with lsns up to this one are folded in: the store's `log_folded`
    /// watermark moves here in the same transaction as the batches (`seglog`).
    pub seglog_upto: Option<u64>,
    /// Event ids to remember, with the time each was accepted.
    pub ids: Vec<(String, i64)>,
    /// Now, for dropping expired dedup buckets.
    pub now_ms: i64,
}

/// The bucketing of the dedup window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupWindow {
    window_ms: i64,
    bucket_ms: i64,
}

impl DedupWindow {
    /// A window of `window`, cut into [`DEDUP_BUCKETS`] buckets.
    pub fn new(window: Duration) -> Self {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
        DedupWindow {
            window_ms,
            bucket_ms: (window_ms / DEDUP_BUCKETS).max(1),
        }
    }

    /// The bucket an id accepted at `at_ms` goes to.
    pub fn bucket(&self, at_ms: i64) -> u64 {
        u64::try_from(at_ms.max(0).div_euclid(self.bucket_ms)).unwrap_or(0)
    }

    /// The oldest bucket still inside the window at `now_ms`.
    pub fn oldest_live(&self, now_ms: i64) -> u64 {
        self.bucket(now_ms.saturating_sub(self.window_ms))
    }
}

fn dedup_table_name(bucket: u64) -> String {
    format!("{DEDUP_PREFIX}{bucket:020}")
}

fn dedup_bucket_of(name: &str) -> Option<u64> {
    name.strip_prefix(DEDUP_PREFIX)?.parse().ok()
}

fn corrupt(table: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: e.to_string(),
    }
}

fn encode<T: Serialize>(table: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(v).map_err(|e| corrupt(table, e))
}

fn decode<'a, T: Deserialize<'a>>(table: &'static str, b: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| corrupt(table, e))
}

/// Checks a stored batch: its body decodes and its signature verifies with `key`, its seq and
/// epoch are the row's, and its sealed time is the body's. Returns the body, or what is wrong.
pub fn check_batch(
    seq: u64,
    epoch: u64,
    b: &StoredBatch,
    key: &ed25519_dalek::VerifyingKey,
) -> Result<BatchBody, String> {
    let body = b
        .batch
        .verify(key)
        .map_err(|e| format!("batch {seq}: {e}"))?;
    if body.seq != seq || body.epoch != epoch {
        return Err(format!(
            "row {seq} of epoch {epoch} holds batch {} of epoch {}",
            body.seq, body.epoch
        ));
    }
    if body.sealed_at_ms != b.sealed_at_ms {
        return Err(format!("batch {seq}: sealed times differ"));
    }
    Ok(body)
}

/// Why a stored batch failed [`check_batch`]: a body naming another agent means the key was
/// replaced after it was sealed; anything else is damage.
fn unshippable_reason(
    b: &StoredBatch,
    key: &ed25519_dalek::VerifyingKey,
    detail: String,
) -> String {
    let ours = tally_protocol::batch::AgentId::from_public_key(key);
    match b.batch.decode_unverified() {
        Ok(body) if body.agent_id != ours => format!(
            "signed by agent {}, not by this agent's key ({ours}): the key was replaced after it was sealed",
            body.agent_id
        ),
        _ => format!("damaged: {detail}"),
    }
}

/// Whether `e` is an I/O failure (after which redb refuses the handle) rather than bad data.
fn is_io(e: &StoreError) -> bool {
    match e {
        StoreError::Db(e) => matches!(**e, redb::Error::Io(_) | redb::Error::PreviousIo),
        StoreError::Io { .. } => true,
        _ => false,
    }
}

fn random_u64() -> u64 {
    let mut b = [0; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // No OS randomness: fall back to the clock, still distinct across stores in practice.
        return tally_clock::Clock::now_ms(&tally_clock::SystemClock).unsigned_abs()
            ^ u64::from(std::process::id()) << 40;
    }
    u64::from_le_bytes(b)
}

/// Failure injection for tests: while [`DiskFaults::set_full`] is on, every write, resize and
/// sync of the agent's files (the redb store and the segment log) fails with `ENOSPC`, as on a
/// full disk; reads work. Lets a test show recovery without root or a real small file system.
#[derive(Debug, Clone, Default)]
pub struct DiskFaults(Arc<AtomicBool>);

impl DiskFaults {
    /// A disk with room.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills or frees the disk.
    pub fn set_full(&self, full: bool) {
        self.0.store(full, Ordering::SeqCst);
    }

    /// `ENOSPC` if the disk is full.
    pub fn check(&self) -> std::io::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        Ok(())
    }
}

/// redb's file backend behind [`DiskFaults`].
#[derive(Debug)]
struct FaultyBackend {
    inner: redb::backends::FileBackend,
    faults: DiskFaults,
}

impl redb::StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.faults.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.faults.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.faults.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(
        &self,
        s: Bound<u64>,
        e: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

/// Bits of one dedup bucket's id filter (512 KiB): about 1 % false positives at 440k ids in a
/// bucket; more ids only raise that rate (more disk lookups), never the memory.
const FILTER_BITS: u64 = 1 << 22;
/// Bits set per id.
const FILTER_HASHES: u64 = 4;

/// An in-memory Bloom filter per dedup bucket in front of the on-disk id tables: an id it has
/// never seen costs no disk read. Buckets leave with their tables, so memory is bounded by
/// (buckets in the window + 1) × [`FILTER_BITS`].
#[derive(Debug, Default)]
struct IdFilter {
    buckets: Mutex<std::collections::BTreeMap<u64, Box<[u64]>>>,
}

fn id_bits(id: &str) -> impl Iterator<Item = u64> {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let h1 =
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id);
    let h2 = h1.rotate_left(32) | 1;
    (0..FILTER_HASHES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % FILTER_BITS)
}

impl IdFilter {
    fn add(&self, bucket: u64, id: &str) {
        let mut b = self.buckets.lock();
        let bits = b
            .entry(bucket)
            .or_insert_with(|| vec![0u64; (FILTER_BITS / 64) as usize].into_boxed_slice());
        for i in id_bits(id) {
            bits[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// False only if no bucket from `oldest` on has ever had `id` added.
    fn may_contain(&self, id: &str, oldest: u64) -> bool {
        let b = self.buckets.lock();
        b.range(oldest..)
            .any(|(_, bits)| id_bits(id).all(|i| bits[(i / 64) as usize] & (1 << (i % 64)) != 0))
    }

    fn drop_below(&self, oldest: u64) {
        let mut b = self.buckets.lock();
        *b = b.split_off(&oldest);
    }
}

/// How long after a failed reopen the next call tries again (a full disk must not turn every
/// call into a recovery attempt).
const REOPEN_EVERY: Duration = Duration::from_millis(200);

/// The local store. Methods block on disk I/O; call them off the async runtime.
///
/// After an I/O error (a full disk, a failing device) redb refuses every later call on the same
/// handle (`PreviousIo`); the store then drops the handle and opens the file again (redb repairs
/// it from its last commit) on the next call, at most every [`REOPEN_EVERY`], so it recovers by
/// itself once the cause is gone. Until then calls fail with the error.
#[derive(Debug)]
pub struct Store {
    db: RwLock<Option<Database>>,
    path: PathBuf,
    faults: Option<DiskFaults>,
    /// The last I/O failure and when the next reopen may be tried, while the handle is broken.
    broken: Mutex<Option<(String, std::time::Instant)>>,
    /// The id filter in front of the dedup tables.
    filter: IdFilter,
    epoch: u64,
    dedup: DedupWindow,
}

impl Store {
    /// Opens or creates the store at `path`. A file that is missing while its marker says it was
    /// created, empty or not a redb file is refused and left alone (`tally_storefile`): starting
    /// afresh there would drop every unacknowledged batch without a word.
    pub fn open(path: &Path, dedup_window: Duration) -> Result<Store, StoreError> {
        Self::open_with(path, dedup_window, None)
    }

    /// redb's page cache ceiling. Its default is 1 GiB a database, which an agent linked into a
    /// product grew into as batches passed through (the sidecar at a full 64 MiB disk budget held
    /// 247 MiB); the working set here is the unacknowledged batches and the dedup index's upper
    /// pages, and the kernel's page cache is behind it anyway.
    const CACHE_BYTES: usize = 16 << 20;

    fn create_db(path: &Path, faults: Option<&DiskFaults>) -> Result<Database, StoreError> {
        Ok(match faults {
            None => Database::builder()
                .set_cache_size(Self::CACHE_BYTES)
                .create(path)?,
            Some(f) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|source| StoreError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
                let inner = redb::backends::FileBackend::new(file)?;
                Database::builder()
                    .set_cache_size(Self::CACHE_BYTES)
                    .create_with_backend(FaultyBackend {
                        inner,
                        faults: f.clone(),
                    })?
            }
        })
    }

    /// [`Store::open`] with its writes going through `faults` (tests).
    pub fn open_with(
        path: &Path,
        dedup_window: Duration,
        faults: Option<DiskFaults>,
    ) -> Result<Store, StoreError> {
        let found = tally_storefile::check(path)?;
        let db = Self::create_db(path, faults.as_ref())?;
        tally_storefile::private_file(path)?;
        let txn = db.begin_write()?;
        let epoch;
        {
            let mut meta = txn.open_table(META)?;
            let format = meta.get("format")?.map(|v| v.value());
            match format {
                None => {
                    epoch = random_u64().max(1);
                    meta.insert("format", FORMAT_VERSION)?;
                    meta.insert("epoch", epoch)?;
                    meta.insert("next_seq", 1)?;
                    meta.insert("next_log_key", 0)?;
                }
                Some(FORMAT_VERSION) => {
                    epoch = meta
                        .get("epoch")?
                        .map(|v| v.value())
                        .ok_or_else(|| corrupt("meta", "no epoch"))?;
                }
                Some(v) => return Err(corrupt("meta", format!("unknown format {v}"))),
            }
            txn.open_table(BATCHES)?;
            txn.open_table(LOG)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(LEASES)?;
            txn.open_table(QUARANTINE)?;
        }
        txn.commit()?;
        if found == tally_storefile::Found::Nothing {
            tally_storefile::mark(path)?;
        }
        // The filter learns every id on disk (bounded: at most the window's buckets).
        let filter = IdFilter::default();
        {
            let txn = db.begin_read()?;
            let names: Vec<(u64, String)> = txn
                .list_tables()?
                .filter_map(|h| Some((dedup_bucket_of(h.name())?, h.name().to_owned())))
                .collect();
            for (bucket, name) in names {
                let t = txn.open_table(TableDefinition::<&str, ()>::new(&name))?;
                for row in t.iter()? {
                    filter.add(bucket, row?.0.value());
                }
            }
        }
        Ok(Store {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            faults,
            broken: Mutex::new(None),
            filter,
            epoch,
            dedup: DedupWindow::new(dedup_window),
        })
    }

    /// Runs `f` on the database; an I/O failure marks the handle broken (see [`Store`]).
    fn run<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.recover()?;
        let r = {
            let g = self.db.read();
            g.as_ref().map(f)
        };
        let Some(r) = r else {
            return Err(self.unavailable());
        };
        if let Err(e) = &r
            && is_io(e)
        {
            let mut b = self.broken.lock();
            if b.is_none() {
                tracing::error!(error = %e, "store i/o failed; reopening it once the cause is gone");
                *b = Some((e.to_string(), std::time::Instant::now()));
            }
        }
        r
    }

    fn unavailable(&self) -> StoreError {
        let why = self
            .broken
            .lock()
            .as_ref()
            .map_or_else(|| "closed".to_owned(), |(e, _)| e.clone());
        StoreError::Io {
            path: self.path.display().to_string(),
            source: std::io::Error::other(format!("store unavailable after an i/o error: {why}")),
        }
    }

    /// The last I/O failure while the store is broken (not yet reopened), for readiness.
    pub fn failure(&self) -> Option<String> {
        self.broken.lock().as_ref().map(|(e, _)| e.clone())
    }

    /// Reopens a broken handle, at most every [`REOPEN_EVERY`].
    fn recover(&self) -> Result<(), StoreError> {
        let mut b = self.broken.lock();
        let Some((why, at)) = b.as_ref() else {
            return Ok(());
        };
        if at.elapsed() < REOPEN_EVERY {
            let why = why.clone();
            drop(b);
            return Err(StoreError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(format!(
                    "store unavailable after an i/o error: {why}"
                )),
            });
        }
        let mut g = self.db.write();
        // The old handle must be gone (it holds the file lock) before the file is opened again.
        *g = None;
        let reopened = Self::create_db(&self.path, self.faults.as_ref()).and_then(|db| {
            let epoch = {
                let txn = db.begin_read()?;
                let meta = txn.open_table(META)?;
                meta.get("epoch")?.map(|v| v.value())
            };
            if epoch != Some(self.epoch) {
                return Err(corrupt("meta", "the reopened store has another epoch"));
            }
            Ok(db)
        });
        match reopened {
            Ok(db) => {
                *g = Some(db);
                *b = None;
                tracing::info!("store reopened after an i/o error");
                Ok(())
            }
            Err(e) => {
                *b = Some((e.to_string(), std::time::Instant::now()));
                Err(e)
            }
        }
    }

    /// The epoch of this store, fixed at creation.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The dedup bucketing.
    pub fn dedup_window(&self) -> DedupWindow {
        self.dedup
    }

    fn meta(&self, key: &str) -> Result<u64, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            meta.get(key)?
                .map(|v| v.value())
                .ok_or_else(|| corrupt("meta", format!("no {key}")))
        })
    }

    /// The seq the next sealed batch gets.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        self.meta("next_seq")
    }

    /// The highest segment-log lsn folded into a sealed batch (0 before the first).
    pub fn log_folded(&self) -> Result<u64, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            Ok(meta.get("log_folded")?.map_or(0, |v| v.value()))
        })
    }

    /// Appends events to the legacy redb log in one commit; returns the bytes written. The agent
    /// writes `record_durable` to the segment log (`seglog`) and only drains this table (rows a
    /// store written before it may still hold).
    pub fn append_log(&self, events: &[LoggedEvent]) -> Result<u64, StoreError> {
        self.run(|db| {
            let txn = db.begin_write()?;
            let mut bytes = 0;
            {
                let mut meta = txn.open_table(META)?;
                let mut key = meta
                    .get("next_log_key")?
                    .map(|v| v.value())
                    .ok_or_else(|| corrupt("meta", "no next_log_key"))?;
                let mut log = txn.open_table(LOG)?;
                for e in events {
                    let row = encode("log", e)?;
                    bytes += row.len() as u64;
                    log.insert(key, row.as_slice())?;
                    key += 1;
                }
                meta.insert("next_log_key", key)?;
            }
            txn.commit()?;
            Ok(bytes)
        })
    }

    /// Up to `limit` durable-log rows, oldest first.
    pub fn read_log(&self, limit: usize) -> Result<Vec<(u64, LoggedEvent)>, StoreError> {
        self.read_log_from(0, limit)
    }

    /// Up to `limit` durable-log rows with keys from `from` on, oldest first: one page of a
    /// bounded scan (the next page starts after the last key returned).
    pub fn read_log_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LoggedEvent)>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let log = txn.open_table(LOG)?;
            let mut out = Vec::with_capacity(limit.min(4096));
            for row in log.range(from..)?.take(limit) {
                let (k, v) = row?;
                out.push((k.value(), decode("log", v.value())?));
            }
            Ok(out)
        })
    }

    /// Rows and bytes in the durable log.
    pub fn log_size(&self) -> Result<(u64, u64), StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let log = txn.open_table(LOG)?;
            let mut bytes = 0;
            for row in log.iter()? {
                bytes += row?.1.value().len() as u64;
            }
            Ok((log.len()?, bytes))
        })
    }

    /// Writes one seal: new batches, `next_seq`, folded log rows, event ids; one transaction.
    /// Returns the stored size of each batch row, in order.
    pub fn commit_seal(&self, c: &SealCommit) -> Result<Vec<u64>, StoreError> {
        self.run(|db| {
            let mut sizes = Vec::with_capacity(c.batches.len());
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                let next = meta
                    .get("next_seq")?
                    .map(|v| v.value())
                    .ok_or_else(|| corrupt("meta", "no next_seq"))?;
                let mut batches = txn.open_table(BATCHES)?;
                let mut expect = next;
                for (seq, b) in &c.batches {
                    // Seqs are never reused and never skipped.
                    if *seq != expect {
                        return Err(corrupt(
                            "batches",
                            format!("seq {seq} sealed but next_seq is {expect}"),
                        ));
                    }
                    expect += 1;
                    let row = encode("batches", b)?;
                    sizes.push(row.len() as u64);
                    batches.insert(*seq, row.as_slice())?;
                }
                if c.next_seq != expect {
                    return Err(corrupt(
                        "meta",
                        format!("next_seq {} does not follow the batches", c.next_seq),
                    ));
                }
                meta.insert("next_seq", expect)?;
                if let Some(upto) = c.seglog_upto {
                    let was = meta.get("log_folded")?.map_or(0, |v| v.value());
                    if upto <= was {
                        return Err(corrupt(
                            "meta",
                            format!("log records up to {upto} folded again (watermark {was})"),
                        ));
                    }
                    meta.insert("log_folded", upto)?;
                }
                if let Some(upto) = c.log_upto {
                    let mut log = txn.open_table(LOG)?;
                    log.retain_in(..=upto, |_, _| false)?;
                }
                for (id, at) in &c.ids {
                    let bucket = self.dedup.bucket(*at);
                    let name = dedup_table_name(bucket);
                    let mut t = txn.open_table(TableDefinition::<&str, ()>::new(&name))?;
                    t.insert(id.as_str(), ())?;
                    // Before the commit: if it fails, the filter only has a false positive.
                    self.filter.add(bucket, id);
                }
                let oldest = self.dedup.oldest_live(c.now_ms);
                let expired: Vec<_> = txn
                    .list_tables()?
                    .filter(|h| dedup_bucket_of(h.name()).is_some_and(|b| b < oldest))
                    .collect();
                for h in expired {
                    txn.delete_table(h)?;
                }
            }
            txn.commit()?;
            self.filter.drop_below(self.dedup.oldest_live(c.now_ms));
            Ok(sizes)
        })
    }

    /// Deletes acknowledged batches in one commit; returns those that were there.
    pub fn ack(&self, seqs: &[u64]) -> Result<Vec<BatchMeta>, StoreError> {
        self.run(|db| {
            let txn = db.begin_write()?;
            let mut removed = Vec::new();
            {
                let mut batches = txn.open_table(BATCHES)?;
                for seq in seqs {
                    if let Some(row) = batches.remove(*seq)? {
                        let b: StoredBatch = decode("batches", row.value())?;
                        removed.push(BatchMeta {
                            seq: *seq,
                            bytes: row.value().len() as u64,
                            sealed_at_ms: b.sealed_at_ms,
                        });
                    }
                }
            }
            txn.commit()?;
            Ok(removed)
        })
    }

    /// Every unacknowledged batch, in seq order.
    pub fn unacked(&self) -> Result<Vec<BatchMeta>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let batches = txn.open_table(BATCHES)?;
            let mut out = Vec::new();
            for row in batches.iter()? {
                let (k, v) = row?;
                let b: StoredBatch = decode("batches", v.value())?;
                out.push(BatchMeta {
                    seq: k.value(),
                    bytes: v.value().len() as u64,
                    sealed_at_ms: b.sealed_at_ms,
                });
            }
            Ok(out)
        })
    }

    /// One unacknowledged batch.
    pub fn batch(&self, seq: u64) -> Result<Option<StoredBatch>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let batches = txn.open_table(BATCHES)?;
            batches
                .get(seq)?
                .map(|v| decode("batches", v.value()))
                .transpose()
        })
    }

    /// The batch `seq` for shipping: [`ForShipping::Unshippable`] when it fails [`check_batch`]
    /// under `key`, with the reason — `signed by agent X, not this agent's key` when its body
    /// names another agent (the key was replaced since it was sealed), else what the check found.
    pub fn batch_for_shipping(
        &self,
        seq: u64,
        key: &ed25519_dalek::VerifyingKey,
    ) -> Result<ForShipping, StoreError> {
        let Some(b) = self.batch(seq)? else {
            return Ok(ForShipping::Missing);
        };
        Ok(match check_batch(seq, self.epoch, &b, key) {
            Ok(_) => ForShipping::Ready(b),
            Err(detail) => ForShipping::Unshippable(unshippable_reason(&b, key, detail)),
        })
    }

    /// Moves batch `seq` from the batches to the quarantine in one commit; returns its size and
    /// age, or `None` if it was not among the batches.
    pub fn quarantine(
        &self,
        seq: u64,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<BatchMeta>, StoreError> {
        self.run(|db| {
            let txn = db.begin_write()?;
            let meta = {
                let mut batches = txn.open_table(BATCHES)?;
                let Some(row) = batches.remove(seq)? else {
                    return Ok(None);
                };
                let stored: StoredBatch = decode("batches", row.value())?;
                let meta = BatchMeta {
                    seq,
                    bytes: row.value().len() as u64,
                    sealed_at_ms: stored.sealed_at_ms,
                };
                drop(row);
                let q = QuarantinedBatch {
                    stored,
                    reason: reason.to_owned(),
                    at_ms: now_ms,
                };
                txn.open_table(QUARANTINE)?
                    .insert(seq, encode("quarantine", &q)?.as_slice())?;
                meta
            };
            txn.commit()?;
            Ok(Some(meta))
        })
    }

    /// Every quarantined batch, in seq order.
    pub fn quarantined(&self) -> Result<Vec<(u64, QuarantinedBatch)>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(QUARANTINE)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                out.push((k.value(), decode("quarantine", v.value())?));
            }
            Ok(out)
        })
    }

    /// Whether `id` was sealed within the dedup window as of `now_ms`.
    pub fn seen_id(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        if !self.filter.may_contain(id, self.dedup.oldest_live(now_ms)) {
            return Ok(false);
        }
        self.run(|db| {
            let txn = db.begin_read()?;
            let oldest = self.dedup.oldest_live(now_ms);
            let names: Vec<String> = txn
                .list_tables()?
                .map(|h| h.name().to_owned())
                .filter(|n| dedup_bucket_of(n).is_some_and(|b| b >= oldest))
                .collect();
            for name in names {
                let t = txn.open_table(TableDefinition::<&str, ()>::new(&name))?;
                if t.get(id)?.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// The dedup buckets on disk, oldest first.
    pub fn dedup_buckets(&self) -> Result<Vec<u64>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let mut b: Vec<u64> = txn
                .list_tables()?
                .filter_map(|h| dedup_bucket_of(h.name()))
                .collect();
            b.sort_unstable();
            Ok(b)
        })
    }

    fn put_snapshot(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.run(|db| {
            let txn = db.begin_write()?;
            txn.open_table(SNAPSHOTS)?.insert(name, bytes)?;
            txn.commit()?;
            Ok(())
        })
    }

    fn snapshot<T: for<'a> Deserialize<'a>>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(SNAPSHOTS)?;
            t.get(name)?
                .map(|v| decode("snapshots", v.value()))
                .transpose()
        })
    }

    /// Keeps the collector's catalog.
    pub fn put_catalog(&self, c: &Catalog) -> Result<(), StoreError> {
        self.put_snapshot("catalog", &encode("snapshots", c)?)
    }

    /// The last catalog kept.
    pub fn catalog(&self) -> Result<Option<Catalog>, StoreError> {
        self.snapshot("catalog")
    }

    /// Keeps the merged entitlement snapshots.
    pub fn put_entitlements(&self, e: &EntitlementsCache) -> Result<(), StoreError> {
        self.put_snapshot("entitlements", &encode("snapshots", e)?)
    }

    /// Keeps a lease's last grant.
    pub fn put_lease(&self, g: &LeaseGrant) -> Result<(), StoreError> {
        self.run(|db| {
            let row = encode("leases", g)?;
            let txn = db.begin_write()?;
            txn.open_table(LEASES)?.insert(g.lease_id, row.as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }

    /// Forgets released leases.
    pub fn delete_leases(&self, ids: &[u64]) -> Result<(), StoreError> {
        self.run(|db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(LEASES)?;
                for id in ids {
                    t.remove(*id)?;
                }
            }
            txn.commit()?;
            Ok(())
        })
    }

    /// The leases kept (not yet released), by id.
    pub fn leases(&self) -> Result<Vec<LeaseGrant>, StoreError> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(LEASES)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                out.push(decode("leases", row?.1.value())?);
            }
            Ok(out)
        })
    }

    /// The merged entitlement snapshots kept.
    pub fn entitlements(&self) -> Result<Option<EntitlementsCache>, StoreError> {
        self.snapshot("entitlements")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tally_protocol::batch::{AgentId, BatchBody};

    pub(crate) fn batch(seq: u64) -> StoredBatch {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let body = BatchBody::new(
            AgentId::from_public_key(&key.verifying_key()),
            1,
            seq,
            0,
            vec![],
        )
        .unwrap();
        StoredBatch {
            sealed_at_ms: 10,
            batch: SignedBatch::seal(&body, &key).unwrap(),
        }
    }

    #[test]
    fn epoch_is_fixed_and_seqs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.redb");
        let s = Store::open(&p, Duration::from_secs(60)).unwrap();
        let epoch = s.epoch();
        assert_eq!(s.next_seq().unwrap(), 1);
        let bad = SealCommit {
            batches: vec![(2, batch(2))],
            next_seq: 3,
            ..Default::default()
        };
        assert!(s.commit_seal(&bad).is_err());
        let ok = SealCommit {
            batches: vec![(1, batch(1)), (2, batch(2))],
            next_seq: 3,
            ..Default::default()
        };
        s.commit_seal(&ok).unwrap();
        drop(s);
        let s = Store::open(&p, Duration::from_secs(60)).unwrap();
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.next_seq().unwrap(), 3);
        assert_eq!(s.unacked().unwrap().len(), 2);
        assert_eq!(s.ack(&[1, 7]).unwrap().len(), 1);
        assert_eq!(s.unacked().unwrap()[0].seq, 2);
        assert_eq!(s.batch(2).unwrap(), Some(batch(2)));
    }

    #[test]
    fn dedup_window_drops_whole_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let window = Duration::from_secs(7 * 100);
        let s = Store::open(&dir.path().join("d.redb"), window).unwrap();
        let w = s.dedup_window();
        let t0 = 1_000_000_000;
        s.commit_seal(&SealCommit {
            next_seq: 1,
            ids: vec![("a".into(), t0)],
            now_ms: t0,
            ..Default::default()
        })
        .unwrap();
        let window_ms = 700_000;
        assert!(s.seen_id("a", t0).unwrap());
        assert!(!s.seen_id("b", t0).unwrap());
        // Still remembered at the end of the window.
        assert!(s.seen_id("a", t0 + window_ms).unwrap());
        // Forgotten one bucket after the window.
        let later = t0 + window_ms + 100_000 + 1;
        assert!(!s.seen_id("a", later).unwrap());
        assert_eq!(s.dedup_buckets().unwrap(), vec![w.bucket(t0)]);
        // The next seal drops the expired bucket table whole.
        s.commit_seal(&SealCommit {
            next_seq: 1,
            ids: vec![("c".into(), later)],
            now_ms: later,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.dedup_buckets().unwrap(), vec![w.bucket(later)]);
    }

    #[test]
    fn log_rows_fold_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("l.redb"), Duration::from_secs(60)).unwrap();
        let ev = |q| LoggedEvent {
            customer: CustomerId::new("c").unwrap(),
            meter: MeterName::new("m").unwrap(),
            dimensions: Dimensions::default(),
            at_ms: 5,
            quantity: Decimal::from(q),
            id: None,
            accepted_at_ms: 5,
        };
        s.append_log(&[ev(1), ev(2)]).unwrap();
        let rows = s.read_log(100).unwrap();
        assert_eq!(rows.len(), 2);
        s.append_log(&[ev(3)]).unwrap();
        s.commit_seal(&SealCommit {
            batches: vec![(1, batch(1))],
            next_seq: 2,
            log_upto: Some(rows[1].0),
            ..Default::default()
        })
        .unwrap();
        let rest = s.read_log(100).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.quantity, Decimal::from(3));
        assert_eq!(s.log_size().unwrap().0, 1);
    }

    #[test]
    fn the_log_reads_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("p.redb"), Duration::from_secs(60)).unwrap();
        let ev = |q: i64| LoggedEvent {
            customer: CustomerId::new("c").unwrap(),
            meter: MeterName::new("m").unwrap(),
            dimensions: Dimensions::default(),
            at_ms: 5,
            quantity: Decimal::from(q),
            id: Some(format!("id-{q}")),
            accepted_at_ms: 5,
        };
        s.append_log(&(0..25).map(ev).collect::<Vec<_>>()).unwrap();
        let mut seen = Vec::new();
        let mut from = 0;
        let mut pages = Vec::new();
        loop {
            let page = s.read_log_from(from, 10).unwrap();
            pages.push(page.len());
            let Some(last) = page.last().map(|(k, _)| *k) else {
                break;
            };
            seen.extend(page.into_iter().map(|(_, e)| e.quantity));
            from = last + 1;
        }
        assert_eq!(pages, vec![10, 10, 5, 0]);
        assert_eq!(seen, (0..25).map(Decimal::from).collect::<Vec<_>>());
    }

    #[test]
    fn a_stored_batch_is_checked_when_read_and_a_mismatch_goes_to_the_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb"), Duration::from_secs(60)).unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let id = AgentId::from_public_key(&key.verifying_key());
        let row = |seq: u64, epoch: u64| {
            let body = BatchBody::new(id, epoch, seq, 10, vec![]).unwrap();
            StoredBatch {
                sealed_at_ms: 10,
                batch: SignedBatch::seal(&body, &key).unwrap(),
            }
        };
        let good = row(1, s.epoch());
        assert!(check_batch(1, s.epoch(), &good, &key.verifying_key()).is_ok());
        // Row 2 holds the body of batch 3; row 3 another epoch's batch.
        s.commit_seal(&SealCommit {
            batches: vec![
                (1, good.clone()),
                (2, row(3, s.epoch())),
                (3, row(3, s.epoch() ^ 1)),
            ],
            next_seq: 4,
            ..Default::default()
        })
        .unwrap();
        let vk = key.verifying_key();
        assert_eq!(
            s.batch_for_shipping(1, &vk).unwrap(),
            ForShipping::Ready(good.clone())
        );
        for seq in [2, 3] {
            let ForShipping::Unshippable(why) = s.batch_for_shipping(seq, &vk).unwrap() else {
                panic!("row {seq} passed the check");
            };
            assert!(why.starts_with("damaged: "), "{why}");
        }
        assert_eq!(s.batch_for_shipping(9, &vk).unwrap(), ForShipping::Missing);
        // After a key change every batch of the old key is unshippable, and says why.
        let new_key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]).verifying_key();
        let ForShipping::Unshippable(why) = s.batch_for_shipping(1, &new_key).unwrap() else {
            panic!("an old key's batch passed the check");
        };
        assert!(
            why.contains(&id.to_string()) && why.contains("replaced"),
            "{why}"
        );

        // The quarantine moves the whole row in one commit: gone from the batches, kept there.
        let meta = s.quarantine(1, &why, 77).unwrap().unwrap();
        assert_eq!(meta.seq, 1);
        assert_eq!(s.quarantine(1, &why, 78).unwrap(), None);
        assert_eq!(
            s.unacked()
                .unwrap()
                .iter()
                .map(|b| b.seq)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(s.batch_for_shipping(1, &vk).unwrap(), ForShipping::Missing);
        let q = s.quarantined().unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].0, 1);
        assert_eq!(q[0].1.stored, good);
        assert_eq!((q[0].1.reason.as_str(), q[0].1.at_ms), (why.as_str(), 77));
        // It survives a reopen.
        drop(s);
        let s = Store::open(&dir.path().join("c.redb"), Duration::from_secs(60)).unwrap();
        assert_eq!(s.quarantined().unwrap().len(), 1);
    }
}
