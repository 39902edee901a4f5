//! `GET /v1/customers` (search by key prefix) and `GET /v1/customers/{customer}` (settings and
//! Stripe mapping): what the console's Customers pages read, and scripts may too.

use super::errors::*;
use super::state::{St, blocking};
use axum::extract::{Path, RawQuery, State};
use serde::Serialize;
use utoipa::ToSchema;

/// Default page size of the customer listing.
const DEFAULT_LIMIT: u64 = 50;

/// A customer as listed: its key, settings and Stripe mapping.
#[derive(Serialize, ToSchema)]
pub struct CustomerSummary {
    /// Our customer key.
    pub customer: String,
    /// The Stripe customer its usage goes to; `cus_…` keys map to themselves. `null`: unmapped
    /// (its usage waits in the outbox).
    pub stripe_customer_id: Option<String>,
    /// The stored plan.
    pub plan: Option<String>,
    /// Orb `external_customer_id` set through the API (`null`: the configuration's default).
    pub orb_external_customer_id: Option<String>,
    /// Metronome customer id or alias set through the API (`null`: the default).
    pub metronome_customer_id: Option<String>,
}

/// A page of customers, in key order.
#[derive(Serialize, ToSchema)]
pub struct CustomerList {
    /// The customers.
    pub data: Vec<CustomerSummary>,
    /// True when more may follow.
    pub has_more: bool,
    /// Pass as `after` for the next page.
    pub next_after: Option<String>,
}

fn summary(
    customer: String,
    rec: Option<crate::store::CustomerRecord>,
    names: crate::store::DestNames,
) -> CustomerSummary {
    let rec = rec.unwrap_or_default();
    let stripe_customer_id = if customer.starts_with("cus_") {
        Some(customer.clone())
    } else {
        rec.stripe_customer_id
    };
    CustomerSummary {
        customer,
        stripe_customer_id,
        plan: rec.plan,
        orb_external_customer_id: names.orb,
        metronome_customer_id: names.metronome,
    }
}

fn names_of(
    s: &super::ApiState,
    key: &str,
) -> Result<crate::store::DestNames, crate::store::StoreError> {
    Ok(s.store
        .dest_names(crate::store::NameKind::Customer, &[key.to_owned()])?
        .pop()
        .map(|(_, n)| n)
        .unwrap_or_default())
}

#[utoipa::path(get, path = "/v1/customers", tag = "customers",
    params(("prefix" = Option<String>, Query, description = "keys that start with this (case-sensitive); default every key"),
           ("after" = Option<String>, Query, description = "the last key of the previous page"),
           ("limit" = Option<u64>, Query, description = "1 to 1000, default 50")),
    responses((status = 200, body = CustomerList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn list_customers(
    State(shared): St,
    RawQuery(raw): RawQuery,
) -> ApiResult<CustomerList> {
    let q = query(raw)?;
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    if prefix.len() > tally_protocol::names::CUSTOMER_MAX_BYTES
        || prefix.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "invalid_prefix",
            "prefix",
            "prefix must be at most 128 bytes without control characters",
        ));
    }
    let after = q.get("after").cloned().unwrap_or_default();
    let limit = number(&q, "limit", DEFAULT_LIMIT)?;
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            "limit must be 1 to 1000",
        ));
    }
    let limit = limit as usize;
    let rows = blocking(&shared, move |s| {
        let keys = s.store.customers(&prefix, &after, limit)?;
        keys.into_iter()
            .map(|k| {
                let rec = s.store.customer(&k)?;
                let names = names_of(s, &k)?;
                Ok(summary(k, rec, names))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    Ok(axum::Json(CustomerList {
        has_more: rows.len() == limit,
        next_after: rows.last().map(|r| r.customer.clone()),
        data: rows,
    }))
}

#[utoipa::path(get, path = "/v1/customers/{customer}", tag = "customers", params(("customer" = String, Path)),
    responses((status = 200, body = CustomerSummary), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_customer(
    State(shared): St,
    Path(c): Path<String>,
) -> ApiResult<CustomerSummary> {
    let c = customer(&c, "customer")?;
    let key = c.as_str().to_owned();
    let found = blocking(&shared, move |s| {
        let rec = s.store.customer(&key)?;
        let names = names_of(s, &key)?;
        let known = rec.is_some()
            || !names.is_empty()
            || s.store
                .customers(&key, "", 1)?
                .first()
                .is_some_and(|k| *k == key);
        Ok((rec, known, names))
    })
    .await?;
    match found {
        (rec, true, names) => Ok(axum::Json(summary(c.as_str().to_owned(), rec, names))),
        (_, false, _) => Err(ApiError::not_found(
            "resource_missing",
            format!("no customer {}", c.as_str()),
        )),
    }
}
