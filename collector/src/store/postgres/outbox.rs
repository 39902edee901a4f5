//! [`tally_forward::stripe::OutboxStore`] on PostgreSQL, shared by every collector's forwarder.
//!
//! The rules are the crate's ([`EventGroup::step`], [`check_new_groups`]); this module stores
//! their results and makes claiming safe across collectors:
//! - `create_groups` locks its rows (`SELECT … FOR UPDATE`) before checking they are free, so two
//!   forwarders planning over the same rows: one creates the group, the other gets `Conflict`
//!   and plans again;
//! - `record_attempt` is the claim of a send: it locks the groups and succeeds only when each
//!   is still open and due (`next_attempt_ms <= now`) and no other group of the same Stripe
//!   customer and event name is in flight (`stripe_inflight`, held until `lease_until_ms`).
//!   A refused claim fails the forwarder's job before anything is sent. A collector killed
//!   mid-send leaves group and slot leased; when the lease runs out another collector claims
//!   the group and resends it under the same identifier;
//! - marking a group (sent, retry, dead) frees its in-flight slot.

use super::pool::Tx;
use super::{PgStore, dec, enc, i, u};
use crate::store::{CustomerRecord, StoreError};
use std::collections::{HashMap, HashSet};
use tally_forward::stripe::OutboxStore;
use tally_forward::stripe::outbox::{
    EventGroup, GroupEvent, GroupId, GroupState, NewGroup, OutboxEntry, OutboxRow, OutboxState,
    OutboxStats, RowClaim, RowId, StoreError as OutboxError, StripeError, WebhookRecord,
    check_new_groups,
};

fn oe(e: StoreError) -> OutboxError {
    match e {
        StoreError::Outbox(o) => o,
        other => OutboxError::Backend(other.to_string()),
    }
}

fn state_str(s: GroupState) -> &'static str {
    match s {
        GroupState::Pending => "pending",
        GroupState::Unknown => "unknown",
        GroupState::Sent => "sent",
        GroupState::Dead => "dead",
    }
}

fn row_of(r: &postgres::Row) -> OutboxRow {
    OutboxRow {
        id: u(r.get(0)),
        customer: r.get(1),
        meter: r.get(2),
        stripe_event_name: r.get(3),
        timestamp_s: r.get(4),
        value: u(r.get(5)),
        revision: u32::try_from(r.get::<_, i32>(6)).unwrap_or(0),
    }
}

fn group_for_update(tx: &mut Tx<'_>, id: GroupId) -> Result<EventGroup, StoreError> {
    match tx.query_opt(
        "SELECT g FROM outbox_groups WHERE id = $1 FOR UPDATE",
        &[&i(id)],
    )? {
        Some(r) => dec("outbox_groups", r.get::<_, &[u8]>(0)),
        None => Err(StoreError::Outbox(OutboxError::NotFound(format!(
            "group {id}"
        )))),
    }
}

fn put_group(tx: &mut Tx<'_>, g: &EventGroup) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE outbox_groups SET state = $2, next_attempt_ms = $3, g = $4 WHERE id = $1",
        &[&i(g.id), &state_str(g.state), &g.next_attempt_ms, &enc(g)?],
    )?;
    Ok(())
}

/// Applies `event` to group `id` ([`EventGroup::step`] decides) and frees its in-flight slot
/// when it leaves the wire.
fn apply(tx: &mut Tx<'_>, id: GroupId, event: GroupEvent) -> Result<(), StoreError> {
    let g = group_for_update(tx, id)?;
    let frees = !matches!(event, GroupEvent::Attempt { .. });
    if let Some(next) = g.step(event).map_err(|e| StoreError::Outbox(e.into()))? {
        put_group(tx, &next)?;
    }
    if frees {
        tx.execute("DELETE FROM stripe_inflight WHERE group_id = $1", &[&i(id)])?;
    }
    Ok(())
}

