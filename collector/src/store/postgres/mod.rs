//! The PostgreSQL [`Store`] (SPEC §6.5): many collectors on one database.
//!
//! Runs the same pure rules as the redb store ([`ingest_group`], `ledger::post_*`,
//! `EventGroup::step`, the unit carry) over tables described in [`schema`]; only storage differs.
//!
//! Guarantees (beside those of [`Store`]):
//! - every ledger write (ingest group, adjustment, grant) is one transaction that first locks
//!   the single `ledger_head` row: writers from every collector take turns, positions are
//!   gapless, and a batch two collectors receive at once is committed by the first and found
//!   done (`Duplicate`) by the second, which reads the dedup state only after the lock;
//! - nothing is reported before `COMMIT` returned; a transient failure (serialization,
//!   deadlock, lost connection) runs the whole transaction again ([`pool`]) — safe, because a
//!   transaction that did commit is then found done and answered the same way;
//! - outbox rows are claimed under row locks (see [`outbox`]).

use crate::core::dedup::DedupState;
use crate::core::ingest::{IngestTxn, ingest_group};
use crate::core::ledger::{
    self, Account, AccountId, AccountKey, Accounts, Adjustment, Existing, Period, Posting,
    Transfer, TransferSource, Verifier, VerifyReport, WorkingSet,
};
use crate::store::redb::outbox_rows::{BucketRec, Carry};
use crate::store::{
    AdjustOutcome, AgentRecord, BatchOutcome, BatchRecord, CustomerRecord, EpochState, IngestBatch,
    IngestOutcome, QuarantineRecord, Store, StoreError,
};
use pool::{Pool, Tx};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use tally_forward::stripe::coalesce::{MAX_OPEN_BUCKETS, OpenBuckets};
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::{Catalog, MeterDef};
use tally_protocol::names::{CustomerId, MeterName};

pub mod entitlements;
pub mod forward;
pub mod listen;
pub mod outbox;
pub mod pool;
pub mod schema;
pub mod testdb;
pub mod tls;

/// Connections per collector: the committer, the forwarder and the admin API each get one, and
/// one spare.
pub const POOL_SIZE: usize = 4;

pub(crate) fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    Ok(postcard::to_stdvec(v)?)
}

pub(crate) fn dec<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

/// A `u64` as PostgreSQL's `bigint`, bit for bit (ids, epochs and seqs past `i64::MAX` keep
/// their identity; only their SQL order differs, which nothing relies on).
pub(crate) fn i(v: u64) -> i64 {
    v as i64
}

/// The inverse of [`i`].
pub(crate) fn u(v: i64) -> u64 {
    v as u64
}

fn id_bytes(id: u128) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

fn agent_from(bytes: &[u8]) -> Result<AgentId, StoreError> {
    let a: [u8; 16] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        table: "agents",
        detail: String::from("agent id is not 16 bytes"),
    })?;
    Ok(AgentId(a))
}

