//! The embedded [`Store`]: one redb file, `<data_dir>/collector.redb`.
//!
//! Every table, the on-disk format, its version and the migration hook are in [`tables`];
//! outbox rows are written by [`outbox_rows`] in the ingest or adjustment transaction that posts
//! their usage, and [`outbox`] serves them to the Stripe forwarder.
//!
//! Guarantees: every write is one redb write transaction with `Durability::Immediate` (fsynced
//! before `commit` returns); a group of batches shares one transaction (group commit).
//!
//! Transfer ids are idempotency keys without an index of their own: a usage transfer's id
//! derives from `(agent, epoch, seq, row)` and its position is `batches[(agent, epoch, seq)]
//! .first_transfer + row`; an adjustment's id derives from its key and `adjustments[key]` holds
//! its position. Recording a batch that is already recorded, or an adjustment key that exists,
//! aborts the transaction ([`StoreError::Invariant`]); dedup and the adjustment check make that
//! unreachable. (A hash-keyed id index cost one random B-tree insert per delta — a dirty page
//! per delta once the index is large; see `docs/perf/collector.md`.)

use crate::core::dedup::DedupState;
use crate::core::ingest::{IngestTxn, ingest_group};
use crate::core::ledger::{
    self, Account, AccountId, AccountKey, Accounts, Adjustment, Existing, Period, Posting,
    Transfer, TransferSource, Verifier, VerifyReport, WorkingSet,
};
use crate::store::{
    AdjustOutcome, AgentRecord, BatchOutcome, BatchRecord, CustomerRecord, EpochState, IngestBatch,
    IngestOutcome, QuarantineRecord, Store, StoreError,
};
use redb::{Database, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::Path;
use tables::{
    ACCOUNTS, ADJUSTMENTS, AGENTS, BATCHES, CATALOG_KEY, CATALOGS, CUSTOMERS, DEDUP, META,
    NAMESPACE_KEY, QUARANTINE, TRANSFERS, USAGE_IDX, UsageKey,
};
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::{Catalog, MeterDef};
use tally_protocol::names::{CustomerId, MeterName};

pub mod enrolment;
pub mod entitlements;
pub mod outbox;
pub mod outbox_rows;
pub mod tables;

/// Greater than every meter name (`[a-z0-9_.-]`) and period (`YYYY-MM`).
const AFTER_ASCII: &str = "\u{7f}";

fn be<E: Into<StoreError>>(e: E) -> StoreError {
    e.into()
}

fn outbox_err(e: tally_forward::stripe::outbox::StoreError) -> StoreError {
    match e {
        tally_forward::stripe::outbox::StoreError::Invalid(m) => StoreError::Invariant(m),
        other => StoreError::Outbox(other),
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(v).map_err(be)
}

fn dec<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

/// Orb and Metronome names of meters and customers: (kind, key) → JSON `DestNames`.
const DEST_NAMES: ::redb::TableDefinition<(&str, &str), &[u8]> =
    ::redb::TableDefinition::new("dest_names");

/// The redb-backed store.
pub struct RedbStore {
    db: Database,
    outbox_appended: std::sync::atomic::AtomicU64,
    /// Usage booked for reclaimed leases by this process's ingest transactions.
    lease_overshoot: std::sync::Mutex<rust_decimal::Decimal>,
}

/// redb's page cache ceiling. At its default (1 GiB a database) the collector's resident memory
/// grew with history — ~130 MiB per million deltas ingested — until it reached the ceiling: the
/// ledger's appended pages stayed cached. The hot set is the upper B-tree pages of the ledger,
/// balances and dedup tables plus one group commit's dirty pages (redb gives writes 10 % of it);
/// the kernel's page cache is behind it for the rest (decision 0105).
pub const CACHE_BYTES: usize = 128 << 20;

impl RedbStore {
    /// Opens (or creates) the database at `path` and its tables. A file that is missing while its
    /// marker says it was created, empty or not a redb file is refused and left alone
    /// (`tally_storefile`): a collector started afresh would count resent batches again.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let found = tally_storefile::check(path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tally_storefile::private_dir(dir)?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        tally_storefile::private_file(path)?;
        let txn = db.begin_write()?;
        tables::create_all(&txn)?;
        entitlements::create_all(&txn)?;
        tables::check_format(&txn)?;
        {
            let mut meta = txn.open_table(META)?;
            if meta.get(NAMESPACE_KEY)?.is_none() {
                // Part of every Stripe identifier: a fresh store never reuses an old one's.
                let mut b = [0u8; 6];
                getrandom::getrandom(&mut b)?;
                meta.insert(NAMESPACE_KEY, hex::encode(b).as_bytes())?;
            }
        }
        txn.commit()?;
        if found == tally_storefile::Found::Nothing {
            tally_storefile::mark(path)?;
        }
        Ok(RedbStore {
            db,
            outbox_appended: std::sync::atomic::AtomicU64::new(0),
            lease_overshoot: std::sync::Mutex::new(rust_decimal::Decimal::ZERO),
        })
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Usage booked for reclaimed leases by this process's ingest transactions.
    pub fn lease_overshoot(&self) -> rust_decimal::Decimal {
        *self
            .lease_overshoot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The customer's settings.
    pub fn customer_record(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerRecord>, tally_forward::stripe::outbox::StoreError> {
        outbox_rows::customer_record(&self.db, customer)
    }

    /// Stores the customer's settings.
    pub fn put_customer_record(
        &self,
        customer: &str,
        rec: &CustomerRecord,
    ) -> Result<(), tally_forward::stripe::outbox::StoreError> {
        outbox_rows::put_customer_record(&self.db, customer, rec)
    }

    /// Appends one row outside any ledger transaction, as [`tally_forward::stripe::MemoryStore::insert`]
    /// does (zero values refused). For tests and tools only: the collector itself writes rows
    /// in the ledger transaction that posts the usage.
    pub fn append_outbox_row(
        &self,
        row: tally_forward::stripe::NewOutboxRow,
    ) -> Result<tally_forward::stripe::outbox::RowId, tally_forward::stripe::outbox::StoreError>
    {
        outbox_rows::append_outbox_row(&self.db, row)
    }

    /// Every outbox row as (customer, stripe event name, bucket time, units), for reconciliation.
    pub fn outbox_items(
        &self,
    ) -> Result<Vec<(String, String, i64, u64)>, tally_forward::stripe::outbox::StoreError> {
        outbox_rows::outbox_items(&self.db)
    }

    fn note_appended(&self, n: u64) {
        if n > 0 {
            self.outbox_appended
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn read_catalog(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Catalog, StoreError> {
    match meta.get(CATALOG_KEY)? {
        Some(v) => dec("meta", v.value()),
        None => Ok(Catalog::default()),
    }
}

/// One transaction's ledger writes: transfers appended as postings arrive; accounts (and the
/// usage index of new ones) written once at the end from the working set.
struct Ledger<'t> {
    accounts: Table<'t, u128, &'static [u8]>,
    transfers: Table<'t, u64, &'static [u8]>,
    usage_idx: Table<'t, UsageKey<'static>, ()>,
    next_pos: u64,
    buf: Vec<u8>,
}

/// Accounts as committed before this transaction.
impl Accounts for Ledger<'_> {
    type Error = StoreError;
    fn load(&mut self, id: AccountId) -> Result<Option<Account>, StoreError> {
        match self.accounts.get(id)? {
            Some(v) => Ok(Some(dec("accounts", v.value())?)),
            None => Ok(None),
        }
    }
}

impl<'t> Ledger<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        let transfers = txn.open_table(TRANSFERS)?;
        let next_pos = transfers.last()?.map_or(1, |(k, _)| k.value() + 1);
        Ok(Ledger {
            accounts: txn.open_table(ACCOUNTS)?,
            transfers,
            usage_idx: txn.open_table(USAGE_IDX)?,
            next_pos,
            buf: Vec::new(),
        })
    }

    /// Appends the posting's transfers; returns the position of the first.
    fn append(&mut self, posting: &Posting) -> Result<u64, StoreError> {
        let first = self.next_pos;
        for t in &posting.transfers {
            self.buf.clear();
            self.buf = postcard::to_extend(t, std::mem::take(&mut self.buf))?;
            self.transfers.insert(self.next_pos, self.buf.as_slice())?;
            self.next_pos += 1;
        }
        Ok(first)
    }

    /// Writes every account of `ws` and indexes the created usage accounts.
    fn put_accounts(&mut self, ws: &WorkingSet) -> Result<(), StoreError> {
        for id in &ws.created {
            if let Some(Account {
                key:
                    AccountKey::Usage {
                        customer,
                        meter,
                        period,
                        ..
                    },
                ..
            }) = ws.accounts.get(id)
            {
                let p = period.to_string();
                self.usage_idx
                    .insert((customer.as_str(), meter.as_str(), p.as_str(), *id), ())?;
            }
        }
        for (id, acct) in &ws.accounts {
            self.buf.clear();
            self.buf = postcard::to_extend(acct, std::mem::take(&mut self.buf))?;
            self.accounts.insert(*id, self.buf.as_slice())?;
        }
        Ok(())
    }
}

/// The tables [`ingest_group`] works on, in one write transaction.
struct IngestTables<'t> {
    ledger: Ledger<'t>,
    dedup: Table<'t, (u128, u64), &'static [u8]>,
    batches: Table<'t, (u128, u64, u64), &'static [u8]>,
    quarantine: Table<'t, u64, &'static [u8]>,
    outbox: outbox_rows::OutboxWriter<'t>,
}

impl Accounts for IngestTables<'_> {
    type Error = StoreError;
    fn load(&mut self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.ledger.load(id)
    }
}

impl IngestTxn for IngestTables<'_> {
    fn dedup_state(&mut self, agent: AgentId, epoch: u64) -> Result<DedupState, StoreError> {
        match self.dedup.get((agent.as_u128(), epoch))? {
            Some(v) => dec("dedup", v.value()),
            None => Ok(DedupState::default()),
        }
    }

    fn epoch_count(&mut self, agent: AgentId) -> Result<usize, StoreError> {
        let a = agent.as_u128();
        let mut n = 0;
        for row in self.dedup.range((a, 0)..=(a, u64::MAX))? {
            row?;
            n += 1;
        }
        Ok(n)
    }

    fn next_quarantine_id(&mut self) -> Result<u64, StoreError> {
        Ok(self.quarantine.last()?.map_or(1, |(k, _)| k.value() + 1))
    }

    fn append(&mut self, posting: &Posting) -> Result<u64, StoreError> {
        self.ledger.append(posting)
    }

    fn outbox(
        &mut self,
        catalog: &Catalog,
        transfer: &Transfer,
        positive: bool,
        bucket_s: i64,
    ) -> Result<(), StoreError> {
        self.outbox
            .transfer(catalog, transfer, positive, bucket_s)
            .map_err(outbox_err)
    }

    fn quarantine(&mut self, rec: &QuarantineRecord) -> Result<(), StoreError> {
        self.quarantine.insert(rec.id, enc(rec)?.as_slice())?;
        Ok(())
    }

    fn record_batch(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        rec: &BatchRecord,
    ) -> Result<(), StoreError> {
        let old = self
            .batches
            .insert((agent.as_u128(), epoch, seq), enc(rec)?.as_slice())?;
        if old.is_some() {
            return Err(StoreError::Invariant(format!(
                "batch {agent} {epoch} {seq} recorded twice"
            )));
        }
        Ok(())
    }

    fn put_dedup(
        &mut self,
        agent: AgentId,
        epoch: u64,
        state: &DedupState,
    ) -> Result<(), StoreError> {
        self.dedup
            .insert((agent.as_u128(), epoch), enc(state)?.as_slice())?;
        Ok(())
    }

    fn put_accounts(&mut self, ws: &WorkingSet) -> Result<(), StoreError> {
        self.ledger.put_accounts(ws)
    }
}

impl RedbStore {
    /// Runs the ingest rules ([`ingest_group`]) on this store's tables inside `txn`; returns the
    /// outcomes and the number of outbox rows appended.
    fn ingest_in(
        &self,
        txn: &WriteTransaction,
        batches: &[IngestBatch],
        now_ms: i64,
    ) -> Result<(Vec<IngestOutcome>, u64), StoreError> {
        let catalog = read_catalog(&txn.open_table(META)?)?;
        let (out, appended) = {
            let mut tables = IngestTables {
                ledger: Ledger::open(txn)?,
                dedup: txn.open_table(DEDUP)?,
                batches: txn.open_table(BATCHES)?,
                quarantine: txn.open_table(QUARANTINE)?,
                outbox: outbox_rows::OutboxWriter::open(txn).map_err(outbox_err)?,
            };
            let out = ingest_group(&mut tables, &catalog, batches, now_ms)?;
            (out, tables.outbox.finish().map_err(outbox_err)?)
        };
        // The leases learn this usage in the transaction that posts it (decision 0095).
        let over = crate::store::entitlements::ship_in(
            &mut entitlements::RedbLeases { txn, store: self },
            &catalog,
            batches,
            &out,
        )?;
        if over > rust_decimal::Decimal::ZERO {
            let mut o = self
                .lease_overshoot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *o += over;
        }
        Ok((out, appended))
    }
}

impl Store for RedbStore {
    fn outbox_appended(&self) -> u64 {
        self.outbox_appended
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn customer(&self, customer: &str) -> Result<Option<CustomerRecord>, StoreError> {
        self.customer_record(customer).map_err(outbox_err)
    }

    fn put_customer(&self, customer: &str, rec: &CustomerRecord) -> Result<(), StoreError> {
        self.put_customer_record(customer, rec).map_err(outbox_err)
    }

    fn dest_names(
        &self,
        kind: crate::store::NameKind,
        keys: &[String],
    ) -> Result<Vec<(String, crate::store::DestNames)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = match txn.open_table(DEST_NAMES) {
            Ok(t) => t,
            // Made by the first name set: a store without it has none.
            Err(::redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut keys: Vec<&String> = keys.iter().collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = t.get((kind.as_str(), k.as_str()))? {
                out.push((k.clone(), crate::store::names_dec(v.value())?));
            }
        }
        Ok(out)
    }

    fn put_dest_names(
        &self,
        kind: crate::store::NameKind,
        key: &str,
        names: &crate::store::DestNames,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(DEST_NAMES)?;
            if names.is_empty() {
                t.remove((kind.as_str(), key))?;
            } else {
                t.insert(
                    (kind.as_str(), key),
                    crate::store::names_enc(names)?.as_slice(),
                )?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn outbox_items(&self) -> Result<Vec<(String, String, i64, u64)>, StoreError> {
        RedbStore::outbox_items(self).map_err(outbox_err)
    }

    fn ingest(
        &self,
        batches: &[IngestBatch],
        now_ms: i64,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let txn = self.db.begin_write()?;
        let (out, appended) = self.ingest_in(&txn, batches, now_ms)?;
        txn.commit()?;
        self.note_appended(appended);
        Ok(out)
    }

    fn adjust(&self, adj: &Adjustment, now_ms: i64) -> Result<AdjustOutcome, StoreError> {
        let txn = self.db.begin_write()?;
        let mut appended = 0;
        let outcome = {
            let catalog = read_catalog(&txn.open_table(META)?)?;
            let mut adjustments = txn.open_table(ADJUSTMENTS)?;
            let mut ledger = Ledger::open(&txn)?;
            let mut ws = WorkingSet::new();
            let posted = ledger::post_adjustment(&mut ws, &mut ledger, &catalog, adj, now_ms)?;
            let existing = match adjustments.get(adj.idempotency_key.as_str())? {
                Some(pos) => {
                    let t = ledger.transfers.get(pos.value())?;
                    let Some(t) = t else {
                        return Err(StoreError::Invariant(String::from("transfer missing")));
                    };
                    Some(dec::<Transfer>("transfers", t.value())?)
                }
                None => None,
            };
            match (existing, posted) {
                (Some(stored), Ok(p)) => match p.transfers.first() {
                    Some(new) => match ledger::compare_existing(&stored, new) {
                        Existing::Exists => AdjustOutcome::Exists(stored),
                        Existing::ExistsWithDifferent(f) => AdjustOutcome::ExistsWithDifferent(f),
                    },
                    None => AdjustOutcome::Exists(stored),
                },
                // A replay of an adjustment that was posted, even if it would be refused now
                // (the balance moved), is still the same request.
                (Some(stored), Err(_)) => {
                    let same_source = matches!(&stored.source,
                        TransferSource::Adjustment { idempotency_key, .. } if *idempotency_key == adj.idempotency_key);
                    if same_source
                        && stored.amount == adj.quantity.abs()
                        && stored.unit == adj.meter
                        && stored.customer == adj.customer
                    {
                        AdjustOutcome::Exists(stored)
                    } else {
                        AdjustOutcome::ExistsWithDifferent("amount")
                    }
                }
                (None, Err(r)) => AdjustOutcome::Rejected(r),
                (None, Ok(p)) => {
                    let Some(t) = p.transfers.first().cloned() else {
                        return Err(StoreError::Invariant(String::from("empty adjustment")));
                    };
                    let pos = ledger.append(&p)?;
                    adjustments.insert(adj.idempotency_key.as_str(), pos)?;
                    ws.assert_balanced();
                    ledger.put_accounts(&ws)?;
                    let mut outbox = outbox_rows::OutboxWriter::open(&txn).map_err(outbox_err)?;
                    outbox
                        .transfer(
                            &catalog,
                            &t,
                            !adj.quantity.is_sign_negative(),
                            now_ms.div_euclid(1000),
                        )
                        .map_err(outbox_err)?;
                    appended = outbox.finish().map_err(outbox_err)?;
                    AdjustOutcome::Created(t)
                }
            }
        };
        if matches!(outcome, AdjustOutcome::Created(_)) {
            txn.commit()?;
            self.note_appended(appended);
        } else {
            txn.abort()?;
        }
        Ok(outcome)
    }

    fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AGENTS)?;
        match t.get(id.as_u128())? {
            Some(v) => Ok(Some(dec("agents", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(AGENTS)?;
            t.insert(rec.id.as_u128(), enc(rec)?.as_slice())?;
        }
        txn.commit().map_err(be)
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(dec("agents", v.value())?);
        }
        Ok(out)
    }

    fn epochs(&self) -> Result<Vec<EpochState>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DEDUP)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (agent, epoch) = k.value();
            out.push(EpochState {
                agent: AgentId(agent.to_be_bytes()),
                epoch,
                dedup: dec("dedup", v.value())?,
            });
        }
        Ok(out)
    }

    fn catalog(&self) -> Result<Catalog, StoreError> {
        let txn = self.db.begin_read()?;
        read_catalog(&txn.open_table(META)?)
    }

    fn put_meter(&self, def: &MeterDef) -> Result<Catalog, StoreError> {
        let txn = self.db.begin_write()?;
        let catalog = {
            let mut meta = txn.open_table(META)?;
            let current = read_catalog(&meta)?;
            let Some(catalog) = crate::store::catalog_with(&current, def)? else {
                return Ok(current);
            };
            let bytes = enc(&catalog)?;
            meta.insert(CATALOG_KEY, bytes.as_slice())?;
            let mut versions = txn.open_table(CATALOGS)?;
            versions.insert(catalog.version, bytes.as_slice())?;
            catalog
        };
        txn.commit()?;
        Ok(catalog)
    }

    fn usage_accounts(
        &self,
        customer: &CustomerId,
        meter: Option<&MeterName>,
        period: Option<Period>,
    ) -> Result<Vec<Account>, StoreError> {
        let txn = self.db.begin_read()?;
        let idx = txn.open_table(USAGE_IDX)?;
        let accounts = txn.open_table(ACCOUNTS)?;
        let c = customer.as_str();
        let m = meter.map(MeterName::as_str);
        let p = period.map(|p| p.to_string());
        let (lo_m, hi_m) = m.map_or(("", AFTER_ASCII), |m| (m, m));
        let (lo_p, hi_p) = p.as_deref().map_or(("", AFTER_ASCII), |p| (p, p));
        let lo: UsageKey = (c, lo_m, lo_p, 0);
        let hi: UsageKey = (c, hi_m, hi_p, u128::MAX);
        let mut out = Vec::new();
        for row in idx.range(lo..=hi)? {
            let (k, _) = row?;
            let (_, km, kp, id) = k.value();
            if m.is_some_and(|m| m != km) || p.as_deref().is_some_and(|p| p != kp) {
                continue;
            }
            let Some(v) = accounts.get(id)? else {
                return Err(StoreError::Invariant(format!(
                    "indexed account {id:032x} missing"
                )));
            };
            out.push(dec("accounts", v.value())?);
        }
        Ok(out)
    }

    fn customers(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let idx = txn.open_table(USAGE_IDX)?;
        let settings = txn.open_table(CUSTOMERS)?;
        let start = if after >= prefix { after } else { prefix };
        let wanted = |c: &str| c.starts_with(prefix) && (c > after || after.is_empty());
        let mut out = std::collections::BTreeSet::new();
        // Skip-scan the usage index: one seek per customer, past every key of the one found.
        let mut lo: (String, &str) = (start.to_owned(), "");
        while out.len() < limit {
            let key: UsageKey = (lo.0.as_str(), lo.1, "", 0);
            let Some(row) = idx.range(key..)?.next() else {
                break;
            };
            let (k, _) = row?;
            let c = k.value().0.to_owned();
            if !c.starts_with(prefix) {
                break;
            }
            if wanted(&c) {
                out.insert(c.clone());
            }
            lo = (c, AFTER_ASCII);
        }
        let mut taken = 0;
        for row in settings.range(start..)? {
            let (k, _) = row?;
            let c = k.value();
            if !c.starts_with(prefix) {
                break;
            }
            if wanted(c) {
                out.insert(c.to_owned());
                // In order: the first `limit` of this table are all the merge can take.
                taken += 1;
                if taken >= limit {
                    break;
                }
            }
        }
        Ok(out.into_iter().take(limit).collect())
    }

    fn entries(
        &self,
        customer: Option<&CustomerId>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Transfer)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(TRANSFERS)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let tr: Transfer = dec("transfers", v.value())?;
            if customer.is_none_or(|c| *c == tr.customer) {
                out.push((k.value(), tr));
            }
        }
        Ok(out)
    }

    fn quarantined(&self, after: u64, limit: usize) -> Result<Vec<QuarantineRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)?.take(limit) {
            let (_, v) = row?;
            let rec: QuarantineRecord = dec("quarantine", v.value())?;
            rec.check()
                .map_err(crate::store::corrupt_record("quarantine"))?;
            out.push(rec);
        }
        Ok(out)
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        let txn = self.db.begin_read()?;
        let transfers = txn.open_table(TRANSFERS)?;
        let batches = txn.open_table(BATCHES)?;
        let dedup = txn.open_table(DEDUP)?;
        let adjustments = txn.open_table(ADJUSTMENTS)?;
        let accounts = txn.open_table(ACCOUNTS)?;
        let grants = txn.open_table(entitlements::GRANTS)?;
        let mut v = Verifier::new();
        let mut dedup_cache: HashMap<(u128, u64), DedupState> = HashMap::new();
        let mut batch_cache: HashMap<(u128, u64, u64), Option<(u32, u64)>> = HashMap::new();
        // Dedup state and batch records agree: every recorded batch is done, and every done seq
        // has its record.
        let mut recorded: HashMap<(u128, u64), Vec<u64>> = HashMap::new();
        for row in batches.iter()? {
            let (k, _) = row?;
            let (agent, epoch, seq) = k.value();
            recorded.entry((agent, epoch)).or_default().push(seq);
            v.batch();
        }
        for row in dedup.iter()? {
            let (k, val) = row?;
            let key = k.value();
            let state: DedupState = dec("dedup", val.value())?;
            let seqs = recorded.remove(&key).unwrap_or_default();
            let agent = AgentId(key.0.to_be_bytes());
            let done = state.done();
            if seqs.len() as u64 != done || seqs.iter().any(|s| !state.contains(*s)) {
                v.violation(format!(
                    "agent {agent} epoch {}: dedup state ({done} done) and batch records ({}) differ",
                    key.1,
                    seqs.len()
                ));
            }
        }
        for ((agent, epoch), _) in recorded {
            v.violation(format!(
                "agent {} epoch {epoch}: batches recorded without dedup state",
                AgentId(agent.to_be_bytes())
            ));
        }
        for row in transfers.iter()? {
            let (pos, val) = row?;
            let t: Transfer = dec("transfers", val.value())?;
            let pos = pos.value();
            let trace = match &t.source {
                TransferSource::BatchRow {
                    agent,
                    epoch,
                    seq,
                    row,
                } => {
                    let bkey = (agent.as_u128(), *epoch, *seq);
                    if let std::collections::hash_map::Entry::Vacant(e) = batch_cache.entry(bkey) {
                        let rec = match batches.get(bkey)? {
                            Some(b) => {
                                let r: BatchRecord = dec("batches", b.value())?;
                                r.check().map_err(crate::store::corrupt_record("batches"))?;
                                (r.outcome == BatchOutcome::Committed)
                                    .then_some((r.deltas, r.first_transfer))
                            }
                            None => None,
                        };
                        e.insert(rec);
                    }
                    let dkey = (agent.as_u128(), *epoch);
                    if !dedup_cache.contains_key(&dkey)
                        && let Some(d) = dedup.get(dkey)?
                    {
                        dedup_cache.insert(dkey, dec("dedup", d.value())?);
                    }
                    let rec = batch_cache.get(&bkey).copied().flatten();
                    ledger::trace_batch_row(rec.map(|r| r.0), dedup_cache.get(&dkey), *seq, *row)
                        .and_then(|()| match rec {
                            Some((_, first)) if first + u64::from(*row) == pos => Ok(()),
                            _ => Err(format!("position {pos} is not the batch's row {row}")),
                        })
                }
                TransferSource::Adjustment {
                    idempotency_key, ..
                } => match adjustments.get(idempotency_key.as_str())? {
                    Some(p) if p.value() == pos => Ok(()),
                    Some(_) => Err(String::from("adjustment key names another transfer")),
                    None => Err(String::from("adjustment key is not recorded")),
                },
                TransferSource::Grant { idempotency_key } => {
                    entitlements::trace_grant(&grants, idempotency_key, pos)?
                }
            };
            v.transfer(&t, trace);
        }
        for row in accounts.iter()? {
            let (id, val) = row?;
            let a: Account = dec("accounts", val.value())?;
            v.account(id.value(), &a);
        }
        drop(txn);
        for problem in outbox_rows::verify_outbox(&self.db).map_err(outbox_err)? {
            v.violation(problem);
        }
        Ok(v.finish())
    }
}
