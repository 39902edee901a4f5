//! The Stripe outbox in the embedded store: rows written inside the ledger transaction, and
//! [`tally_stripe::OutboxStore`] on [`RedbStore`].
//!
//! Tables (values are postcard):
//!
//! | table             | key                                        | value                        |
//! |-------------------|--------------------------------------------|------------------------------|
//! | `outbox`          | row id (1, 2, …)                           | row + its group id           |
//! | `outbox_free`     | row id of a row in no group                | `()`                         |
//! | `outbox_open_ts`  | bucket time                                | undelivered rows at it       |
//! | `outbox_groups`   | group id                                   | [`EventGroup`]               |
//! | `outbox_active`   | group id of pending/unknown groups         | `()`                         |
//! | `outbox_ident`    | identifier                                 | group id                     |
//! | `outbox_window`   | (stripe customer, event, time, group id)   | `()`                         |
//! | `outbox_carry`    | (customer, meter)                          | [`Carry`]                    |
//! | `outbox_counters` | `next_row`, `next_group`, row counts       | u64                          |
//! | `customers`       | customer key                               | [`CustomerRecord`]           |
//! | `stripe_webhooks` | Stripe event id                            | [`WebhookRecord`]            |
//!
//! Guarantees (the rules of [`tally_stripe::MemoryStore`], which is the reference): row ids are
//! strictly increasing and assigned in the ledger transaction that posts the usage; a row is in
//! at most one group; groups are created all-or-none in one transaction; each trait call is one
//! redb transaction (`Durability::Immediate`, redb's default), so a crash leaves either the
//! whole call or none of it. Counts for [`OutboxStore::stats`] are maintained incrementally.
//!
//! The rules are not here: a group moves only as [`EventGroup::step`] says
//! (`tally_stripe::group`), and units follow [`tally_stripe::units::Carry::step`]; this module
//! stores their results and keeps its indexes (open groups, open rows per bucket time, counts)
//! in step with the state each transition produced.
//!
//! Units: per (customer, meter) the store keeps [`Carry`] — the net scaled quantity posted so
//! far and the whole units written to the outbox. Usage adds `quantity × stripe_unit_scale` and
//! writes `⌊net⌋ − sent` units when positive; a reduction (a negative adjustment or a `last`
//! meter going down) lowers `net` and writes nothing, so later usage nets it out before anything
//! more is sent (docs/decisions/0022). Without reductions `sent = ⌊Σ ledger × scale⌋` exactly.

use crate::core::ledger::Transfer;
use crate::store::redb::RedbStore;
use redb::{ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tally_protocol::catalog::Catalog;
use tally_stripe::outbox::{
    EventGroup, GroupEvent, GroupId, GroupState, NewGroup, OutboxEntry, OutboxRow, OutboxState,
    OutboxStats, RowClaim, RowId, StoreError as OutboxError, StripeError, WebhookRecord,
    check_new_groups,
};
use tally_stripe::units::UnitsError;

pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
pub(crate) const OUTBOX_FREE: TableDefinition<u64, ()> = TableDefinition::new("outbox_free");
/// Bucket time → number of undelivered, non-dead rows with that time (entries at zero removed).
pub(crate) const OUTBOX_OPEN: TableDefinition<i64, u64> = TableDefinition::new("outbox_open_ts");

/// Adds `delta` to the open-row count of each bucket time.
fn open_add(open: &mut Table<'_, i64, u64>, counts: BTreeMap<i64, i64>) -> Result<(), OutboxError> {
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
pub(crate) const OUTBOX_GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_groups");
pub(crate) const OUTBOX_ACTIVE: TableDefinition<u64, ()> = TableDefinition::new("outbox_active");
pub(crate) const OUTBOX_IDENT: TableDefinition<&str, u64> = TableDefinition::new("outbox_ident");
type WindowKey<'a> = (&'a str, &'a str, i64, u64);
pub(crate) const OUTBOX_WINDOW: TableDefinition<WindowKey<'static>, ()> =
    TableDefinition::new("outbox_window");
pub(crate) const OUTBOX_CARRY: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("outbox_carry");
pub(crate) const OUTBOX_COUNTERS: TableDefinition<&str, u64> =
    TableDefinition::new("outbox_counters");
pub(crate) const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
pub(crate) const WEBHOOKS: TableDefinition<&str, &[u8]> = TableDefinition::new("stripe_webhooks");
pub(crate) const NAMESPACE_KEY: &str = "stripe_namespace";

const NEXT_ROW: &str = "next_row";
const NEXT_GROUP: &str = "next_group";
const TOTAL_ROWS: &str = "total_rows";
const UNKNOWN_ROWS: &str = "unknown_rows";
const SENT_ROWS: &str = "sent_rows";
const DEAD_ROWS: &str = "dead_rows";

/// A customer's settings (`PUT /v1/customers/{customer}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerRecord {
    /// The Stripe customer (`cus_…`) usage is forwarded to.
    pub stripe_customer_id: Option<String>,
    /// The plan (stored; entitlements are a later issue and do not read it yet).
    pub plan: Option<String>,
}

/// Per (customer, meter): what was posted and what was written to the outbox, in Stripe units
/// (the stored form of [`tally_stripe::units::Carry`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    /// Net `Σ signed quantity × stripe_unit_scale` posted so far.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub net_scaled: Decimal,
    /// Whole units written to the outbox so far (never decreases).
    pub sent_units: u64,
}

