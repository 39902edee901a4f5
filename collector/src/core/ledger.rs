//! The ledger's rules, with no I/O: accounts, immutable transfers, how a batch or an adjustment
//! becomes transfers, and how the whole ledger is verified (SPEC §6.2).
//!
//! The model follows TigerBeetle: accounts and transfers have 128-bit ids that are idempotency
//! keys; transfers are never edited or deleted, corrections are new transfers. Every account has
//! a unit, the meter's name, and a transfer moves an amount between two accounts of the same unit.
//!
//! Accounts ([`AccountKey`]):
//! - `Source{meter}`: where a meter's usage comes from; debited by every usage transfer.
//! - `Adjustments{meter}`: the other side of every adjustment of that meter.
//! - `Usage{customer, meter, dimensions, period}`: credited with the customer's usage; its
//!   balance (`credits - debits`) is the usage of that customer, meter, dimension set and
//!   calendar month (UTC, by the delta's bucket time).
//!
//! An account's id is derived from its key, and a usage transfer's id from
//! `(agent_id, epoch, seq, row)`, an adjustment's from its idempotency key: the same fact always
//! has the same id.
//!
//! Posting rules (see `docs/decisions/0010-ledger-model.md`, `0011-last-meters.md`):
//! `sum` meters post `delta.sum`, `count` meters post `delta.count`; `last` meters move the usage
//! balance to the value with the latest `(last_at_ms, value)` seen in the period, so the final
//! balance does not depend on arrival order. A batch is posted whole or not at all: any delta that
//! fails [`Delta::validate`], names a meter not in the catalog, or overflows makes the whole batch
//! a [`Rejection`] (quarantined by the caller).
//!
//! Invariants, checked by [`Verifier`]: per unit Σdebits = Σcredits; every account's stored
//! totals equal the sums of its transfers; every transfer's id is unique, derived from its source,
//! and traces to that source (a committed batch row or a recorded adjustment).

use crate::core::dedup::DedupState;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use tally_protocol::batch::{AgentId, BatchBody, Delta};
use tally_protocol::catalog::{Aggregation, Catalog};
use tally_protocol::error::ErrorCode;
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

/// An account's 128-bit id, derived from its [`AccountKey`].
pub type AccountId = u128;
/// A transfer's 128-bit id; also its idempotency key.
pub type TransferId = u128;

fn hash_id(domain: &[u8], parts: &[&[u8]]) -> u128 {
    let mut h = Sha256::new();
    h.update(domain);
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(id)
}

/// A billing period: a calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Period {
    /// The year.
    pub year: i32,
    /// The month, 1 to 12.
    pub month: u8,
}

impl Period {
    /// The month that holds `ms` (milliseconds since the Unix epoch).
    pub fn of_ms(ms: i64) -> Period {
        let (year, month, _) = tally_clock::calendar::civil_from_ms(ms);
        Period {
            year: i32::try_from(year).unwrap_or(i32::MAX),
            month: month as u8,
        }
    }

    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Period> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 || !y.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let year = y.parse().ok()?;
        let month: u8 = m.parse().ok()?;
        (1..=12).contains(&month).then_some(Period { year, month })
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// What an account stands for; its id is derived from this.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AccountKey {
    /// Where a meter's usage comes from.
    Source {
        /// The meter (and unit).
        meter: MeterName,
    },
    /// The other side of a meter's adjustments.
    Adjustments {
        /// The meter (and unit).
        meter: MeterName,
    },
    /// A customer's usage of a meter with some dimensions in a period.
    Usage {
        /// Who pays.
        customer: CustomerId,
        /// The meter (and unit).
        meter: MeterName,
        /// The dimension set.
        dimensions: Dimensions,
        /// The calendar month.
        period: Period,
    },
    /// Where a meter's grants come from (entitlements, SPEC §6.3).
    GrantSource {
        /// The meter (and unit).
        meter: MeterName,
    },
    /// A customer's granted quantity of a meter: credited with every grant.
    Grants {
        /// Who received them.
        customer: CustomerId,
        /// The meter (and unit).
        meter: MeterName,
    },
}

