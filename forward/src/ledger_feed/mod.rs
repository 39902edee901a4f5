//! What the decimal destinations — Orb ([`crate::orb`]) and Metronome ([`crate::metronome`]) —
//! share: the ledger as their outbox, each exactly once and independently of the others and of
//! Stripe (SPEC §6.4b).
//!
//! The Stripe outbox carries whole Stripe units with a carried remainder; Orb and Metronome take
//! exact decimals, so they read the ledger itself as their outbox (docs/decisions/0120): the
//! ledger is append-only and ordered by position, and each destination keeps its **own cursor**
//! over it, its own groups (one event each), claims, pacing, retries, dead letters and
//! out-of-window list. Planning a pass persists the new groups **and** the advanced cursor in one
//! transaction ([`ForwardStore::commit_plan`]), so every ledger position is in exactly one
//! group's sum (or deliberately skipped) per destination, and a group's idempotency key is fixed
//! before its first send.
//!
//! - [`plan`]: ledger items → events (pure), one per (customer, meter, dimensions, minute).
//! - [`FwdGroup::step`]: the one state machine every store applies.
//! - [`wire`]: a request body from each engine's event writer, and how an answer is classified
//!   (pure).
//! - [`store`]: the [`ForwardStore`] trait, the in-memory reference and the redb file store.
//! - [`runner`]: the tokio shell, one task per destination; its [`FeedHandle`] is a
//!   [`crate::Destination`].
//! - [`reconcile`]: the report, run with each engine's reads.
//! - `conformance`, `fake` (feature `test-server`): the checks every store passes; the local
//!   server both engines' sides plug into (faults, dedup, windows).
//!
//! Guarantees: Σ value of a destination's groups = Σ signed ledger amount of the routed items it
//! consumed, per (customer, meter), exactly in `Decimal`; a group is never sent under two keys;
//! usage older than a destination's window is sent through Orb's backfill or listed
//! `out_of_window` with the reason (Metronome), never dropped silently.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod reconcile;
pub mod runner;
pub mod store;
pub mod wire;

#[cfg(feature = "test-server")]
pub mod conformance;
#[cfg(feature = "test-server")]
pub mod fake;

pub use runner::{DestinationConfig, FeedHandle, spawn_destination};
pub use store::{ForwardStore, MemoryForwardStore, RedbForwardStore};

/// A decimal billing engine that reads the ledger as its outbox (the trait of a running one is
/// [`crate::Destination`]; this names which engine a cursor, group or key belongs to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// Orb (`POST /v1/ingest`, `{"events":[…]}`, ≤ 500 events).
    Orb,
    /// Metronome (`POST /v1/ingest`, a bare array of ≤ 100 events).
    Metronome,
}

impl Engine {
    /// `orb` or `metronome` (the `destination` query parameter and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orb => "orb",
            Self::Metronome => "metronome",
        }
    }

    /// Most events one ingest request carries (wire facts: Orb 500, Metronome 100).
    pub fn batch_max(self) -> usize {
        match self {
            Self::Orb => crate::orb::BATCH_MAX,
            Self::Metronome => crate::metronome::BATCH_MAX,
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "orb" => Ok(Self::Orb),
            "metronome" => Ok(Self::Metronome),
            other => Err(format!(
                "unknown destination {other:?}: expected orb or metronome"
            )),
        }
    }
}

/// One ledger transfer as a destination sees it: signed (a reduction is negative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerItem {
    /// The transfer's ledger position (strictly increasing).
    pub position: u64,
    /// Our customer key.
    pub customer: String,
    /// Our meter name.
    pub meter: String,
    /// Signed amount in the meter's unit: usage up is positive, a reduction negative.
    pub amount: Decimal,
    /// When the usage happened, Unix seconds.
    pub timestamp_s: i64,
    /// The usage account's dimensions.
    pub dimensions: BTreeMap<String, String>,
}

