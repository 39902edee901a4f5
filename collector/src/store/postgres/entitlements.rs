//! Entitlements ([`EntitlementStore`]) and enrolment ([`EnrolmentStore`]) on PostgreSQL.
//!
//! Values are the redb store's: JSON for plans, settings, grants and leases; postcard for
//! tokens and enrolments. A grant posts its transfer under the ledger lock, like an ingest.
//! Writers of plans, settings and grants notify `tally_entitlements` (payload: the customer, or
//! empty for every customer), so other collectors push the change to their agents
//! ([`super::listen`]).

use super::pool::Tx;
use super::{PgStore, PgTxn, dec, enc, i, read_catalog, u};
use crate::core::dedup::DedupState;
use crate::core::entitlements::lease::{Lease, LeaseBookLimits, LeaseChange, LeaseCounters};
use crate::core::entitlements::period::PeriodRange;
use crate::core::entitlements::{CustomerSettings, Grant, GrantRequest, Plan};
use crate::core::ledger::{self, Rejection, WorkingSet};
use crate::core::registry::{AgentRecord, EnrollToken, Enrolment, MAX_ENROLL_TOKENS};
use crate::store::entitlements::{
    EntitlementStore, GrantOutcome, LeaseRows, MAX_GRANTS_PER_CUSTOMER, release_in, request_in,
    tick_in,
};
use crate::store::{EnrolmentStore, StoreError};
use rust_decimal::Decimal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use tally_protocol::batch::AgentId;
use tally_protocol::entitlements::{LeaseGrant, LeaseRelease, LeaseRequest};
use tally_protocol::error::ErrorCode;
use tally_protocol::names::{CustomerId, MeterName, PlanName};

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Invariant(format!("encode: {e}")))
}

pub(crate) fn unjson<T: DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

/// The lease rows of one PostgreSQL transaction (see [`LeaseRows`]). A request locks its
/// limit's row in `lease_limits`; every statement that reads leases to change them locks them
/// (`FOR UPDATE`, in id order, so two operations never deadlock on them). Ingest holds the
/// ledger lock and then its agents' leases; lease operations never take the ledger lock.
pub(crate) struct PgLeases<'t, 'a> {
    pub(crate) tx: &'t mut Tx<'a>,
    /// Dedup states this transaction changed and has not written yet (an ingest's).
    pub(crate) pending: Option<&'t HashMap<(AgentId, u64), DedupState>>,
}

fn leases_of(rows: Vec<postgres::Row>) -> Result<Vec<Lease>, StoreError> {
    rows.iter()
        .map(|r| unjson("leases", r.get::<_, &[u8]>(0)))
        .collect()
}

impl LeaseRows for PgLeases<'_, '_> {
    fn lock_limit(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Vec<Lease>, StoreError> {
        let (c, m) = (customer.as_str(), meter.as_str());
        self.tx.execute(
            "INSERT INTO lease_limits (customer, meter) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&c, &m],
        )?;
        self.tx.query_one(
            "SELECT 1 FROM lease_limits WHERE customer = $1 AND meter = $2 FOR UPDATE",
            &[&c, &m],
        )?;
        leases_of(self.tx.query(
            "SELECT lease FROM leases WHERE customer = $1 AND meter = $2 ORDER BY id FOR UPDATE",
            &[&c, &m],
        )?)
    }

    fn of_agents(&mut self, agents: &[AgentId]) -> Result<Vec<Lease>, StoreError> {
        let a: Vec<&[u8]> = agents.iter().map(|a| a.0.as_slice()).collect();
        leases_of(self.tx.query(
            "SELECT lease FROM leases WHERE agent = ANY($1) ORDER BY id FOR UPDATE",
            &[&a],
        )?)
    }

    fn due(&mut self, before_ms: i64) -> Result<Vec<Lease>, StoreError> {
        leases_of(self.tx.query(
            "SELECT lease FROM leases WHERE reclaimed_at IS NULL AND expires_at <= $1 \
             ORDER BY id FOR UPDATE SKIP LOCKED",
            &[&before_ms],
        )?)
    }

    fn forget_tombstones(&mut self, before_ms: i64) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM leases WHERE reclaimed_at < $1", &[&before_ms])?;
        Ok(())
    }