impl AccountKey {
    /// The account's id.
    pub fn id(&self) -> AccountId {
        match self {
            AccountKey::Source { meter } => source_account_id(meter),
            AccountKey::Adjustments { meter } => hash_id(
                b"tally/1 adjustments account\0",
                &[meter.as_str().as_bytes()],
            ),
            AccountKey::Usage {
                customer,
                meter,
                dimensions,
                period,
            } => usage_account_id(customer, meter, dimensions, *period),
            AccountKey::GrantSource { meter } => {
                hash_id(b"tally/1 grant source\0", &[meter.as_str().as_bytes()])
            }
            AccountKey::Grants { customer, meter } => hash_id(
                b"tally/1 grants account\0",
                &[customer.as_str().as_bytes(), meter.as_str().as_bytes()],
            ),
        }
    }

    /// The unit: the meter's name.
    pub fn unit(&self) -> &MeterName {
        match self {
            AccountKey::Source { meter }
            | AccountKey::Adjustments { meter }
            | AccountKey::Usage { meter, .. }
            | AccountKey::GrantSource { meter }
            | AccountKey::Grants { meter, .. } => meter,
        }
    }
}

/// The id of `AccountKey::Source{meter}`.
pub fn source_account_id(meter: &MeterName) -> AccountId {
    hash_id(b"tally/1 source account\0", &[meter.as_str().as_bytes()])
}

/// The id of `AccountKey::Usage{..}`, computed from borrowed parts (no allocation).
pub fn usage_account_id(
    customer: &CustomerId,
    meter: &MeterName,
    dimensions: &Dimensions,
    period: Period,
) -> AccountId {
    let mut h = Sha256::new();
    h.update(b"tally/1 usage account\0");
    let mut part = |p: &[u8]| {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    };
    part(customer.as_str().as_bytes());
    part(meter.as_str().as_bytes());
    part(&period.year.to_le_bytes());
    part(&[period.month]);
    for (k, v) in dimensions.pairs() {
        part(k.as_str().as_bytes());
        part(v.as_str().as_bytes());
    }
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(id)
}

/// The latest value a `last` meter's usage account has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastValue {
    /// Timestamp of the value, ms.
    pub at_ms: i64,
    /// The value.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub value: Decimal,
}

impl LastValue {
    fn newer_than(&self, other: &LastValue) -> bool {
        (self.at_ms, self.value) > (other.at_ms, other.value)
    }
}

/// An account and its running totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// What it stands for.
    pub key: AccountKey,
    /// Sum of the amounts of transfers that debit it.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub debits: Decimal,
    /// Sum of the amounts of transfers that credit it.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub credits: Decimal,
    /// Sum of the events of the transfers that touch it, in either direction.
    pub events: u64,
    /// Number of transfers that touch it.
    pub transfers: u64,
    /// For `last` meters' usage accounts: the latest value seen.
    pub last: Option<LastValue>,
}

impl Account {
    /// A new account with zero totals.
    pub fn new(key: AccountKey) -> Self {
        Account {
            key,
            debits: Decimal::ZERO,
            credits: Decimal::ZERO,
            events: 0,
            transfers: 0,
            last: None,
        }
    }

    /// `credits - debits`: for a usage account, the usage.
    pub fn balance(&self) -> Decimal {
        self.credits - self.debits
    }
}

/// Where a transfer comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferSource {
    /// Row `row` of batch `(agent, epoch, seq)`.
    BatchRow {
        /// The agent.
        agent: AgentId,
        /// The epoch.
        epoch: u64,
        /// The seq.
        seq: u64,
        /// Index of the delta in the batch.
        row: u32,
    },
    /// An adjustment made through the API.
    Adjustment {
        /// Its idempotency key.
        idempotency_key: String,
        /// Why it was made.
        reason: String,
    },
    /// A grant of extra quantity (`POST /v1/grants`).
    Grant {
        /// Its idempotency key.
        idempotency_key: String,
    },
}

