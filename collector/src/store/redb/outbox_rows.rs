//! The Stripe outbox's rows, in the embedded store: what the ingest and adjustment transaction
//! writes (rows, free list, open-row index, carry, counters) and the reads over them. The format
//! and the guarantees are in [`super::outbox`]; every table is in [`super::tables`].
//!
//! Imports nothing from the store itself ([`super`]), so the store's ingest transaction can
//! hold an [`OutboxWriter`] while [`super::outbox`] builds on both.

use super::tables::{
    CUSTOMERS, OUTBOX, OUTBOX_BUCKETS, OUTBOX_CARRY, OUTBOX_COUNTERS, OUTBOX_FREE, OUTBOX_OPEN,
};
use crate::core::ledger::AccountId;
use crate::core::ledger::Transfer;
use crate::store::CustomerRecord;
use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use tally_forward::stripe::coalesce::{MAX_OPEN_BUCKETS, OpenBuckets};
use tally_forward::stripe::outbox::{GroupId, OutboxRow, RowId, StoreError as OutboxError};
use tally_forward::stripe::units::UnitsError;
use tally_protocol::catalog::Catalog;

const NEXT_ROW: &str = "next_row";
pub(super) const NEXT_GROUP: &str = "next_group";
pub(super) const TOTAL_ROWS: &str = "total_rows";
pub(super) const UNKNOWN_ROWS: &str = "unknown_rows";
pub(super) const SENT_ROWS: &str = "sent_rows";
pub(super) const DEAD_ROWS: &str = "dead_rows";

/// Adds `delta` to the open-row count of each bucket time.
pub(super) fn open_add(
    open: &mut Table<'_, i64, u64>,
    counts: BTreeMap<i64, i64>,
) -> Result<(), OutboxError> {
    for (ts, delta) in counts {
        let cur = open.get(ts).map_err(obe)?.map_or(0, |v| v.value());
        let n = if delta >= 0 {
            cur.saturating_add(delta.unsigned_abs())
        } else {
            cur.saturating_sub(delta.unsigned_abs())
        };
        if n == 0 {
            open.remove(ts).map_err(obe)?;
        } else {
            open.insert(ts, n).map_err(obe)?;
        }
    }
    Ok(())
}
/// Per (customer, meter): what was posted and what was written to the outbox, in Stripe units
/// (the stored form of [`tally_forward::stripe::units::Carry`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    /// Net `Σ signed quantity × stripe_unit_scale` posted so far.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub net_scaled: Decimal,
    /// Whole units written to the outbox so far (never decreases).
    pub sent_units: u64,
}

/// Per (customer, meter) with open buckets: the event name they were posted under and the
/// buckets ([`tally_forward::stripe::coalesce`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BucketRec {
    pub(crate) event_name: String,
    pub(crate) open: OpenBuckets,
}

/// Stored form of a row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RowRec {
    pub(super) row: OutboxRow,
    pub(super) group: Option<GroupId>,
}

/// [`BucketRec`] from borrowed fields: the same bytes, encoded without copying the record.
#[derive(Serialize)]
#[serde(rename = "BucketRec")]
struct BucketRecRef<'a> {
    event_name: &'a str,
    open: &'a OpenBuckets,
}

/// [`RowRec`] from borrowed fields: the same bytes, encoded without three `String`s per row.
#[derive(Serialize)]
#[serde(rename = "RowRec")]
struct RowRecRef<'a> {
    row: OutboxRowRef<'a>,
    group: Option<GroupId>,
}

/// [`OutboxRow`]'s fields, in its order, borrowed.
#[derive(Serialize)]
#[serde(rename = "OutboxRow")]
struct OutboxRowRef<'a> {
    id: RowId,
    customer: &'a str,
    meter: &'a str,
    stripe_event_name: &'a str,
    timestamp_s: i64,
    value: u64,
    revision: u32,
}

pub(super) fn obe<E: std::fmt::Display>(e: E) -> OutboxError {
    OutboxError::Backend(e.to_string())
}

/// [`oenc`] into `buf` (emptied first), reusing its allocation.
fn oenc_into<T: Serialize>(buf: &mut Vec<u8>, v: &T) -> Result<(), OutboxError> {
    buf.clear();
    *buf = postcard::to_extend(v, std::mem::take(buf)).map_err(obe)?;
    Ok(())
}