/// Stored form of a row.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RowRec {
    row: OutboxRow,
    group: Option<GroupId>,
}

fn obe<E: std::fmt::Display>(e: E) -> OutboxError {
    OutboxError::Backend(e.to_string())
}

fn oenc<T: Serialize>(v: &T) -> Result<Vec<u8>, OutboxError> {
    postcard::to_stdvec(v).map_err(obe)
}

fn odec<T: DeserializeOwned>(table: &str, bytes: &[u8]) -> Result<T, OutboxError> {
    postcard::from_bytes(bytes).map_err(|e| OutboxError::Backend(format!("corrupt {table}: {e}")))
}

/// Opens every outbox table (at store open).
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(OUTBOX)?;
    txn.open_table(OUTBOX_FREE)?;
    txn.open_table(OUTBOX_OPEN)?;
    txn.open_table(OUTBOX_GROUPS)?;
    txn.open_table(OUTBOX_ACTIVE)?;
    txn.open_table(OUTBOX_IDENT)?;
    txn.open_table(OUTBOX_WINDOW)?;
    txn.open_table(OUTBOX_CARRY)?;
    txn.open_table(OUTBOX_COUNTERS)?;
    txn.open_table(CUSTOMERS)?;
    txn.open_table(WEBHOOKS)?;
    Ok(())
}

fn counter(t: &impl ReadableTable<&'static str, u64>, k: &str) -> Result<u64, OutboxError> {
    Ok(t.get(k).map_err(obe)?.map_or(0, |v| v.value()))
}