impl TransferSource {
    /// The transfer id this source derives.
    pub fn transfer_id(&self) -> TransferId {
        match self {
            TransferSource::BatchRow {
                agent,
                epoch,
                seq,
                row,
            } => usage_transfer_id(*agent, *epoch, *seq, *row),
            TransferSource::Adjustment {
                idempotency_key, ..
            } => adjustment_transfer_id(idempotency_key),
            TransferSource::Grant { idempotency_key } => grant_transfer_id(idempotency_key),
        }
    }
}

/// The id of the usage transfer of row `row` of batch `(agent, epoch, seq)`.
pub fn usage_transfer_id(agent: AgentId, epoch: u64, seq: u64, row: u32) -> TransferId {
    hash_id(
        b"tally/1 usage\0",
        &[
            &agent.0,
            &epoch.to_be_bytes(),
            &seq.to_be_bytes(),
            &row.to_be_bytes(),
        ],
    )
}

/// The id of the adjustment with this idempotency key.
pub fn adjustment_transfer_id(idempotency_key: &str) -> TransferId {
    hash_id(b"tally/1 adjustment\0", &[idempotency_key.as_bytes()])
}

/// The id of the grant with this idempotency key.
pub fn grant_transfer_id(idempotency_key: &str) -> TransferId {
    hash_id(b"tally/1 grant\0", &[idempotency_key.as_bytes()])
}

/// Posts a grant of `quantity` (positive) of `meter` to `customer`: `GrantSource{meter}` →
/// `Grants{customer, meter}`, its id derived from the idempotency key. Grants do not touch
/// usage: they raise a limit (SPEC §6.3), and the ledger keeps them traceable.
pub fn post_grant<A: Accounts>(
    ws: &mut WorkingSet,
    base: &mut A,
    customer: &CustomerId,
    meter: &MeterName,
    quantity: Decimal,
    idempotency_key: &str,
    now_ms: i64,
) -> Result<Result<Posting, Rejection>, A::Error> {
    if quantity <= Decimal::ZERO {
        return Ok(Err(Rejection::new(
            ErrorCode::InvalidDelta,
            None,
            "a grant's quantity must be positive",
        )));
    }
    ws.begin();
    let source_key = AccountKey::GrantSource {
        meter: meter.clone(),
    };
    let debit = ws.ensure(base, source_key.id(), || source_key)?;
    let grants_key = AccountKey::Grants {
        customer: customer.clone(),
        meter: meter.clone(),
    };
    let credit = ws.ensure(base, grants_key.id(), || grants_key)?;
    let t = Transfer {
        id: grant_transfer_id(idempotency_key),
        debit,
        credit,
        unit: meter.clone(),
        amount: quantity,
        events: 0,
        customer: customer.clone(),
        event_at_ms: now_ms,
        posted_at_ms: now_ms,
        source: TransferSource::Grant {
            idempotency_key: idempotency_key.to_owned(),
        },
    };
    if let Err(r) = ws.apply(&t) {
        ws.rollback();
        return Ok(Err(r));
    }
    Ok(Ok(Posting { transfers: vec![t] }))
}

/// An immutable movement of `amount` from `debit` to `credit`, in one unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The id; also the idempotency key.
    pub id: TransferId,
    /// The debited account.
    pub debit: AccountId,
    /// The credited account.
    pub credit: AccountId,
    /// The unit (meter) of both accounts.
    pub unit: MeterName,
    /// How much, never negative.
    #[serde(with = "tally_protocol::wire_decimal")]
    pub amount: Decimal,
    /// How many events it carries (moved with the amount).
    pub events: u64,
    /// The customer whose usage account it touches.
    pub customer: CustomerId,
    /// When the usage happened (the delta's last event), ms.
    pub event_at_ms: i64,
    /// When it was posted, ms.
    pub posted_at_ms: i64,
    /// Where it comes from.
    pub source: TransferSource,
}

/// What `create_transfer` says about an id that already exists, as TigerBeetle does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Same fields: nothing to do.
    Exists,
    /// Same id, different fields: refused.
    ExistsWithDifferent(&'static str),
}