/// Where a group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FwdState {
    /// Not sent yet, or sent with a definite failure.
    Pending,
    /// A send may have reached the destination; resent only under the same key.
    Unknown,
    /// Orb: waiting in a backfill (ingested or not yet); sent once the backfill is reflected.
    Backfill,
    /// The destination has it.
    Sent,
    /// Rejected permanently; waits for an operator.
    Dead,
    /// Older than the destination's window and it has no late path (Metronome): listed with the
    /// reason, never sent, never silently dropped.
    OutOfWindow,
}

impl FwdState {
    /// The forwarder may still send it (pending, unknown).
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Unknown)
    }

    /// Sent, dead or out of window.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Sent | Self::Dead | Self::OutOfWindow)
    }
}

impl std::str::FromStr for FwdState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pending" => Self::Pending,
            "unknown" => Self::Unknown,
            "backfill" => Self::Backfill,
            "sent" => Self::Sent,
            "dead" => Self::Dead,
            "out_of_window" => Self::OutOfWindow,
            other => return Err(format!("unknown state {other:?}")),
        })
    }
}

/// One event planned over ledger positions, before the store gives it an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFwdGroup {
    /// Deterministic idempotency key (Orb `idempotency_key`, Metronome `transaction_id`).
    pub key: String,
    /// Our customer key.
    pub customer: String,
    /// The destination's customer (Orb `external_customer_id`, Metronome ingest alias or id).
    pub dest_customer: String,
    /// Our meter.
    pub meter: String,
    /// Orb `event_name` / Metronome `event_type`.
    pub event_name: String,
    /// Minute of the usage, Unix seconds.
    pub timestamp_s: i64,
    /// Exact signed decimal value (never zero).
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    /// The meter's dimensions, sent as properties beside `value`.
    pub dimensions: BTreeMap<String, String>,
    /// Ledger positions covered.
    pub positions: Vec<u64>,
}

/// A persisted group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwdGroup {
    /// Store-assigned id (per destination, increasing).
    pub id: u64,
    /// What was planned; never changes.
    pub event: NewFwdGroup,
    /// Current state.
    pub state: FwdState,
    /// Sends started.
    pub attempts: u32,
    /// First send's start (Unix ms).
    pub first_attempt_ms: Option<i64>,
    /// Not before (Unix ms); also the lease while a send is in flight.
    pub next_attempt_ms: i64,
    /// Last error or the out-of-window reason.
    pub last_error: Option<String>,
    /// Orb: the backfill it travels in (our backfill record's key).
    pub backfill: Option<String>,
    /// Orb: accepted into its backfill (sent once the backfill is reflected).
    #[serde(default)]
    pub ingested: bool,
}

/// Something that happens to a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwdEvent {
    /// A send starts (lease until `lease_until_ms`).
    Attempt {
        /// Now.
        now_ms: i64,
        /// Lease end.
        lease_until_ms: i64,
    },
    /// Try again later; `unknown` when the destination may have processed it.
    Retry {
        /// Not before.
        at_ms: i64,
        /// Outcome unknown (sticky).
        unknown: bool,
        /// What was said.
        error: Option<String>,
    },
    /// The destination has it.
    Delivered,
    /// Rejected permanently.
    Rejected(String),
    /// Too old for the destination's window, which has no late path.
    OutOfWindow(String),
    /// Orb: moved into backfill `key`.
    ToBackfill(String),
    /// Orb: accepted into its backfill.
    BackfillIngested,
    /// An operator requeues a dead or out-of-window group (same key: dedup keeps it harmless).
    Requeue,
}

impl FwdGroup {
    /// A new pending group.
    pub fn new(id: u64, event: NewFwdGroup) -> Self {
        assert!(
            !event.value.is_zero() && !event.positions.is_empty(),
            "a group covers at least one position and a non-zero value"
        );
        Self {
            id,
            event,
            state: FwdState::Pending,
            attempts: 0,
            first_attempt_ms: None,
            next_attempt_ms: 0,
            last_error: None,
            backfill: None,
            ingested: false,
        }
    }

