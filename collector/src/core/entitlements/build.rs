//! A customer's entitlements at `now_ms`: features with what gave them, and per meter the
//! limit, what grants add, what is used and leased, and what remains.
//!
//! Rules (decision 0062): overrides replace the plan's limit of a meter (or remove it); plan
//! features minus `remove_features`, plus `add_features`, plus Stripe features. Grants count in
//! the period they overlap; usage past `included` consumes them in priority, then expiry
//! (sooner first, never-expiring last), then effective time, then key order. An active grant
//! counts whole; an expired one only for what usage consumed before it expired, so expiry never
//! takes back what was already used. Remaining = included + granted − used − leased.

use super::model::{CustomerSettings, Grant, LimitDef, Plan, Reset};
use super::period::{PeriodRange, anchored_period, calendar_month};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::entitlements::{
    CustomerEntitlements, Enforcement, Feature, MeterLimit, Source,
};
use tally_protocol::names::{CustomerId, FeatureName, MeterName, PlanName};

/// One meter's numbers at `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterView {
    /// The meter.
    pub meter: MeterName,
    /// Included in the period.
    pub included: Decimal,
    /// What grants add in the period.
    pub granted: Decimal,
    /// `included + granted`.
    pub limit: Decimal,
    /// Used in the period.
    pub used: Decimal,
    /// Held by agents' leases, not yet used.
    pub leased: Decimal,
    /// `max(0, limit − used − leased)`.
    pub remaining: Decimal,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Plan or override.
    pub source: Source,
    /// The period.
    pub period: PeriodRange,
}

impl MeterView {
    /// True when more usage is allowed now (soft limits always allow).
    pub fn allowed(&self) -> bool {
        self.enforcement == Enforcement::Soft || self.remaining > Decimal::ZERO
    }
}

/// A customer's entitlements at `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerView {
    /// The customer.
    pub customer: CustomerId,
    /// Its plan.
    pub plan: Option<PlanName>,
    /// Features it has, with their source.
    pub features: Vec<(FeatureName, Source)>,
    /// Its limits.
    pub meters: Vec<MeterView>,
}

impl CustomerView {
    /// The wire form pushed to agents (`used` as the ledger knows it; leases travel apart).
    pub fn to_wire(&self) -> CustomerEntitlements {
        let features = self
            .features
            .iter()
            .map(|(name, source)| Feature {
                name: name.clone(),
                source: *source,
            })
            .collect::<Vec<_>>();
        let limits = self
            .meters
            .iter()
            .map(|m| MeterLimit {
                meter: m.meter.clone(),
                included: m.included,
                granted: m.granted,
                limit: m.limit,
                used: m.used,
                enforcement: m.enforcement,
                source: m.source,
                period_start_ms: m.period.start_ms,
                period_end_ms: m.period.end_ms,
            })
            .collect::<Vec<_>>();
        // The model checks bound both lists at MAX_ITEMS_PER_CUSTOMER; truncating is a
        // fallback that keeps the frame valid.
        CustomerEntitlements {
            customer: self.customer.clone(),
            plan: self.plan.clone(),
            features: bounded(features),
            limits: bounded(limits),
        }
    }
}

fn bounded<T, const N: usize>(mut v: Vec<T>) -> BoundedVec<T, N> {
    v.truncate(N);
    BoundedVec::new(v).unwrap_or_default()
}

/// The limits in force: the plan's, replaced or removed by overrides.
pub fn effective_limits(
    plan: Option<&Plan>,
    settings: &CustomerSettings,
) -> BTreeMap<MeterName, (LimitDef, Source)> {
    let mut out: BTreeMap<MeterName, (LimitDef, Source)> = plan
        .map(|p| {
            p.limits
                .iter()
                .map(|(m, l)| (m.clone(), (l.clone(), Source::Plan)))
                .collect()
        })
        .unwrap_or_default();
    for (m, l) in &settings.overrides.limits {
        match l {
            Some(l) => {
                out.insert(m.clone(), (l.clone(), Source::Override));
            }
            None => {
                out.remove(m);
            }
        }
    }
    out
}

