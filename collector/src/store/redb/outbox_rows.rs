//! The Stripe outbox's rows, in the embedded store: what the ingest and adjustment transaction
//! writes (rows, free list, open-row index, carry, counters) and the reads over them. The format
//! and the guarantees are in [`super::outbox`]; every table is in [`super::tables`].
//!
//! Imports nothing from the store itself ([`super`]), so the store's ingest transaction can
//! hold an [`OutboxWriter`] while [`super::outbox`] builds on both.

use super::tables::{
    CUSTOMERS, OUTBOX, OUTBOX_BUCKETS, OUTBOX_CARRY, OUTBOX_COUNTERS, OUTBOX_FREE, OUTBOX_OPEN,
};
use crate::core::ledger::Transfer;
use crate::store::CustomerRecord;
use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

pub(super) fn obe<E: std::fmt::Display>(e: E) -> OutboxError {
    OutboxError::Backend(e.to_string())
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
    /// Per customer, then meter: the carry and open buckets read or changed in this
    /// transaction; written once at [`OutboxWriter::finish`] (one carry and one bucket record
    /// per customer and meter, whatever the number of deltas). Two levels so that a lookup by
    /// `&str` allocates nothing.
    touched: std::collections::HashMap<String, std::collections::HashMap<String, Touched>>,
    next_row: u64,
    /// Rows written (spilled buckets, [`append_outbox_row`]): what wakes the forwarder.
    appended: u64,
    /// Buckets opened per bucket time (the undelivered count of `outbox_open_ts` and the
    /// `total_rows` counter count a bucket as the row it will become).
    opened: BTreeMap<i64, i64>,
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
            touched: std::collections::HashMap::new(),
            next_row,
            appended: 0,
            opened: BTreeMap::new(),
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
        let (customer, meter) = (t.customer.as_str(), t.unit.as_str());
        let by_meter = match self.touched.get_mut(customer) {
            Some(m) => m,
            None => self.touched.entry(customer.to_owned()).or_default(),
        };
        let e = match by_meter.get_mut(meter) {
            Some(e) => e,
            None => {
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
                by_meter.entry(meter.to_owned()).or_insert(Touched {
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
                })
            }
        };
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

    /// Writes the counters; returns the number of rows appended.
    pub(crate) fn finish(mut self) -> Result<u64, OutboxError> {
        let mut touched: Vec<(String, String, Touched)> = std::mem::take(&mut self.touched)
            .into_iter()
            .flat_map(|(c, ms)| ms.into_iter().map(move |(m, t)| (c.clone(), m, t)))
            .collect();
        // Deterministic row order: by customer, meter, bucket time.
        touched.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        for (customer, meter, t) in touched {
            let key = (customer.as_str(), meter.as_str());
            let carry = Carry {
                net_scaled: t.carry.net_scaled,
                sent_units: t.carry.sent_units,
            };
            self.carry
                .insert(key, oenc(&carry)?.as_slice())
                .map_err(obe)?;
            if t.changed {
                if t.open.is_empty() {
                    if t.had_open {
                        self.buckets.remove(key).map_err(obe)?;
                    }
                } else {
                    let rec = BucketRec {
                        event_name: t.event_name.clone(),
                        open: t.open,
                    };
                    self.buckets
                        .insert(key, oenc(&rec)?.as_slice())
                        .map_err(obe)?;
                }
            }
            if let Some((name, old)) = t.renamed {
                for (timestamp_s, value) in old {
                    self.push_row(&customer, &meter, &name, timestamp_s, value)?;
                }
            }
            let mut spilled = t.spilled;
            spilled.sort_unstable();
            for (timestamp_s, value) in spilled {
                self.push_row(&customer, &meter, &t.event_name, timestamp_s, value)?;
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
        let rec = RowRec {
            row: OutboxRow {
                id,
                customer: customer.to_owned(),
                meter: meter.to_owned(),
                stripe_event_name: event_name.to_owned(),
                timestamp_s,
                value,
                revision: 0,
            },
            group: None,
        };
        self.rows.insert(id, oenc(&rec)?.as_slice()).map_err(obe)?;
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
            n += rec.open.buckets.len();
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
        for (ts, value) in rec.open.buckets {
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