pub(super) fn oenc<T: Serialize>(v: &T) -> Result<Vec<u8>, OutboxError> {
    postcard::to_stdvec(v).map_err(obe)
}

pub(super) fn odec<T: DeserializeOwned>(table: &str, bytes: &[u8]) -> Result<T, OutboxError> {
    postcard::from_bytes(bytes).map_err(|e| OutboxError::Backend(format!("corrupt {table}: {e}")))
}

pub(super) fn counter(
    t: &impl ReadableTable<&'static str, u64>,
    k: &str,
) -> Result<u64, OutboxError> {
    Ok(t.get(k).map_err(obe)?.map_or(0, |v| v.value()))
}

/// How many whole units one signed, scaled amount makes due: [`tally_forward::stripe::units::Carry::step`]
/// on the stored carry (see the module doc).
pub fn carry_step(
    carry: &mut Carry,
    signed_quantity: Decimal,
    scale: Decimal,
) -> Result<u64, UnitsError> {
    let now = tally_forward::stripe::units::Carry {
        net_scaled: carry.net_scaled,
        sent_units: carry.sent_units,
    };
    let (next, units) = now.step(signed_quantity, scale)?;
    carry.net_scaled = next.net_scaled;
    carry.sent_units = next.sent_units;
    Ok(units)
}

/// Outbox writes inside one ledger write transaction.
pub(crate) struct OutboxWriter<'t> {
    rows: Table<'t, u64, &'static [u8]>,
    free: Table<'t, u64, ()>,
    open: Table<'t, i64, u64>,
    carry: Table<'t, (&'static str, &'static str), &'static [u8]>,
    buckets: Table<'t, (&'static str, &'static str), &'static [u8]>,
    counters: Table<'t, &'static str, u64>,
    /// The (customer, meter) pairs whose carry and open buckets this transaction read or
    /// changed, in first-touch order; each written once at [`OutboxWriter::finish`] (one carry
    /// and one bucket record per pair, whatever the number of deltas).
    touched: Vec<Touched>,
    /// The slot in `touched` of each (debit, credit) account pair seen. One of the two is the
    /// usage account, which names one (customer, meter), so a transfer finds its pair by two
    /// integers instead of hashing and comparing strings (most transfers of a transaction
    /// hit an account pair already seen).
    by_accounts: HashMap<(AccountId, AccountId), u32, BuildHasherDefault<IdHasher>>,
    /// The slot per customer, then meter: a transfer's first time (two levels so that a lookup
    /// by `&str` allocates nothing).
    by_pair: HashMap<String, HashMap<String, u32>>,
    next_row: u64,
    /// Rows written (spilled buckets, [`append_outbox_row`]): what wakes the forwarder.
    appended: u64,
    /// Buckets opened per bucket time (the undelivered count of `outbox_open_ts` and the
    /// `total_rows` counter count a bucket as the row it will become).
    opened: BTreeMap<i64, i64>,
    /// Encoding buffer reused for every record and row written.
    buf: Vec<u8>,
}

/// Hashes account ids, which are already uniform (SHA-256 of the account key): a multiply to
/// mix, no SipHash. Not for keys an agent chooses freely (strings go to the default hasher).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u128(&mut self, i: u128) {
        // The low 64 bits of a SHA-256 id are as uniform as all of it.
        self.write_u64(i as u64);
    }
}