/// How many whole units one signed, scaled amount makes due: [`tally_stripe::units::Carry::step`]
/// on the stored carry (see the module doc).
pub fn carry_step(
    carry: &mut Carry,
    signed_quantity: Decimal,
    scale: Decimal,
) -> Result<u64, UnitsError> {
    let now = tally_stripe::units::Carry {
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
    counters: Table<'t, &'static str, u64>,
    /// Per customer, then meter: the carry read or changed in this transaction and the units
    /// due per bucket time; written once at [`OutboxWriter::finish`] (one row per customer,
    /// meter and bucket time). Two levels so that a lookup by `&str` allocates nothing.
    touched: std::collections::HashMap<String, std::collections::HashMap<String, Touched>>,
    next_row: u64,
    appended: u64,
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
            counters,
            touched: std::collections::HashMap::new(),
            next_row,
            appended: 0,
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
                let carry = match self.carry.get((customer, meter)).map_err(obe)? {
                    Some(v) => odec("outbox_carry", v.value())?,
                    None => Carry::default(),
                };
                by_meter.entry(meter.to_owned()).or_insert(Touched {
                    carry,
                    event_name: event_name.to_owned(),
                    due: BTreeMap::new(),
                })
            }
        };
        let signed = if positive { t.amount } else { -t.amount };
        let units = carry_step(&mut e.carry, signed, def.stripe_unit_scale)
            .map_err(|e| OutboxError::Invalid(e.to_string()))?;
        if units > 0 {
            // (The catalog is read once per transaction, so the event name cannot change here.)
            let d = e.due.entry(timestamp_s).or_insert(0);
            *d = d
                .checked_add(units)
                .ok_or_else(|| OutboxError::Invalid(String::from("outbox units overflow")))?;
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
        let mut opened: BTreeMap<i64, i64> = BTreeMap::new();
        for (customer, meter, t) in touched {
            self.carry
                .insert(
                    (customer.as_str(), meter.as_str()),
                    oenc(&t.carry)?.as_slice(),
                )
                .map_err(obe)?;
            for (timestamp_s, value) in t.due {
                let id = self.next_row;
                self.next_row += 1;
                let rec = RowRec {
                    row: OutboxRow {
                        id,
                        customer: customer.clone(),
                        meter: meter.clone(),
                        stripe_event_name: t.event_name.clone(),
                        timestamp_s,
                        value,
                        revision: 0,
                    },
                    group: None,
                };
                self.rows.insert(id, oenc(&rec)?.as_slice()).map_err(obe)?;
                self.free.insert(id, ()).map_err(obe)?;
                *opened.entry(timestamp_s).or_insert(0) += 1;
                self.appended += 1;
            }
        }
        open_add(&mut self.open, opened)?;
        if self.appended > 0 {
            self.counters.insert(NEXT_ROW, self.next_row).map_err(obe)?;
            let total = counter(&self.counters, TOTAL_ROWS)? + self.appended;
            self.counters.insert(TOTAL_ROWS, total).map_err(obe)?;
        }
        Ok(self.appended)
    }
}

/// What one transaction did to one (customer, meter).
struct Touched {
    carry: Carry,
    event_name: String,
    /// Units due per bucket time (Unix seconds).
    due: BTreeMap<i64, u64>,
}

/// Group-related tables of one write transaction.
struct GroupTables<'t> {
    rows: Table<'t, u64, &'static [u8]>,
    free: Table<'t, u64, ()>,
    open: Table<'t, i64, u64>,
    groups: Table<'t, u64, &'static [u8]>,
    active: Table<'t, u64, ()>,
    ident: Table<'t, &'static str, u64>,
    window: Table<'t, WindowKey<'static>, ()>,
    counters: Table<'t, &'static str, u64>,
}

fn state_counter(s: GroupState) -> Option<&'static str> {
    match s {
        GroupState::Pending => None,
        GroupState::Unknown => Some(UNKNOWN_ROWS),
        GroupState::Sent => Some(SENT_ROWS),
        GroupState::Dead => Some(DEAD_ROWS),
    }
}