/// Compares a transfer about to be created with the one already stored under its id. Timestamps
/// are not compared (they are assigned at posting).
pub fn compare_existing(stored: &Transfer, new: &Transfer) -> Existing {
    let diff = if stored.debit != new.debit {
        Some("debit_account")
    } else if stored.credit != new.credit {
        Some("credit_account")
    } else if stored.unit != new.unit {
        Some("unit")
    } else if stored.amount != new.amount {
        Some("amount")
    } else if stored.customer != new.customer {
        Some("customer")
    } else if stored.source != new.source {
        Some("source")
    } else {
        None
    };
    diff.map_or(Existing::Exists, Existing::ExistsWithDifferent)
}

/// Why a batch or adjustment cannot be posted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The wire code (`unknown_meter`, `invalid_delta`, `overflow`, …).
    pub code: ErrorCode,
    /// The delta that failed, if one did.
    pub row: Option<u32>,
    /// Lowercase detail.
    pub message: String,
}

impl Rejection {
    fn new(code: ErrorCode, row: Option<u32>, message: impl Into<String>) -> Self {
        Rejection {
            code,
            row,
            message: message.into(),
        }
    }
}

/// Reads accounts as they stand before a posting.
pub trait Accounts {
    /// The storage error.
    type Error;
    /// The account with this id, if it exists.
    fn load(&mut self, id: AccountId) -> Result<Option<Account>, Self::Error>;
}

impl Accounts for HashMap<AccountId, Account> {
    type Error = std::convert::Infallible;
    fn load(&mut self, id: AccountId) -> Result<Option<Account>, Self::Error> {
        Ok(self.get(&id).cloned())
    }
}

/// An empty base: every account is new (for tests and in-memory ledgers).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAccounts;

impl Accounts for NoAccounts {
    type Error = std::convert::Infallible;
    fn load(&mut self, _id: AccountId) -> Result<Option<Account>, Self::Error> {
        Ok(None)
    }
}

/// The numbers of an account, saved before a change so a rejected posting can be undone
/// without cloning the account's key.
#[derive(Debug, Clone, Copy)]
struct Saved {
    debits: Decimal,
    credits: Decimal,
    events: u64,
    transfers: u64,
    last: Option<LastValue>,
}

#[derive(Debug, Clone, Copy)]
enum Undo {
    Totals(AccountId, Saved),
    Created(AccountId),
}

/// The accounts a sequence of postings works on (a group commit's, or a whole in-memory
/// ledger's): each is loaded from a base on first touch and then changed in place. Every change
/// of a posting is logged, so a posting that is rejected half-way (overflow) is rolled back and
/// leaves the set as it was.
#[derive(Debug, Default)]
pub struct WorkingSet {
    /// Every account touched, as it stands now.
    pub accounts: HashMap<AccountId, Account>,
    /// Accounts created (not found in the base), in creation order.
    pub created: Vec<AccountId>,
    undo: Vec<Undo>,
    source_ids: Vec<(MeterName, AccountId)>,
    /// Debits and credits of each account as it was loaded (zero for created ones), so the
    /// changes can be checked to balance.
    opened: HashMap<AccountId, (Decimal, Decimal)>,
}

impl WorkingSet {
    /// An empty working set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure account `id` is present; `key` builds its key if it is new.
    fn ensure<A: Accounts>(
        &mut self,
        base: &mut A,
        id: AccountId,
        key: impl FnOnce() -> AccountKey,
    ) -> Result<AccountId, A::Error> {
        if !self.accounts.contains_key(&id) {
            let acct = match base.load(id)? {
                Some(a) => {
                    self.opened.insert(id, (a.debits, a.credits));
                    a
                }
                None => {
                    self.created.push(id);
                    self.undo.push(Undo::Created(id));
                    let key = key();
                    debug_assert_eq!(key.id(), id);
                    Account::new(key)
                }
            };
            self.accounts.insert(id, acct);
        }
        Ok(id)
    }

    fn source_id(&mut self, meter: &MeterName) -> AccountId {
        match self.source_ids.iter().find(|(m, _)| m == meter) {
            Some((_, id)) => *id,
            None => {
                let id = source_account_id(meter);
                self.source_ids.push((meter.clone(), id));
                id
            }
        }
    }