impl<'t> OutboxWriter<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> Result<Self, OutboxError> {
        let counters = txn.open_table(OUTBOX_COUNTERS).map_err(obe)?;
        let next_row = counter(&counters, NEXT_ROW)?.max(1);
        Ok(Self {
            rows: txn.open_table(OUTBOX).map_err(obe)?,
            free: txn.open_table(OUTBOX_FREE).map_err(obe)?,
            open: txn.open_table(OUTBOX_OPEN).map_err(obe)?,
            carry: txn.open_table(OUTBOX_CARRY).map_err(obe)?,
            buckets: txn.open_table(OUTBOX_BUCKETS).map_err(obe)?,
            counters,
            touched: Vec::new(),
            by_accounts: HashMap::default(),
            by_pair: HashMap::new(),
            next_row,
            appended: 0,
            opened: BTreeMap::new(),
            buf: Vec::new(),
        })
    }

    /// Records one posted transfer: `positive` says whether it raised the customer's usage.
    /// Meters without a Stripe event name write nothing.
    pub(crate) fn transfer(
        &mut self,
        catalog: &Catalog,
        t: &Transfer,
        positive: bool,
        timestamp_s: i64,
    ) -> Result<(), OutboxError> {
        if t.amount.is_zero() {
            return Ok(());
        }
        let Some(def) = catalog.meter(t.unit.as_str()) else {
            return Ok(());
        };
        let Some(event_name) = def.stripe_event_name.as_deref() else {
            return Ok(());
        };
        let slot = match self.by_accounts.get(&(t.debit, t.credit)) {
            Some(s) => *s as usize,
            None => {
                let s = self.slot(t.customer.as_str(), t.unit.as_str(), event_name)?;
                self.by_accounts.insert((t.debit, t.credit), s);
                s as usize
            }
        };
        let Some(e) = self.touched.get_mut(slot) else {
            return Err(OutboxError::Backend(format!("outbox slot {slot} missing")));
        };
        // An account pair names one (customer, meter): the ledger's account ids are hashes
        // of keys that hold both.
        debug_assert!(
            e.customer == t.customer.as_str() && e.meter == t.unit.as_str(),
            "account pair of {}/{} found the slot of {}/{}",
            t.customer,
            t.unit,
            e.customer,
            e.meter
        );
        let signed = if positive { t.amount } else { -t.amount };
        // (The catalog is read once per transaction, so the event name cannot change here.)
        let p = tally_forward::stripe::coalesce::post(
            &mut e.carry,
            &mut e.open,
            signed,
            def.stripe_unit_scale,
            timestamp_s,
            MAX_OPEN_BUCKETS,
        )
        .map_err(|e| OutboxError::Invalid(e.to_string()))?;
        e.changed |= p.units > 0;
        if p.opened {
            *self.opened.entry(timestamp_s).or_insert(0) += 1;
        }
        if let Some(s) = p.spilled {
            e.spilled.push(s);
        }
        Ok(())
    }

    /// The slot of (customer, meter) in `touched`, reading its carry and bucket record the
    /// first time in this transaction.
    fn slot(&mut self, customer: &str, meter: &str, event_name: &str) -> Result<u32, OutboxError> {
        if let Some(s) = self.by_pair.get(customer).and_then(|m| m.get(meter)) {
            return Ok(*s);
        }
        let carry: Carry = match self.carry.get((customer, meter)).map_err(obe)? {
            Some(v) => odec("outbox_carry", v.value())?,
            None => Carry::default(),
        };
        let (mut open, had_open, mut renamed) =
            match self.buckets.get((customer, meter)).map_err(obe)? {
                Some(v) => {
                    let r: BucketRec = odec("outbox_buckets", v.value())?;
                    (r.open, true, r.event_name)
                }
                None => (OpenBuckets::default(), false, String::new()),
            };
        // Buckets posted under another event name leave as rows under that name.
        let renamed = if renamed != event_name && !open.is_empty() {
            let old = open.seal();
            Some((std::mem::take(&mut renamed), old))
        } else {
            None
        };
        let s = u32::try_from(self.touched.len())
            .map_err(|_| OutboxError::Backend("too many outbox pairs in one transaction".into()))?;
        self.touched.push(Touched {
            customer: customer.to_owned(),
            meter: meter.to_owned(),
            carry: tally_forward::stripe::units::Carry {
                net_scaled: carry.net_scaled,
                sent_units: carry.sent_units,
            },
            changed: renamed.is_some(),
            open,
            had_open,
            renamed,
            event_name: event_name.to_owned(),
            spilled: Vec::new(),
        });
        self.by_pair
            .entry(customer.to_owned())
            .or_default()
            .insert(meter.to_owned(), s);
        Ok(s)
    }

    /// Writes the carries, bucket records, rows and counters; returns the number of rows
    /// appended.
    pub(crate) fn finish(mut self) -> Result<u64, OutboxError> {
        let mut touched = std::mem::take(&mut self.touched);
        // Deterministic row order: by customer, meter, bucket time.
        touched.sort_unstable_by(|a, b| (&a.customer, &a.meter).cmp(&(&b.customer, &b.meter)));
        for t in &mut touched {
            let key = (t.customer.as_str(), t.meter.as_str());
            let carry = Carry {
                net_scaled: t.carry.net_scaled,
                sent_units: t.carry.sent_units,
            };
            oenc_into(&mut self.buf, &carry)?;
            self.carry.insert(key, self.buf.as_slice()).map_err(obe)?;
            if t.changed {
                if t.open.is_empty() {
                    if t.had_open {
                        self.buckets.remove(key).map_err(obe)?;
                    }
                } else {
                    let rec = BucketRecRef {
                        event_name: &t.event_name,
                        open: &t.open,
                    };
                    oenc_into(&mut self.buf, &rec)?;
                    self.buckets.insert(key, self.buf.as_slice()).map_err(obe)?;
                }
            }
            if let Some((name, old)) = &t.renamed {
                for (timestamp_s, value) in old {
                    self.push_row(&t.customer, &t.meter, name, *timestamp_s, *value)?;
                }
            }
            t.spilled.sort_unstable();
            for (timestamp_s, value) in &t.spilled {
                self.push_row(&t.customer, &t.meter, &t.event_name, *timestamp_s, *value)?;
            }
        }
        self.finish_counts()
    }

    /// Writes one pending row (a bucket leaving its record, or a direct append).
    fn push_row(
        &mut self,
        customer: &str,
        meter: &str,
        event_name: &str,
        timestamp_s: i64,
        value: u64,
    ) -> Result<RowId, OutboxError> {
        let id = self.next_row;
        self.next_row += 1;
        let rec = RowRecRef {
            row: OutboxRowRef {
                id,
                customer,
                meter,
                stripe_event_name: event_name,
                timestamp_s,
                value,
                revision: 0,
            },
            group: None,
        };
        oenc_into(&mut self.buf, &rec)?;
        self.rows.insert(id, self.buf.as_slice()).map_err(obe)?;
        self.free.insert(id, ()).map_err(obe)?;
        self.appended += 1;
        Ok(id)
    }

    /// Counters and the undelivered index: a bucket counts as a row from when it opens, so
    /// sealing or spilling it changes no count.
    fn finish_counts(mut self) -> Result<u64, OutboxError> {
        let opened = std::mem::take(&mut self.opened);
        let new: i64 = opened.values().sum();
        open_add(&mut self.open, opened)?;
        if self.appended > 0 {
            self.counters.insert(NEXT_ROW, self.next_row).map_err(obe)?;
        }
        if new > 0 {
            let total = counter(&self.counters, TOTAL_ROWS)? + new.unsigned_abs();
            self.counters.insert(TOTAL_ROWS, total).map_err(obe)?;
        }
        Ok(self.appended)
    }

    /// Seals open bucket records, whole, in key order, until at least `limit` rows were
    /// written or none is left ([`tally_forward::stripe::OutboxStore::seal_open`]).
    pub(crate) fn seal(mut self, limit: usize) -> Result<u64, OutboxError> {
        let mut records: Vec<(String, String, BucketRec)> = Vec::new();
        let mut n = 0usize;
        for e in self.buckets.iter().map_err(obe)? {
            if n >= limit.max(1) {
                break;
            }
            let (k, v) = e.map_err(obe)?;
            let (c, m) = k.value();
            let rec: BucketRec = odec("outbox_buckets", v.value())?;
            n += rec.open.len();
            records.push((c.to_owned(), m.to_owned(), rec));
        }
        for (customer, meter, mut rec) in records {
            self.buckets
                .remove((customer.as_str(), meter.as_str()))
                .map_err(obe)?;
            for (ts, value) in rec.open.seal() {
                self.push_row(&customer, &meter, &rec.event_name, ts, value)?;
            }
        }
        self.finish_counts()
    }
}

