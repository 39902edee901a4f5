//! The outbox: rows the collector writes in its ledger transaction, the event groups the
//! forwarder builds from them, and the [`OutboxStore`] trait that persists both.
//!
//! Before a row there is an *open bucket* ([`crate::stripe::coalesce`]): the collector's ledger
//! transactions add units to it in place until [`OutboxStore::seal_open`] writes it as a row.
//!
//! Lifecycle of a row: written *pending* (no group) → claimed into exactly one [`EventGroup`]
//! (persisted with its deterministic identifier **before** the first send) → the group ends
//! *sent* or *dead*; a dead group can be requeued by an operator, which dissolves it and returns
//! its rows to pending with `revision + 1` (so the next identifier differs from the rejected one).
//!
//! Guarantees a store implementation must keep (the memory store here is the reference):
//! - row ids are assigned by the store, strictly increasing;
//! - a row belongs to at most one live group ([`OutboxStore::create_groups`] is atomic and fails
//!   with [`StoreError::Conflict`] if any row is already grouped — the hook where PostgreSQL uses
//!   `FOR UPDATE SKIP LOCKED`);
//! - a group's identifier, value and rows never change once created;
//! - a group moves only as [`EventGroup::step`] (the [`crate::stripe::group`] state machine) says — every
//!   store applies that one rule instead of its own;
//! - `Unknown` is sticky: once a send's outcome was unknown, only a success (or an operator)
//!   leaves that state, and `first_attempt_ms` keeps the time of the first possibly-delivered send.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::stripe::group::{
    EventGroup, GroupEvent, GroupId, GroupState, NewGroup, RowId, StripeError, TransitionError,
};

/// A row the collector writes in the same transaction as the ledger transfer it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOutboxRow {
    /// Our customer key (mapped to a Stripe customer at send time).
    pub customer: String,
    /// Our meter name.
    pub meter: String,
    /// The meter's Stripe `event_name`.
    pub stripe_event_name: String,
    /// Bucket time, Unix seconds.
    pub timestamp_s: i64,
    /// Whole Stripe units, already scaled (never zero: zero-unit rows are not written).
    pub value: u64,
}

/// A stored outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRow {
    /// Store-assigned, strictly increasing id.
    pub id: RowId,
    /// Our customer key.
    pub customer: String,
    /// Our meter name.
    pub meter: String,
    /// The meter's Stripe `event_name`.
    pub stripe_event_name: String,
    /// Bucket time, Unix seconds.
    pub timestamp_s: i64,
    /// Whole Stripe units.
    pub value: u64,
    /// How many times an operator requeued this row after a dead letter (part of the identifier).
    pub revision: u32,
}

/// Listing filter and per-row state as shown by `GET /v1/stripe/outbox?state=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxState {
    /// Not delivered yet (ungrouped, or in a pending group).
    Pending,
    /// In a group whose outcome is unknown.
    Unknown,
    /// Delivered.
    Sent,
    /// Dead letter.
    Dead,
}

impl OutboxState {
    /// A row's state from its group's (`None`: the row is in no group yet).
    pub fn of(group: Option<GroupState>) -> Self {
        match group {
            None | Some(GroupState::Pending) => Self::Pending,
            Some(GroupState::Unknown) => Self::Unknown,
            Some(GroupState::Sent) => Self::Sent,
            Some(GroupState::Dead) => Self::Dead,
        }
    }
}

impl OutboxRow {
    /// The row as an operator's requeue returns it to pending: the next revision, so the next
    /// identifier differs from the rejected one.
    pub fn requeued(mut self) -> Self {
        self.revision = self.revision.saturating_add(1);
        self
    }
}

/// What a store knows about one row when a group is about to be created over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowClaim {
    /// The row's units.
    pub value: u64,
    /// Whether it is already in a group.
    pub grouped: bool,
}

