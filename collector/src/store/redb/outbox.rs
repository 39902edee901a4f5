//! The Stripe outbox in the embedded store: rows written inside the ledger transaction
//! ([`super::outbox_rows`]), and [`tally_forward::stripe::OutboxStore`] on [`RedbStore`] (here).
//!
//! Tables (declared, with every other table, in [`super::tables`]; values are postcard):
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
//! | `outbox_carry`    | (customer, meter)                          | `Carry`                      |
//! | `outbox_buckets`  | (customer, meter) with open buckets        | event name + open buckets    |
//! | `outbox_counters` | `next_row`, `next_group`, row counts       | u64                          |
//! | `customers`       | customer key                               | [`CustomerRecord`]           |
//! | `stripe_webhooks` | Stripe event id                            | [`WebhookRecord`]            |
//!
//! The Stripe namespace (part of every identifier) is the `meta` key `"stripe_namespace"`.
//!
//! Coalescing ([`tally_forward::stripe::coalesce`], decision 0106): the ledger transaction adds the units
//! it makes due to open buckets, one record per (customer, meter) in `outbox_buckets`, instead
//! of writing rows; [`OutboxStore::seal_open`] (the forwarder, before each planning scan) turns
//! records into rows and removes them in one transaction. A bucket counts as an undelivered row
//! (`total_rows`, `outbox_open_ts`) from when it opens, so `stats` and the lag gauge see it.
//!
//! Guarantees (the rules of [`tally_forward::stripe::MemoryStore`], which is the reference): row ids are
//! strictly increasing and assigned when a bucket is sealed (or spills); a row is in
//! at most one group; groups are created all-or-none in one transaction; each trait call is one
//! redb transaction (`Durability::Immediate`, redb's default), so a crash leaves either the
//! whole call or none of it. Counts for [`OutboxStore::stats`] are maintained incrementally.
//!
//! The rules are not here: a group moves only as [`EventGroup::step`] says
//! (`tally_forward::stripe::group`), and units follow [`tally_forward::stripe::units::Carry::step`]; this module
//! stores their results and keeps its indexes (open groups, open rows per bucket time, counts)
//! in step with the state each transition produced.
//!
//! Units: per (customer, meter) the store keeps [`Carry`](super::outbox_rows::Carry) — the net scaled quantity posted so
//! far and the whole units written to the outbox. Usage adds `quantity × stripe_unit_scale` and
//! writes `⌊net⌋ − sent` units when positive; a reduction (a negative adjustment or a `last`
//! meter going down) lowers `net` and writes nothing, so later usage nets it out before anything
//! more is sent (docs/decisions/0022). Without reductions `sent = ⌊Σ ledger × scale⌋` exactly.

use super::RedbStore;
use super::outbox_rows::{
    DEAD_ROWS, NEXT_GROUP, RowRec, SENT_ROWS, TOTAL_ROWS, UNKNOWN_ROWS, counter, obe, odec, oenc,
    open_add, write,
};
use super::tables::{
    CUSTOMERS, META, NAMESPACE_KEY, OUTBOX, OUTBOX_ACTIVE, OUTBOX_COUNTERS, OUTBOX_FREE,
    OUTBOX_GROUPS, OUTBOX_IDENT, OUTBOX_OPEN, OUTBOX_WINDOW, WEBHOOKS, WindowKey,
};
use crate::store::CustomerRecord;
use redb::{ReadableDatabase, ReadableTable, Table, WriteTransaction};
use std::collections::BTreeMap;
use tally_forward::stripe::OutboxStore;
use tally_forward::stripe::outbox::{
    EventGroup, GroupEvent, GroupId, GroupState, NewGroup, OutboxEntry, OutboxRow, OutboxState,
    OutboxStats, RowClaim, RowId, StoreError as OutboxError, StripeError, WebhookRecord,
    check_new_groups,
};

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
impl OutboxStore for RedbStore {
    fn namespace(&self) -> Result<String, OutboxError> {
        let txn = self.db().begin_read().map_err(obe)?;
        let t = txn.open_table(META).map_err(obe)?;
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
        write(self.db(), |txn| {
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
        write(self.db(), |txn| {
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
        write(self.db(), |txn| {
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
        write(self.db(), |txn| {
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
        write(self.db(), |txn| {
            let event = GroupEvent::Retry {
                next_attempt_ms,
                unknown,
                error,
            };
            GroupTables::open(txn)?.apply(id, event)
        })
    }

    fn mark_dead(&self, id: GroupId, error: StripeError) -> Result<(), OutboxError> {
        write(self.db(), |txn| {
            GroupTables::open(txn)?.apply(id, GroupEvent::Rejected(error))
        })
    }

    fn mark_dead_by_identifier(
        &self,
        identifier: &str,
        error: StripeError,
    ) -> Result<bool, OutboxError> {
        write(self.db(), |txn| {
            let mut t = GroupTables::open(txn)?;
            let Some(id) = t.ident.get(identifier).map_err(obe)?.map(|v| v.value()) else {
                return Ok(false);
            };
            t.apply(id, GroupEvent::Reported(error))?;
            Ok(true)
        })
    }

    fn requeue(&self, row: RowId) -> Result<Vec<RowId>, OutboxError> {
        write(self.db(), |txn| {
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
            let e = entry(&groups, r)?;
            if e.state == state {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn seal_open(&self, limit: usize) -> Result<u64, OutboxError> {
        // Nothing open (the usual answer between passes): no write transaction, no fsync.
        {
            let txn = self.db().begin_read().map_err(obe)?;
            let t = txn.open_table(super::tables::OUTBOX_BUCKETS).map_err(obe)?;
            if t.first().map_err(obe)?.is_none() {
                return Ok(0);
            }
        }
        let n = write(self.db(), |txn| {
            super::outbox_rows::OutboxWriter::open(txn)?.seal(limit)
        })?;
        Ok(n)
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
        write(self.db(), |txn| {
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