/// What one transaction did to one (customer, meter).
struct Touched {
    customer: String,
    meter: String,
    carry: tally_forward::stripe::units::Carry,
    open: OpenBuckets,
    /// A bucket record existed before this transaction.
    had_open: bool,
    /// Units were made due (the bucket record changed).
    changed: bool,
    /// Buckets posted under the meter's previous Stripe event name, written as rows under it.
    renamed: Option<(String, Vec<(i64, u64)>)>,
    event_name: String,
    /// Buckets that left the record at its limit, written as rows.
    spilled: Vec<(i64, u64)>,
}
pub(super) fn write<T>(
    db: &Database,
    f: impl FnOnce(&WriteTransaction) -> Result<T, OutboxError>,
) -> Result<T, OutboxError> {
    let txn = db.begin_write().map_err(obe)?;
    let out = f(&txn)?;
    txn.commit().map_err(obe)?;
    Ok(out)
}

/// The customer's settings.
pub(super) fn customer_record(
    db: &Database,
    customer: &str,
) -> Result<Option<CustomerRecord>, OutboxError> {
    let txn = db.begin_read().map_err(obe)?;
    let t = txn.open_table(CUSTOMERS).map_err(obe)?;
    match t.get(customer).map_err(obe)? {
        Some(v) => Ok(Some(odec("customers", v.value())?)),
        None => Ok(None),
    }
}