/// The PostgreSQL-backed store.
pub struct PgStore {
    pool: Pool,
    namespace: String,
    outbox_appended: std::sync::atomic::AtomicU64,
    changes: tokio::sync::broadcast::Sender<listen::PgChange>,
    stop_listening: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Usage booked for reclaimed leases by this process's ingest transactions.
    lease_overshoot: std::sync::Mutex<rust_decimal::Decimal>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop_listening
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), migrates the schema (once, under an
    /// advisory lock) and records a Stripe namespace if the database has none.
    /// `sslmode` and `sslrootcert` are honoured as libpq does ([`tls`]). Changes from other
    /// collectors are heard with `LISTEN` on the same URL.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_listen(url, None)
    }

    /// [`PgStore::open`], hearing other collectors' changes as `listen` says (decision 0097):
    /// `None`: `LISTEN` on `url`; `Some("poll")`: poll the change log through `url` every
    /// 250 ms (behind a transaction-mode pooler, where `LISTEN` does not work); `Some(url2)`:
    /// `LISTEN` on a direct session connection to the same database.
    pub fn open_with_listen(url: &str, listen: Option<&str>) -> Result<Self, StoreError> {
        let (config, tls, _) = tls::parse(url)?;
        let source = match listen {
            None => listen::Source::Listen(config.clone(), tls.clone()),
            Some("poll") => listen::Source::Poll(config.clone(), tls.clone()),
            Some(other) => {
                let (c, t, _) = tls::parse(other)?;
                listen::Source::Listen(c, t)
            }
        };
        Self::open_config(config, tls, source)
    }

    /// [`PgStore::open`] with a parsed configuration.
    pub fn open_config(
        mut config: postgres::Config,
        tls: tls::PgTls,
        source: listen::Source,
    ) -> Result<Self, StoreError> {
        if config.get_application_name().is_none() {
            config.application_name("tally-collector");
        }
        let pool = Pool::new(config.clone(), tls.clone(), POOL_SIZE)?;
        let namespace = pool.run(|s| {
            let mut tx = s.begin()?;
            schema::migrate(&mut tx)?;
            entitlements::fill_lease_columns(&mut tx)?;
            // Part of every Stripe identifier: a fresh database never reuses an old one's.
            let mut b = [0u8; 6];
            getrandom::getrandom(&mut b)?;
            let fresh = hex::encode(b).into_bytes();
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('stripe_namespace', $1) \
                 ON CONFLICT (key) DO NOTHING",
                &[&fresh],
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('catalog', $1) ON CONFLICT (key) DO NOTHING",
                &[&enc(&Catalog::default())?],
            )?;
            let ns: Vec<u8> = tx
                .query_one("SELECT value FROM meta WHERE key = 'stripe_namespace'", &[])?
                .get(0);
            tx.commit()?;
            Ok(String::from_utf8_lossy(&ns).into_owned())
        })?;
        let (changes, _) = tokio::sync::broadcast::channel(listen::CHANGES_MAX);
        let stop_listening = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        listen::spawn(source, changes.clone(), stop_listening.clone())
            .map_err(|e| StoreError::Invariant(format!("postgres listener thread: {e}")))?;
        Ok(PgStore {
            pool,
            namespace,
            outbox_appended: std::sync::atomic::AtomicU64::new(0),
            changes,
            stop_listening,
            lease_overshoot: std::sync::Mutex::new(rust_decimal::Decimal::ZERO),
        })
    }

    /// Runs `f` as a whole transaction on a pooled connection, retried on transient failures.
    pub(crate) fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&mut pool::Session) -> Result<T, StoreError> + Send + 'static,
    {
        self.pool.run(f)
    }

    /// Changes made through any collector on this database, this one included (see
    /// [`listen`]).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<listen::PgChange> {
        self.changes.subscribe()
    }

    /// Usage booked for reclaimed leases by this process's ingest transactions.
    pub fn lease_overshoot(&self) -> rust_decimal::Decimal {
        *self
            .lease_overshoot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Transactions run again after a transient failure since this store opened.
    pub fn retries(&self) -> u64 {
        self.pool.retries()
    }

    /// Appends one outbox row outside any ledger transaction (tests and tools only, as
    /// `RedbStore::append_outbox_row`).
    pub fn append_outbox_row(
        &self,
        row: tally_forward::stripe::NewOutboxRow,
    ) -> Result<tally_forward::stripe::outbox::RowId, StoreError> {
        if row.value == 0 {
            return Err(StoreError::Invariant(String::from(
                "zero-unit rows are not written",
            )));
        }
        let id = self.run(move |s| {
            let mut tx = s.begin()?;
            lock_ledger(&mut tx)?;
            let id = next_id(&mut tx, "SELECT coalesce(max(id), 0) + 1 FROM outbox")?;
            tx.execute(
                "INSERT INTO outbox (id, customer, meter, event_name, ts, value, revision) \
                 VALUES ($1, $2, $3, $4, $5, $6, 0)",
                &[
                    &i(id),
                    &row.customer,
                    &row.meter,
                    &row.stripe_event_name,
                    &row.timestamp_s,
                    &i(row.value),
                ],
            )?;
            tx.commit()?;
            Ok(id)
        })?;
        self.note_appended(1);
        Ok(id)
    }

    fn note_appended(&self, n: u64) {
        if n > 0 {
            self.outbox_appended
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Takes the ledger lock (see the module doc); held until the transaction ends.
pub(crate) fn lock_ledger(tx: &mut Tx<'_>) -> Result<(), StoreError> {
    tx.query_one("SELECT id FROM ledger_head WHERE id = 1 FOR UPDATE", &[])?;
    Ok(())
}

fn next_id(tx: &mut Tx<'_>, sql: &'static str) -> Result<u64, StoreError> {
    Ok(u(tx.query_one(sql, &[])?.get(0)))
}

pub(crate) fn read_catalog(tx: &mut Tx<'_>) -> Result<Catalog, StoreError> {
    match tx.query_opt("SELECT value FROM meta WHERE key = 'catalog'", &[])? {
        Some(r) => dec("meta", r.get::<_, &[u8]>(0)),
        None => Ok(Catalog::default()),
    }
}

/// One ledger transaction's reads and (buffered) writes: what [`ingest_group`],
/// `ledger::post_adjustment` and `ledger::post_grant` work on.
pub(crate) struct PgTxn<'t, 'a> {
    pub(crate) tx: &'t mut Tx<'a>,
    next_pos: u64,
    next_quarantine: u64,
    transfers: Vec<(i64, String, Vec<u8>)>,
    dedup: HashMap<(AgentId, u64), DedupState>,
    batches: Vec<(Vec<u8>, i64, i64, Vec<u8>)>,
    quarantine: Vec<(i64, Vec<u8>)>,
    outbox: OutboxWriter,
    /// Accounts and dedup states read ahead in one query each ([`PgTxn::prefetch`]); `None`:
    /// known absent. Read under the ledger lock, so they stay current for the transaction.
    accounts_read: HashMap<AccountId, Option<Account>>,
    dedup_read: HashMap<(AgentId, u64), Option<DedupState>>,
}

impl<'t, 'a> PgTxn<'t, 'a> {
    /// Locks the ledger and reads the next positions.
    pub(crate) fn open(tx: &'t mut Tx<'a>) -> Result<Self, StoreError> {
        lock_ledger(tx)?;
        let next_pos = next_id(tx, "SELECT coalesce(max(pos), 0) + 1 FROM transfers")?;
        let next_quarantine = next_id(tx, "SELECT coalesce(max(id), 0) + 1 FROM quarantine")?;
        let next_row = next_id(tx, "SELECT coalesce(max(id), 0) + 1 FROM outbox")?;
        Ok(PgTxn {
            tx,
            next_pos,
            next_quarantine,
            transfers: Vec::new(),
            dedup: HashMap::new(),
            batches: Vec::new(),
            quarantine: Vec::new(),
            accounts_read: HashMap::new(),
            dedup_read: HashMap::new(),
            outbox: OutboxWriter {
                touched: HashMap::new(),
                next_row,
                carries_read: HashMap::new(),
                buckets_read: HashMap::new(),
            },
        })
    }

    /// Reads ahead, in one query each, the accounts and dedup states a group of batches will
    /// most likely touch, instead of one round trip per account. Only a cache: the ids are a
    /// guess from the deltas (usage and source accounts), and whatever the rules load that is
    /// not here is read on demand.
    fn prefetch(&mut self, batches: &[IngestBatch]) -> Result<(), StoreError> {
        let mut ids: Vec<AccountId> = Vec::new();
        let mut pairs: Vec<(AgentId, u64)> = Vec::new();
        for b in batches {
            pairs.push((b.body.agent_id, b.body.epoch));
            for d in b.body.deltas.iter() {
                ids.push(ledger::source_account_id(&d.meter));
                ids.push(ledger::usage_account_id(
                    &d.customer,
                    &d.meter,
                    &d.dimensions,
                    Period::of_ms(d.bucket_start_ms),
                ));
            }
        }
        ids.sort_unstable();
        ids.dedup();
        pairs.sort_unstable();
        pairs.dedup();
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id_bytes(*id)).collect();
        for id in &ids {
            self.accounts_read.insert(*id, None);
        }
        for r in self
            .tx
            .query("SELECT id, acct FROM accounts WHERE id = ANY($1)", &[&keys])?
        {
            let idb: &[u8] = r.get(0);
            let id: [u8; 16] = idb.try_into().map_err(|_| StoreError::Corrupt {
                table: "accounts",
                detail: String::from("account id is not 16 bytes"),
            })?;
            let a: Account = dec("accounts", r.get::<_, &[u8]>(1))?;
            self.accounts_read.insert(u128::from_be_bytes(id), Some(a));
        }
        let mut cm: Vec<(String, String)> = batches
            .iter()
            .flat_map(|b| b.body.deltas.iter())
            .map(|d| (d.customer.as_str().to_owned(), d.meter.as_str().to_owned()))
            .collect();
        cm.sort_unstable();
        cm.dedup();
        let (cs, ms): (Vec<String>, Vec<String>) = cm.iter().cloned().unzip();
        for k in &cm {
            self.outbox.carries_read.insert(k.clone(), None);
        }
        for k in cm {
            self.outbox.buckets_read.insert(k, None);
        }
        for r in self.tx.query(
            "SELECT o.customer, o.meter, o.carry FROM outbox_carry o \
             JOIN unnest($1::text[], $2::text[]) AS k(customer, meter) \
             ON o.customer = k.customer COLLATE \"C\" AND o.meter = k.meter COLLATE \"C\"",
            &[&cs, &ms],
        )? {
            let key: (String, String) = (r.get(0), r.get(1));
            let c: Carry = dec("outbox_carry", r.get::<_, &[u8]>(2))?;
            self.outbox.carries_read.insert(key, Some(c));
        }
        for r in self.tx.query(
            "SELECT o.customer, o.meter, o.rec FROM outbox_buckets o \
             JOIN unnest($1::text[], $2::text[]) AS k(customer, meter) \
             ON o.customer = k.customer COLLATE \"C\" AND o.meter = k.meter COLLATE \"C\"",
            &[&cs, &ms],
        )? {
            let key: (String, String) = (r.get(0), r.get(1));
            let b: BucketRec = dec("outbox_buckets", r.get::<_, &[u8]>(2))?;
            self.outbox.buckets_read.insert(key, Some(b));
        }
        let agents: Vec<Vec<u8>> = pairs.iter().map(|p| p.0.0.to_vec()).collect();
        let epochs: Vec<i64> = pairs.iter().map(|p| i(p.1)).collect();
        for p in &pairs {
            self.dedup_read.insert(*p, None);
        }
        for r in self.tx.query(
            "SELECT d.agent, d.epoch, d.state FROM dedup d \
             JOIN unnest($1::bytea[], $2::bigint[]) AS k(agent, epoch) \
             ON d.agent = k.agent AND d.epoch = k.epoch",
            &[&agents, &epochs],
        )? {
            let key = (agent_from(r.get::<_, &[u8]>(0))?, u(r.get(1)));
            self.dedup_read
                .insert(key, Some(dec("dedup", r.get::<_, &[u8]>(2))?));
        }
        Ok(())
    }

    /// Writes everything buffered; returns the outbox rows appended.
    pub(crate) fn flush(self) -> Result<u64, StoreError> {
        if !self.transfers.is_empty() {
            let (pos, cust, t): (Vec<i64>, Vec<String>, Vec<Vec<u8>>) = split3(self.transfers);
            self.tx.execute(
                "INSERT INTO transfers (pos, customer, t) \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[])",
                &[&pos, &cust, &t],
            )?;
        }
        if !self.batches.is_empty() {
            let mut a = Vec::new();
            let mut e = Vec::new();
            let mut s = Vec::new();
            let mut r = Vec::new();
            for (ag, ep, sq, rec) in self.batches {
                a.push(ag);
                e.push(ep);
                s.push(sq);
                r.push(rec);
            }
            // No ON CONFLICT: recording a batch twice aborts the transaction, as in redb.
            self.tx.execute(
                "INSERT INTO batches (agent, epoch, seq, rec) \
                 SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bytea[])",
                &[&a, &e, &s, &r],
            )?;
        }
        if !self.dedup.is_empty() {
            let mut a = Vec::new();
            let mut e = Vec::new();
            let mut st = Vec::new();
            for ((ag, ep), state) in &self.dedup {
                a.push(ag.0.to_vec());
                e.push(i(*ep));
                st.push(enc(state)?);
            }
            self.tx.execute(
                "INSERT INTO dedup (agent, epoch, state) \
                 SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[]) \
                 ON CONFLICT (agent, epoch) DO UPDATE SET state = EXCLUDED.state",
                &[&a, &e, &st],
            )?;
        }
        if !self.quarantine.is_empty() {
            let (ids, recs): (Vec<i64>, Vec<Vec<u8>>) = self.quarantine.into_iter().unzip();
            self.tx.execute(
                "INSERT INTO quarantine (id, rec) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
                &[&ids, &recs],
            )?;
        }
        self.outbox.finish(self.tx)
    }
}

fn split3<A, B, C>(v: Vec<(A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let mut a = Vec::with_capacity(v.len());
    let mut b = Vec::with_capacity(v.len());
    let mut c = Vec::with_capacity(v.len());
    for (x, y, z) in v {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}

impl Accounts for PgTxn<'_, '_> {
    type Error = StoreError;
    fn load(&mut self, id: AccountId) -> Result<Option<Account>, StoreError> {
        if let Some(a) = self.accounts_read.get(&id) {
            return Ok(a.clone());
        }
        match self
            .tx
            .query_opt("SELECT acct FROM accounts WHERE id = $1", &[&id_bytes(id)])?
        {
            Some(r) => Ok(Some(dec("accounts", r.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }
}

impl PgTxn<'_, '_> {
    fn append_posting(&mut self, posting: &Posting) -> Result<u64, StoreError> {
        let first = self.next_pos;
        for t in &posting.transfers {
            self.transfers
                .push((i(self.next_pos), t.customer.as_str().to_owned(), enc(t)?));
            self.next_pos += 1;
        }
        Ok(first)
    }

    fn write_accounts(&mut self, ws: &WorkingSet) -> Result<(), StoreError> {
        let mut ids = Vec::with_capacity(ws.accounts.len());
        let mut cs: Vec<Option<String>> = Vec::with_capacity(ws.accounts.len());
        let mut ms: Vec<Option<String>> = Vec::with_capacity(ws.accounts.len());
        let mut ps: Vec<Option<String>> = Vec::with_capacity(ws.accounts.len());
        let mut blobs = Vec::with_capacity(ws.accounts.len());
        for (id, a) in &ws.accounts {
            ids.push(id_bytes(*id));
            match &a.key {
                AccountKey::Usage {
                    customer,
                    meter,
                    period,
                    ..
                } => {
                    cs.push(Some(customer.as_str().to_owned()));
                    ms.push(Some(meter.as_str().to_owned()));
                    ps.push(Some(period.to_string()));
                }
                _ => {
                    cs.push(None);
                    ms.push(None);
                    ps.push(None);
                }
            }
            blobs.push(enc(a)?);
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.tx.execute(
            "INSERT INTO accounts (id, customer, meter, period, acct) \
             SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::bytea[]) \
             ON CONFLICT (id) DO UPDATE SET acct = EXCLUDED.acct",
            &[&ids, &cs, &ms, &ps, &blobs],
        )?;
        Ok(())
    }
}

impl IngestTxn for PgTxn<'_, '_> {
    fn dedup_state(&mut self, agent: AgentId, epoch: u64) -> Result<DedupState, StoreError> {
        if let Some(s) = self.dedup.get(&(agent, epoch)) {
            return Ok(s.clone());
        }
        if let Some(s) = self.dedup_read.get(&(agent, epoch)) {
            return Ok(s.clone().unwrap_or_default());
        }
        match self.tx.query_opt(
            "SELECT state FROM dedup WHERE agent = $1 AND epoch = $2",
            &[&agent.0.as_slice(), &i(epoch)],
        )? {
            Some(r) => dec("dedup", r.get::<_, &[u8]>(0)),
            None => Ok(DedupState::default()),
        }
    }

    fn epoch_count(&mut self, agent: AgentId) -> Result<usize, StoreError> {
        let n: i64 = self
            .tx
            .query_one(
                "SELECT count(*) FROM dedup WHERE agent = $1",
                &[&agent.0.as_slice()],
            )?
            .get(0);
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn next_quarantine_id(&mut self) -> Result<u64, StoreError> {
        Ok(self.next_quarantine)
    }

    fn append(&mut self, posting: &Posting) -> Result<u64, StoreError> {
        self.append_posting(posting)
    }

    fn outbox(
        &mut self,
        catalog: &Catalog,
        transfer: &Transfer,
        positive: bool,
        bucket_s: i64,
    ) -> Result<(), StoreError> {
        self.outbox
            .transfer(self.tx, catalog, transfer, positive, bucket_s)
    }

    fn quarantine(&mut self, rec: &QuarantineRecord) -> Result<(), StoreError> {
        self.quarantine.push((i(rec.id), enc(rec)?));
        self.next_quarantine = self.next_quarantine.max(rec.id + 1);
        Ok(())
    }

    fn record_batch(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        rec: &BatchRecord,
    ) -> Result<(), StoreError> {
        self.batches
            .push((agent.0.to_vec(), i(epoch), i(seq), enc(rec)?));
        Ok(())
    }

    fn put_dedup(
        &mut self,
        agent: AgentId,
        epoch: u64,
        state: &DedupState,
    ) -> Result<(), StoreError> {
        self.dedup.insert((agent, epoch), state.clone());
        Ok(())
    }

    fn put_accounts(&mut self, ws: &WorkingSet) -> Result<(), StoreError> {
        self.write_accounts(ws)
    }
}

/// The outbox of one ledger transaction: the rule is the redb store's
/// ([`tally_forward::stripe::coalesce::post`] on the stored [`Carry`] and open buckets); carries, bucket
/// records and spilled rows are written at the end.
struct OutboxWriter {
    touched: HashMap<(String, String), Touched>,
    next_row: u64,
    /// Carries read ahead ([`PgTxn::prefetch`]); `None`: known absent.
    carries_read: HashMap<(String, String), Option<Carry>>,
    /// Bucket records read ahead; `None`: known absent.
    buckets_read: HashMap<(String, String), Option<BucketRec>>,
}

struct Touched {
    carry: tally_forward::stripe::units::Carry,
    event_name: String,
    open: OpenBuckets,
    had_open: bool,
    changed: bool,
    /// Rows to write: spilled buckets, and buckets posted under a previous event name.
    rows: Vec<(String, i64, u64)>,
}

/// One row of `outbox` to insert.
type NewRow = (i64, String, String, String, i64, i64);

/// Inserts rows in one statement.
pub(crate) fn insert_rows(tx: &mut Tx<'_>, rows: Vec<NewRow>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let (mut ids, mut cs, mut ms, mut es, mut ts, mut vs) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (id, c, m, e, t, v) in rows {
        ids.push(id);
        cs.push(c);
        ms.push(m);
        es.push(e);
        ts.push(t);
        vs.push(v);
    }
    tx.execute(
        "INSERT INTO outbox (id, customer, meter, event_name, ts, value, revision) \
         SELECT a, b, c, d, e, f, 0 FROM unnest($1::bigint[], $2::text[], $3::text[], \
         $4::text[], $5::bigint[], $6::bigint[]) AS x(a, b, c, d, e, f)",
        &[&ids, &cs, &ms, &es, &ts, &vs],
    )?;
    Ok(())
}

impl OutboxWriter {
    fn transfer(
        &mut self,
        tx: &mut Tx<'_>,
        catalog: &Catalog,
        t: &Transfer,
        positive: bool,
        timestamp_s: i64,
    ) -> Result<(), StoreError> {
        if t.amount.is_zero() {
            return Ok(());
        }
        let Some(def) = catalog.meter(t.unit.as_str()) else {
            return Ok(());
        };
        let Some(event_name) = def.stripe_event_name.as_deref() else {
            return Ok(());
        };
        let key = (t.customer.as_str().to_owned(), t.unit.as_str().to_owned());
        let e = match self.touched.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let carry = match self.carries_read.get(v.key()) {
                    Some(c) => c.clone().unwrap_or_default(),
                    None => match tx.query_opt(
                        "SELECT carry FROM outbox_carry WHERE customer = $1 AND meter = $2",
                        &[&v.key().0, &v.key().1],
                    )? {
                        Some(r) => dec("outbox_carry", r.get::<_, &[u8]>(0))?,
                        None => Carry::default(),
                    },
                };
                let rec = match self.buckets_read.get(v.key()) {
                    Some(b) => b.clone(),
                    None => match tx.query_opt(
                        "SELECT rec FROM outbox_buckets WHERE customer = $1 AND meter = $2",
                        &[&v.key().0, &v.key().1],
                    )? {
                        Some(r) => Some(dec("outbox_buckets", r.get::<_, &[u8]>(0))?),
                        None => None,
                    },
                };
                let had_open = rec.is_some();
                let (mut open, mut rows) = (OpenBuckets::default(), Vec::new());
                if let Some(mut b) = rec {
                    if b.event_name == event_name {
                        open = b.open;
                    } else {
                        // Buckets posted under another event name leave as rows under it.
                        for (ts, value) in b.open.seal() {
                            rows.push((b.event_name.clone(), ts, value));
                        }
                    }
                }
                v.insert(Touched {
                    carry: tally_forward::stripe::units::Carry {
                        net_scaled: carry.net_scaled,
                        sent_units: carry.sent_units,
                    },
                    event_name: event_name.to_owned(),
                    open,
                    had_open,
                    changed: !rows.is_empty(),
                    rows,
                })
            }
        };
        let signed = if positive { t.amount } else { -t.amount };
        let p = tally_forward::stripe::coalesce::post(
            &mut e.carry,
            &mut e.open,
            signed,
            def.stripe_unit_scale,
            timestamp_s,
            MAX_OPEN_BUCKETS,
        )
        .map_err(|e| StoreError::Invariant(e.to_string()))?;
        e.changed |= p.units > 0;
        if let Some((ts, value)) = p.spilled {
            e.rows.push((e.event_name.clone(), ts, value));
        }
        Ok(())
    }

    /// Writes carries, bucket records and rows; returns the rows written.
    fn finish(self, tx: &mut Tx<'_>) -> Result<u64, StoreError> {
        let mut touched: Vec<((String, String), Touched)> = self.touched.into_iter().collect();
        // Deterministic row order: by customer, meter, bucket time (as redb).
        touched.sort_by(|a, b| a.0.cmp(&b.0));
        let mut next = self.next_row;
        let (mut cc, mut cm, mut cb) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bc, mut bm, mut bb, mut bn, mut bt) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut dc, mut dm) = (Vec::new(), Vec::new());
        let mut rows: Vec<NewRow> = Vec::new();
        for ((customer, meter), mut t) in touched {
            cc.push(customer.clone());
            cm.push(meter.clone());
            cb.push(enc(&Carry {
                net_scaled: t.carry.net_scaled,
                sent_units: t.carry.sent_units,
            })?);
            if t.changed {
                if let Some(min_ts) = t.open.oldest() {
                    bc.push(customer.clone());
                    bm.push(meter.clone());
                    bn.push(i32::try_from(t.open.len()).unwrap_or(i32::MAX));
                    bt.push(min_ts);
                    bb.push(enc(&BucketRec {
                        event_name: t.event_name.clone(),
                        open: t.open,
                    })?);
                } else if t.had_open {
                    dc.push(customer.clone());
                    dm.push(meter.clone());
                }
            }
            t.rows
                .sort_unstable_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            for (event_name, ts, value) in t.rows {
                rows.push((
                    i(next),
                    customer.clone(),
                    meter.clone(),
                    event_name,
                    ts,
                    i(value),
                ));
                next += 1;
            }
        }
        if !cc.is_empty() {
            tx.execute(
                "INSERT INTO outbox_carry (customer, meter, carry) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) \
                 ON CONFLICT (customer, meter) DO UPDATE SET carry = EXCLUDED.carry",
                &[&cc, &cm, &cb],
            )?;
        }
        if !bc.is_empty() {
            tx.execute(
                "INSERT INTO outbox_buckets (customer, meter, rec, n, min_ts) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int[], \
                 $5::bigint[]) \
                 ON CONFLICT (customer, meter) DO UPDATE SET rec = EXCLUDED.rec, n = EXCLUDED.n, \
                 min_ts = EXCLUDED.min_ts",
                &[&bc, &bm, &bb, &bn, &bt],
            )?;
        }
        if !dc.is_empty() {
            tx.execute(
                "DELETE FROM outbox_buckets o USING unnest($1::text[], $2::text[]) AS k(c, m) \
                 WHERE o.customer = k.c COLLATE \"C\" AND o.meter = k.m COLLATE \"C\"",
                &[&dc, &dm],
            )?;
        }
        let appended = rows.len() as u64;
        insert_rows(tx, rows)?;
        Ok(appended)
    }
}

impl Store for PgStore {
    fn ingest(
        &self,
        batches: &[IngestBatch],
        now_ms: i64,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let batches = batches.to_vec();
        let (out, appended) = self.run(move |s| {
            let mut tx = s.begin()?;
            let (out, appended) = {
                let mut t = PgTxn::open(&mut tx)?;
                let catalog = read_catalog(t.tx)?;
                t.prefetch(&batches)?;
                let out = ingest_group(&mut t, &catalog, &batches, now_ms)?;
                // The leases learn this usage in the transaction that posts it (decision 0095).
                let over = crate::store::entitlements::ship_in(
                    &mut entitlements::PgLeases {
                        tx: &mut *t.tx,
                        pending: Some(&t.dedup),
                    },
                    &catalog,
                    &batches,
                    &out,
                )?;
                (out, (t.flush()?, over))
            };
            tx.commit()?;
            Ok((out, appended))
        })?;
        let (appended, over) = appended;
        self.note_appended(appended);
        if over > rust_decimal::Decimal::ZERO {
            let mut o = self
                .lease_overshoot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *o += over;
        }
        Ok(out)
    }

    fn adjust(&self, adj: &Adjustment, now_ms: i64) -> Result<AdjustOutcome, StoreError> {
        let adj = adj.clone();
        let (outcome, appended) = self.run(move |s| {
            let mut tx = s.begin()?;
            let (outcome, appended) = {
                let mut t = PgTxn::open(&mut tx)?;
                let catalog = read_catalog(t.tx)?;
                let mut ws = WorkingSet::new();
                let posted = ledger::post_adjustment(&mut ws, &mut t, &catalog, &adj, now_ms)?;
                let existing = match t.tx.query_opt(
                    "SELECT t.t FROM adjustments a JOIN transfers t ON t.pos = a.pos \
                     WHERE a.key = $1",
                    &[&adj.idempotency_key],
                )? {
                    Some(r) => Some(dec::<Transfer>("transfers", r.get::<_, &[u8]>(0))?),
                    None => None,
                };
                match (existing, posted) {
                    (Some(stored), Ok(p)) => (
                        match p.transfers.first() {
                            Some(new) => match ledger::compare_existing(&stored, new) {
                                Existing::Exists => AdjustOutcome::Exists(stored),
                                Existing::ExistsWithDifferent(f) => {
                                    AdjustOutcome::ExistsWithDifferent(f)
                                }
                            },
                            None => AdjustOutcome::Exists(stored),
                        },
                        0,
                    ),
                    // A replay of a posted adjustment that would be refused now is still the
                    // same request (as redb).
                    (Some(stored), Err(_)) => {
                        let same_source = matches!(&stored.source,
                            TransferSource::Adjustment { idempotency_key, .. } if *idempotency_key == adj.idempotency_key);
                        let o = if same_source
                            && stored.amount == adj.quantity.abs()
                            && stored.unit == adj.meter
                            && stored.customer == adj.customer
                        {
                            AdjustOutcome::Exists(stored)
                        } else {
                            AdjustOutcome::ExistsWithDifferent("amount")
                        };
                        (o, 0)
                    }
                    (None, Err(r)) => (AdjustOutcome::Rejected(r), 0),
                    (None, Ok(p)) => {
                        let Some(tr) = p.transfers.first().cloned() else {
                            return Err(StoreError::Invariant(String::from("empty adjustment")));
                        };
                        let pos = t.append_posting(&p)?;
                        t.tx.execute(
                            "INSERT INTO adjustments (key, pos) VALUES ($1, $2)",
                            &[&adj.idempotency_key, &i(pos)],
                        )?;
                        ws.assert_balanced();
                        t.write_accounts(&ws)?;
                        t.outbox.transfer(
                            t.tx,
                            &catalog,
                            &tr,
                            !adj.quantity.is_sign_negative(),
                            now_ms.div_euclid(1000),
                        )?;
                        (AdjustOutcome::Created(tr), t.flush()?)
                    }
                }
            };
            if matches!(outcome, AdjustOutcome::Created(_)) {
                tx.commit()?;
            }
            Ok((outcome, appended))
        })?;
        self.note_appended(appended);
        Ok(outcome)
    }

    fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>, StoreError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            match tx.query_opt("SELECT rec FROM agents WHERE id = $1", &[&id.0.as_slice()])? {
                Some(r) => Ok(Some(dec("agents", r.get::<_, &[u8]>(0))?)),
                None => Ok(None),
            }
        })
    }

    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        let (id, blob) = (rec.id.0.to_vec(), enc(rec)?);
        let revoked = rec.revoked_at_ms.is_some();
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.execute(
                "INSERT INTO agents (id, rec) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET rec = EXCLUDED.rec",
                &[&id, &blob],
            )?;
            if revoked {
                listen::notify(&mut tx, "tally_registry", &hex::encode(&id))?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            tx.query("SELECT rec FROM agents ORDER BY id", &[])?
                .iter()
                .map(|r| dec("agents", r.get::<_, &[u8]>(0)))
                .collect()
        })
    }

    fn epochs(&self) -> Result<Vec<EpochState>, StoreError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            let mut out = Vec::new();
            for r in tx.query(
                "SELECT agent, epoch, state FROM dedup ORDER BY agent, epoch",
                &[],
            )? {
                out.push(EpochState {
                    agent: agent_from(r.get::<_, &[u8]>(0))?,
                    epoch: u(r.get(1)),
                    dedup: dec("dedup", r.get::<_, &[u8]>(2))?,
                });
            }
            Ok(out)
        })
    }

    fn catalog(&self) -> Result<Catalog, StoreError> {
        self.run(|s| read_catalog(&mut s.begin()?))
    }

    fn put_meter(&self, def: &MeterDef) -> Result<Catalog, StoreError> {
        let def = def.clone();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let current: Catalog = dec(
                "meta",
                tx.query_one(
                    "SELECT value FROM meta WHERE key = 'catalog' FOR UPDATE",
                    &[],
                )?
                .get::<_, &[u8]>(0),
            )?;
            let Some(catalog) = crate::store::catalog_with(&current, &def)? else {
                return Ok(current);
            };
            let bytes = enc(&catalog)?;
            tx.execute(
                "UPDATE meta SET value = $1 WHERE key = 'catalog'",
                &[&bytes],
            )?;
            tx.execute(
                "INSERT INTO catalogs (version, catalog) VALUES ($1, $2)",
                &[&i(catalog.version), &bytes],
            )?;
            listen::notify(&mut tx, "tally_catalog", "")?;
            tx.commit()?;
            Ok(catalog)
        })
    }

    fn usage_accounts(
        &self,
        customer: &CustomerId,
        meter: Option<&MeterName>,
        period: Option<Period>,
    ) -> Result<Vec<Account>, StoreError> {
        let c = customer.as_str().to_owned();
        let m = meter.map(|m| m.as_str().to_owned());
        let p = period.map(|p| p.to_string());
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.query(
                "SELECT acct FROM accounts WHERE customer = $1 \
                 AND ($2::text IS NULL OR meter = $2) AND ($3::text IS NULL OR period = $3) \
                 ORDER BY customer, meter, period, id",
                &[&c, &m, &p],
            )?
            .iter()
            .map(|r| dec("accounts", r.get::<_, &[u8]>(0)))
            .collect()
        })
    }

    fn customers(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (prefix, after) = (prefix.to_owned(), after.to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT c FROM ( \
                   SELECT DISTINCT customer AS c FROM accounts WHERE customer IS NOT NULL \
                   UNION SELECT customer FROM customers) x \
                 WHERE starts_with(c, $1) AND ($2 = '' OR c > $2) ORDER BY c LIMIT $3",
                &[&prefix, &after, &limit],
            )?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
    }

    fn entries(
        &self,
        customer: Option<&CustomerId>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Transfer)>, StoreError> {
        let c = customer.map(|c| c.as_str().to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT pos, t FROM transfers WHERE pos > $1 AND ($2::text IS NULL OR customer = $2) \
                 ORDER BY pos LIMIT $3",
                &[&i(after), &c, &limit],
            )?;
            rows.iter()
                .map(|r| Ok((u(r.get(0)), dec("transfers", r.get::<_, &[u8]>(1))?)))
                .collect()
        })
    }

    fn quarantined(&self, after: u64, limit: usize) -> Result<Vec<QuarantineRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT rec FROM quarantine WHERE id > $1 ORDER BY id LIMIT $2",
                &[&i(after), &limit],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let rec: QuarantineRecord = dec("quarantine", r.get::<_, &[u8]>(0))?;
                rec.check()
                    .map_err(crate::store::corrupt_record("quarantine"))?;
                out.push(rec);
            }
            Ok(out)
        })
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            // One snapshot for every read below.
            tx.batch("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
            verify_in(&mut tx)
        })
    }

    fn outbox_appended(&self) -> u64 {
        self.outbox_appended
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn customer(&self, customer: &str) -> Result<Option<CustomerRecord>, StoreError> {
        let c = customer.to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            match tx.query_opt("SELECT rec FROM customers WHERE customer = $1", &[&c])? {
                Some(r) => Ok(Some(dec("customers", r.get::<_, &[u8]>(0))?)),
                None => Ok(None),
            }
        })
    }

    fn dest_names(
        &self,
        kind: crate::store::NameKind,
        keys: &[String],
    ) -> Result<Vec<(String, crate::store::DestNames)>, StoreError> {
        let (k, keys) = (kind.as_str(), keys.to_vec());
        self.run(move |s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT key, names FROM dest_names WHERE kind = $1 AND key = ANY($2) ORDER BY key",
                &[&k, &keys],
            )?;
            rows.iter()
                .map(|r| Ok((r.get(0), crate::store::names_dec(r.get::<_, &[u8]>(1))?)))
                .collect()
        })
    }

    fn put_dest_names(
        &self,
        kind: crate::store::NameKind,
        key: &str,
        names: &crate::store::DestNames,
    ) -> Result<(), StoreError> {
        let (k, key) = (kind.as_str(), key.to_owned());
        let blob = (!names.is_empty())
            .then(|| crate::store::names_enc(names))
            .transpose()?;
        self.run(move |s| {
            let mut tx = s.begin()?;
            match &blob {
                Some(b) => tx.execute(
                    "INSERT INTO dest_names (kind, key, names) VALUES ($1, $2, $3) \
                     ON CONFLICT (kind, key) DO UPDATE SET names = EXCLUDED.names",
                    &[&k, &key, b],
                )?,
                None => tx.execute(
                    "DELETE FROM dest_names WHERE kind = $1 AND key = $2",
                    &[&k, &key],
                )?,
            };
            tx.commit()?;
            Ok(())
        })
    }

    fn put_customer(&self, customer: &str, rec: &CustomerRecord) -> Result<(), StoreError> {
        let (c, blob, sc) = (
            customer.to_owned(),
            enc(rec)?,
            rec.stripe_customer_id.clone(),
        );
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.execute(
                "INSERT INTO customers (customer, stripe_customer, rec) VALUES ($1, $2, $3) \
                 ON CONFLICT (customer) DO UPDATE SET stripe_customer = EXCLUDED.stripe_customer, \
                 rec = EXCLUDED.rec",
                &[&c, &sc, &blob],
            )?;
            listen::notify(&mut tx, "tally_entitlements", &c)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn claim(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run(move |s| {
            let mut tx = s.begin()?;
            let got = tx.query_opt(
                "INSERT INTO claims (name, holder, until_ms) VALUES ($1, $2, $4) \
                 ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, \
                 until_ms = EXCLUDED.until_ms \
                 WHERE claims.holder = EXCLUDED.holder OR claims.until_ms <= $3 \
                 RETURNING holder",
                &[&name, &holder, &now_ms, &until_ms],
            )?;
            tx.commit()?;
            Ok(got.is_some())
        })
    }

    fn outbox_items(&self) -> Result<Vec<(String, String, i64, u64)>, StoreError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            let rows = tx.query(
                "SELECT customer, event_name, ts, value FROM outbox ORDER BY id",
                &[],
            )?;
            let mut out: Vec<(String, String, i64, u64)> = rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), u(r.get(3))))
                .collect();
            // Open buckets are owed too: they become rows when a forwarder seals them.
            for r in tx.query(
                "SELECT customer, rec FROM outbox_buckets ORDER BY customer, meter",
                &[],
            )? {
                let b: BucketRec = dec("outbox_buckets", r.get::<_, &[u8]>(1))?;
                for (ts, value) in b.open {
                    out.push((r.get(0), b.event_name.clone(), ts, value));
                }
            }
            Ok(out)
        })
    }
}