    /// The account to change, its totals saved first.
    fn touch(&mut self, id: AccountId) -> Option<&mut Account> {
        let a = self.accounts.get_mut(&id)?;
        self.undo.push(Undo::Totals(
            id,
            Saved {
                debits: a.debits,
                credits: a.credits,
                events: a.events,
                transfers: a.transfers,
                last: a.last,
            },
        ));
        Some(a)
    }

    fn begin(&mut self) {
        self.undo.clear();
    }

    fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Totals(id, t) => {
                    if let Some(a) = self.accounts.get_mut(&id) {
                        a.debits = t.debits;
                        a.credits = t.credits;
                        a.events = t.events;
                        a.transfers = t.transfers;
                        a.last = t.last;
                    }
                }
                Undo::Created(id) => {
                    self.accounts.remove(&id);
                    self.opened.remove(&id);
                    if self.created.last() == Some(&id) {
                        self.created.pop();
                    }
                }
            }
        }
    }

    /// Applies a transfer to its two accounts; `Err` on overflow (the caller rolls back).
    ///
    /// # Panics
    /// When either account is not in the set: posting ensures both first, so a missing one is
    /// a programming error, not a rejection.
    fn apply(&mut self, t: &Transfer) -> Result<(), Rejection> {
        let overflow = || Rejection::new(ErrorCode::Overflow, None, "an account total overflows");
        let missing = |id: AccountId| -> ! {
            panic!(
                "account {id:032x} of transfer {:032x} is not in the working set",
                t.id
            )
        };
        let Some(d) = self.touch(t.debit) else {
            missing(t.debit)
        };
        d.debits = d.debits.checked_add(t.amount).ok_or_else(overflow)?;
        d.events = d.events.checked_add(t.events).ok_or_else(overflow)?;
        d.transfers += 1;
        let Some(c) = self.touch(t.credit) else {
            missing(t.credit)
        };
        c.credits = c.credits.checked_add(t.amount).ok_or_else(overflow)?;
        c.events = c.events.checked_add(t.events).ok_or_else(overflow)?;
        c.transfers += 1;
        Ok(())
    }

    /// Checks, in release builds too, that the changes made since the accounts were loaded
    /// balance: for every unit, the debits added equal the credits added (double entry). Call
    /// it before the transaction that writes the set commits.
    ///
    /// # Panics
    /// When they do not: the ledger rules broke double entry.
    pub fn assert_balanced(&self) {
        let mut per_unit: HashMap<&MeterName, (Decimal, Decimal)> = HashMap::new();
        for (id, a) in &self.accounts {
            let (d0, c0) = self
                .opened
                .get(id)
                .copied()
                .unwrap_or((Decimal::ZERO, Decimal::ZERO));
            let e = per_unit.entry(a.key.unit()).or_default();
            e.0 += a.debits - d0;
            e.1 += a.credits - c0;
        }
        for (unit, (debits, credits)) in per_unit {
            assert_eq!(
                debits, credits,
                "ledger out of balance in unit {unit}: debits added {debits}, credits added {credits}"
            );
        }
    }
}

/// The transfers of one posting, in order; the account changes are in the [`WorkingSet`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Posting {
    /// Transfers to append, in order.
    pub transfers: Vec<Transfer>,
}

fn check_delta(catalog: &Catalog, delta: &Delta) -> Result<(), Rejection> {
    if catalog.meter(delta.meter.as_str()).is_none() {
        let msg = format!("meter {} is not in the catalog", delta.meter);
        return Err(Rejection::new(ErrorCode::UnknownMeter, None, msg));
    }
    delta
        .validate()
        .map_err(|e| Rejection::new(ErrorCode::InvalidDelta, None, e.to_string()))
}