impl<'t> GroupTables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, OutboxError> {
        Ok(Self {
            rows: txn.open_table(OUTBOX).map_err(obe)?,
            free: txn.open_table(OUTBOX_FREE).map_err(obe)?,
            open: txn.open_table(OUTBOX_OPEN).map_err(obe)?,
            groups: txn.open_table(OUTBOX_GROUPS).map_err(obe)?,
            active: txn.open_table(OUTBOX_ACTIVE).map_err(obe)?,
            ident: txn.open_table(OUTBOX_IDENT).map_err(obe)?,
            window: txn.open_table(OUTBOX_WINDOW).map_err(obe)?,
            counters: txn.open_table(OUTBOX_COUNTERS).map_err(obe)?,
        })
    }

    fn row(&self, id: RowId) -> Result<Option<RowRec>, OutboxError> {
        match self.rows.get(id).map_err(obe)? {
            Some(v) => Ok(Some(odec("outbox", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_row(&mut self, r: &RowRec) -> Result<(), OutboxError> {
        self.rows
            .insert(r.row.id, oenc(r)?.as_slice())
            .map_err(obe)?;
        Ok(())
    }

    fn group(&self, id: GroupId) -> Result<EventGroup, OutboxError> {
        match self.groups.get(id).map_err(obe)? {
            Some(v) => odec("outbox_groups", v.value()),
            None => Err(OutboxError::NotFound(format!("group {id}"))),
        }
    }

    fn put_group(&mut self, g: &EventGroup) -> Result<(), OutboxError> {
        self.groups.insert(g.id, oenc(g)?.as_slice()).map_err(obe)?;
        Ok(())
    }

    fn bump(&mut self, key: &str, delta: i64) -> Result<(), OutboxError> {
        let v = counter(&self.counters, key)?;
        let n = if delta >= 0 {
            v.saturating_add(delta.unsigned_abs())
        } else {
            v.saturating_sub(delta.unsigned_abs())
        };
        self.counters.insert(key, n).map_err(obe)?;
        Ok(())
    }

    /// Applies `event` to group `id` and stores the result ([`EventGroup::step`] decides).
    fn apply(&mut self, id: GroupId, event: GroupEvent) -> Result<(), OutboxError> {
        let g = self.group(id)?;
        if let Some(next) = g.step(event)? {
            self.reindex(&g, next.state)?;
            self.put_group(&next)?;
        }
        Ok(())
    }

    /// Keeps counters, the active set and the open-row index in step with `g` moving to `to`.
    fn reindex(&mut self, g: &EventGroup, to: GroupState) -> Result<(), OutboxError> {
        let from = g.state;
        if from == to {
            return Ok(());
        }
        let n = i64::try_from(g.event.row_ids.len()).unwrap_or(i64::MAX);
        if let Some(k) = state_counter(from) {
            self.bump(k, -n)?;
        }
        if let Some(k) = state_counter(to) {
            self.bump(k, n)?;
        }
        if from.is_open() != to.is_open() {
            if to.is_open() {
                self.active.insert(g.id, ()).map_err(obe)?;
            } else {
                self.active.remove(g.id).map_err(obe)?;
            }
            let sign = if to.is_open() { 1 } else { -1 };
            let mut counts: BTreeMap<i64, i64> = BTreeMap::new();
            for rid in &g.event.row_ids {
                let Some(r) = self.row(*rid)? else { continue };
                *counts.entry(r.row.timestamp_s).or_insert(0) += sign;
            }
            open_add(&mut self.open, counts)?;
        }
        Ok(())
    }
}

impl RedbStore {
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, OutboxError>,
    ) -> Result<T, OutboxError> {
        let txn = self.db().begin_write().map_err(obe)?;
        let out = f(&txn)?;
        txn.commit().map_err(obe)?;
        Ok(out)
    }

    /// The customer's settings.
    pub fn customer_record(&self, customer: &str) -> Result<Option<CustomerRecord>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let t = txn.open_table(CUSTOMERS).map_err(obe)?;
        match t.get(customer).map_err(obe)? {
            Some(v) => Ok(Some(odec("customers", v.value())?)),
            None => Ok(None),
        }
    }

    /// Stores the customer's settings.
    pub fn put_customer_record(
        &self,
        customer: &str,
        rec: &CustomerRecord,
    ) -> Result<(), OutboxError> {
        self.write(|txn| {
            let mut t = txn.open_table(CUSTOMERS).map_err(obe)?;
            t.insert(customer, oenc(rec)?.as_slice()).map_err(obe)?;
            Ok(())
        })
    }

    /// Appends one row outside any ledger transaction, as [`tally_stripe::MemoryStore::insert`]
    /// does (zero values refused). For tests and tools only: the collector itself writes rows
    /// in the ledger transaction that posts the usage.
    pub fn append_outbox_row(&self, row: tally_stripe::NewOutboxRow) -> Result<RowId, OutboxError> {
        if row.value == 0 {
            return Err(OutboxError::Invalid(
                "zero-unit rows are not written".into(),
            ));
        }
        self.write(|txn| {
            let mut w = OutboxWriter::open(txn)?;
            let id = w.next_row;
            w.next_row += 1;
            let rec = RowRec {
                row: OutboxRow {
                    id,
                    customer: row.customer,
                    meter: row.meter,
                    stripe_event_name: row.stripe_event_name,
                    timestamp_s: row.timestamp_s,
                    value: row.value,
                    revision: 0,
                },
                group: None,
            };
            w.rows.insert(id, oenc(&rec)?.as_slice()).map_err(obe)?;
            w.free.insert(id, ()).map_err(obe)?;
            open_add(&mut w.open, BTreeMap::from([(rec.row.timestamp_s, 1)]))?;
            w.appended += 1;
            w.finish()?;
            Ok(id)
        })
    }

    /// Every outbox row as (customer, stripe event name, bucket time, units), for reconciliation.
    pub fn outbox_items(&self) -> Result<Vec<(String, String, i64, u64)>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
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
        Ok(out)
    }

    /// Checks Σ outbox units = the carried `sent_units` per (customer, meter) (for `verify`).
    pub(crate) fn verify_outbox(&self) -> Result<Vec<String>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let rows = txn.open_table(OUTBOX).map_err(obe)?;
        let carry = txn.open_table(OUTBOX_CARRY).map_err(obe)?;
        let mut sums: BTreeMap<(String, String), u64> = BTreeMap::new();
        for row in rows.iter().map_err(obe)? {
            let (_, v) = row.map_err(obe)?;
            let r: RowRec = odec("outbox", v.value())?;
            *sums.entry((r.row.customer, r.row.meter)).or_default() += r.row.value;
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

    fn entry(
        groups: &impl ReadableTable<u64, &'static [u8]>,
        r: RowRec,
    ) -> Result<OutboxEntry, OutboxError> {
        let grp: Option<EventGroup> = match r.group {
            Some(g) => match groups.get(g).map_err(obe)? {
                Some(v) => Some(odec("outbox_groups", v.value())?),
                None => None,
            },
            None => None,
        };
        let (state, group, error) = match grp {
            None => (OutboxState::Pending, None, None),
            Some(g) => (
                OutboxState::of(Some(g.state)),
                Some((g.id, g.event.identifier.clone())),
                g.last_error.clone(),
            ),
        };
        Ok(OutboxEntry {
            row: r.row,
            state,
            group,
            error,
        })
    }
}

impl tally_stripe::OutboxStore for RedbStore {
    fn namespace(&self) -> Result<String, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let t = txn.open_table(crate::redb_store::META_TABLE).map_err(obe)?;
        match t.get(NAMESPACE_KEY).map_err(obe)? {
            Some(v) => Ok(String::from_utf8_lossy(v.value()).into_owned()),
            None => Err(OutboxError::Backend("no stripe namespace".into())),
        }
    }

    fn pending_rows(&self, after: RowId, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let free = txn.open_table(OUTBOX_FREE).map_err(obe)?;
        let rows = txn.open_table(OUTBOX).map_err(obe)?;
        let mut out = Vec::new();
        for k in free
            .range(after.saturating_add(1)..)
            .map_err(obe)?
            .take(limit)
        {
            let (k, _) = k.map_err(obe)?;
            if let Some(v) = rows.get(k.value()).map_err(obe)? {
                out.push(odec::<RowRec>("outbox", v.value())?.row);
            }
        }
        Ok(out)
    }

    fn stripe_customer(&self, customer: &str) -> Result<Option<String>, OutboxError> {
        Ok(self
            .customer_record(customer)?
            .and_then(|r| r.stripe_customer_id))
    }

    fn set_stripe_customer(
        &self,
        customer: &str,
        stripe_customer: &str,
    ) -> Result<(), OutboxError> {
        self.write(|txn| {
            let mut t = txn.open_table(CUSTOMERS).map_err(obe)?;
            let mut rec: CustomerRecord = match t.get(customer).map_err(obe)? {
                Some(v) => odec("customers", v.value())?,
                None => CustomerRecord::default(),
            };
            rec.stripe_customer_id = Some(stripe_customer.to_owned());
            t.insert(customer, oenc(&rec)?.as_slice()).map_err(obe)?;
            Ok(())
        })
    }

    fn create_groups(&self, groups: Vec<NewGroup>) -> Result<Vec<EventGroup>, OutboxError> {
        self.write(|txn| {
            let mut t = GroupTables::open(txn)?;
            check_new_groups(
                &groups,
                |id| {
                    Ok(t.row(id)?.map(|r| RowClaim {
                        value: r.row.value,
                        grouped: r.group.is_some(),
                    }))
                },
                |ident| Ok(t.ident.get(ident).map_err(obe)?.is_some()),
            )?;
            let mut next = counter(&t.counters, NEXT_GROUP)?.max(1);
            let mut out = Vec::with_capacity(groups.len());
            for grp in groups {
                let id = next;
                next += 1;
                for rid in &grp.row_ids {
                    if let Some(mut r) = t.row(*rid)? {
                        r.group = Some(id);
                        t.put_row(&r)?;
                    }
                    t.free.remove(*rid).map_err(obe)?;
                }
                t.ident.insert(grp.identifier.as_str(), id).map_err(obe)?;
                t.window
                    .insert(
                        (
                            grp.stripe_customer.as_str(),
                            grp.event_name.as_str(),
                            grp.timestamp_s,
                            id,
                        ),
                        (),
                    )
                    .map_err(obe)?;
                t.active.insert(id, ()).map_err(obe)?;
                let eg = EventGroup::new(id, grp);
                t.put_group(&eg)?;
                out.push(eg);
            }
            t.counters.insert(NEXT_GROUP, next).map_err(obe)?;
            Ok(out)
        })
    }

    fn ready_groups(&self, now_ms: i64, limit: usize) -> Result<Vec<EventGroup>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let active = txn.open_table(OUTBOX_ACTIVE).map_err(obe)?;
        let groups = txn.open_table(OUTBOX_GROUPS).map_err(obe)?;
        let mut out = Vec::new();
        for k in active.iter().map_err(obe)? {
            if out.len() >= limit {
                break;
            }
            let (k, _) = k.map_err(obe)?;
            let Some(v) = groups.get(k.value()).map_err(obe)? else {
                continue;
            };
            let g: EventGroup = odec("outbox_groups", v.value())?;
            if g.state.is_open() && g.next_attempt_ms <= now_ms {
                out.push(g);
            }
        }
        Ok(out)
    }

    fn record_attempt(
        &self,
        ids: &[GroupId],
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<(), OutboxError> {
        self.write(|txn| {
            let mut t = GroupTables::open(txn)?;
            for id in ids {
                let event = GroupEvent::Attempt {
                    now_ms,
                    lease_until_ms,
                };
                t.apply(*id, event)?;
            }
            Ok(())
        })
    }

    fn mark_sent(&self, ids: &[GroupId]) -> Result<(), OutboxError> {
        self.write(|txn| {
            let mut t = GroupTables::open(txn)?;
            for id in ids {
                t.apply(*id, GroupEvent::Delivered)?;
            }
            Ok(())
        })
    }

    fn mark_retry(
        &self,
        id: GroupId,
        next_attempt_ms: i64,
        unknown: bool,
        error: Option<StripeError>,
    ) -> Result<(), OutboxError> {
        self.write(|txn| {
            let event = GroupEvent::Retry {
                next_attempt_ms,
                unknown,
                error,
            };
            GroupTables::open(txn)?.apply(id, event)
        })
    }

    fn mark_dead(&self, id: GroupId, error: StripeError) -> Result<(), OutboxError> {
        self.write(|txn| GroupTables::open(txn)?.apply(id, GroupEvent::Rejected(error)))
    }

    fn mark_dead_by_identifier(
        &self,
        identifier: &str,
        error: StripeError,
    ) -> Result<bool, OutboxError> {
        self.write(|txn| {
            let mut t = GroupTables::open(txn)?;
            let Some(id) = t.ident.get(identifier).map_err(obe)?.map(|v| v.value()) else {
                return Ok(false);
            };
            t.apply(id, GroupEvent::Reported(error))?;
            Ok(true)
        })
    }

    fn requeue(&self, row: RowId) -> Result<Vec<RowId>, OutboxError> {
        self.write(|txn| {
            let mut t = GroupTables::open(txn)?;
            let r = t
                .row(row)?
                .ok_or_else(|| OutboxError::NotFound(format!("row {row}")))?;
            let gid = r
                .group
                .ok_or_else(|| OutboxError::Invalid(format!("row {row} is not dead")))?;
            let g = t.group(gid)?;
            let Ok(Some(back)) = g.step(GroupEvent::Requeue) else {
                return Err(OutboxError::Invalid(format!("row {row} is not dead")));
            };
            // Back to an open state first so counters and the open index follow.
            t.reindex(&g, back.state)?;
            t.active.remove(gid).map_err(obe)?;
            t.groups.remove(gid).map_err(obe)?;
            t.ident.remove(g.event.identifier.as_str()).map_err(obe)?;
            t.window
                .remove((
                    g.event.stripe_customer.as_str(),
                    g.event.event_name.as_str(),
                    g.event.timestamp_s,
                    gid,
                ))
                .map_err(obe)?;
            for rid in &g.event.row_ids {
                if let Some(mut rec) = t.row(*rid)? {
                    rec.group = None;
                    rec.row = rec.row.requeued();
                    t.put_row(&rec)?;
                }
                t.free.insert(*rid, ()).map_err(obe)?;
            }
            Ok(g.event.row_ids.clone())
        })
    }

    fn list(
        &self,
        state: OutboxState,
        after: RowId,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let rows = txn.open_table(OUTBOX).map_err(obe)?;
        let groups = txn.open_table(OUTBOX_GROUPS).map_err(obe)?;
        let mut out = Vec::new();
        for row in rows.range(after.saturating_add(1)..).map_err(obe)? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = row.map_err(obe)?;
            let r: RowRec = odec("outbox", v.value())?;
            let e = Self::entry(&groups, r)?;
            if e.state == state {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let c = txn.open_table(OUTBOX_COUNTERS).map_err(obe)?;
        let open = txn.open_table(OUTBOX_OPEN).map_err(obe)?;
        let total = counter(&c, TOTAL_ROWS)?;
        let sent = counter(&c, SENT_ROWS)?;
        let dead = counter(&c, DEAD_ROWS)?;
        let oldest = open.first().map_err(obe)?.map(|(k, _)| k.value());
        Ok(OutboxStats {
            pending_rows: total.saturating_sub(sent).saturating_sub(dead),
            unknown_rows: counter(&c, UNKNOWN_ROWS)?,
            dead_rows: dead,
            sent_rows: sent,
            oldest_pending_timestamp_s: oldest,
        })
    }

    fn window_groups(
        &self,
        stripe_customer: &str,
        event_name: &str,
        start_s: i64,
        end_s: i64,
    ) -> Result<Vec<EventGroup>, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let window = txn.open_table(OUTBOX_WINDOW).map_err(obe)?;
        let groups = txn.open_table(OUTBOX_GROUPS).map_err(obe)?;
        let mut out = Vec::new();
        if start_s >= end_s {
            return Ok(out);
        }
        let lo: WindowKey = (stripe_customer, event_name, start_s, 0);
        let hi: WindowKey = (stripe_customer, event_name, end_s, 0);
        for k in window.range(lo..hi).map_err(obe)? {
            let (k, _) = k.map_err(obe)?;
            if let Some(v) = groups.get(k.value().3).map_err(obe)? {
                out.push(odec("outbox_groups", v.value())?);
            }
        }
        Ok(out)
    }

    fn record_webhook(&self, record: WebhookRecord) -> Result<bool, OutboxError> {
        self.write(|txn| {
            let mut t = txn.open_table(WEBHOOKS).map_err(obe)?;
            if t.get(record.id.as_str()).map_err(obe)?.is_some() {
                return Ok(false);
            }
            t.insert(record.id.as_str(), oenc(&record)?.as_slice())
                .map_err(obe)?;
            Ok(true)
        })
    }
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