    /// The group after `ev`; `None` when it changes nothing (a late answer on a final group).
    /// Unknown is sticky: only a final state or a backfill leaves it.
    pub fn step(&self, ev: FwdEvent) -> Option<FwdGroup> {
        let mut n = self.clone();
        match ev {
            FwdEvent::Attempt {
                now_ms,
                lease_until_ms,
            } => {
                if !self.state.is_open() && self.state != FwdState::Backfill {
                    return None;
                }
                n.attempts = n.attempts.saturating_add(1);
                n.first_attempt_ms.get_or_insert(now_ms);
                n.next_attempt_ms = lease_until_ms;
            }
            FwdEvent::Retry {
                at_ms,
                unknown,
                error,
            } => {
                if self.state.is_final() {
                    return None;
                }
                n.next_attempt_ms = at_ms;
                if unknown && self.state == FwdState::Pending {
                    n.state = FwdState::Unknown;
                }
                if error.is_some() {
                    n.last_error = error;
                }
            }
            FwdEvent::Delivered => {
                if self.state.is_final() {
                    return None;
                }
                n.state = FwdState::Sent;
                n.last_error = None;
            }
            FwdEvent::Rejected(e) => {
                if self.state.is_final() {
                    return None;
                }
                n.state = FwdState::Dead;
                n.last_error = Some(e);
            }
            FwdEvent::OutOfWindow(reason) => {
                if self.state.is_final() {
                    return None;
                }
                n.state = FwdState::OutOfWindow;
                n.last_error = Some(reason);
            }
            FwdEvent::ToBackfill(key) => {
                if !self.state.is_open() {
                    return None;
                }
                n.state = FwdState::Backfill;
                n.backfill = Some(key);
                n.next_attempt_ms = 0;
            }
            FwdEvent::BackfillIngested => {
                if self.state != FwdState::Backfill {
                    return None;
                }
                n.ingested = true;
            }
            FwdEvent::Requeue => {
                if !matches!(self.state, FwdState::Dead | FwdState::OutOfWindow) {
                    return None;
                }
                // A dead group may have been sent before: it goes back as unknown, under the
                // same key, so the destination's dedup keeps a resend harmless.
                n.state = if self.attempts > 0 {
                    FwdState::Unknown
                } else {
                    FwdState::Pending
                };
                n.next_attempt_ms = 0;
            }
        }
        assert!(
            n.id == self.id && n.event == self.event,
            "a group's id, key, value and positions never change"
        );
        assert!(n.attempts >= self.attempts, "attempts never decrease");
        assert!(
            self.state != FwdState::Unknown || n.state != FwdState::Pending,
            "unknown is sticky"
        );
        Some(n)
    }
}

/// How one destination names meters and customers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Meter → the destination's event name. `None`: every meter, under its own name.
    pub meters: Option<BTreeMap<String, String>>,
    /// Customer → the destination's customer (default: the customer key itself).
    pub customers: BTreeMap<String, String>,
}

impl Routes {
    /// The destination's event name for `meter`, if the meter goes there.
    pub fn event_name(&self, meter: &str) -> Option<String> {
        match &self.meters {
            None => Some(meter.to_owned()),
            Some(m) => m.get(meter).cloned(),
        }
    }

    /// The destination's customer for `customer`.
    pub fn customer(&self, customer: &str) -> String {
        self.customers
            .get(customer)
            .cloned()
            .unwrap_or_else(|| customer.to_owned())
    }
}