/// Posts every delta of a verified batch into `ws`, or rejects the whole batch and leaves `ws`
/// as it was.
pub fn post_batch<A: Accounts>(
    ws: &mut WorkingSet,
    base: &mut A,
    catalog: &Catalog,
    body: &BatchBody,
    now_ms: i64,
) -> Result<Result<Posting, Rejection>, A::Error> {
    for (row, delta) in body.deltas.iter().enumerate() {
        if let Err(rej) = check_delta(catalog, delta) {
            let row = u32::try_from(row).unwrap_or(u32::MAX);
            return Ok(Err(Rejection {
                row: Some(row),
                ..rej
            }));
        }
    }
    ws.begin();
    let mut p = Posting {
        transfers: Vec::with_capacity(body.deltas.len()),
    };
    for (row, delta) in body.deltas.iter().enumerate() {
        let row = u32::try_from(row).unwrap_or(u32::MAX);
        let source = TransferSource::BatchRow {
            agent: body.agent_id,
            epoch: body.epoch,
            seq: body.seq,
            row,
        };
        match post_delta(ws, base, &mut p, catalog, delta, source, now_ms) {
            Ok(Ok(())) => {}
            Ok(Err(rej)) => {
                ws.rollback();
                return Ok(Err(Rejection {
                    row: Some(row),
                    ..rej
                }));
            }
            Err(e) => {
                ws.rollback();
                return Err(e);
            }
        }
    }
    Ok(Ok(p))
}

fn post_delta<A: Accounts>(
    ws: &mut WorkingSet,
    base: &mut A,
    p: &mut Posting,
    catalog: &Catalog,
    delta: &Delta,
    source: TransferSource,
    now_ms: i64,
) -> Result<Result<(), Rejection>, A::Error> {
    let Some(def) = catalog.meter(delta.meter.as_str()) else {
        let msg = format!("meter {} is not in the catalog", delta.meter);
        return Ok(Err(Rejection::new(ErrorCode::UnknownMeter, None, msg)));
    };
    let source_id = ws.source_id(&delta.meter);
    let source_acct = ws.ensure(base, source_id, || AccountKey::Source {
        meter: delta.meter.clone(),
    })?;
    let period = Period::of_ms(delta.bucket_start_ms);
    let usage_id = usage_account_id(&delta.customer, &delta.meter, &delta.dimensions, period);
    let usage = ws.ensure(base, usage_id, || AccountKey::Usage {
        customer: delta.customer.clone(),
        meter: delta.meter.clone(),
        dimensions: delta.dimensions.clone(),
        period,
    })?;
    let (debit, credit, amount) = match def.aggregation {
        Aggregation::Sum => (source_acct, usage, delta.sum),
        Aggregation::Count => (source_acct, usage, Decimal::from(delta.count)),
        Aggregation::Last => {
            let candidate = LastValue {
                at_ms: delta.last_at_ms,
                value: delta.last,
            };
            let Some(acct) = ws.touch(usage) else {
                return Ok(Err(Rejection::new(
                    ErrorCode::Internal,
                    None,
                    "lost account",
                )));
            };
            if acct.last.is_none_or(|cur| candidate.newer_than(&cur)) {
                acct.last = Some(candidate);
                let Some(diff) = candidate.value.checked_sub(acct.balance()) else {
                    return Ok(Err(Rejection::new(ErrorCode::Overflow, None, "overflow")));
                };
                if diff.is_sign_negative() && !diff.is_zero() {
                    (usage, source_acct, -diff)
                } else {
                    (source_acct, usage, diff)
                }
            } else {
                (source_acct, usage, Decimal::ZERO)
            }
        }
    };
    let t = Transfer {
        id: source.transfer_id(),
        debit,
        credit,
        unit: delta.meter.clone(),
        amount,
        events: delta.count,
        customer: delta.customer.clone(),
        event_at_ms: delta.last_at_ms,
        posted_at_ms: now_ms,
        source,
    };
    if let Err(r) = ws.apply(&t) {
        return Ok(Err(r));
    }
    p.transfers.push(t);
    Ok(Ok(()))
}

/// An adjustment: a signed quantity added to a customer's usage, booked as a new transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjustment {
    /// Who pays.
    pub customer: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// Which dimension set (usually none).
    pub dimensions: Dimensions,
    /// Which month.
    pub period: Period,
    /// Added to the usage; negative to reduce it. Never zero.
    pub quantity: Decimal,
    /// Why.
    pub reason: String,
    /// The idempotency key: the transfer id derives from it.
    pub idempotency_key: String,
}