/// The rules of [`OutboxStore::create_groups`], for every store: each group is non-empty, its
/// identifier is new, each row exists and is in no group (nor in two groups of the batch), and
/// the group's value is exactly the sum of its rows'. `row` reads a row; `identifier_exists`
/// looks an identifier up.
pub fn check_new_groups(
    groups: &[NewGroup],
    mut row: impl FnMut(RowId) -> Result<Option<RowClaim>, StoreError>,
    mut identifier_exists: impl FnMut(&str) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut seen_rows = std::collections::HashSet::new();
    let mut seen_identifiers = std::collections::HashSet::new();
    for grp in groups {
        if grp.value == 0 || grp.row_ids.is_empty() {
            return Err(StoreError::Invalid("empty group".into()));
        }
        if !seen_identifiers.insert(grp.identifier.as_str()) || identifier_exists(&grp.identifier)?
        {
            return Err(StoreError::Invalid(format!(
                "identifier {} exists",
                grp.identifier
            )));
        }
        let mut sum: u64 = 0;
        for id in &grp.row_ids {
            let r = row(*id)?.ok_or_else(|| StoreError::NotFound(format!("row {id}")))?;
            if r.grouped || !seen_rows.insert(*id) {
                return Err(StoreError::Conflict(*id));
            }
            sum = sum.saturating_add(r.value);
        }
        // Pair assertion: the group carries exactly the value of its rows.
        if sum != grp.value {
            return Err(StoreError::Invalid(format!(
                "group value {} differs from its rows' {sum}",
                grp.value
            )));
        }
    }
    Ok(())
}

impl From<TransitionError> for StoreError {
    fn from(e: TransitionError) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl std::str::FromStr for OutboxState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s {
            "pending" => Ok(Self::Pending),
            "unknown" => Ok(Self::Unknown),
            "sent" => Ok(Self::Sent),
            "dead" => Ok(Self::Dead),
            _ => Err(StoreError::Invalid(format!("unknown outbox state {s:?}"))),
        }
    }
}

/// One row in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The row.
    pub row: OutboxRow,
    /// Its state.
    pub state: OutboxState,
    /// Group id and identifier if grouped.
    pub group: Option<(GroupId, String)>,
    /// Stripe's error for dead (or retried) rows.
    pub error: Option<StripeError>,
}

/// Counts for metrics and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Rows not yet delivered (including unknown, excluding dead).
    pub pending_rows: u64,
    /// Rows in groups whose outcome is unknown.
    pub unknown_rows: u64,
    /// Dead-letter rows.
    pub dead_rows: u64,
    /// Delivered rows.
    pub sent_rows: u64,
    /// Bucket time of the oldest undelivered, non-dead row.
    pub oldest_pending_timestamp_s: Option<i64>,
}

/// A verified webhook event, stored once per event id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRecord {
    /// Stripe event id (`evt_…`).
    pub id: String,
    /// Event type.
    pub event_type: String,
    /// Event `created` (Unix seconds, 0 if absent).
    pub created: i64,
    /// The raw JSON body.
    pub body: String,
}

/// Store failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A row is already in a group (another forwarder claimed it).
    #[error("row {0} is already grouped")]
    Conflict(RowId),
    /// No such row or group.
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation does not apply in the current state.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The backend failed.
    #[error("backend: {0}")]
    Backend(String),
}

