//! The entitlement calls on [`Agent`] (SPEC §3): answered from memory by the [`super::table`],
//! no network, never a lock shared with the collector session.

use super::decision::{ConsumeError, Consumed, DecidedBy, Decision, Limit};
use super::meter::{Booked, Freshness, Hold};
use super::table::MeterSlot;
use crate::agent::Shared;
use crate::error::RecordError;
use crate::{Agent, Event};
use rust_decimal::Decimal;
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn check_qty(qty: Decimal) -> Result<(), RecordError> {
    if qty.is_sign_negative() && !qty.is_zero() {
        return Err(RecordError::NegativeQuantity);
    }
    Ok(())
}

/// Records `qty` under the slot's usage key, resolved once per (customer, meter): the same as
/// [`Agent::record`] without looking the key up on every call. The key's id and catalog check
/// are cached in the slot's first line (decision 0112), so this reads only the accumulator.
#[inline]
fn record_slot(
    sh: &Shared,
    slot: &MeterSlot,
    qty: Decimal,
    now_ms: i64,
) -> Result<(), RecordError> {
    sh.agg
        .record_cached(slot.key_cache(), qty, now_ms, || match slot.key.get() {
            Some(k) => Ok(&**k),
            None => {
                let k = sh
                    .agg
                    .intern(slot.customer.as_str(), slot.meter.as_str(), &[])?;
                Ok(&**slot.key.get_or_init(|| k))
            }
        })
}

/// Prefetches the accumulator `record_slot` will write, by the key id kept in the slot's head
/// line (decisions 0112, 0129), so that its miss overlaps the lock-free line's; sets that hint
/// once the slot's key is resolved. Accounting never reads the hint.
#[inline]
fn warm(sh: &Shared, slot: &MeterSlot) {
    let hint = slot.key_hint();
    let h = hint.load(Ordering::Relaxed);
    if h != u32::MAX {
        sh.agg.prefetch(h);
    } else if let Some(id) = slot.key_cache().id() {
        hint.store(id, Ordering::Relaxed);
    }
}

fn consumed(t: &super::meter::Take, recorded: Decimal) -> Consumed {
    Consumed {
        allowed: t.allowed,
        recorded,
        remaining: t.remaining,
        decided_by: t.decided_by,
    }
}

/// Keeps a durable record's in-flight mark until it ends, even if the future is dropped (then
/// the usage counts as consumed: it may have reached the log).
struct Inflight<'a> {
    sh: &'a Shared,
    slot: &'a MeterSlot,
    booked: Booked,
    qty: Decimal,
    ok: Option<bool>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.sh.ent.end_inflight(
            self.slot,
            self.booked,
            self.qty,
            self.ok.unwrap_or(true),
            self.sh.hot_now_ms(),
        );
    }
}

impl Agent {
    /// Whether `customer` has `feature`, from memory: the snapshot's features, or the offline
    /// policy for a customer with no snapshot yet (whose snapshot is then asked for) or a stale
    /// one. No I/O, no allocation once the customer is known.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tally_agent::{Agent, DecidedBy};
    /// let dir = tempfile::tempdir()?;
    /// let agent = Agent::builder().data_dir(dir.path()).start().await?;
    /// // No collector ever answered: the offline policy (deny by default) decides.
    /// let d = agent.check("acme", "gpt4");
    /// assert!(!d.allowed);
    /// assert_eq!(d.decided_by, DecidedBy::NoSnapshot);
    /// # Ok(()) }
    /// ```
    pub fn check(&self, customer: &str, feature: &str) -> Decision {
        let sh = self.shared();
        sh.ent.check(customer, feature, sh.hot_now_ms())
    }

    /// The limit of `customer` on `meter`: limit, used, remaining, enforcement, staleness and
    /// what decides consumption now.
    pub fn limit(&self, customer: &str, meter: &str) -> Limit {
        let sh = self.shared();
        sh.ent.limit(customer, meter, sh.hot_now_ms())
    }

