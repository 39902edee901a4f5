//! Aggregation: pending outbox rows → meter events (groups), with no I/O.
//!
//! Rows are grouped per (Stripe customer, event name, meter, bucket time), in row-id order, at
//! most [`ROWS_PER_GROUP_MAX`] rows a group. The caller persists the groups
//! ([`crate::stripe::outbox::OutboxStore::create_groups`]) before anything is sent, so the grouping —
//! and with it every identifier — is fixed once and survives restarts. Rows whose customer has
//! no Stripe mapping are left out and counted; they stay pending, never dropped.

use std::collections::BTreeMap;

use crate::stripe::outbox::{NewGroup, OutboxRow, identifier_for};

/// Most rows one meter event covers (bounds identifier work and the row-id list in a group).
pub const ROWS_PER_GROUP_MAX: usize = 1000;

/// What [`plan_groups`] produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Groups to persist, then send.
    pub groups: Vec<NewGroup>,
    /// Rows left pending per unmapped customer key.
    pub unmapped: BTreeMap<String, u64>,
}

/// (Stripe customer, event name, meter, bucket time).
type GroupKey = (String, String, String, i64);
/// (row ids, Σ value, max revision).
type Acc = (Vec<u64>, u64, u32);

/// Groups `rows` (any order) using `resolve` for the customer mapping.
pub fn plan_groups(
    namespace: &str,
    rows: &[OutboxRow],
    mut resolve: impl FnMut(&str) -> Option<String>,
) -> Plan {
    let mut plan = Plan::default();
    let mut sorted: Vec<&OutboxRow> = rows.iter().filter(|r| r.value > 0).collect();
    sorted.sort_by_key(|r| r.id);
    let mut mapping: BTreeMap<&str, Option<String>> = BTreeMap::new();
    // key → (rows, value, revision)
    let mut open: BTreeMap<GroupKey, Acc> = BTreeMap::new();
    let mut done: Vec<(GroupKey, Acc)> = Vec::new();
    for r in sorted {
        let stripe = mapping
            .entry(r.customer.as_str())
            .or_insert_with(|| resolve(&r.customer))
            .clone();
        let Some(stripe) = stripe else {
            *plan.unmapped.entry(r.customer.clone()).or_insert(0) += 1;
            continue;
        };
        let key = (
            stripe,
            r.stripe_event_name.clone(),
            r.meter.clone(),
            r.timestamp_s,
        );
        let entry = open
            .entry(key.clone())
            .or_insert_with(|| (Vec::new(), 0, 0));
        let full = entry.0.len() >= ROWS_PER_GROUP_MAX || entry.1.checked_add(r.value).is_none();
        if full {
            let closed = std::mem::take(entry);
            done.push((key, closed));
        }
        entry.0.push(r.id);
        entry.1 += r.value;
        entry.2 = entry.2.max(r.revision);
    }
    done.extend(open);
    for ((stripe_customer, event_name, meter, timestamp_s), (row_ids, value, revision)) in done {
        plan.groups.push(NewGroup {
            identifier: identifier_for(namespace, &row_ids, revision),
            stripe_customer,
            event_name,
            meter,
            timestamp_s,
            value,
            row_ids,
        });
    }
    plan.groups.sort_by_key(|g| g.row_ids.first().copied());
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, customer: &str, ts: i64, value: u64) -> OutboxRow {
        OutboxRow {
            id,
            customer: customer.into(),
            meter: "api_calls".into(),
            stripe_event_name: "api_calls".into(),
            timestamp_s: ts,
            value,
            revision: 0,
        }
    }

    #[test]
    fn groups_per_customer_event_and_bucket() {
        let rows = vec![
            row(1, "cus_a", 60, 1),
            row(2, "acme", 60, 2),
            row(3, "cus_a", 60, 3),
            row(4, "cus_a", 120, 4),
            row(5, "nobody", 60, 5),
        ];
        let p = plan_groups("ns", &rows, |c| match c {
            "acme" => Some("cus_b".into()),
            c if c.starts_with("cus_") => Some(c.into()),
            _ => None,
        });
        assert_eq!(p.unmapped.get("nobody"), Some(&1));
        let got: Vec<_> = p
            .groups
            .iter()
            .map(|g| (g.row_ids.clone(), g.value))
            .collect();
        assert_eq!(got, vec![(vec![1, 3], 4), (vec![2], 2), (vec![4], 4)]);
        // same input → same identifiers
        let q = plan_groups("ns", &rows, |c| match c {
            "acme" => Some("cus_b".into()),
            c if c.starts_with("cus_") => Some(c.into()),
            _ => None,
        });
        assert_eq!(p, q);
    }

    #[test]
    fn large_groups_split() {
        let rows: Vec<_> = (1..=2500).map(|i| row(i, "cus_a", 60, 1)).collect();
        let p = plan_groups("ns", &rows, |c| Some(c.into()));
        let sizes: Vec<_> = p.groups.iter().map(|g| g.row_ids.len()).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        assert_eq!(p.groups.iter().map(|g| g.value).sum::<u64>(), 2500);
    }
}

#[cfg(test)]
mod props {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    proptest! {
        /// Every mapped row lands in exactly one group, values are preserved, identifiers are
        /// unique and at most 100 characters, and the plan is a function of its input.
        #[test]
        fn plan_partitions_rows(
            rows in proptest::collection::vec((0u8..6, 0u8..2, 0i64..5, 1u64..1_000_000, 0u32..3), 0..400)
        ) {
            let rows: Vec<OutboxRow> = rows
                .into_iter()
                .enumerate()
                .map(|(i, (c, m, t, v, rev))| OutboxRow {
                    id: i as u64 + 1,
                    customer: if c == 5 { "unmapped".into() } else { format!("cus_{c}") },
                    meter: format!("m{m}"),
                    stripe_event_name: format!("m{m}"),
                    timestamp_s: 60 * t,
                    value: v,
                    revision: rev,
                })
                .collect();
            let resolve = |c: &str| c.starts_with("cus_").then(|| c.to_owned());
            let plan = plan_groups("ns", &rows, resolve);
            prop_assert_eq!(&plan, &plan_groups("ns", &rows, resolve));
            let mut seen = HashSet::new();
            let mut idents = HashSet::new();
            for g in &plan.groups {
                prop_assert!(g.identifier.len() <= crate::stripe::outbox::IDENTIFIER_LEN_MAX);
                prop_assert!(idents.insert(g.identifier.clone()));
                let mut sum = 0;
                for id in &g.row_ids {
                    prop_assert!(seen.insert(*id), "row {} in two groups", id);
                    let r = &rows[(*id - 1) as usize];
                    prop_assert_eq!(&r.stripe_event_name, &g.event_name);
                    prop_assert_eq!(r.timestamp_s, g.timestamp_s);
                    prop_assert_eq!(Some(r.customer.clone()), resolve(&r.customer).map(|_| g.stripe_customer.clone()));
                    sum += r.value;
                }
                prop_assert_eq!(sum, g.value);
            }
            let mapped = rows.iter().filter(|r| r.customer != "unmapped").count();
            prop_assert_eq!(seen.len(), mapped);
            let unmapped: u64 = plan.unmapped.values().sum();
            prop_assert_eq!(unmapped as usize, rows.len() - mapped);
        }
    }
}