/// Posts an adjustment: `Adjustments{meter}` → usage for a positive quantity, the reverse for a
/// negative one. Refused when the meter is unknown, the quantity is zero, or the usage would go
/// below zero (the usage account has TigerBeetle's `debits_must_not_exceed_credits`).
pub fn post_adjustment<A: Accounts>(
    ws: &mut WorkingSet,
    base: &mut A,
    catalog: &Catalog,
    adj: &Adjustment,
    now_ms: i64,
) -> Result<Result<Posting, Rejection>, A::Error> {
    if catalog.meter(adj.meter.as_str()).is_none() {
        let msg = format!("meter {} is not in the catalog", adj.meter);
        return Ok(Err(Rejection::new(ErrorCode::UnknownMeter, None, msg)));
    }
    if adj.quantity.is_zero() {
        return Ok(Err(Rejection::new(
            ErrorCode::InvalidDelta,
            None,
            "quantity must not be zero",
        )));
    }
    ws.begin();
    let other_key = AccountKey::Adjustments {
        meter: adj.meter.clone(),
    };
    let other = ws.ensure(base, other_key.id(), || other_key)?;
    let usage_key = AccountKey::Usage {
        customer: adj.customer.clone(),
        meter: adj.meter.clone(),
        dimensions: adj.dimensions.clone(),
        period: adj.period,
    };
    let usage = ws.ensure(base, usage_key.id(), || usage_key)?;
    let (debit, credit) = if adj.quantity.is_sign_negative() {
        (usage, other)
    } else {
        (other, usage)
    };
    let amount = adj.quantity.abs();
    let t = Transfer {
        id: adjustment_transfer_id(&adj.idempotency_key),
        debit,
        credit,
        unit: adj.meter.clone(),
        amount,
        events: 0,
        customer: adj.customer.clone(),
        event_at_ms: now_ms,
        posted_at_ms: now_ms,
        source: TransferSource::Adjustment {
            idempotency_key: adj.idempotency_key.clone(),
            reason: adj.reason.clone(),
        },
    };
    if let Err(r) = ws.apply(&t) {
        ws.rollback();
        return Ok(Err(r));
    }
    if ws
        .accounts
        .get(&usage)
        .is_some_and(|a| a.debits > a.credits)
    {
        ws.rollback();
        return Ok(Err(Rejection::new(
            ErrorCode::InvalidDelta,
            None,
            "the adjustment would take the usage below zero",
        )));
    }
    Ok(Ok(Posting { transfers: vec![t] }))
}

/// The outcome of a ledger verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// True when no invariant is violated.
    pub ok: bool,
    /// Accounts checked.
    pub accounts: u64,
    /// Transfers checked.
    pub transfers: u64,
    /// Units (meters) checked.
    pub units: u64,
    /// Batches recorded as committed or quarantined.
    pub batches: u64,
    /// Number of violations found.
    pub violation_count: u64,
    /// The first violations, described.
    pub violations: Vec<String>,
}

/// Most violations described in a report.
pub const MAX_VIOLATIONS_LISTED: usize = 100;

#[derive(Default)]
struct Totals {
    debits: Decimal,
    credits: Decimal,
    events: u64,
    transfers: u64,
}

/// Checks the invariants over a stream of transfers and then accounts. Keeps a set of transfer
/// ids and per-account totals in memory.
#[derive(Default)]
pub struct Verifier {
    report: VerifyReport,
    ids: HashSet<TransferId>,
    recomputed: HashMap<AccountId, Totals>,
    units: BTreeMap<String, (Decimal, Decimal)>,
    unit_of: HashMap<AccountId, MeterName>,
}

impl Verifier {
    /// A fresh verifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation.
    pub fn violation(&mut self, what: String) {
        self.report.violation_count += 1;
        if self.report.violations.len() < MAX_VIOLATIONS_LISTED {
            self.report.violations.push(what);
        }
    }

    /// Counts a recorded batch.
    pub fn batch(&mut self) {
        self.report.batches += 1;
    }