/// `ledger verify` on one snapshot: the redb store's checks, over these tables.
fn verify_in(tx: &mut Tx<'_>) -> Result<VerifyReport, StoreError> {
    let mut v = Verifier::new();
    // Batch records: (agent, epoch) → seqs; and the committed ones' (deltas, first transfer).
    let mut recorded: HashMap<(AgentId, u64), Vec<u64>> = HashMap::new();
    let mut batch_info: HashMap<(AgentId, u64, u64), Option<(u32, u64)>> = HashMap::new();
    for r in tx.query("SELECT agent, epoch, seq, rec FROM batches", &[])? {
        let key = (agent_from(r.get::<_, &[u8]>(0))?, u(r.get(1)));
        let seq = u(r.get(2));
        let rec: BatchRecord = dec("batches", r.get::<_, &[u8]>(3))?;
        rec.check()
            .map_err(crate::store::corrupt_record("batches"))?;
        recorded.entry(key).or_default().push(seq);
        batch_info.insert(
            (key.0, key.1, seq),
            (rec.outcome == BatchOutcome::Committed).then_some((rec.deltas, rec.first_transfer)),
        );
        v.batch();
    }
    let mut dedup: HashMap<(AgentId, u64), DedupState> = HashMap::new();
    for r in tx.query("SELECT agent, epoch, state FROM dedup", &[])? {
        let key = (agent_from(r.get::<_, &[u8]>(0))?, u(r.get(1)));
        let state: DedupState = dec("dedup", r.get::<_, &[u8]>(2))?;
        let seqs = recorded.remove(&key).unwrap_or_default();
        let done = state.done();
        if seqs.len() as u64 != done || seqs.iter().any(|s| !state.contains(*s)) {
            v.violation(format!(
                "agent {} epoch {}: dedup state ({done} done) and batch records ({}) differ",
                key.0,
                key.1,
                seqs.len()
            ));
        }
        dedup.insert(key, state);
    }
    for ((agent, epoch), _) in recorded {
        v.violation(format!(
            "agent {agent} epoch {epoch}: batches recorded without dedup state"
        ));
    }
    let adjustments: HashMap<String, u64> = tx
        .query("SELECT key, pos FROM adjustments", &[])?
        .iter()
        .map(|r| (r.get::<_, String>(0), u(r.get(1))))
        .collect();
    let mut grants: HashMap<String, u64> = HashMap::new();
    for r in tx.query("SELECT key, grant_rec FROM grants", &[])? {
        let g: crate::core::entitlements::Grant =
            entitlements::unjson("grants", r.get::<_, &[u8]>(1))?;
        grants.insert(r.get(0), g.position);
    }
    let mut after = 0i64;
    loop {
        let rows = tx.query(
            "SELECT pos, t FROM transfers WHERE pos > $1 ORDER BY pos LIMIT 10000",
            &[&after],
        )?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        for r in rows {
            let pos = u(r.get(0));
            let t: Transfer = dec("transfers", r.get::<_, &[u8]>(1))?;
            let trace = match &t.source {
                TransferSource::BatchRow {
                    agent,
                    epoch,
                    seq,
                    row,
                } => {
                    let rec = batch_info.get(&(*agent, *epoch, *seq)).copied().flatten();
                    ledger::trace_batch_row(
                        rec.map(|r| r.0),
                        dedup.get(&(*agent, *epoch)),
                        *seq,
                        *row,
                    )
                    .and_then(|()| match rec {
                        Some((_, first)) if first + u64::from(*row) == pos => Ok(()),
                        _ => Err(format!("position {pos} is not the batch's row {row}")),
                    })
                }
                TransferSource::Adjustment {
                    idempotency_key, ..
                } => match adjustments.get(idempotency_key) {
                    Some(p) if *p == pos => Ok(()),
                    Some(_) => Err(String::from("adjustment key names another transfer")),
                    None => Err(String::from("adjustment key is not recorded")),
                },
                TransferSource::Grant { idempotency_key } => match grants.get(idempotency_key) {
                    Some(p) if *p == pos => Ok(()),
                    Some(_) => Err(String::from("grant key names another transfer")),
                    None => Err(String::from("grant key is not recorded")),
                },
            };
            v.transfer(&t, trace);
        }
    }
    for r in tx.query("SELECT id, acct FROM accounts", &[])? {
        let idb: &[u8] = r.get(0);
        let id: [u8; 16] = idb.try_into().map_err(|_| StoreError::Corrupt {
            table: "accounts",
            detail: String::from("account id is not 16 bytes"),
        })?;
        let a: Account = dec("accounts", r.get::<_, &[u8]>(1))?;
        v.account(u128::from_be_bytes(id), &a);
    }
    // Σ outbox units (rows and open buckets) = the carried sent units per (customer, meter).
    let mut sums: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in tx.query(
        "SELECT customer, meter, sum(value)::bigint FROM outbox GROUP BY customer, meter",
        &[],
    )? {
        sums.insert((r.get(0), r.get(1)), u(r.get(2)));
    }
    for r in tx.query("SELECT customer, meter, rec FROM outbox_buckets", &[])? {
        let b: BucketRec = dec("outbox_buckets", r.get::<_, &[u8]>(2))?;
        *sums.entry((r.get(0), r.get(1))).or_default() += b.open.units();
    }
    for r in tx.query("SELECT customer, meter, carry FROM outbox_carry", &[])? {
        let (c, m): (String, String) = (r.get(0), r.get(1));
        let cv: Carry = dec("outbox_carry", r.get::<_, &[u8]>(2))?;
        let s = sums.remove(&(c.clone(), m.clone())).unwrap_or(0);
        if s != cv.sent_units {
            v.violation(format!(
                "outbox {c}/{m}: rows sum to {s} units, carry says {}",
                cv.sent_units
            ));
        }
        if !cv.net_scaled.is_sign_negative()
            && cv.net_scaled.floor() > rust_decimal::Decimal::from(s)
        {
            v.violation(format!(
                "outbox {c}/{m}: ⌊posted⌋ {} exceeds the {s} units written",
                cv.net_scaled.floor()
            ));
        }
    }
    for ((c, m), s) in sums {
        v.violation(format!("outbox {c}/{m}: {s} units without a carry record"));
    }
    Ok(v.finish())
}