/// Stores the customer's settings.
pub(super) fn put_customer_record(
    db: &Database,
    customer: &str,
    rec: &CustomerRecord,
) -> Result<(), OutboxError> {
    write(db, |txn| {
        let mut t = txn.open_table(CUSTOMERS).map_err(obe)?;
        t.insert(customer, oenc(rec)?.as_slice()).map_err(obe)?;
        Ok(())
    })
}

/// Appends one row outside any ledger transaction, as [`tally_forward::stripe::MemoryStore::insert`]
/// does (zero values refused). For tests and tools only: the collector itself writes rows
/// in the ledger transaction that posts the usage.
pub(super) fn append_outbox_row(
    db: &Database,
    row: tally_forward::stripe::NewOutboxRow,
) -> Result<RowId, OutboxError> {
    if row.value == 0 {
        return Err(OutboxError::Invalid(
            "zero-unit rows are not written".into(),
        ));
    }
    write(db, |txn| {
        let mut w = OutboxWriter::open(txn)?;
        let id = w.push_row(
            &row.customer,
            &row.meter,
            &row.stripe_event_name,
            row.timestamp_s,
            row.value,
        )?;
        w.opened.insert(row.timestamp_s, 1);
        w.finish_counts()?;
        Ok(id)
    })
}

/// Every outbox row as (customer, stripe event name, bucket time, units), for reconciliation.
pub(super) fn outbox_items(db: &Database) -> Result<Vec<(String, String, i64, u64)>, OutboxError> {
    let txn = db.begin_read().map_err(obe)?;
    let t = txn.open_table(OUTBOX).map_err(obe)?;
    let mut out = Vec::new();
    for row in t.iter().map_err(obe)? {
        let (_, v) = row.map_err(obe)?;
        let r: RowRec = odec("outbox", v.value())?;
        out.push((
            r.row.customer,
            r.row.stripe_event_name,
            r.row.timestamp_s,
            r.row.value,
        ));
    }
    // Open buckets are owed too: they become rows when the forwarder seals them.
    let b = txn.open_table(OUTBOX_BUCKETS).map_err(obe)?;
    for e in b.iter().map_err(obe)? {
        let (k, v) = e.map_err(obe)?;
        let rec: BucketRec = odec("outbox_buckets", v.value())?;
        for (ts, value) in rec.open {
            out.push((k.value().0.to_owned(), rec.event_name.clone(), ts, value));
        }
    }
    Ok(out)
}