/// The period a limit counts in at `now_ms`.
pub fn period_of(limit: &LimitDef, settings: &CustomerSettings, now_ms: i64) -> PeriodRange {
    match limit.reset {
        Reset::Calendar => calendar_month(now_ms),
        Reset::Anchor => anchored_period(now_ms, settings.anchor_day.unwrap_or(1)),
    }
}

/// Most earlier periods walked to carry grants' balances forward (36: three years monthly).
pub const MAX_CARRY_PERIODS: usize = 36;

/// Grants in consumption order: priority (lower first), then expiry (sooner first, never
/// last), then effective time, then key.
fn consumption_order(grants: &mut [&Grant]) {
    grants.sort_by(|a, b| {
        let (a, b) = (&a.request, &b.request);
        (
            a.priority,
            a.expires_at_ms.unwrap_or(i64::MAX),
            a.effective_at_ms,
        )
            .cmp(&(
                b.priority,
                b.expires_at_ms.unwrap_or(i64::MAX),
                b.effective_at_ms,
            ))
            .then_with(|| a.idempotency_key.cmp(&b.idempotency_key))
    });
}

fn counts_in(g: &Grant, period: PeriodRange, now_ms: i64) -> bool {
    let r = &g.request;
    r.effective_at_ms <= now_ms
        && r.effective_at_ms < period.end_ms
        && r.expires_at_ms.is_none_or(|e| e > period.start_ms)
}

/// What grants add to a meter's limit in `period` at `now_ms`, given the period's usage and
/// each grant's balance at the period's start (`balance(g)`; its quantity when it began in
/// this period). Usage past `included` consumes balances in [`consumption_order`]; an active
/// grant adds its whole balance, an expired one only what this period consumed of it.
pub fn granted_from(
    grants: &[&Grant],
    balance: impl Fn(&Grant) -> Decimal,
    included: Decimal,
    used: Decimal,
    period: PeriodRange,
    now_ms: i64,
) -> Decimal {
    let mut relevant: Vec<&Grant> = grants
        .iter()
        .copied()
        .filter(|g| counts_in(g, period, now_ms))
        .collect();
    consumption_order(&mut relevant);
    let mut over = (used - included).max(Decimal::ZERO);
    let mut total = Decimal::ZERO;
    for g in relevant {
        let amount = balance(g).max(Decimal::ZERO);
        let consumed = over.min(amount);
        over -= consumed;
        total += if g.active_at(now_ms) {
            amount
        } else {
            consumed
        };
    }
    total
}

/// [`granted_from`] with every grant whole (no earlier period consumed any of it).
pub fn granted(
    grants: &[&Grant],
    included: Decimal,
    used: Decimal,
    period: PeriodRange,
    now_ms: i64,
) -> Decimal {
    granted_from(
        grants,
        |g| g.request.quantity,
        included,
        used,
        period,
        now_ms,
    )
}

/// Each grant's balance at the start of `current`: its quantity less what usage past
/// `included` consumed of it in the earlier periods it counted in (SPEC §6.3: a grant is extra
/// quantity, used once, not offered again each period). Walks back at most
/// [`MAX_CARRY_PERIODS`] periods (`previous(p)` is the period before `p`), reading each one's
/// usage with `used`; the included quantity of the limit now is assumed for them (plan
/// history is not kept).
pub fn carried_balances(
    grants: &[&Grant],
    included: Decimal,
    current: PeriodRange,
    now_ms: i64,
    mut previous: impl FnMut(PeriodRange) -> PeriodRange,
    mut used: impl FnMut(PeriodRange) -> Decimal,
) -> BTreeMap<String, Decimal> {
    let mut balances: BTreeMap<String, Decimal> = grants
        .iter()
        .map(|g| (g.request.idempotency_key.clone(), g.request.quantity))
        .collect();
    let Some(earliest) = grants
        .iter()
        .map(|g| g.request.effective_at_ms)
        .filter(|t| *t < current.start_ms)
        .min()
    else {
        return balances;
    };
    let mut periods = Vec::new();
    let mut p = current;
    while periods.len() < MAX_CARRY_PERIODS {
        let prev = previous(p);
        if prev.end_ms <= earliest || prev.start_ms >= p.start_ms {
            break;
        }
        periods.push(prev);
        p = prev;
    }
    for p in periods.into_iter().rev() {
        let mut relevant: Vec<&Grant> = grants
            .iter()
            .copied()
            .filter(|g| counts_in(g, p, now_ms))
            .collect();
        if relevant.is_empty() {
            continue;
        }
        consumption_order(&mut relevant);
        let mut over = (used(p) - included).max(Decimal::ZERO);
        for g in relevant {
            let Some(b) = balances.get_mut(&g.request.idempotency_key) else {
                continue;
            };
            let consumed = over.min((*b).max(Decimal::ZERO));
            over -= consumed;
            *b -= consumed;
        }
    }
    balances
}