    /// Checks one transfer; `trace` says whether its source exists and matches (an error
    /// describes why not).
    pub fn transfer(&mut self, t: &Transfer, trace: Result<(), String>) {
        self.report.transfers += 1;
        let id = format!("{:032x}", t.id);
        if !self.ids.insert(t.id) {
            self.violation(format!("transfer {id}: id is not unique"));
        }
        if t.source.transfer_id() != t.id {
            self.violation(format!("transfer {id}: id does not derive from its source"));
        }
        if let Err(why) = trace {
            self.violation(format!(
                "transfer {id}: does not trace to its source: {why}"
            ));
        }
        if t.amount.is_sign_negative() && !t.amount.is_zero() {
            self.violation(format!("transfer {id}: negative amount"));
        }
        if t.debit == t.credit {
            self.violation(format!(
                "transfer {id}: debits and credits the same account"
            ));
        }
        let u = self.units.entry(t.unit.to_string()).or_default();
        u.0 += t.amount;
        u.1 += t.amount;
        let events = t.events;
        let d = self.recomputed.entry(t.debit).or_default();
        d.debits += t.amount;
        d.events = d.events.saturating_add(events);
        d.transfers += 1;
        let c = self.recomputed.entry(t.credit).or_default();
        c.credits += t.amount;
        c.events = c.events.saturating_add(events);
        c.transfers += 1;
        for acct in [t.debit, t.credit] {
            if let Some(unit) = self.unit_of.insert(acct, t.unit.clone())
                && unit != t.unit
            {
                self.violation(format!("transfer {id}: accounts of different units"));
            }
        }
    }

    /// Checks one stored account against the transfers seen so far (call after all transfers).
    pub fn account(&mut self, id: AccountId, a: &Account) {
        self.report.accounts += 1;
        let name = format!("{id:032x}");
        if a.key.id() != id {
            self.violation(format!("account {name}: id does not derive from its key"));
        }
        if let Some(unit) = self.unit_of.get(&id)
            && unit != a.key.unit()
        {
            self.violation(format!("account {name}: unit differs from its transfers'"));
        }
        let t = self.recomputed.remove(&id).unwrap_or_default();
        if t.debits != a.debits
            || t.credits != a.credits
            || t.transfers != a.transfers
            || t.events != a.events
        {
            self.violation(format!(
                "account {name}: stored debits {} credits {} events {} transfers {} but its \
                 transfers sum to {} {} {} {}",
                a.debits,
                a.credits,
                a.events,
                a.transfers,
                t.debits,
                t.credits,
                t.events,
                t.transfers
            ));
        }
        if let AccountKey::Usage { .. } = a.key
            && a.debits > a.credits
        {
            self.violation(format!("account {name}: usage below zero"));
        }
    }

    /// Finishes: accounts referenced by transfers but never stored are violations.
    pub fn finish(mut self) -> VerifyReport {
        let missing: Vec<AccountId> = self.recomputed.keys().copied().collect();
        for id in missing {
            self.violation(format!(
                "account {id:032x}: referenced by transfers but missing"
            ));
        }
        let units: Vec<(String, (Decimal, Decimal))> =
            std::mem::take(&mut self.units).into_iter().collect();
        self.report.units = units.len() as u64;
        for (unit, (d, c)) in units {
            if d != c {
                self.violation(format!("unit {unit}: debits {d} != credits {c}"));
            }
        }
        self.report.ok = self.report.violation_count == 0;
        self.report
    }
}

/// Checks that a batch row traces: the batch is recorded with at least `row + 1` deltas and
/// its seq is done in the dedup state.
pub fn trace_batch_row(
    recorded_deltas: Option<u32>,
    dedup: Option<&DedupState>,
    seq: u64,
    row: u32,
) -> Result<(), String> {
    match recorded_deltas {
        None => Err(String::from("batch is not recorded")),
        Some(n) if row >= n => Err(format!("row {row} but the batch has {n} deltas")),
        Some(_) if !dedup.is_some_and(|d| d.contains(seq)) => {
            Err(String::from("batch is not in the dedup state"))
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