/// Checks Σ outbox units (rows and open buckets) = the carried `sent_units` per (customer,
/// meter) (for `verify`).
pub(super) fn verify_outbox(db: &Database) -> Result<Vec<String>, OutboxError> {
    let txn = db.begin_read().map_err(obe)?;
    let rows = txn.open_table(OUTBOX).map_err(obe)?;
    let carry = txn.open_table(OUTBOX_CARRY).map_err(obe)?;
    let mut sums: BTreeMap<(String, String), u64> = BTreeMap::new();
    for row in rows.iter().map_err(obe)? {
        let (_, v) = row.map_err(obe)?;
        let r: RowRec = odec("outbox", v.value())?;
        *sums.entry((r.row.customer, r.row.meter)).or_default() += r.row.value;
    }
    let buckets = txn.open_table(OUTBOX_BUCKETS).map_err(obe)?;
    for e in buckets.iter().map_err(obe)? {
        let (k, v) = e.map_err(obe)?;
        let (c, m) = k.value();
        let rec: BucketRec = odec("outbox_buckets", v.value())?;
        *sums.entry((c.to_owned(), m.to_owned())).or_default() += rec.open.units();
    }
    let mut out = Vec::new();
    for row in carry.iter().map_err(obe)? {
        let (k, v) = row.map_err(obe)?;
        let (c, m) = k.value();
        let cv: Carry = odec("outbox_carry", v.value())?;
        let s = sums.remove(&(c.to_owned(), m.to_owned())).unwrap_or(0);
        if s != cv.sent_units {
            out.push(format!(
                "outbox {c}/{m}: rows sum to {s} units, carry says {}",
                cv.sent_units
            ));
        }
        if !cv.net_scaled.is_sign_negative() && cv.net_scaled.floor() > Decimal::from(s) {
            out.push(format!(
                "outbox {c}/{m}: ⌊posted⌋ {} exceeds the {s} units written",
                cv.net_scaled.floor()
            ));
        }
    }
    for ((c, m), s) in sums {
        out.push(format!("outbox {c}/{m}: {s} units without a carry record"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// The stored forms before the borrowed encoders and the sorted-vector buckets.
    #[derive(Serialize)]
    struct OldBucketRec {
        event_name: String,
        open: OldOpen,
    }
    #[derive(Serialize)]
    struct OldOpen {
        buckets: BTreeMap<i64, u64>,
    }

    proptest::proptest! {
        /// The borrowed encoders write the bytes of the owned records (and of the
        /// `BTreeMap` buckets stored before), which decode back to the same values.
        #[test]
        fn borrowed_encodings_are_the_stored_format(
            buckets in proptest::collection::btree_map(proptest::num::i64::ANY, 1u64.., 0..130),
            name in "[a-z_]{0,12}",
            customer in "[a-z0-9-]{1,20}",
            id in proptest::num::u64::ANY,
            ts in proptest::num::i64::ANY,
            value in 1u64..,
        ) {
            let mut open = OpenBuckets::default();
            for (t, v) in &buckets {
                open.add(*t, *v, usize::MAX).unwrap();
            }
            let old = postcard::to_stdvec(&OldBucketRec {
                event_name: name.clone(),
                open: OldOpen { buckets: buckets.clone() },
            }).unwrap();
            let new = postcard::to_stdvec(&BucketRecRef { event_name: &name, open: &open }).unwrap();
            proptest::prop_assert_eq!(&old, &new);
            let back: BucketRec = odec("outbox_buckets", &old).unwrap();
            proptest::prop_assert_eq!(back.event_name, name.clone());
            proptest::prop_assert_eq!(back.open, open);

            let row = RowRec {
                row: OutboxRow {
                    id,
                    customer: customer.clone(),
                    meter: "m".into(),
                    stripe_event_name: name.clone(),
                    timestamp_s: ts,
                    value,
                    revision: 0,
                },
                group: None,
            };
            let r = RowRecRef {
                row: OutboxRowRef {
                    id,
                    customer: &customer,
                    meter: "m",
                    stripe_event_name: &name,
                    timestamp_s: ts,
                    value,
                    revision: 0,
                },
                group: None,
            };
            proptest::prop_assert_eq!(oenc(&row).unwrap(), postcard::to_stdvec(&r).unwrap());
        }

        /// The writer against a model of the rule: transfers of several usage accounts per
        /// (customer, meter), both directions, in transactions of random sizes; after each
        /// commit every pair's carry and open buckets are what [`tally_forward::stripe::coalesce::post`]
        /// makes of that pair's transfers alone (so the account-pair index never mixes pairs).
        #[test]
        fn the_writer_keeps_each_pair_apart(
            txns in proptest::collection::vec(
                proptest::collection::vec((0usize..3, 0usize..2, 0usize..3, 1i64..500, proptest::bool::weighted(0.8), 0i64..4), 1..30),
                1..6,
            ),
        ) {
            use crate::core::ledger::{Period, TransferSource, source_account_id, usage_account_id};
            use tally_protocol::bounded::BoundedVec;
            use tally_protocol::catalog::{Aggregation, MeterDef};
            use tally_protocol::names::{CustomerId, Dimensions, MeterName};
            let meters = ["calls", "tokens"];
            let catalog = Catalog {
                version: 1,
                meters: BoundedVec::new(meters.iter().map(|m| MeterDef {
                    name: MeterName::new(*m).unwrap(),
                    aggregation: Aggregation::Sum,
                    event_type: (*m).into(),
                    value_property: None,
                    group_by: BoundedVec::default(),
                    stripe_event_name: Some(format!("{m}_ev")),
                    stripe_unit_scale: Decimal::new(3, 1),
                }).collect()).unwrap(),
            };
            let dims = [
                Dimensions::default(),
                Dimensions::from_strs([("model", "small")]).unwrap(),
                Dimensions::from_strs([("model", "large")]).unwrap(),
            ];
            let dir = tempfile::tempdir().unwrap();
            let db = Database::create(dir.path().join("o.redb")).unwrap();
            let mut model: BTreeMap<(String, String), (tally_forward::stripe::units::Carry, OpenBuckets)> = BTreeMap::new();
            for txn in txns {
                write(&db, |w| {
                    let mut ow = OutboxWriter::open(w)?;
                    for (c, m, dim, q, positive, minute) in &txn {
                        let customer = CustomerId::new(format!("cust-{c}")).unwrap();
                        let meter = MeterName::new(meters[*m]).unwrap();
                        let usage = usage_account_id(&customer, &meter, &dims[*dim], Period::of_ms(0));
                        let source = source_account_id(&meter);
                        let (debit, credit) = if *positive { (source, usage) } else { (usage, source) };
                        let t = Transfer {
                            id: 0,
                            debit,
                            credit,
                            unit: meter.clone(),
                            amount: Decimal::new(*q, 2),
                            events: 1,
                            customer: customer.clone(),
                            event_at_ms: 0,
                            posted_at_ms: 0,
                            source: TransferSource::Grant { idempotency_key: String::new() },
                        };
                        ow.transfer(&catalog, &t, *positive, minute * 60)?;
                        let e = model.entry((customer.to_string(), meter.to_string())).or_default();
                        let signed = if *positive { t.amount } else { -t.amount };
                        tally_forward::stripe::coalesce::post(&mut e.0, &mut e.1, signed, Decimal::new(3, 1), minute * 60, MAX_OPEN_BUCKETS).unwrap();
                    }
                    ow.finish()?;
                    Ok(())
                }).unwrap();
                let r = db.begin_read().unwrap();
                let carry = r.open_table(OUTBOX_CARRY).unwrap();
                let buckets = r.open_table(OUTBOX_BUCKETS).unwrap();
                for ((c, m), (mc, mo)) in &model {
                    let got: Carry = odec("outbox_carry", carry.get((c.as_str(), m.as_str())).unwrap().unwrap().value()).unwrap();
                    proptest::prop_assert_eq!((got.net_scaled, got.sent_units), (mc.net_scaled, mc.sent_units));
                    let got = buckets.get((c.as_str(), m.as_str())).unwrap().map(|v| odec::<BucketRec>("outbox_buckets", v.value()).unwrap().open).unwrap_or_default();
                    proptest::prop_assert_eq!(&got, mo);
                }
            }
            proptest::prop_assert!(verify_outbox(&db).unwrap().is_empty());
        }
    }

    #[test]
    fn carry_matches_the_crate_rule_and_nets_out_reductions() {
        let mut c = Carry::default();
        let mut sum = 0;
        for q in ["0.4", "0.4", "0.4", "2.25", "0"] {
            sum += carry_step(&mut c, d(q), d("1")).unwrap();
        }
        assert_eq!(sum, 3);
        assert_eq!(c.net_scaled, d("3.45"));
        // A reduction writes nothing; later usage nets it out first.
        assert_eq!(carry_step(&mut c, d("-2"), d("1")).unwrap(), 0);
        assert_eq!(carry_step(&mut c, d("1.5"), d("1")).unwrap(), 0);
        assert_eq!(carry_step(&mut c, d("1.1"), d("1")).unwrap(), 1);
        assert_eq!(c.sent_units, 4);
        assert_eq!(c.net_scaled, d("4.05"));
        let mut k = Carry::default();
        assert_eq!(carry_step(&mut k, d("0.0015"), d("1000")).unwrap(), 1);
        assert_eq!(carry_step(&mut k, d("0.0015"), d("1000")).unwrap(), 2);
    }
}