/// A customer's entitlements at `now_ms`. `used(meter, period)` and `leased(meter, period)`
/// give the period's ledger usage and the outstanding leases.
#[allow(clippy::too_many_arguments)]
pub fn build_customer(
    customer: &CustomerId,
    plan_name: Option<&PlanName>,
    plan: Option<&Plan>,
    settings: &CustomerSettings,
    grants: &[Grant],
    now_ms: i64,
    mut used: impl FnMut(&MeterName, PeriodRange) -> Decimal,
    mut leased: impl FnMut(&MeterName, PeriodRange) -> Decimal,
) -> CustomerView {
    let mut features: BTreeMap<FeatureName, Source> = BTreeMap::new();
    if let Some(p) = plan {
        for f in &p.features {
            if !settings.overrides.remove_features.contains(f) {
                features.insert(f.clone(), Source::Plan);
            }
        }
    }
    for f in &settings.overrides.add_features {
        features.entry(f.clone()).or_insert(Source::Override);
    }
    for f in &settings.stripe_features {
        features.entry(f.clone()).or_insert(Source::Stripe);
    }
    let meters = effective_limits(plan, settings)
        .into_iter()
        .map(|(meter, (def, source))| {
            let period = period_of(&def, settings, now_ms);
            let u = used(&meter, period);
            let l = leased(&meter, period);
            let mine: Vec<&Grant> = grants.iter().filter(|g| g.request.meter == meter).collect();
            let balances = carried_balances(
                &mine,
                def.included,
                period,
                now_ms,
                |p| period_of(&def, settings, p.start_ms.saturating_sub(1)),
                |p| used(&meter, p),
            );
            let g = granted_from(
                &mine,
                |g| {
                    balances
                        .get(&g.request.idempotency_key)
                        .copied()
                        .unwrap_or(g.request.quantity)
                },
                def.included,
                u,
                period,
                now_ms,
            );
            let limit = def.included.saturating_add(g);
            MeterView {
                remaining: (limit - u - l).max(Decimal::ZERO),
                meter,
                included: def.included,
                granted: g,
                limit,
                used: u,
                leased: l,
                enforcement: def.enforcement,
                source,
                period,
            }
        })
        .collect();
    CustomerView {
        customer: customer.clone(),
        plan: plan_name.cloned(),
        features: features.into_iter().collect(),
        meters,
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::GrantRequest;
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn grant(key: &str, qty: &str, priority: u32, eff: i64, exp: Option<i64>) -> Grant {
        Grant {
            request: GrantRequest {
                customer: CustomerId::new("acme").unwrap(),
                meter: MeterName::new("api_calls").unwrap(),
                quantity: d(qty),
                priority,
                effective_at_ms: eff,
                expires_at_ms: exp,
                idempotency_key: key.into(),
            },
            transfer_id: 0,
            position: 0,
            created_at_ms: 0,
        }
    }

    #[test]
    fn grants_count_while_active_and_keep_what_was_consumed() {
        let p = PeriodRange {
            start_ms: 0,
            end_ms: 1_000,
        };
        let a = grant("a", "100", 1, 0, Some(500));
        let b = grant("b", "50", 0, 0, None);
        let gs = [&a, &b];
        // Before any usage past included: both count whole.
        assert_eq!(granted(&gs, d("10"), d("5"), p, 100), d("150"));
        // b (priority 0) is consumed first; a expired at 500 with 20 consumed.
        assert_eq!(granted(&gs, d("10"), d("80"), p, 600), d("70"));
        // Not yet effective: not counted.
        let c = grant("c", "7", 0, 900, None);
        assert_eq!(granted(&[&c], d("0"), d("0"), p, 100), d("0"));
        // Expired before the period: not counted.
        let e = grant("e", "7", 0, -100, Some(-1));
        assert_eq!(granted(&[&e], d("0"), d("9"), p, 100), d("0"));
    }

    #[test]
    fn a_grant_consumed_in_one_period_is_not_offered_again_in_the_next() {
        // Periods of 1,000 ms: [0, 1000), [1000, 2000), [2000, 3000).
        let period = |t: i64| PeriodRange {
            start_ms: t.div_euclid(1000) * 1000,
            end_ms: t.div_euclid(1000) * 1000 + 1000,
        };
        let a = grant("a", "50", 0, 100, None);
        let b = grant("b", "20", 1, 100, None);
        let gs = [&a, &b];
        // Period 0 used 10 past the included 100: 10 of `a` gone. Period 1 used 55 past it:
        // the other 40 of `a` and 15 of `b`.
        let used = |p: PeriodRange| match p.start_ms {
            0 => d("110"),
            1000 => d("155"),
            _ => d("0"),
        };
        let now = 2500;
        let bal = carried_balances(
            &gs,
            d("100"),
            period(now),
            now,
            |p| period(p.start_ms - 1),
            used,
        );
        assert_eq!((bal["a"], bal["b"]), (d("0"), d("5")));
        // In period 2 only b's 5 remain on top of the included 100.
        let g = granted_from(
            &gs,
            |g| bal[&g.request.idempotency_key],
            d("100"),
            d("0"),
            period(now),
            now,
        );
        assert_eq!(g, d("5"));
        // A grant that begins in the current period is whole.
        let c = grant("c", "7", 0, 2100, None);
        let bal = carried_balances(
            &[&c],
            d("100"),
            period(now),
            now,
            |p| period(p.start_ms - 1),
            used,
        );
        assert_eq!(bal["c"], d("7"));
        // Usage below the included quantity consumes nothing.
        let bal = carried_balances(
            &gs,
            d("1000"),
            period(now),
            now,
            |p| period(p.start_ms - 1),
            used,
        );
        assert_eq!((bal["a"], bal["b"]), (d("50"), d("20")));
    }

    #[test]
    fn overrides_replace_and_remove() {
        let plan: Plan = serde_json::from_str(
            r#"{"features":["gpt4","sso"],"limits":{"api_calls":{"included":"1000","enforcement":"hard"},"tokens":{"included":"5","enforcement":"soft"}}}"#,
        )
        .unwrap();
        let mut s = CustomerSettings {
            overrides: serde_json::from_str(
            r#"{"add_features":["beta"],"remove_features":["sso"],"limits":{"api_calls":{"included":"20","enforcement":"hard"},"tokens":null}}"#,
        )
            .unwrap(),
            ..CustomerSettings::default()
        };
        s.stripe_features.insert(FeatureName::new("gpt4").unwrap());
        s.stripe_features.insert(FeatureName::new("vip").unwrap());
        let c = CustomerId::new("acme").unwrap();
        let v = build_customer(
            &c,
            None,
            Some(&plan),
            &s,
            &[],
            0,
            |_, _| d("3"),
            |_, _| d("4"),
        );
        let names: Vec<(&str, Source)> = v.features.iter().map(|(f, s)| (f.as_str(), *s)).collect();
        assert_eq!(
            names,
            [
                ("beta", Source::Override),
                ("gpt4", Source::Plan),
                ("vip", Source::Stripe)
            ]
        );
        assert_eq!(v.meters.len(), 1);
        let m = &v.meters[0];
        assert_eq!(
            (m.limit, m.remaining, m.source),
            (d("20"), d("13"), Source::Override)
        );
        assert_eq!(v.to_wire().limits[0].used, d("3"));
    }
}