/// The deterministic key of an event over `positions` for `dest` in store `namespace`:
/// `tly-{ns}-{dest}-{first}-{count}-{16 hex of SHA-256}` — at most 4+16+10+20+20+16+4 = 90
/// characters (Metronome allows 128; Orb has no stated limit on the body key).
pub fn key_for(namespace: &str, dest: Engine, positions: &[u64]) -> String {
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update(dest.as_str().as_bytes());
    for p in positions {
        h.update(p.to_be_bytes());
    }
    let d = h.finalize();
    let ns: String = namespace.chars().take(16).collect();
    format!(
        "tly-{ns}-{}-{}-{}-{}",
        dest.as_str(),
        positions.first().copied().unwrap_or(0),
        positions.len(),
        hex::encode(&d[..8])
    )
}

/// Most positions one group covers.
pub const POSITIONS_PER_GROUP_MAX: usize = 1000;

/// What a planning pass produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// New groups, in order of their first position.
    pub groups: Vec<NewFwdGroup>,
    /// The cursor after this pass (the last position read).
    pub cursor: u64,
    /// Items skipped because their meter does not go to this destination.
    pub skipped: u64,
}

type PlanKey = (String, String, BTreeMap<String, String>, i64);

/// Groups `items` (ascending positions after `cursor`) into one event per (customer, meter,
/// dimensions, minute), summing signed amounts exactly; a sum of zero sends nothing (a reduction
/// netted within the pass). Pure: the same input gives the same keys. The new cursor is the
/// last item's position, or `scanned_to` when the read went further (past transfers that are
/// not usage, such as grants).
pub fn plan(
    namespace: &str,
    dest: Engine,
    cursor: u64,
    scanned_to: u64,
    items: &[LedgerItem],
    routes: &Routes,
) -> Plan {
    let mut out = Plan {
        cursor,
        ..Plan::default()
    };
    let mut open: BTreeMap<PlanKey, (String, Decimal, Vec<u64>)> = BTreeMap::new();
    let mut done = Vec::new();
    for it in items {
        assert!(it.position > out.cursor, "ledger positions ascend");
        out.cursor = it.position;
        let Some(event_name) = routes.event_name(&it.meter) else {
            out.skipped += 1;
            continue;
        };
        let minute = it.timestamp_s.div_euclid(60) * 60;
        let k = (
            it.customer.clone(),
            it.meter.clone(),
            it.dimensions.clone(),
            minute,
        );
        let e = open
            .entry(k.clone())
            .or_insert_with(|| (event_name.clone(), Decimal::ZERO, Vec::new()));
        let sum = e.1.checked_add(it.amount);
        match sum {
            Some(s) if e.2.len() < POSITIONS_PER_GROUP_MAX => {
                e.1 = s;
                e.2.push(it.position);
            }
            _ => {
                let closed = std::mem::replace(e, (event_name, it.amount, vec![it.position]));
                done.push((k, closed));
            }
        }
    }
    done.extend(open);
    out.cursor = out.cursor.max(scanned_to);
    for ((customer, meter, dimensions, ts), (event_name, value, positions)) in done {
        if value.is_zero() {
            continue;
        }
        out.groups.push(NewFwdGroup {
            key: key_for(namespace, dest, &positions),
            dest_customer: routes.customer(&customer),
            customer,
            meter,
            event_name,
            timestamp_s: ts,
            value: value.normalize(),
            dimensions,
            positions,
        });
    }
    out.groups.sort_by_key(|g| g.positions.first().copied());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn item(p: u64, c: &str, m: &str, a: &str, ts: i64) -> LedgerItem {
        LedgerItem {
            position: p,
            customer: c.into(),
            meter: m.into(),
            amount: Decimal::from_str(a).unwrap(),
            timestamp_s: ts,
            dimensions: BTreeMap::new(),
        }
    }

    #[test]
    fn plan_groups_by_minute_and_nets_reductions() {
        let items = vec![
            item(1, "a", "tokens", "0.125", 60),
            item(2, "a", "tokens", "1.5", 119),
            item(3, "b", "tokens", "2", 60),
            item(4, "b", "tokens", "-2", 61),
            item(5, "a", "other", "7", 60),
            item(6, "a", "tokens", "-0.025", 180),
        ];
        let routes = Routes {
            meters: Some(BTreeMap::from([("tokens".into(), "llm_tokens".into())])),
            customers: BTreeMap::from([("a".into(), "orb_a".into())]),
        };
        let p = plan("ns", Engine::Orb, 0, 0, &items, &routes);
        assert_eq!((p.cursor, p.skipped), (6, 1));
        let got: Vec<_> = p
            .groups
            .iter()
            .map(|g| {
                (
                    g.dest_customer.as_str(),
                    g.value.to_string(),
                    g.positions.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("orb_a", "1.625".to_owned(), vec![1, 2]),
                ("orb_a", "-0.025".to_owned(), vec![6])
            ]
        );
        assert_eq!(p, plan("ns", Engine::Orb, 0, 0, &items, &routes));
        assert_ne!(
            p.groups[0].key,
            plan("ns", Engine::Metronome, 0, 0, &items, &routes).groups[0].key
        );
    }

    #[test]
    fn unknown_is_sticky_and_final_states_ignore_late_answers() {
        let g = FwdGroup::new(
            1,
            plan(
                "n",
                Engine::Metronome,
                0,
                0,
                &[item(1, "a", "m", "1", 0)],
                &Routes::default(),
            )
            .groups[0]
                .clone(),
        );
        let u = g
            .step(FwdEvent::Retry {
                at_ms: 5,
                unknown: true,
                error: None,
            })
            .unwrap();
        assert_eq!(u.state, FwdState::Unknown);
        let still = u
            .step(FwdEvent::Retry {
                at_ms: 6,
                unknown: false,
                error: Some("429".into()),
            })
            .unwrap();
        assert_eq!(still.state, FwdState::Unknown);
        let s = still.step(FwdEvent::Delivered).unwrap();
        assert_eq!(s.step(FwdEvent::Rejected("late".into())), None);
        let o = g
            .step(FwdEvent::OutOfWindow("older than 34 days".into()))
            .unwrap();
        assert_eq!(o.state, FwdState::OutOfWindow);
        assert_eq!(o.step(FwdEvent::Requeue).unwrap().state, FwdState::Pending);
    }

    proptest! {
        /// Per (customer, meter), Σ group values = Σ routed signed amounts, exactly; every
        /// routed position is in at most one group; keys are unique.
        #[test]
        fn plan_preserves_sums(raw in proptest::collection::vec((0u8..3, 0u8..2, -5000i64..50_000, 0u32..6, 0i64..300), 0..300)) {
            let items: Vec<LedgerItem> = raw.iter().enumerate().map(|(i, (c, m, v, s, t))| LedgerItem {
                position: i as u64 * 3 + 1,
                customer: format!("c{c}"),
                meter: format!("m{m}"),
                amount: Decimal::new(*v, *s),
                timestamp_s: *t,
                dimensions: BTreeMap::new(),
            }).collect();
            let p = plan("ns", Engine::Metronome, 0, 0, &items, &Routes::default());
            let mut want: BTreeMap<(String, String), Decimal> = BTreeMap::new();
            for it in &items { *want.entry((it.customer.clone(), it.meter.clone())).or_default() += it.amount; }
            let mut got: BTreeMap<(String, String), Decimal> = BTreeMap::new();
            let mut seen = std::collections::HashSet::new();
            let mut keys = std::collections::HashSet::new();
            for g in &p.groups {
                prop_assert!(keys.insert(g.key.clone()));
                prop_assert!(g.key.len() <= 128);
                for pos in &g.positions { prop_assert!(seen.insert(*pos)); }
                *got.entry((g.customer.clone(), g.meter.clone())).or_default() += g.value;
            }
            want.retain(|_, v| !v.is_zero());
            got.retain(|_, v| !v.is_zero());
            prop_assert_eq!(want, got);
        }
    }
}