    /// Records `qty` of `meter` for `customer` (as [`Agent::record`]) only if allowed, atomically
    /// against concurrent callers on the same customer and meter. A denial is
    /// `Ok(Consumed { allowed: false, .. })`; an error means nothing was recorded.
    pub fn try_consume(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<Consumed, ConsumeError> {
        Ok(self.try_consume_inner(customer, meter, qty)?.0)
    }

    /// The lock-free answer when there is one, else the general path; `true` when a denial's
    /// answer from the collector is pending.
    #[inline]
    fn try_consume_inner(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<(Consumed, bool), ConsumeError> {
        check_qty(qty)?;
        let sh = self.shared();
        let now = sh.hot_now_ms();
        let warm = |slot: &MeterSlot| warm(sh, slot);
        let record = |slot: &MeterSlot| record_slot(sh, slot, qty, now);
        if let Some(r) = sh
            .ent
            .try_consume_lockfree(customer, meter, qty, now, warm, record)
        {
            let (decided_by, remaining) = r?;
            let c = Consumed {
                allowed: true,
                recorded: qty,
                remaining,
                decided_by,
            };
            return Ok((c, false));
        }
        let (t, pending) = sh
            .ent
            .try_consume_warm(customer, meter, qty, now, warm, record)?;
        Ok((
            consumed(&t, if t.allowed { qty } else { Decimal::ZERO }),
            pending,
        ))
    }

    /// Holds `qty` for work whose cost is known afterwards; [`Reservation::commit`] records the
    /// actual quantity, dropping the reservation gives the hold back. A denial is
    /// [`ConsumeError::Denied`].
    pub fn reserve(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<Reservation, ConsumeError> {
        self.reserve_inner(customer, meter, qty).map(|(r, _)| r)
    }

    fn reserve_inner(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<(Reservation, bool), ConsumeError> {
        check_qty(qty)?;
        let sh = self.shared();
        let (slot, t, pending) =
            sh.ent
                .take_slot(customer, meter, qty, Hold::Reserve, sh.hot_now_ms())?;
        if !t.allowed {
            return Err(ConsumeError::Denied {
                decided_by: t.decided_by,
                remaining: t.remaining,
                pending,
            });
        }
        Ok((
            Reservation {
                agent: self.clone(),
                slot,
                held: qty,
                booked: t.booked,
                decided_by: t.decided_by,
                done: false,
            },
            pending,
        ))
    }

    /// Runs `attempt` until it is no longer waiting for an answer of the collector (a new
    /// customer's snapshot, a lease) or the configured wait (default 100 ms) ran out.
    async fn waiting<T>(
        &self,
        mut attempt: impl FnMut() -> Result<(T, bool), ConsumeError>,
    ) -> Result<T, ConsumeError> {
        let sh = self.shared();
        let deadline = tokio::time::Instant::now() + sh.ent.config().wait;
        loop {
            let notified = sh.ent_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (v, pending) = attempt()?;
            if !pending || tokio::time::Instant::now() >= deadline {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(attempt()?.0);
            }
        }
    }

    /// What the agent knows of `customer`: plan, features, meters with accounting, staleness.
    pub fn describe(&self, customer: &str) -> super::table::CustomerView {
        let sh = self.shared();
        sh.ent.describe(customer, sh.hot_now_ms())
    }

    /// [`Agent::describe`], first waiting for a new customer's snapshot.
    pub async fn describe_wait(&self, customer: &str) -> super::table::CustomerView {
        let r = self
            .waiting(|| {
                let v = self.describe(customer);
                Ok((v.clone(), v.decided_by == Some(DecidedBy::NoSnapshot)))
            })
            .await;
        r.unwrap_or_else(|_| self.describe(customer))
    }

    /// The offline policy of `meter`.
    pub fn offline_policy(&self, meter: &str) -> super::OfflinePolicy {
        self.shared().ent.config().policy(meter)
    }

    /// [`Agent::check`], first waiting (up to the configured bound, default 100 ms) for the
    /// snapshot of a customer not seen before.
    pub async fn check_wait(&self, customer: &str, feature: &str) -> Decision {
        let r = self
            .waiting(|| {
                let d = self.check(customer, feature);
                Ok((d, d.decided_by == DecidedBy::NoSnapshot))
            })
            .await;
        r.unwrap_or_else(|_| self.check(customer, feature))
    }

    /// [`Agent::limit`], first waiting for a new customer's snapshot.
    pub async fn limit_wait(&self, customer: &str, meter: &str) -> Limit {
        let r = self
            .waiting(|| {
                let l = self.limit(customer, meter);
                Ok((l, l.decided_by == DecidedBy::NoSnapshot))
            })
            .await;
        r.unwrap_or_else(|_| self.limit(customer, meter))
    }

    /// [`Agent::try_consume`], waiting up to the bound for a new customer's snapshot or a
    /// first lease before it denies.
    pub async fn try_consume_wait(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<Consumed, ConsumeError> {
        self.waiting(|| self.try_consume_inner(customer, meter, qty))
            .await
    }

    /// [`Agent::reserve`], waiting up to the bound for a snapshot or lease before it denies.
    pub async fn reserve_wait(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<Reservation, ConsumeError> {
        let mut last = None;
        let r = self
            .waiting(|| match self.reserve_inner(customer, meter, qty) {
                Ok((r, _)) => Ok((Some(r), false)),
                Err(ConsumeError::Denied {
                    decided_by,
                    remaining,
                    pending,
                }) => {
                    last = Some(ConsumeError::Denied {
                        decided_by,
                        remaining,
                        pending,
                    });
                    Ok((None, pending))
                }
                Err(e) => Err(e),
            })
            .await?;
        match (r, last) {
            (Some(r), _) => Ok(r),
            (None, Some(e)) => Err(e),
            (None, None) => Err(ConsumeError::Record(RecordError::Closed)),
        }
    }

    /// [`Agent::try_consume_wait`], recording durably (as [`Agent::record_durable`]) before it
    /// returns `allowed: true`: what the sidecar's consume endpoint answers from. The lease it
    /// consumes under is not released while the record is in flight.
    pub async fn try_consume_durable(
        &self,
        customer: &str,
        meter: &str,
        qty: Decimal,
    ) -> Result<Consumed, ConsumeError> {
        check_qty(qty)?;
        let sh = self.shared();
        let (slot, t) = self
            .waiting(|| {
                let (slot, t, pending) =
                    sh.ent
                        .take_slot(customer, meter, qty, Hold::Consume, sh.hot_now_ms())?;
                Ok(((slot, t), pending))
            })
            .await?;
        if !t.allowed {
            return Ok(consumed(&t, Decimal::ZERO));
        }
        let mut guard = Inflight {
            sh,
            slot: &slot,
            booked: t.booked,
            qty,
            ok: None,
        };
        let r = self.record_durable(Event::new(customer, meter, qty)).await;
        guard.ok = Some(r.is_ok());
        drop(guard);
        r?;
        Ok(consumed(&t, qty))
    }
}

/// Quantity held for work whose cost is known afterwards. [`Reservation::commit`] records the
/// actual quantity (capped by what a hard limit still allows); dropping it gives the hold back.
pub struct Reservation {
    agent: Agent,
    slot: Arc<MeterSlot>,
    held: Decimal,
    booked: Booked,
    decided_by: DecidedBy,
    done: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("customer", &self.slot.customer)
            .field("meter", &self.slot.meter)
            .field("held", &self.held)
            .field("decided_by", &self.decided_by)
            .finish()
    }
}

impl Reservation {
    /// The quantity held.
    pub fn quantity(&self) -> Decimal {
        self.held
    }

    /// What decided the hold.
    pub fn decided_by(&self) -> DecidedBy {
        self.decided_by
    }

    /// The customer.
    pub fn customer(&self) -> &str {
        self.slot.customer.as_str()
    }

    /// The meter.
    pub fn meter(&self) -> &str {
        self.slot.meter.as_str()
    }

    fn freshness(&self, now_ms: i64) -> Freshness {
        self.agent
            .shared()
            .ent
            .freshness_of(self.slot.customer.as_str(), now_ms)
    }

    /// Records `actual` (as [`Agent::record`]). Beyond the hold it takes what the limit still
    /// allows; `recorded` says what was recorded and `allowed` is false when it was capped.
    pub fn commit(mut self, actual: Decimal) -> Result<Consumed, ConsumeError> {
        check_qty(actual)?;
        self.done = true;
        let sh = self.agent.shared();
        let now = sh.hot_now_ms();
        let fresh = self.freshness(now);
        let mut st = self.slot.lock(now);
        let (rec, t) = st.commit(self.booked, self.held, actual, fresh, now);
        if rec > Decimal::ZERO
            && let Err(e) = record_slot(sh, &self.slot, rec, now)
        {
            st.untake(t.booked, rec);
            return Err(e.into());
        }
        drop(st);
        sh.ent.after_take(&self.slot, &t, None);
        Ok(consumed(&t, rec))
    }

    /// [`Reservation::commit`], recorded durably (as [`Agent::record_durable`]) before it
    /// returns.
    pub async fn commit_durable(mut self, actual: Decimal) -> Result<Consumed, ConsumeError> {
        check_qty(actual)?;
        self.done = true;
        let sh = self.agent.shared().clone();
        let now = sh.hot_now_ms();
        let fresh = self.freshness(now);
        let (rec, t) = {
            let mut st = self.slot.lock(now);
            let (rec, t) = st.commit(self.booked, self.held, actual, fresh, now);
            if rec > Decimal::ZERO {
                st.begin_inflight(t.booked);
            }
            (rec, t)
        };
        sh.ent.after_take(&self.slot, &t, None);
        if rec.is_zero() {
            return Ok(consumed(&t, rec));
        }
        let mut guard = Inflight {
            sh: &sh,
            slot: &self.slot,
            booked: t.booked,
            qty: rec,
            ok: None,
        };
        let r = self
            .agent
            .record_durable(Event::new(
                self.slot.customer.as_str(),
                self.slot.meter.as_str(),
                rec,
            ))
            .await;
        guard.ok = Some(r.is_ok());
        drop(guard);
        r?;
        Ok(consumed(&t, rec))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            let now = self.agent.shared().hot_now_ms();
            self.slot.lock(now).unhold(self.booked, self.held);
        }
    }
}