    fn watermark(&mut self, agent: AgentId, epoch: u64) -> Result<u64, StoreError> {
        if let Some(s) = self.pending.and_then(|p| p.get(&(agent, epoch))) {
            return Ok(s.watermark);
        }
        match self.tx.query_opt(
            "SELECT state FROM dedup WHERE agent = $1 AND epoch = $2",
            &[&agent.0.as_slice(), &i(epoch)],
        )? {
            Some(r) => Ok(dec::<DedupState>("dedup", r.get::<_, &[u8]>(0))?.watermark),
            None => Ok(0),
        }
    }

    fn used(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError> {
        let tx = std::cell::RefCell::new(&mut *self.tx);
        crate::store::entitlements::used_with(
            customer,
            meter,
            period,
            |c, m, p| {
                tx.borrow_mut()
                    .query(
                        "SELECT acct FROM accounts WHERE customer = $1 AND meter = $2 \
                         AND period = $3",
                        &[&c.as_str(), &m.as_str(), &p.to_string()],
                    )?
                    .iter()
                    .map(|r| dec("accounts", r.get::<_, &[u8]>(0)))
                    .collect()
            },
            |c, after, n| {
                let n = i64::try_from(n).unwrap_or(i64::MAX);
                tx.borrow_mut()
                    .query(
                        "SELECT pos, t FROM transfers WHERE customer = $1 AND pos > $2 \
                         ORDER BY pos LIMIT $3",
                        &[&c.as_str(), &i(after), &n],
                    )?
                    .iter()
                    .map(|r| Ok((u(r.get(0)), dec("transfers", r.get::<_, &[u8]>(1))?)))
                    .collect()
            },
        )
    }

    fn count(&mut self) -> Result<usize, StoreError> {
        let n: i64 = self
            .tx
            .query_one("SELECT count(*) FROM leases", &[])?
            .get(0);
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn next_id(&mut self) -> Result<u64, StoreError> {
        let n: i64 = self
            .tx
            .query_one("SELECT nextval('lease_ids')", &[])?
            .get(0);
        Ok(u(n))
    }

    fn write(&mut self, changes: &[LeaseChange]) -> Result<(), StoreError> {
        for c in changes {
            match c {
                LeaseChange::Put(l) => put_lease(self.tx, l)?,
                LeaseChange::Delete(id) => {
                    self.tx
                        .execute("DELETE FROM leases WHERE id = $1", &[&i(*id)])?;
                }
            }
        }
        Ok(())
    }
}

fn put_lease(tx: &mut Tx<'_>, l: &Lease) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO leases (id, lease, agent, customer, meter, expires_at, reclaimed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (id) DO UPDATE SET lease = EXCLUDED.lease, agent = EXCLUDED.agent, \
         customer = EXCLUDED.customer, meter = EXCLUDED.meter, \
         expires_at = EXCLUDED.expires_at, reclaimed_at = EXCLUDED.reclaimed_at",
        &[
            &i(l.id),
            &json(l)?,
            &l.agent.0.as_slice(),
            &l.customer.as_str(),
            &l.meter.as_str(),
            &l.expires_at_ms,
            &l.reclaimed_at_ms,
        ],
    )?;
    Ok(())
}

/// Fills the lookup columns of lease rows kept before migration 3 (from their JSON).
pub(crate) fn fill_lease_columns(tx: &mut Tx<'_>) -> Result<(), StoreError> {
    let old = leases_of(tx.query(
        "SELECT lease FROM leases WHERE customer IS NULL ORDER BY id",
        &[],
    )?)?;
    for l in &old {
        put_lease(tx, l)?;
    }
    Ok(())
}

/// Advisory lock key serializing enrolment-token writers ("tallytok").
const TOKEN_LOCK: i64 = 0x7461_6c6c_7974_6f6b;

impl EntitlementStore for PgStore {
    fn plan(&self, name: &PlanName) -> Result<Option<Plan>, StoreError> {
        let n = name.as_str().to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            match tx.query_opt("SELECT plan FROM plans WHERE name = $1", &[&n])? {
                Some(r) => Ok(Some(unjson("plans", r.get::<_, &[u8]>(0))?)),
                None => Ok(None),
            }
        })
    }

    fn put_plan(&self, name: &PlanName, plan: &Plan) -> Result<(), StoreError> {
        let (n, blob) = (name.as_str().to_owned(), json(plan)?);
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.execute(
                "INSERT INTO plans (name, plan) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET plan = EXCLUDED.plan",
                &[&n, &blob],
            )?;
            super::listen::notify(&mut tx, "tally_entitlements", "")?;
            tx.commit()?;
            Ok(())
        })
    }

    fn settings(&self, customer: &CustomerId) -> Result<CustomerSettings, StoreError> {
        let c = customer.as_str().to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            match tx.query_opt(
                "SELECT settings FROM ent_customers WHERE customer = $1",
                &[&c],
            )? {
                Some(r) => unjson("ent_customers", r.get::<_, &[u8]>(0)),
                None => Ok(CustomerSettings::default()),
            }
        })
    }

    fn put_settings(&self, customer: &CustomerId, st: &CustomerSettings) -> Result<(), StoreError> {
        let (c, blob) = (customer.as_str().to_owned(), json(st)?);
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.execute(
                "INSERT INTO ent_customers (customer, settings) VALUES ($1, $2) \
                 ON CONFLICT (customer) DO UPDATE SET settings = EXCLUDED.settings",
                &[&c, &blob],
            )?;
            super::listen::notify(&mut tx, "tally_entitlements", &c)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn grant(&self, req: &GrantRequest, now_ms: i64) -> Result<GrantOutcome, StoreError> {
        let req = req.clone();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let outcome = {
                let mut t = PgTxn::open(&mut tx)?;
                if let Some(r) = t.tx.query_opt(
                    "SELECT grant_rec FROM grants WHERE key = $1",
                    &[&req.idempotency_key],
                )? {
                    let stored: Grant = unjson("grants", r.get::<_, &[u8]>(0))?;
                    return Ok(match stored.request.differs_from(&req) {
                        None => GrantOutcome::Exists(stored),
                        Some(f) => GrantOutcome::ExistsWithDifferent(f),
                    });
                }
                let catalog = read_catalog(t.tx)?;
                if catalog.meter(req.meter.as_str()).is_none() {
                    return Ok(GrantOutcome::Rejected(Rejection {
                        code: ErrorCode::UnknownMeter,
                        row: None,
                        message: format!("meter {} is not in the catalog", req.meter),
                    }));
                }
                let n: i64 =
                    t.tx.query_one(
                        "SELECT count(*) FROM grants WHERE customer = $1",
                        &[&req.customer.as_str()],
                    )?
                    .get(0);
                if usize::try_from(n).unwrap_or(usize::MAX) >= MAX_GRANTS_PER_CUSTOMER {
                    return Ok(GrantOutcome::Rejected(Rejection {
                        code: ErrorCode::Overloaded,
                        row: None,
                        message: format!("a customer has at most {MAX_GRANTS_PER_CUSTOMER} grants"),
                    }));
                }
                let mut ws = WorkingSet::new();
                let posting = match ledger::post_grant(
                    &mut ws,
                    &mut t,
                    &req.customer,
                    &req.meter,
                    req.quantity,
                    &req.idempotency_key,
                    now_ms,
                )? {
                    Ok(p) => p,
                    Err(r) => return Ok(GrantOutcome::Rejected(r)),
                };
                let Some(first) = posting.transfers.first() else {
                    return Err(StoreError::Invariant(String::from("empty grant posting")));
                };
                let transfer_id = first.id;
                let position = t.append_posting(&posting)?;
                ws.assert_balanced();
                t.write_accounts(&ws)?;
                let g = Grant {
                    request: req.clone(),
                    transfer_id,
                    position,
                    created_at_ms: now_ms,
                };
                t.tx.execute(
                    "INSERT INTO grants (key, customer, grant_rec) VALUES ($1, $2, $3)",
                    &[&req.idempotency_key, &req.customer.as_str(), &json(&g)?],
                )?;
                t.flush()?;
                GrantOutcome::Created(g)
            };
            if let GrantOutcome::Created(_) = &outcome {
                super::listen::notify(&mut tx, "tally_entitlements", req.customer.as_str())?;
            }
            tx.commit()?;
            Ok(outcome)
        })
    }

    fn grants(&self, customer: &CustomerId) -> Result<Vec<Grant>, StoreError> {
        let c = customer.as_str().to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.query(
                "SELECT grant_rec FROM grants WHERE customer = $1 ORDER BY key",
                &[&c],
            )?
            .iter()
            .map(|r| unjson("grants", r.get::<_, &[u8]>(0)))
            .collect()
        })
    }

    fn used(
        &self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError> {
        crate::store::entitlements::used_in_period(self, customer, meter, period)
    }

    fn customers_for_stripe(&self, stripe_customer: &str) -> Result<Vec<CustomerId>, StoreError> {
        let sc = stripe_customer.to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let mut out: Vec<CustomerId> = CustomerId::new(&sc).into_iter().collect();
            for r in tx.query(
                "SELECT customer FROM customers WHERE stripe_customer = $1 ORDER BY customer",
                &[&sc],
            )? {
                if let Ok(c) = CustomerId::new(r.get::<_, &str>(0))
                    && !out.contains(&c)
                {
                    out.push(c);
                }
            }
            Ok(out)
        })
    }

    fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            tx.query("SELECT lease FROM leases ORDER BY id", &[])?
                .iter()
                .map(|r| unjson("leases", r.get::<_, &[u8]>(0)))
                .collect()
        })
    }

    fn customer_leases(&self, customer: &CustomerId) -> Result<Vec<Lease>, StoreError> {
        let c = customer.as_str().to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            leases_of(tx.query(
                "SELECT lease FROM leases WHERE customer = $1 ORDER BY id",
                &[&c],
            )?)
        })
    }

    fn lease_request(
        &self,
        agent: AgentId,
        req: &LeaseRequest,
        limit: Decimal,
        period: PeriodRange,
        limits: LeaseBookLimits,
        now_ms: i64,
    ) -> Result<(LeaseGrant, LeaseCounters), StoreError> {
        let req = req.clone();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let out = request_in(
                &mut PgLeases {
                    tx: &mut tx,
                    pending: None,
                },
                agent,
                &req,
                limit,
                period,
                limits,
                now_ms,
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn lease_release(
        &self,
        agent: AgentId,
        rel: &LeaseRelease,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError> {
        let rel = rel.clone();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let out = release_in(
                &mut PgLeases {
                    tx: &mut tx,
                    pending: None,
                },
                agent,
                &rel,
                limits,
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn lease_tick(
        &self,
        now_ms: i64,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            let out = tick_in(
                &mut PgLeases {
                    tx: &mut tx,
                    pending: None,
                },
                now_ms,
                limits,
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn ingest_overshoot(&self) -> Decimal {
        self.lease_overshoot()
    }
}

impl EnrolmentStore for PgStore {
    fn create_enroll_token(&self, t: &EnrollToken, now_ms: i64) -> Result<bool, StoreError> {
        let (id, hash, blob) = (t.id.clone(), t.hash.to_vec(), enc(t)?);
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.batch(&format!("SELECT pg_advisory_xact_lock({TOKEN_LOCK})"))?;
            if tx
                .query_opt(
                    "SELECT 1 FROM enroll_tokens WHERE id = $1 OR hash = $2",
                    &[&id, &hash],
                )?
                .is_some()
            {
                return Ok(false);
            }
            let n: i64 = tx
                .query_one("SELECT count(*) FROM enroll_tokens", &[])?
                .get(0);
            if usize::try_from(n).unwrap_or(usize::MAX) >= MAX_ENROLL_TOKENS {
                // Make room: drop spent tokens (revoked, expired or used up).
                let mut spent = Vec::new();
                for r in tx.query("SELECT id, tok FROM enroll_tokens", &[])? {
                    let tok: EnrollToken = dec("enroll_tokens", r.get::<_, &[u8]>(1))?;
                    if tok.usable(now_ms).is_err() {
                        spent.push(r.get::<_, String>(0));
                    }
                }
                tx.execute("DELETE FROM enroll_tokens WHERE id = ANY($1)", &[&spent])?;
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM enroll_tokens", &[])?
                    .get(0);
                if usize::try_from(n).unwrap_or(usize::MAX) >= MAX_ENROLL_TOKENS {
                    return Err(StoreError::Invariant(format!(
                        "{MAX_ENROLL_TOKENS} usable enrolment tokens exist; revoke some first"
                    )));
                }
            }
            tx.execute(
                "INSERT INTO enroll_tokens (id, hash, tok) VALUES ($1, $2, $3)",
                &[&id, &hash, &blob],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn enroll_tokens(&self) -> Result<Vec<EnrollToken>, StoreError> {
        self.run(|s| {
            let mut tx = s.begin()?;
            tx.query("SELECT tok FROM enroll_tokens ORDER BY id", &[])?
                .iter()
                .map(|r| dec("enroll_tokens", r.get::<_, &[u8]>(0)))
                .collect()
        })
    }

    fn enroll_token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<EnrollToken>, StoreError> {
        let h = hash.to_vec();
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.query_opt("SELECT tok FROM enroll_tokens WHERE hash = $1", &[&h])?
                .map(|r| dec("enroll_tokens", r.get::<_, &[u8]>(0)))
                .transpose()
        })
    }

    fn revoke_enroll_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<EnrollToken>, StoreError> {
        let id = id.to_owned();
        self.run(move |s| {
            let mut tx = s.begin()?;
            let Some(mut tok): Option<EnrollToken> = tx
                .query_opt(
                    "SELECT tok FROM enroll_tokens WHERE id = $1 FOR UPDATE",
                    &[&id],
                )?
                .map(|r| dec("enroll_tokens", r.get::<_, &[u8]>(0)))
                .transpose()?
            else {
                return Ok(None);
            };
            if tok.revoked_at_ms.is_none() {
                tok.revoked_at_ms = Some(now_ms);
                tx.execute(
                    "UPDATE enroll_tokens SET tok = $2 WHERE id = $1",
                    &[&id, &enc(&tok)?],
                )?;
            }
            tx.commit()?;
            Ok(Some(tok))
        })
    }

    fn enrol(
        &self,
        rec: &AgentRecord,
        token_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<Result<EnrollToken, ErrorCode>, StoreError> {
        let (agent, blob, h) = (rec.id.0.to_vec(), enc(rec)?, token_hash.to_vec());
        self.run(move |s| {
            let mut tx = s.begin()?;
            // The row lock makes two agents racing for a single-use token take turns.
            let Some(mut tok): Option<EnrollToken> = tx
                .query_opt(
                    "SELECT tok FROM enroll_tokens WHERE hash = $1 FOR UPDATE",
                    &[&h],
                )?
                .map(|r| dec("enroll_tokens", r.get::<_, &[u8]>(0)))
                .transpose()?
            else {
                return Ok(Err(ErrorCode::InvalidEnrollToken));
            };
            if let Err(code) = tok.usable(now_ms) {
                return Ok(Err(code));
            }
            tok.uses += 1;
            tx.execute(
                "UPDATE enroll_tokens SET tok = $2 WHERE id = $1",
                &[&tok.id, &enc(&tok)?],
            )?;
            tx.execute(
                "INSERT INTO agents (id, rec) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET rec = EXCLUDED.rec",
                &[&agent, &blob],
            )?;
            let enrolment = Enrolment {
                token_id: tok.id.clone(),
                labels: tok.labels.clone(),
            };
            tx.execute(
                "INSERT INTO agent_enrolment (agent, rec) VALUES ($1, $2) \
                 ON CONFLICT (agent) DO UPDATE SET rec = EXCLUDED.rec",
                &[&agent, &enc(&enrolment)?],
            )?;
            tx.commit()?;
            Ok(Ok(tok))
        })
    }

    fn enrolment(&self, agent: AgentId) -> Result<Option<Enrolment>, StoreError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.query_opt(
                "SELECT rec FROM agent_enrolment WHERE agent = $1",
                &[&agent.0.as_slice()],
            )?
            .map(|r| dec("agent_enrolment", r.get::<_, &[u8]>(0)))
            .transpose()
        })
    }
}