/// Persistence for the outbox, event groups, customer mapping and webhook ids.
///
/// Implementations may block for one short transaction per call; the forwarder calls them from
/// `spawn_blocking`. Rows are inserted by the collector in its own ledger transaction, so
/// insertion is not part of this trait (see [`MemoryStore::insert`] for the reference semantics).
pub trait OutboxStore: Send + Sync + 'static {
    /// A short, stable `[a-z0-9]{1,16}` name of this store, part of every identifier, so two
    /// stores (a dev reset, a second deployment on the same Stripe account) never collide.
    fn namespace(&self) -> Result<String, StoreError>;
    /// Rows in no group with `id > after`, ascending, at most `limit`.
    fn pending_rows(&self, after: RowId, limit: usize) -> Result<Vec<OutboxRow>, StoreError>;
    /// The Stripe customer our key maps to (`cus_…` keys map to themselves — callers may rely
    /// on [`resolve_customer`] for that rule).
    fn stripe_customer(&self, customer: &str) -> Result<Option<String>, StoreError>;
    /// Sets (or replaces) a mapping.
    fn set_stripe_customer(&self, customer: &str, stripe_customer: &str) -> Result<(), StoreError>;
    /// Persists groups atomically: all or none; `Conflict` if any row is already grouped.
    fn create_groups(&self, groups: Vec<NewGroup>) -> Result<Vec<EventGroup>, StoreError>;
    /// Pending or unknown groups with `next_attempt_ms <= now_ms`, ascending id, at most `limit`.
    fn ready_groups(&self, now_ms: i64, limit: usize) -> Result<Vec<EventGroup>, StoreError>;
    /// Before a send: `attempts += 1`, `first_attempt_ms` set if unset, and
    /// `next_attempt_ms = lease_until_ms` — the lease that keeps other claimers (and a restarted
    /// forwarder) off the group while the request is in flight.
    fn record_attempt(
        &self,
        ids: &[GroupId],
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<(), StoreError>;
    /// Delivered ([`GroupEvent::Delivered`]; a settled group is left as it is).
    fn mark_sent(&self, ids: &[GroupId]) -> Result<(), StoreError>;
    /// Try again at `next_attempt_ms`; `unknown` moves the group to `Unknown` (sticky)
    /// ([`GroupEvent::Retry`]; a settled group is left as it is).
    fn mark_retry(
        &self,
        id: GroupId,
        next_attempt_ms: i64,
        unknown: bool,
        error: Option<StripeError>,
    ) -> Result<(), StoreError>;
    /// Dead letter with Stripe's error ([`GroupEvent::Rejected`]; a settled group is left as
    /// it is).
    fn mark_dead(&self, id: GroupId, error: StripeError) -> Result<(), StoreError>;
    /// Dead letter by identifier (from a webhook error report, [`GroupEvent::Reported`], which
    /// also overrides `Sent`); `Ok(false)` if unknown to us.
    fn mark_dead_by_identifier(
        &self,
        identifier: &str,
        error: StripeError,
    ) -> Result<bool, StoreError>;
    /// Operator retry of a dead row: dissolves its group and returns all of the group's rows to
    /// pending with `revision + 1`. Returns the requeued row ids.
    fn requeue(&self, row: RowId) -> Result<Vec<RowId>, StoreError>;
    /// Rows in `state` with `id > after`, ascending, at most `limit`.
    fn list(
        &self,
        state: OutboxState,
        after: RowId,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Counts.
    fn stats(&self) -> Result<OutboxStats, StoreError>;
    /// Every group (any state) for this Stripe customer and event name with
    /// `start_s <= timestamp_s < end_s`, for the unknown-outcome check. Windows are one minute,
    /// so the result is small.
    fn window_groups(
        &self,
        stripe_customer: &str,
        event_name: &str,
        start_s: i64,
        end_s: i64,
    ) -> Result<Vec<EventGroup>, StoreError>;
    /// Stores a webhook event once; `Ok(false)` if its id was seen before.
    fn record_webhook(&self, record: WebhookRecord) -> Result<bool, StoreError>;
    /// Seals open buckets ([`crate::stripe::coalesce`]) into pending rows, whole (customer, meter)
    /// records at a time, until at least `limit` rows were written or none is left; returns the
    /// rows written. One transaction: the record is emptied where its rows are written. The
    /// forwarder calls it before each planning scan. Stores that write rows directly (no open
    /// buckets) keep the default.
    fn seal_open(&self, limit: usize) -> Result<u64, StoreError> {
        let _ = limit;
        Ok(0)
    }
}

/// The Stripe customer for our key: `cus_…` maps to itself, otherwise the stored mapping.
pub fn resolve_customer<S: OutboxStore + ?Sized>(
    store: &S,
    customer: &str,
) -> Result<Option<String>, StoreError> {
    if customer.starts_with("cus_") {
        return Ok(Some(customer.to_owned()));
    }
    store.stripe_customer(customer)
}

/// What the collector calls inside its ledger transaction for one usage transfer: converts
/// `quantity` with the carried remainder ([`crate::stripe::units::carry_units`]) and returns the outbox
/// row to write (none when no whole unit is due) and the new cumulative to store for
/// (customer, meter).
pub fn outbox_row_for_usage(
    customer: &str,
    meter: &str,
    stripe_event_name: &str,
    bucket_timestamp_s: i64,
    cumulative_scaled_before: rust_decimal::Decimal,
    quantity: rust_decimal::Decimal,
    stripe_unit_scale: rust_decimal::Decimal,
) -> Result<(Option<NewOutboxRow>, rust_decimal::Decimal), crate::stripe::units::UnitsError> {
    let step =
        crate::stripe::units::carry_units(cumulative_scaled_before, quantity, stripe_unit_scale)?;
    let row = (step.units_now > 0).then(|| NewOutboxRow {
        customer: customer.to_owned(),
        meter: meter.to_owned(),
        stripe_event_name: stripe_event_name.to_owned(),
        timestamp_s: bucket_timestamp_s,
        value: step.units_now,
    });
    Ok((row, step.cumulative_scaled))
}

/// Longest identifier we produce; Stripe allows 100.
pub const IDENTIFIER_LEN_MAX: usize = 100;

/// The deterministic identifier of an event covering `row_ids` (any order) at `revision`.
///
/// `tly-{namespace}-{min row id}-{row count}-r{revision}-{16 hex of SHA-256 over the sorted ids}`:
/// at most 4+16+1+20+1+20+2+10+1+16 = 91 characters.
pub fn identifier_for(namespace: &str, row_ids: &[RowId], revision: u32) -> String {
    let mut ids = row_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update(revision.to_be_bytes());
    for id in &ids {
        h.update(id.to_be_bytes());
    }
    let digest = h.finalize();
    let ns: String = namespace.chars().take(16).collect();
    let id = format!(
        "tly-{ns}-{}-{}-r{revision}-{}",
        ids.first().copied().unwrap_or(0),
        ids.len(),
        hex::encode(&digest[..8])
    );
    debug_assert!(id.len() <= IDENTIFIER_LEN_MAX);
    id
}

#[derive(Debug, Clone)]
struct RowRec {
    row: OutboxRow,
    group: Option<GroupId>,
}

#[derive(Debug, Default)]
struct Inner {
    next_row: RowId,
    next_group: GroupId,
    rows: BTreeMap<RowId, RowRec>,
    ungrouped: std::collections::BTreeSet<RowId>,
    groups: BTreeMap<GroupId, EventGroup>,
    active: std::collections::BTreeSet<GroupId>,
    by_identifier: HashMap<String, GroupId>,
    mapping: HashMap<String, String>,
    webhooks: BTreeMap<String, WebhookRecord>,
    /// Open buckets per (customer, meter), with the event name they were posted under.
    buckets: BTreeMap<(String, String), (String, crate::stripe::coalesce::OpenBuckets)>,
}

/// An in-memory [`OutboxStore`] for tests and the reference for other backends.
#[derive(Debug)]
pub struct MemoryStore {
    namespace: String,
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store with a random namespace.
    pub fn new() -> Self {
        let mut b = [0u8; 6];
        // A fixed namespace would only risk identifier reuse across test stores on one server.
        let _ = getrandom::getrandom(&mut b);
        Self::with_namespace(&hex::encode(b))
    }

    /// An empty store with a chosen namespace (`[a-z0-9]`, up to 16 characters are used).
    pub fn with_namespace(namespace: &str) -> Self {
        Self {
            namespace: namespace.chars().take(16).collect(),
            inner: Mutex::new(Inner {
                next_row: 1,
                next_group: 1,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Backend("memory store lock poisoned".into()))
    }

    /// What the collector does in its ledger transaction: add the row's units to the open
    /// bucket of its (customer, meter, time) ([`crate::stripe::coalesce`]); a bucket that spills at the
    /// limit, or buckets posted under another event name, become rows now. Zero values refused.
    pub fn accumulate(&self, row: NewOutboxRow) -> Result<(), StoreError> {
        if row.value == 0 {
            return Err(StoreError::Invalid("zero-unit rows are not written".into()));
        }
        let mut g = self.lock()?;
        let key = (row.customer.clone(), row.meter.clone());
        let (name, mut open) = g.buckets.remove(&key).unwrap_or_default();
        if name != row.stripe_event_name {
            for (ts, value) in open.seal() {
                Self::push(&mut g, &row.customer, &row.meter, &name, ts, value);
            }
        }
        let p = open
            .add(
                row.timestamp_s,
                row.value,
                crate::stripe::coalesce::MAX_OPEN_BUCKETS,
            )
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        if let Some((ts, value)) = p.spilled {
            Self::push(
                &mut g,
                &row.customer,
                &row.meter,
                &row.stripe_event_name,
                ts,
                value,
            );
        }
        g.buckets.insert(key, (row.stripe_event_name, open));
        Ok(())
    }

    fn push(g: &mut Inner, customer: &str, meter: &str, event: &str, ts: i64, value: u64) {
        let id = g.next_row;
        g.next_row += 1;
        g.rows.insert(
            id,
            RowRec {
                row: OutboxRow {
                    id,
                    customer: customer.to_owned(),
                    meter: meter.to_owned(),
                    stripe_event_name: event.to_owned(),
                    timestamp_s: ts,
                    value,
                    revision: 0,
                },
                group: None,
            },
        );
        g.ungrouped.insert(id);
    }

    /// Appends a row directly (zero values refused): the pre-coalescing write, kept for tests
    /// and tools that need a row id at once.
    pub fn insert(&self, row: NewOutboxRow) -> Result<RowId, StoreError> {
        if row.value == 0 {
            return Err(StoreError::Invalid("zero-unit rows are not written".into()));
        }
        let mut g = self.lock()?;
        let id = g.next_row;
        g.next_row += 1;
        g.rows.insert(
            id,
            RowRec {
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
            },
        );
        g.ungrouped.insert(id);
        Ok(id)
    }

    /// Σ value of all rows per (customer, stripe event name), whatever their state.
    pub fn totals(&self) -> Result<BTreeMap<(String, String), u64>, StoreError> {
        let g = self.lock()?;
        let mut t = BTreeMap::new();
        for r in g.rows.values() {
            *t.entry((r.row.customer.clone(), r.row.stripe_event_name.clone()))
                .or_insert(0) += r.row.value;
        }
        for ((c, _), (name, open)) in &g.buckets {
            *t.entry((c.clone(), name.clone())).or_insert(0) += open.units();
        }
        Ok(t)
    }

    /// All groups (tests).
    pub fn groups(&self) -> Result<Vec<EventGroup>, StoreError> {
        Ok(self.lock()?.groups.values().cloned().collect())
    }

    /// Stored webhook events (tests, the entitlements work).
    pub fn webhooks(&self) -> Result<Vec<WebhookRecord>, StoreError> {
        Ok(self.lock()?.webhooks.values().cloned().collect())
    }

    fn row_state(
        g: &Inner,
        r: &RowRec,
    ) -> (OutboxState, Option<(GroupId, String)>, Option<StripeError>) {
        match r.group.and_then(|id| g.groups.get(&id)) {
            None => (OutboxState::Pending, None, None),
            Some(grp) => (
                OutboxState::of(Some(grp.state)),
                Some((grp.id, grp.event.identifier.clone())),
                grp.last_error.clone(),
            ),
        }
    }

    /// Applies `event` to group `id` (the rules are [`EventGroup::step`]'s), keeping the set of
    /// open groups in step.
    fn apply(g: &mut Inner, id: GroupId, event: GroupEvent) -> Result<(), StoreError> {
        let grp = g
            .groups
            .get_mut(&id)
            .ok_or_else(|| StoreError::NotFound(format!("group {id}")))?;
        if let Some(next) = grp.step(event)? {
            if next.state.is_open() {
                g.active.insert(id);
            } else {
                g.active.remove(&id);
            }
            *grp = next;
        }
        Ok(())
    }
}

impl OutboxStore for MemoryStore {
    fn namespace(&self) -> Result<String, StoreError> {
        Ok(self.namespace.clone())
    }

    fn pending_rows(&self, after: RowId, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let g = self.lock()?;
        Ok(g.ungrouped
            .range(after.saturating_add(1)..)
            .take(limit)
            .filter_map(|id| g.rows.get(id))
            .map(|r| r.row.clone())
            .collect())
    }

    fn stripe_customer(&self, customer: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock()?.mapping.get(customer).cloned())
    }

    fn set_stripe_customer(&self, customer: &str, stripe_customer: &str) -> Result<(), StoreError> {
        self.lock()?
            .mapping
            .insert(customer.to_owned(), stripe_customer.to_owned());
        Ok(())
    }

    fn create_groups(&self, groups: Vec<NewGroup>) -> Result<Vec<EventGroup>, StoreError> {
        let mut g = self.lock()?;
        check_new_groups(
            &groups,
            |id| {
                Ok(g.rows.get(&id).map(|r| RowClaim {
                    value: r.row.value,
                    grouped: r.group.is_some(),
                }))
            },
            |ident| Ok(g.by_identifier.contains_key(ident)),
        )?;
        let mut out = Vec::with_capacity(groups.len());
        for grp in groups {
            let id = g.next_group;
            g.next_group += 1;
            for r in &grp.row_ids {
                if let Some(rec) = g.rows.get_mut(r) {
                    rec.group = Some(id);
                }
                g.ungrouped.remove(r);
            }
            g.by_identifier.insert(grp.identifier.clone(), id);
            g.active.insert(id);
            let eg = EventGroup::new(id, grp);
            g.groups.insert(id, eg.clone());
            out.push(eg);
        }
        Ok(out)
    }

    fn ready_groups(&self, now_ms: i64, limit: usize) -> Result<Vec<EventGroup>, StoreError> {
        let g = self.lock()?;
        Ok(g.active
            .iter()
            .filter_map(|id| g.groups.get(id))
            .filter(|x| x.state.is_open() && x.next_attempt_ms <= now_ms)
            .take(limit)
            .cloned()
            .collect())
    }

    fn record_attempt(
        &self,
        ids: &[GroupId],
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        for id in ids {
            let event = GroupEvent::Attempt {
                now_ms,
                lease_until_ms,
            };
            Self::apply(&mut g, *id, event)?;
        }
        Ok(())
    }

    fn mark_sent(&self, ids: &[GroupId]) -> Result<(), StoreError> {
        let mut g = self.lock()?;
        for id in ids {
            Self::apply(&mut g, *id, GroupEvent::Delivered)?;
        }
        Ok(())
    }

    fn mark_retry(
        &self,
        id: GroupId,
        next_attempt_ms: i64,
        unknown: bool,
        error: Option<StripeError>,
    ) -> Result<(), StoreError> {
        let event = GroupEvent::Retry {
            next_attempt_ms,
            unknown,
            error,
        };
        Self::apply(&mut *self.lock()?, id, event)
    }

    fn mark_dead(&self, id: GroupId, error: StripeError) -> Result<(), StoreError> {
        Self::apply(&mut *self.lock()?, id, GroupEvent::Rejected(error))
    }

    fn mark_dead_by_identifier(
        &self,
        identifier: &str,
        error: StripeError,
    ) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        let Some(id) = g.by_identifier.get(identifier).copied() else {
            return Ok(false);
        };
        Self::apply(&mut g, id, GroupEvent::Reported(error))?;
        Ok(true)
    }

    fn requeue(&self, row: RowId) -> Result<Vec<RowId>, StoreError> {
        let mut g = self.lock()?;
        let gid = g
            .rows
            .get(&row)
            .ok_or_else(|| StoreError::NotFound(format!("row {row}")))?
            .group
            .ok_or_else(|| StoreError::Invalid(format!("row {row} is not dead")))?;
        let grp = g
            .groups
            .get(&gid)
            .ok_or_else(|| StoreError::NotFound(format!("group {gid}")))?;
        if grp.step(GroupEvent::Requeue).is_err() {
            return Err(StoreError::Invalid(format!("row {row} is not dead")));
        }
        let rows = grp.event.row_ids.clone();
        let ident = grp.event.identifier.clone();
        g.groups.remove(&gid);
        g.active.remove(&gid);
        g.by_identifier.remove(&ident);
        for r in &rows {
            if let Some(rec) = g.rows.get_mut(r) {
                rec.group = None;
                rec.row = rec.row.clone().requeued();
            }
            g.ungrouped.insert(*r);
        }
        Ok(rows)
    }

    fn list(
        &self,
        state: OutboxState,
        after: RowId,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let g = self.lock()?;
        let mut out = Vec::new();
        for (_, r) in g.rows.range(after.saturating_add(1)..) {
            if out.len() >= limit {
                break;
            }
            let (st, group, error) = Self::row_state(&g, r);
            if st == state {
                out.push(OutboxEntry {
                    row: r.row.clone(),
                    state: st,
                    group,
                    error,
                });
            }
        }
        Ok(out)
    }

    fn seal_open(&self, limit: usize) -> Result<u64, StoreError> {
        let mut g = self.lock()?;
        let mut n = 0usize;
        while n < limit.max(1) {
            let Some(((c, m), (name, mut open))) = g.buckets.pop_first() else {
                break;
            };
            for (ts, value) in open.seal() {
                Self::push(&mut g, &c, &m, &name, ts, value);
                n += 1;
            }
        }
        Ok(n as u64)
    }

    fn stats(&self) -> Result<OutboxStats, StoreError> {
        let g = self.lock()?;
        let mut s = OutboxStats::default();
        for r in g.rows.values() {
            let st = OutboxState::of(r.group.and_then(|id| g.groups.get(&id)).map(|x| x.state));
            match st {
                OutboxState::Pending | OutboxState::Unknown => {
                    s.pending_rows += 1;
                    if st == OutboxState::Unknown {
                        s.unknown_rows += 1;
                    }
                    let t = r.row.timestamp_s;
                    s.oldest_pending_timestamp_s =
                        Some(s.oldest_pending_timestamp_s.map_or(t, |o: i64| o.min(t)));
                }
                OutboxState::Sent => s.sent_rows += 1,
                OutboxState::Dead => s.dead_rows += 1,
            }
        }
        // Open buckets count as the pending rows they will become.
        for (_, open) in g.buckets.values() {
            s.pending_rows += open.len() as u64;
            if let Some(t) = open.oldest() {
                s.oldest_pending_timestamp_s =
                    Some(s.oldest_pending_timestamp_s.map_or(t, |o: i64| o.min(t)));
            }
        }
        Ok(s)
    }

    fn window_groups(
        &self,
        stripe_customer: &str,
        event_name: &str,
        start_s: i64,
        end_s: i64,
    ) -> Result<Vec<EventGroup>, StoreError> {
        let g = self.lock()?;
        Ok(g.groups
            .values()
            .filter(|x| {
                x.event.stripe_customer == stripe_customer
                    && x.event.event_name == event_name
                    && (start_s..end_s).contains(&x.event.timestamp_s)
            })
            .cloned()
            .collect())
    }

    fn record_webhook(&self, record: WebhookRecord) -> Result<bool, StoreError> {
        let mut g = self.lock()?;
        if g.webhooks.contains_key(&record.id) {
            return Ok(false);
        }
        g.webhooks.insert(record.id.clone(), record);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identifiers_are_deterministic_and_short() {
        let a = identifier_for("abcdef0123456789", &[3, 1, 2], 0);
        assert_eq!(a, identifier_for("abcdef0123456789", &[1, 2, 3], 0));
        assert_ne!(a, identifier_for("abcdef0123456789", &[1, 2, 3], 1));
        assert_ne!(a, identifier_for("abcdef0123456789", &[1, 2, 4], 0));
        let long = identifier_for("abcdefabcdefabcdefabcdef", &[u64::MAX, 1], u32::MAX);
        assert!(long.len() <= IDENTIFIER_LEN_MAX, "{}", long.len());
    }

    #[test]
    fn open_buckets_become_rows_once_and_later_units_a_new_row() {
        let s = MemoryStore::with_namespace("t");
        let row = |ts, v| NewOutboxRow {
            customer: "cus_a".into(),
            meter: "m".into(),
            stripe_event_name: "m".into(),
            timestamp_s: ts,
            value: v,
        };
        for _ in 0..1000 {
            s.accumulate(row(60, 2)).unwrap();
        }
        s.accumulate(row(120, 1)).unwrap();
        assert!(s.accumulate(row(60, 0)).is_err());
        assert!(
            s.pending_rows(0, 10).unwrap().is_empty(),
            "nothing sealed yet"
        );
        assert_eq!(s.stats().unwrap().pending_rows, 2);
        assert_eq!(s.seal_open(1).unwrap(), 2, "a record is sealed whole");
        let rows = s.pending_rows(0, 10).unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.timestamp_s, r.value))
                .collect::<Vec<_>>(),
            vec![(60, 2000), (120, 1)]
        );
        let ng = NewGroup {
            identifier: identifier_for("t", &[rows[0].id], 0),
            stripe_customer: "cus_a".into(),
            event_name: "m".into(),
            meter: "m".into(),
            timestamp_s: 60,
            value: 2000,
            row_ids: vec![rows[0].id],
        };
        let g = s.create_groups(vec![ng]).unwrap();
        // Units after the claim go to a new bucket, then a new row; the group is unchanged.
        s.accumulate(row(60, 5)).unwrap();
        assert_eq!(s.seal_open(10).unwrap(), 1);
        assert_eq!(s.seal_open(10).unwrap(), 0);
        assert_eq!(s.groups().unwrap(), g);
        let rows = s.pending_rows(0, 10).unwrap();
        assert_eq!(rows.iter().map(|r| r.value).collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(
            s.totals().unwrap(),
            BTreeMap::from([(("cus_a".into(), "m".into()), 2006)])
        );
    }

    #[test]
    fn grouping_is_exclusive_and_requeue_bumps_revision() {
        let s = MemoryStore::with_namespace("t");
        let row = |v| NewOutboxRow {
            customer: "cus_a".into(),
            meter: "m".into(),
            stripe_event_name: "m".into(),
            timestamp_s: 60,
            value: v,
        };
        assert!(s.insert(row(0)).is_err());
        let a = s.insert(row(2)).unwrap();
        let b = s.insert(row(3)).unwrap();
        let ng = NewGroup {
            identifier: identifier_for("t", &[a, b], 0),
            stripe_customer: "cus_a".into(),
            event_name: "m".into(),
            meter: "m".into(),
            timestamp_s: 60,
            value: 5,
            row_ids: vec![a, b],
        };
        let g = s.create_groups(vec![ng.clone()]).unwrap();
        let mut again = ng.clone();
        again.identifier = "other".into();
        assert_eq!(s.create_groups(vec![again]), Err(StoreError::Conflict(a)));
        assert!(s.pending_rows(0, 10).unwrap().is_empty());
        assert!(s.requeue(a).is_err(), "only dead rows are requeued");
        s.mark_dead(
            g[0].id,
            StripeError {
                status: 400,
                code: "resource_missing".into(),
                message: "x".into(),
            },
        )
        .unwrap();
        assert_eq!(s.list(OutboxState::Dead, 0, 10).unwrap().len(), 2);
        assert_eq!(s.requeue(b).unwrap(), vec![a, b]);
        let p = s.pending_rows(0, 10).unwrap();
        assert!(p.iter().all(|r| r.revision == 1));
        assert_eq!(s.stats().unwrap().pending_rows, 2);
    }
}
