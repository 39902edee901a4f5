//! Outbox coalescing: one *open bucket* per (customer, meter, bucket time), added to in place
//! by every ledger transaction until the forwarder *seals* it into an immutable outbox row
//! (docs/decisions/0106).
//!
//! Writing a row per (customer, meter, bucket time) per ledger transaction cost the collector a
//! quarter of its ingest rate when every meter forwards: a 100,000-delta transaction over many
//! minutes wrote almost a row per delta. Open buckets live in one record per (customer, meter)
//! beside its unit carry, so a transaction writes one small record per pair whatever the number
//! of deltas, and a row is written once per bucket when the forwarder seals it.
//!
//! Rules (every store applies these functions, the stores only persist the result):
//! - [`post`] runs [`Carry::step`] and adds the units due to the bucket of the delta's time, in
//!   the same transaction as the ledger transfer: `Σ sealed rows + Σ open buckets = sent units =
//!   ⌊net posted × scale⌋` (while usage is not below a reduction, decision 0022);
//! - a bucket is never part of a group: only a sealed row is, and a sealed row never changes, so
//!   a group's value and Stripe identifier (fixed when the forwarder claims its rows) never
//!   change; units arriving after a seal open a new bucket, which becomes a new row;
//! - [`OpenBuckets::seal`] empties the record in the same transaction that writes its rows, so a
//!   crash between the two loses and duplicates nothing;
//! - bounded: at most `limit` open buckets per (customer, meter) ([`MAX_OPEN_BUCKETS`]); a
//!   posting that would open one more spills the *oldest* bucket, which the same transaction
//!   writes as an ordinary pending row (the pre-coalescing behaviour): nothing is refused or
//!   delayed, only coalescing stops for that bucket. The records themselves are one per
//!   (customer, meter) with a carry, so the set of open buckets is ≤ pairs × limit.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::stripe::units::{Carry, UnitsError};

/// Open buckets kept per (customer, meter) before the oldest spills into a row: two hours of
/// one-minute buckets, far more than a forwarder that seals every poll interval leaves open.
pub const MAX_OPEN_BUCKETS: usize = 128;

/// The open buckets of one (customer, meter): whole Stripe units per bucket time (Unix seconds),
/// never zero.
///
/// A sorted vector, not a map: the collector decodes, adds to and re-encodes a pair's record
/// in every ingest transaction, and a record holds at most [`MAX_OPEN_BUCKETS`] buckets,
/// usually posted in time order (an append). Serialized as a map from time to units, so the
/// stored bytes are those of the `BTreeMap<i64, u64>` it replaced (postcard and JSON alike).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenBuckets {
    /// (bucket time, units), strictly increasing in time, units never zero.
    #[serde(with = "bucket_map")]
    buckets: Vec<(i64, u64)>,
}

/// Why a posting could not be coalesced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoalesceError {
    /// The carry refused the quantity.
    #[error(transparent)]
    Units(#[from] UnitsError),
    /// A bucket's units overflow `u64`.
    #[error("outbox units overflow")]
    Overflow,
}

/// What one posting did to the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Posted {
    /// Whole units made due (0: nothing changed in the buckets).
    pub units: u64,
    /// A bucket was opened (the open-bucket count grew by one, unless one spilled).
    pub opened: bool,
    /// The oldest bucket left the record at the limit: write it as a pending row now.
    pub spilled: Option<(i64, u64)>,
}

impl OpenBuckets {
    /// Σ units over the open buckets.
    pub fn units(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |a, (_, v)| a.saturating_add(*v))
    }

    /// Whether no bucket is open.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// How many buckets are open.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The oldest open bucket's time.
    pub fn oldest(&self) -> Option<i64> {
        self.buckets.first().map(|b| b.0)
    }

    /// The buckets as (time, units), oldest first.
    pub fn as_slice(&self) -> &[(i64, u64)] {
        &self.buckets
    }

    /// Adds `units` (> 0) to the bucket of `timestamp_s`; at more than `limit` buckets the
    /// oldest leaves and is returned (to be written as a row in the same transaction).
    pub fn add(
        &mut self,
        timestamp_s: i64,
        units: u64,
        limit: usize,
    ) -> Result<Posted, CoalesceError> {
        if units == 0 {
            return Ok(Posted::default());
        }
        let mut out = Posted {
            units,
            ..Posted::default()
        };
        // Usage mostly arrives in time order: try the newest bucket before searching.
        let at = match self.buckets.last() {
            None => Err(0),
            Some(&(t, _)) if t < timestamp_s => Err(self.buckets.len()),
            Some(&(t, _)) if t == timestamp_s => Ok(self.buckets.len() - 1),
            Some(_) => self.buckets.binary_search_by_key(&timestamp_s, |b| b.0),
        };
        match at {
            Ok(i) => {
                let v = &mut self.buckets[i].1;
                *v = v.checked_add(units).ok_or(CoalesceError::Overflow)?;
            }
            Err(i) => {
                self.buckets.insert(i, (timestamp_s, units));
                out.opened = true;
            }
        }
        if self.buckets.len() > limit.max(1) {
            out.spilled = Some(self.buckets.remove(0));
        }
        debug_assert!(well_formed(&self.buckets), "open buckets sorted, nonzero");
        Ok(out)
    }

    /// Empties the record: the buckets, oldest first, each to be written as one row in the
    /// transaction that stores the emptied record.
    pub fn seal(&mut self) -> Vec<(i64, u64)> {
        std::mem::take(&mut self.buckets)
    }
}