fn entries_of(rows: &[postgres::Row]) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let row = row_of(r);
        let g: Option<&[u8]> = r.get(7);
        let g: Option<EventGroup> = g.map(|b| dec("outbox_groups", b)).transpose()?;
        let (state, group, error) = match g {
            None => (OutboxState::Pending, None, None),
            Some(g) => (
                OutboxState::of(Some(g.state)),
                Some((g.id, g.event.identifier.clone())),
                g.last_error.clone(),
            ),
        };
        out.push(OutboxEntry {
            row,
            state,
            group,
            error,
        });
    }
    Ok(out)
}

impl OutboxStore for PgStore {
    fn namespace(&self) -> Result<String, OutboxError> {
        Ok(self.namespace.clone())
    }

    fn pending_rows(&self, after: RowId, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT id, customer, meter, event_name, ts, value, revision FROM outbox \
                 WHERE group_id IS NULL AND id > $1 ORDER BY id LIMIT $2",
                &[&i(after), &limit],
            )?;
            Ok(rows.iter().map(row_of).collect())
        })
        .map_err(oe)
    }

    fn stripe_customer(&self, customer: &str) -> Result<Option<String>, OutboxError> {
        let c = customer.to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            Ok(tx
                .query_opt(
                    "SELECT stripe_customer FROM customers WHERE customer = $1",
                    &[&c],
                )?
                .and_then(|r| r.get::<_, Option<String>>(0)))
        })
        .map_err(oe)
    }

    fn set_stripe_customer(
        &self,
        customer: &str,
        stripe_customer: &str,
    ) -> Result<(), OutboxError> {
        let (c, sc) = (customer.to_owned(), stripe_customer.to_owned());
        self.run(move |s| {
            let mut tx = s.begin()?;
            let mut rec: CustomerRecord = match tx.query_opt(
                "SELECT rec FROM customers WHERE customer = $1 FOR UPDATE",
                &[&c],
            )? {
                Some(r) => dec("customers", r.get::<_, &[u8]>(0))?,
                None => CustomerRecord::default(),
            };
            rec.stripe_customer_id = Some(sc.clone());
            tx.execute(
                "INSERT INTO customers (customer, stripe_customer, rec) VALUES ($1, $2, $3) \
                 ON CONFLICT (customer) DO UPDATE SET stripe_customer = EXCLUDED.stripe_customer, \
                 rec = EXCLUDED.rec",
                &[&c, &sc, &enc(&rec)?],
            )?;
            tx.commit()?;
            Ok(())
        })
        .map_err(oe)
    }

    fn create_groups(&self, groups: Vec<NewGroup>) -> Result<Vec<EventGroup>, OutboxError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            let ids: Vec<i64> = groups
                .iter()
                .flat_map(|g| g.row_ids.iter().map(|r| i(*r)))
                .collect();
            let mut rows: HashMap<RowId, RowClaim> = HashMap::new();
            for r in tx.query(
                "SELECT id, value, group_id IS NOT NULL FROM outbox WHERE id = ANY($1) \
                 ORDER BY id FOR UPDATE",
                &[&ids],
            )? {
                rows.insert(
                    u(r.get(0)),
                    RowClaim {
                        value: u(r.get(1)),
                        grouped: r.get(2),
                    },
                );
            }
            let idents: Vec<String> = groups.iter().map(|g| g.identifier.clone()).collect();
            let taken: HashSet<String> = tx
                .query(
                    "SELECT identifier FROM outbox_groups WHERE identifier = ANY($1)",
                    &[&idents],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            check_new_groups(
                &groups,
                |id| Ok(rows.get(&id).copied()),
                |ident| Ok(taken.contains(ident)),
            )
            .map_err(StoreError::Outbox)?;
            let mut out = Vec::with_capacity(groups.len());
            for grp in &groups {
                let id: i64 = tx
                    .query_one("SELECT nextval('outbox_group_ids')", &[])?
                    .get(0);
                let row_ids: Vec<i64> = grp.row_ids.iter().map(|r| i(*r)).collect();
                tx.execute(
                    "UPDATE outbox SET group_id = $1 WHERE id = ANY($2)",
                    &[&id, &row_ids],
                )?;
                let eg = EventGroup::new(u(id), grp.clone());
                tx.execute(
                    "INSERT INTO outbox_groups \
                     (id, identifier, stripe_customer, event_name, ts, state, next_attempt_ms, g) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &id,
                        &grp.identifier,
                        &grp.stripe_customer,
                        &grp.event_name,
                        &grp.timestamp_s,
                        &state_str(eg.state),
                        &eg.next_attempt_ms,
                        &enc(&eg)?,
                    ],
                )?;
                out.push(eg);
            }
            tx.commit()?;
            Ok(out)
        })
        .map_err(oe)
    }

    fn ready_groups(&self, now_ms: i64, limit: usize) -> Result<Vec<EventGroup>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.query(
                "SELECT g FROM outbox_groups WHERE state IN ('pending', 'unknown') \
                 AND next_attempt_ms <= $1 ORDER BY id LIMIT $2",
                &[&now_ms, &limit],
            )?
            .iter()
            .map(|r| dec("outbox_groups", r.get::<_, &[u8]>(0)))
            .collect()
        })
        .map_err(oe)
    }

    fn record_attempt(
        &self,
        ids: &[GroupId],
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<(), OutboxError> {
        let mut ids = ids.to_vec();
        // One lock order for every claimer.
        ids.sort_unstable();
        self.run(move |s| {
            let mut tx = s.begin()?;
            for id in &ids {
                let g = group_for_update(&mut tx, *id)?;
                if !g.state.is_open() || g.next_attempt_ms > now_ms {
                    return Err(StoreError::Outbox(OutboxError::Invalid(format!(
                        "group {id} is claimed by another forwarder"
                    ))));
                }
                let holder = tx.query_opt(
                    "SELECT group_id FROM stripe_inflight WHERE stripe_customer = $1 \
                     AND event_name = $2 AND until_ms > $3 FOR UPDATE",
                    &[&g.event.stripe_customer, &g.event.event_name, &now_ms],
                )?;
                if let Some(h) = holder {
                    let h = u(h.get(0));
                    if !ids.contains(&h) {
                        return Err(StoreError::Outbox(OutboxError::Invalid(format!(
                            "{} {} has a send in flight (group {h})",
                            g.event.stripe_customer, g.event.event_name
                        ))));
                    }
                }
                tx.execute(
                    "INSERT INTO stripe_inflight (stripe_customer, event_name, group_id, until_ms) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (stripe_customer, event_name) \
                     DO UPDATE SET group_id = EXCLUDED.group_id, until_ms = EXCLUDED.until_ms",
                    &[
                        &g.event.stripe_customer,
                        &g.event.event_name,
                        &i(*id),
                        &lease_until_ms,
                    ],
                )?;
                apply(
                    &mut tx,
                    *id,
                    GroupEvent::Attempt {
                        now_ms,
                        lease_until_ms,
                    },
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .map_err(oe)
    }

    fn mark_sent(&self, ids: &[GroupId]) -> Result<(), OutboxError> {
        let ids = ids.to_vec();
        self.run(move |s| {
            let mut tx = s.begin()?;
            for id in &ids {
                apply(&mut tx, *id, GroupEvent::Delivered)?;
            }
            tx.commit()?;
            Ok(())
        })
        .map_err(oe)
    }

    fn mark_retry(
        &self,
        id: GroupId,
        next_attempt_ms: i64,
        unknown: bool,
        error: Option<StripeError>,
    ) -> Result<(), OutboxError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            let event = GroupEvent::Retry {
                next_attempt_ms,
                unknown,
                error: error.clone(),
            };
            apply(&mut tx, id, event)?;
            tx.commit()?;
            Ok(())
        })
        .map_err(oe)
    }

    fn mark_dead(&self, id: GroupId, error: StripeError) -> Result<(), OutboxError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            apply(&mut tx, id, GroupEvent::Rejected(error.clone()))?;
            tx.commit()?;
            Ok(())
        })
        .map_err(oe)
    }

    fn mark_dead_by_identifier(
        &self,
        identifier: &str,
        error: StripeError,
    ) -> Result<bool, OutboxError> {
        let ident = identifier.to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let Some(r) = tx.query_opt(
                "SELECT id FROM outbox_groups WHERE identifier = $1",
                &[&ident],
            )?
            else {
                return Ok(false);
            };
            apply(&mut tx, u(r.get(0)), GroupEvent::Reported(error.clone()))?;
            tx.commit()?;
            Ok(true)
        })
        .map_err(oe)
    }

    fn requeue(&self, row: RowId) -> Result<Vec<RowId>, OutboxError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            let Some(r) = tx.query_opt(
                "SELECT group_id FROM outbox WHERE id = $1 FOR UPDATE",
                &[&i(row)],
            )?
            else {
                return Err(StoreError::Outbox(OutboxError::NotFound(format!(
                    "row {row}"
                ))));
            };
            let Some(gid) = r.get::<_, Option<i64>>(0) else {
                return Err(StoreError::Outbox(OutboxError::Invalid(format!(
                    "row {row} is not dead"
                ))));
            };
            let g = group_for_update(&mut tx, u(gid))?;
            let Ok(Some(_)) = g.step(GroupEvent::Requeue) else {
                return Err(StoreError::Outbox(OutboxError::Invalid(format!(
                    "row {row} is not dead"
                ))));
            };
            let ids: Vec<i64> = g.event.row_ids.iter().map(|r| i(*r)).collect();
            tx.execute(
                "UPDATE outbox SET group_id = NULL, revision = revision + 1 WHERE id = ANY($1)",
                &[&ids],
            )?;
            tx.execute("DELETE FROM outbox_groups WHERE id = $1", &[&gid])?;
            tx.execute("DELETE FROM stripe_inflight WHERE group_id = $1", &[&gid])?;
            tx.commit()?;
            Ok(g.event.row_ids.clone())
        })
        .map_err(oe)
    }

    fn list(
        &self,
        state: OutboxState,
        after: RowId,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let states: Vec<&'static str> = match state {
            OutboxState::Pending => vec!["pending"],
            OutboxState::Unknown => vec!["unknown"],
            OutboxState::Sent => vec!["sent"],
            OutboxState::Dead => vec!["dead"],
        };
        let ungrouped = state == OutboxState::Pending;
        self.run(move |s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT o.id, o.customer, o.meter, o.event_name, o.ts, o.value, o.revision, g.g \
                 FROM outbox o LEFT JOIN outbox_groups g ON g.id = o.group_id \
                 WHERE o.id > $1 AND ((g.id IS NULL AND $2) OR g.state = ANY($3)) \
                 ORDER BY o.id LIMIT $4",
                &[&i(after), &ungrouped, &states, &limit],
            )?;
            entries_of(&rows)
        })
        .map_err(oe)
    }

    /// Under the ledger lock (row ids are `max + 1`, as in the ledger transaction), so
    /// collectors sealing at once take turns, and an ingest transaction sees a record either
    /// before or after it was sealed, never half.
    fn seal_open(&self, limit: usize) -> Result<u64, OutboxError> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = s.begin()?;
            // Nothing open (the usual answer): no turn at the ledger lock.
            if tx
                .query_opt("SELECT 1 FROM outbox_buckets LIMIT 1", &[])?
                .is_none()
            {
                return Ok(0);
            }
            super::lock_ledger(&mut tx)?;
            let mut next = u(tx
                .query_one("SELECT coalesce(max(id), 0) + 1 FROM outbox", &[])?
                .get(0));
            let recs = tx.query(
                "DELETE FROM outbox_buckets WHERE (customer, meter) IN \
                 (SELECT customer, meter FROM \
                   (SELECT customer, meter, sum(n) OVER (ORDER BY customer, meter) - n AS before \
                    FROM (SELECT customer, meter, n FROM outbox_buckets \
                          ORDER BY customer, meter LIMIT $1) f) w \
                  WHERE before < $1) \
                 RETURNING customer, meter, rec",
                &[&limit],
            )?;
            let mut sealed: Vec<(String, String, super::BucketRec)> = Vec::new();
            for r in &recs {
                sealed.push((
                    r.get(0),
                    r.get(1),
                    dec("outbox_buckets", r.get::<_, &[u8]>(2))?,
                ));
            }
            sealed.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            let mut rows = Vec::new();
            for (c, m, mut b) in sealed {
                for (ts, value) in b.open.seal() {
                    rows.push((
                        i(next),
                        c.clone(),
                        m.clone(),
                        b.event_name.clone(),
                        ts,
                        i(value),
                    ));
                    next += 1;
                }
            }
            let n = rows.len() as u64;
            super::insert_rows(&mut tx, rows)?;
            tx.commit()?;
            Ok(n)
        })
        .map_err(oe)
    }

    fn stats(&self) -> Result<OutboxStats, OutboxError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            let r = tx.query_one(
                "SELECT count(*), \
                   count(*) FILTER (WHERE g.state = 'unknown'), \
                   count(*) FILTER (WHERE g.state = 'dead'), \
                   count(*) FILTER (WHERE g.state = 'sent'), \
                   min(o.ts) FILTER (WHERE g.id IS NULL OR g.state IN ('pending', 'unknown')) \
                 FROM outbox o LEFT JOIN outbox_groups g ON g.id = o.group_id",
                &[],
            )?;
            // Open buckets count as the pending rows they will become.
            let b = tx.query_one(
                "SELECT coalesce(sum(n), 0)::bigint, min(min_ts) FROM outbox_buckets",
                &[],
            )?;
            let total = u(r.get(0)).saturating_add(u(b.get(0)));
            let dead = u(r.get(2));
            let sent = u(r.get(3));
            let oldest = match (r.get::<_, Option<i64>>(4), b.get::<_, Option<i64>>(1)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok(OutboxStats {
                pending_rows: total.saturating_sub(sent).saturating_sub(dead),
                unknown_rows: u(r.get(1)),
                dead_rows: dead,
                sent_rows: sent,
                oldest_pending_timestamp_s: oldest,
            })
        })
        .map_err(oe)
    }

    fn window_groups(
        &self,
        stripe_customer: &str,
        event_name: &str,
        start_s: i64,
        end_s: i64,
    ) -> Result<Vec<EventGroup>, OutboxError> {
        let (c, e) = (stripe_customer.to_owned(), event_name.to_owned());
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.query(
                "SELECT g FROM outbox_groups WHERE stripe_customer = $1 AND event_name = $2 \
                 AND ts >= $3 AND ts < $4 ORDER BY ts, id",
                &[&c, &e, &start_s, &end_s],
            )?
            .iter()
            .map(|r| dec("outbox_groups", r.get::<_, &[u8]>(0)))
            .collect()
        })
        .map_err(oe)
    }

    fn record_webhook(&self, record: WebhookRecord) -> Result<bool, OutboxError> {
        let blob = enc(&record).map_err(oe)?;
        self.run(move |s| {
            let mut tx = s.begin()?;
            let n = tx.execute(
                "INSERT INTO stripe_webhooks (id, rec) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&record.id, &blob],
            )?;
            tx.commit()?;
            Ok(n == 1)
        })
        .map_err(oe)
    }
}
