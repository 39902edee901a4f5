//! The checks after every run, against what the observer recorded (TigerBeetle's VOPR checks
//! every reply against a model; here the whole end state is checked):
//!
//! 1. every invariant of `ledger verify` holds (`Store::verify`);
//! 2. every batch in the ledger is a batch that reached an agent's disk, row for row, once; and
//!    every batch that reached the disk of an agent that was not revoked is in the ledger;
//! 3. what reached the disks is exactly what was durably accepted (`record_durable`,
//!    first-time `record_event`) plus the `record` usage that was sealed;
//! 4. the ledger's usage per customer and meter is exactly that, plus the adjustments answered,
//!    (for a revoked agent: what it had delivered before, and no more than it recorded);
//! 5. `record` usage lost in a crash was recorded after the last seal that reached the disk, and
//!    that seal was at most one flush interval (and one tick) before the crash unless a full disk
//!    held sealing back;
//! 6. Stripe's totals are ⌊ledger × scale⌋ per customer and meter, with nothing dead-lettered;
//! 7. the backlogs are drained: agents (except the revoked one) hold no batch, log row, `record`
//!    usage or waiting caller; the outbox holds no undelivered row; Stripe has nothing in flight.

use super::agent::{SimAgent, Totals};
use super::workload::{METERS, Usage};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use tally_collector::core::ledger::TransferSource;
use tally_collector::store::Store;
use tally_collector::store::redb::RedbStore;
use tally_protocol::batch::AgentId;
use tally_protocol::names::CustomerId;

/// Transfers read per page.
const PAGE: usize = 10_000;

/// What the auditor needs besides the agents and the store.
pub struct Inputs<'a> {
    /// The agents.
    pub agents: &'a [SimAgent],
    /// The revoked agent, if one was.
    pub revoked: Option<usize>,
    /// The collector's store, reopened after the run.
    pub store: &'a RedbStore,
    /// Adjustments the collector answered `Created` or `Exists` for, by key.
    pub adjustments: &'a BTreeMap<String, Usage>,
    /// Stripe's counted totals per (Stripe customer, event name).
    pub stripe: BTreeMap<(String, String), u64>,
    /// Whether Stripe still has requests in flight.
    pub stripe_idle: bool,
    /// The flush interval and the tick, ms.
    pub flush_ms: i64,
    /// The tick, ms.
    pub tick_ms: i64,
}

/// Runs every check; returns the findings (empty: the run passed).
pub fn audit(i: &Inputs<'_>) -> Vec<String> {
    let mut f = Vec::new();
    match i.store.verify() {
        Ok(r) if r.ok => {}
        Ok(r) => f.push(format!(
            "ledger verify: {} violations, first: {:?}",
            r.violation_count,
            r.violations.iter().take(3).collect::<Vec<_>>()
        )),
        Err(e) => f.push(format!("ledger verify failed to run: {e}")),
    }
    match i.store.quarantined(0, 10) {
        Ok(q) if q.is_empty() => {}
        Ok(q) => f.push(format!("{} batches quarantined (none expected)", q.len())),
        Err(e) => f.push(format!("quarantine unreadable: {e}")),
    }
    let ledger_batches = match ledger_batches(i.store) {
        Ok(b) => b,
        Err(e) => {
            f.push(e);
            return f;
        }
    };
    let mut expected = Totals::new();
    for a in i.agents {
        let revoked = i.revoked == Some(a.index);
        check_agent(a, revoked, &ledger_batches, &mut expected, i, &mut f);
    }
    for (key, u) in i.adjustments {
        let _ = key;
        *expected
            .entry((u.customer.to_string(), u.meter.to_string()))
            .or_default() += u.quantity;
    }
    check_totals(i, &expected, &mut f);
    f
}

/// Rows of one batch in the ledger: row → (customer, meter, amount), and how often each row
/// appears.
type LedgerBatch = BTreeMap<u32, Vec<(String, String, Decimal)>>;

fn ledger_batches(store: &RedbStore) -> Result<BTreeMap<(AgentId, u64, u64), LedgerBatch>, String> {
    let mut out: BTreeMap<(AgentId, u64, u64), LedgerBatch> = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = store
            .entries(None, after, PAGE)
            .map_err(|e| format!("ledger entries unreadable: {e}"))?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (_, t) in page {
            if let TransferSource::BatchRow {
                agent,
                epoch,
                seq,
                row,
            } = t.source
            {
                out.entry((agent, epoch, seq))
                    .or_default()
                    .entry(row)
                    .or_default()
                    .push((t.customer.to_string(), t.unit.to_string(), t.amount));
            }
        }
    }
    Ok(out)
}

fn add_totals(into: &mut Totals, from: &Totals) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += *v;
    }
}