/// Strictly increasing times, no zero units: what [`OpenBuckets::add`] keeps and decoding
/// checks.
fn well_formed(buckets: &[(i64, u64)]) -> bool {
    buckets.windows(2).all(|w| w[0].0 < w[1].0) && buckets.iter().all(|b| b.1 > 0)
}

impl IntoIterator for OpenBuckets {
    type Item = (i64, u64);
    type IntoIter = std::vec::IntoIter<(i64, u64)>;
    fn into_iter(self) -> Self::IntoIter {
        self.buckets.into_iter()
    }
}

/// The buckets' stored form: a map from bucket time to units, as the `BTreeMap` they were
/// before; decoding refuses one out of time order or with zero units (no writer makes one).
mod bucket_map {
    use super::{MAX_OPEN_BUCKETS, well_formed};
    use serde::de::{Error, MapAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(buckets: &[(i64, u64)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(buckets.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(i64, u64)>, D::Error> {
        d.deserialize_map(Buckets)
    }

    struct Buckets;

    impl<'de> Visitor<'de> for Buckets {
        type Value = Vec<(i64, u64)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map from bucket time to units")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut v = Vec::with_capacity(m.size_hint().unwrap_or(0).min(MAX_OPEN_BUCKETS * 2));
            while let Some(e) = m.next_entry::<i64, u64>()? {
                v.push(e);
            }
            if !well_formed(&v) {
                return Err(A::Error::custom(
                    "open buckets out of time order or with zero units",
                ));
            }
            Ok(v)
        }
    }
}

/// The ledger-transaction rule for one posted transfer of a forwarded meter: the carry step
/// (decision 0022), then the units due into the open bucket of `timestamp_s`.
pub fn post(
    carry: &mut Carry,
    open: &mut OpenBuckets,
    signed_quantity: Decimal,
    stripe_unit_scale: Decimal,
    timestamp_s: i64,
    limit: usize,
) -> Result<Posted, CoalesceError> {
    let (next, units) = carry.step(signed_quantity, stripe_unit_scale)?;
    let posted = open.add(timestamp_s, units, limit)?;
    *carry = next;
    Ok(posted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A ledger transaction of postings (pair, minute, quantity), committed or lost in a crash.
        Txn(Vec<(usize, i64, Decimal)>, bool),
        /// The forwarder seals one pair (committed or lost in a crash).
        Seal(usize, bool),
        /// The forwarder claims every sealed, unclaimed row into a group.
        Claim,
    }

    #[derive(Debug, Clone)]
    struct Row {
        pair: usize,
        value: u64,
        group: Option<usize>,
    }

    #[derive(Debug, Clone, Default)]
    struct Model {
        carry: Vec<Carry>,
        open: Vec<OpenBuckets>,
        ledger: Vec<Decimal>,
        rows: Vec<Row>,
        groups: Vec<(Vec<usize>, u64)>,
    }

    const PAIRS: usize = 3;

    fn op() -> impl Strategy<Value = Op> {
        let q = prop_oneof![
            (0i64..1000, 0u32..4).prop_map(|(m, s)| Decimal::new(m, s)),
            (0i64..10, 0u32..3).prop_map(|(m, s)| Decimal::new(m, s + 2)),
        ];
        prop_oneof![
            4 => (proptest::collection::vec((0..PAIRS, 0i64..12, q), 1..20), any::<bool>())
                .prop_map(|(p, c)| Op::Txn(p, c)),
            2 => (0..PAIRS, any::<bool>()).prop_map(|(p, c)| Op::Seal(p, c)),
            1 => Just(Op::Claim),
        ]
    }

    proptest! {
        /// Σ rows + Σ open buckets = ⌊ledger × scale⌋ per pair after every committed or crashed
        /// step; a claimed row and its group never change; the limit holds.
        #[test]
        fn rows_plus_open_equal_the_floor_of_the_ledger(
            ops in proptest::collection::vec(op(), 0..120),
            scale in prop_oneof![Just(Decimal::ONE), Just(Decimal::new(1000, 0)), Just(Decimal::new(1, 1))],
            limit in 1usize..6,
        ) {
            let mut m = Model {
                carry: vec![Carry::default(); PAIRS],
                open: vec![OpenBuckets::default(); PAIRS],
                ledger: vec![Decimal::ZERO; PAIRS],
                ..Model::default()
            };
            for op in ops {
                // Each step works on a copy, kept only if it commits (a crash drops it whole).
                let mut next = m.clone();
                let commit = match op {
                    Op::Txn(postings, commit) => {
                        for (pair, minute, q) in postings {
                            let p = post(&mut next.carry[pair], &mut next.open[pair], q, scale, minute * 60, limit).unwrap();
                            next.ledger[pair] += q;
                            if let Some((_, v)) = p.spilled {
                                next.rows.push(Row { pair, value: v, group: None });
                            }
                        }
                        commit
                    }
                    Op::Seal(pair, commit) => {
                        for (_, v) in next.open[pair].seal() {
                            next.rows.push(Row { pair, value: v, group: None });
                        }
                        commit
                    }
                    Op::Claim => {
                        let ids: Vec<usize> = (0..next.rows.len()).filter(|i| next.rows[*i].group.is_none()).collect();
                        if !ids.is_empty() {
                            let g = next.groups.len();
                            let v = ids.iter().map(|i| next.rows[*i].value).sum();
                            for i in &ids { next.rows[*i].group = Some(g); }
                            next.groups.push((ids, v));
                        }
                        true
                    }
                };
                if commit {
                    // Claimed rows and groups are append-only and unchanged.
                    for (i, r) in m.rows.iter().enumerate() {
                        prop_assert_eq!(next.rows[i].value, r.value);
                        if r.group.is_some() { prop_assert_eq!(next.rows[i].group, r.group); }
                    }
                    prop_assert_eq!(&next.groups[..m.groups.len()], &m.groups[..]);
                    m = next;
                }
                for pair in 0..PAIRS {
                    let rows: u64 = m.rows.iter().filter(|r| r.pair == pair).map(|r| r.value).sum();
                    let due: u64 = (m.ledger[pair] * scale).floor().try_into().unwrap();
                    prop_assert_eq!(rows + m.open[pair].units(), due);
                    prop_assert_eq!(m.carry[pair].sent_units, due);
                    prop_assert!(m.open[pair].len() <= limit);
                    prop_assert!(m.open[pair].as_slice().iter().all(|(_, v)| *v > 0));
                }
                // No unit in two groups: each group is exactly the sum of its own rows.
                let mut seen = std::collections::HashSet::new();
                for (ids, v) in &m.groups {
                    prop_assert_eq!(ids.iter().map(|i| m.rows[*i].value).sum::<u64>(), *v);
                    for i in ids { prop_assert!(seen.insert(*i)); }
                }
            }
        }
    }

    proptest! {
        /// The sorted vector behaves as the `BTreeMap` it replaced (the model): same buckets,
        /// same answers from `add` and `seal`; its JSON is the map's.
        #[test]
        fn open_buckets_match_a_map(
            ops in proptest::collection::vec(
                prop_oneof![
                    8 => (-3i64..40, 0u64..5).prop_map(|(t, u)| Some((t * 60, u))),
                    1 => Just(None),
                ],
                0..200,
            ),
            limit in 1usize..8,
        ) {
            let mut o = OpenBuckets::default();
            let mut model: std::collections::BTreeMap<i64, u64> = Default::default();
            for op in ops {
                match op {
                    Some((t, u)) => {
                        let p = o.add(t, u, limit).unwrap();
                        let mut want = Posted { units: u, ..Posted::default() };
                        if u > 0 {
                            want.opened = !model.contains_key(&t);
                            *model.entry(t).or_insert(0) += u;
                            if model.len() > limit {
                                want.spilled = model.pop_first();
                            }
                        }
                        prop_assert_eq!(p, want);
                    }
                    None => {
                        let want: Vec<(i64, u64)> = std::mem::take(&mut model).into_iter().collect();
                        prop_assert_eq!(o.seal(), want);
                    }
                }
                let want: Vec<(i64, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                prop_assert_eq!(o.as_slice(), &want[..]);
                prop_assert_eq!(o.units(), model.values().sum::<u64>());
                prop_assert_eq!(o.oldest(), model.keys().next().copied());
                #[derive(Serialize)]
                struct Old<'a> { buckets: &'a std::collections::BTreeMap<i64, u64> }
                let json = serde_json::to_string(&o).unwrap();
                prop_assert_eq!(&json, &serde_json::to_string(&Old { buckets: &model }).unwrap());
                prop_assert_eq!(serde_json::from_str::<OpenBuckets>(&json).unwrap(), o.clone());
            }
        }
    }

    #[test]
    fn out_of_order_or_zero_buckets_are_refused_on_decode() {
        for bad in [r#"{"buckets":{"120":1,"60":2}}"#, r#"{"buckets":{"60":0}}"#] {
            assert!(serde_json::from_str::<OpenBuckets>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_oldest_bucket_spills_at_the_limit() {
        let mut o = OpenBuckets::default();
        assert!(o.add(120, 1, 2).unwrap().opened);
        assert!(!o.add(120, 1, 2).unwrap().opened);
        o.add(60, 5, 2).unwrap();
        let p = o.add(180, 3, 2).unwrap();
        assert_eq!((p.opened, p.spilled), (true, Some((60, 5))));
        assert_eq!(o.seal(), vec![(120, 2), (180, 3)]);
        assert!(o.is_empty());
        assert_eq!(o.add(0, 0, 2).unwrap(), Posted::default());
    }
}
