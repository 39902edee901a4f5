//! `GET /v1/usage` and `GET /v1/customers/{customer}/usage`: usage totals from the ledger.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::ledger::{Account, Period};
use axum::extract::{Path, RawQuery, State};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A customer's usage of a meter in a period.
#[derive(Serialize, ToSchema)]
pub struct Usage {
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// `YYYY-MM`.
    pub period: String,
    /// The usage, as a decimal string.
    #[schema(value_type = String)]
    pub quantity: Decimal,
    /// Events counted.
    pub events: u64,
}

pub(crate) fn sum_usage(accounts: &[Account]) -> (Decimal, u64) {
    accounts.iter().fold((Decimal::ZERO, 0), |(q, e), a| {
        (q + a.balance(), e + a.events)
    })
}

#[utoipa::path(get, path = "/v1/usage", tag = "usage",
    params(("customer" = String, Query), ("meter" = String, Query), ("period" = Option<String>, Query, description = "YYYY-MM; default the current month (UTC)")),
    responses((status = 200, body = Usage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn usage(State(shared): St, RawQuery(raw): RawQuery) -> ApiResult<Usage> {
    let q = query(raw)?;
    let c = customer(
        q.get("customer")
            .ok_or_else(|| ApiError::missing("customer"))?,
        "customer",
    )?;
    let m = meter_name(
        q.get("meter").ok_or_else(|| ApiError::missing("meter"))?,
        "meter",
    )?;
    let p = period(q.get("period"))?.unwrap_or_else(|| Period::of_ms(shared.now_ms()));
    let (c2, m2) = (c.clone(), m.clone());
    let accounts = blocking(&shared, move |s| {
        s.store.usage_accounts(&c2, Some(&m2), Some(p))
    })
    .await?;
    let (quantity, events) = sum_usage(&accounts);
    Ok(axum::Json(Usage {
        customer: c.to_string(),
        meter: m.to_string(),
        period: p.to_string(),
        quantity,
        events,
    }))
}

/// A customer's usage of every meter and period.
#[derive(Serialize, ToSchema)]
pub struct CustomerUsage {
    /// The customer.
    pub customer: String,
    /// One entry per meter and period.
    pub data: Vec<Usage>,
}

#[utoipa::path(get, path = "/v1/customers/{customer}/usage", tag = "usage",
    params(("customer" = String, Path), ("period" = Option<String>, Query)),
    responses((status = 200, body = CustomerUsage), (status = 400, body = ErrorBody)))]
pub(super) async fn customer_usage(
    State(shared): St,
    Path(c): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult<CustomerUsage> {
    let q = query(raw)?;
    let c = customer(&c, "customer")?;
    let p = period(q.get("period"))?;
    let c2 = c.clone();
    let accounts = blocking(&shared, move |s| s.store.usage_accounts(&c2, None, p)).await?;
    let mut by: BTreeMap<(String, String), Vec<Account>> = BTreeMap::new();
    for a in accounts {
        if let crate::core::ledger::AccountKey::Usage { meter, period, .. } = &a.key {
            by.entry((meter.to_string(), period.to_string()))
                .or_default()
                .push(a);
        }
    }
    let data = by
        .into_iter()
        .map(|((meter, period), accts)| {
            let (quantity, events) = sum_usage(&accts);
            Usage {
                customer: c.to_string(),
                meter,
                period,
                quantity,
                events,
            }
        })
        .collect();
    Ok(axum::Json(CustomerUsage {
        customer: c.to_string(),
        data,
    }))
}