fn check_agent(
    a: &SimAgent,
    revoked: bool,
    ledger: &BTreeMap<(AgentId, u64, u64), LedgerBatch>,
    expected: &mut Totals,
    i: &Inputs<'_>,
    f: &mut Vec<String>,
) {
    let who = format!("agent {}", a.index);
    f.extend(a.model.violations.iter().cloned());
    // 3: disk = durably accepted + sealed `record` usage.
    let mut on_disk = Totals::new();
    for deltas in a.model.batches.values() {
        for d in deltas {
            *on_disk
                .entry((d.customer.to_string(), d.meter.to_string()))
                .or_default() += d.sum;
        }
    }
    let mut accepted = a.model.durable.clone();
    add_totals(&mut accepted, &a.model.sealed_record);
    if nonzero(&on_disk) != nonzero(&accepted) {
        f.push(format!(
            "{who}: sealed batches hold {:?} but {:?} was accepted",
            diff(&on_disk, &accepted),
            diff(&accepted, &on_disk)
        ));
    }
    // 2: ledger batches of this agent = batches that reached its disk.
    let mut delivered = Totals::new();
    for ((agent, epoch, seq), rows) in ledger.range((a.id, 0, 0)..=(a.id, u64::MAX, u64::MAX)) {
        let _ = agent;
        let Some(deltas) = a.model.batches.get(&(*epoch, *seq)) else {
            f.push(format!(
                "{who}: ledger holds seq {seq} that never reached its disk"
            ));
            continue;
        };
        for (row, postings) in rows {
            if postings.len() != 1 {
                f.push(format!(
                    "{who}: seq {seq} row {row} is in the ledger {} times",
                    postings.len()
                ));
            }
            let Some(d) = deltas.get(*row as usize) else {
                f.push(format!("{who}: seq {seq} has no row {row}"));
                continue;
            };
            for (c, m, amount) in postings {
                if (c.as_str(), m.as_str(), *amount)
                    != (d.customer.as_str(), d.meter.as_str(), d.sum)
                {
                    f.push(format!(
                        "{who}: seq {seq} row {row} posted as {c} {m} {amount}"
                    ));
                }
                *delivered.entry((c.clone(), m.clone())).or_default() += *amount;
            }
        }
        if rows.len() != deltas.len() {
            f.push(format!(
                "{who}: seq {seq} has {} rows in the ledger, {} on disk",
                rows.len(),
                deltas.len()
            ));
        }
    }
    if revoked {
        for (k, v) in &delivered {
            if *v > accepted.get(k).copied().unwrap_or_default() {
                f.push(format!(
                    "{who} (revoked): ledger {v} for {k:?} is more than it recorded"
                ));
            }
        }
        add_totals(expected, &delivered);
    } else {
        for (epoch, seq) in a.model.batches.keys() {
            if !ledger.contains_key(&(a.id, *epoch, *seq)) {
                f.push(format!(
                    "{who}: seq {seq} reached its disk but not the ledger"
                ));
            }
        }
        add_totals(expected, &accepted);
        // 7: drained.
        if !a.drained() {
            let (b, l, m, w) = a.backlog();
            f.push(format!(
                "{who}: backlog not drained: {b} batches, {l} log rows, {m} in memory, {w} waiting"
            ));
        }
    }
    // 5: `record` loss only inside the last flush interval before a crash.
    for lost in &a.model.lost {
        if lost.at_ms < lost.last_seal_ms {
            f.push(format!(
                "{who}: lost `record` usage from {} although a seal at {} reached the disk",
                lost.at_ms, lost.last_seal_ms
            ));
        }
        if !lost.seal_failed && lost.crash_ms - lost.last_seal_ms > i.flush_ms + i.tick_ms {
            f.push(format!(
                "{who}: lost `record` usage of {} ms before the crash at {} (flush interval {} ms)",
                lost.crash_ms - lost.last_seal_ms,
                lost.crash_ms,
                i.flush_ms
            ));
        }
    }
}

fn nonzero(t: &Totals) -> Totals {
    t.iter()
        .filter(|(_, v)| !v.is_zero())
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Entries of `a` that `b` does not have with the same value.
fn diff(a: &Totals, b: &Totals) -> Totals {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v) && !v.is_zero())
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn check_totals(i: &Inputs<'_>, expected: &Totals, f: &mut Vec<String>) {
    let mut ledger = Totals::new();
    for customer in super::workload::CUSTOMERS {
        let Ok(c) = CustomerId::new(customer) else {
            continue;
        };
        match i.store.usage_accounts(&c, None, None) {
            Ok(accounts) => {
                for a in accounts {
                    if let tally_collector::core::ledger::AccountKey::Usage { meter, .. } = &a.key {
                        *ledger
                            .entry((customer.to_owned(), meter.to_string()))
                            .or_default() += a.balance();
                    }
                }
            }
            Err(e) => f.push(format!("usage of {customer} unreadable: {e}")),
        }
    }
    // 4: ledger = recorded + adjustments, exactly.
    if nonzero(&ledger) != nonzero(expected) {
        f.push(format!(
            "ledger differs from what was durably recorded: ledger has {:?}, expected {:?}",
            diff(&ledger, expected),
            diff(expected, &ledger)
        ));
    }
    // 6: Stripe = ⌊ledger × scale⌋.
    for customer in super::workload::CUSTOMERS {
        for (meter, event, (m, s)) in METERS {
            let Some(event) = event else { continue };
            let usage = ledger
                .get(&(customer.to_owned(), meter.to_owned()))
                .copied()
                .unwrap_or_default();
            let want = (usage * Decimal::new(m, s)).floor();
            let got = Decimal::from(
                i.stripe
                    .get(&(customer.to_owned(), event.to_owned()))
                    .copied()
                    .unwrap_or(0),
            );
            if want != got {
                f.push(format!(
                    "stripe {customer} {event}: {got}, but ⌊ledger {usage} × {}⌋ = {want}",
                    Decimal::new(m, s)
                ));
            }
        }
    }
    // 7: the outbox and Stripe are drained.
    match tally_forward::stripe::OutboxStore::stats(i.store) {
        Ok(s) if s.pending_rows == 0 && s.dead_rows == 0 => {}
        Ok(s) => f.push(format!(
            "outbox not drained: {} pending, {} unknown, {} dead",
            s.pending_rows, s.unknown_rows, s.dead_rows
        )),
        Err(e) => f.push(format!("outbox stats unreadable: {e}")),
    }
    if !i.stripe_idle {
        f.push(String::from("stripe still has requests in flight"));
    }
}
