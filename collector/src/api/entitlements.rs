//! `GET /v1/entitlements/{customer}`: per feature allowed and its source; per meter allowed,
//! included, granted, used, leased, remaining, period and enforcement — what agents are told.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::entitlements::CustomerView;
use axum::extract::{Path, State};
use serde::Serialize;
use std::collections::BTreeMap;
use tally_protocol::entitlements::{Enforcement, Source};
use utoipa::ToSchema;

/// A feature the customer has.
#[derive(Serialize, ToSchema)]
pub struct FeatureAnswer {
    /// Always true (features not listed are denied).
    pub allowed: bool,
    /// `plan`, `override` or `stripe`.
    pub source: String,
}

/// A metered limit now.
#[derive(Serialize, ToSchema)]
pub struct MeterAnswer {
    /// Whether more usage is allowed now.
    pub allowed: bool,
    /// Decimal strings.
    pub included: String,
    /// What active grants add.
    pub granted: String,
    /// Used in the period (the ledger).
    pub used: String,
    /// Held by agents' leases, not yet used.
    pub leased: String,
    /// `max(0, included + granted − used − leased)`.
    pub remaining: String,
    /// `hard` or `soft`.
    pub enforcement: String,
    /// `plan` or `override`.
    pub source: String,
    /// `[start, end)`, Unix seconds.
    pub period: PeriodAnswer,
}

/// A period.
#[derive(Serialize, ToSchema)]
pub struct PeriodAnswer {
    /// First second.
    pub start: i64,
    /// First second after it.
    pub end: i64,
}

/// `GET /v1/entitlements/{customer}`.
#[derive(Serialize, ToSchema)]
pub struct EntitlementsAnswer {
    /// The customer.
    pub customer: String,
    /// Its plan.
    pub plan: Option<String>,
    /// Features it has.
    pub features: BTreeMap<String, FeatureAnswer>,
    /// Its limits per meter.
    pub meters: BTreeMap<String, MeterAnswer>,
}

fn source(s: Source) -> String {
    String::from(match s {
        Source::Plan => "plan",
        Source::Override => "override",
        Source::Stripe => "stripe",
    })
}

impl EntitlementsAnswer {
    pub(crate) fn of(v: &CustomerView) -> Self {
        EntitlementsAnswer {
            customer: v.customer.to_string(),
            plan: v.plan.as_ref().map(ToString::to_string),
            features: v
                .features
                .iter()
                .map(|(f, s)| {
                    (
                        f.to_string(),
                        FeatureAnswer {
                            allowed: true,
                            source: source(*s),
                        },
                    )
                })
                .collect(),
            meters: v
                .meters
                .iter()
                .map(|m| {
                    (
                        m.meter.to_string(),
                        MeterAnswer {
                            allowed: m.allowed(),
                            included: m.included.to_string(),
                            granted: m.granted.to_string(),
                            used: m.used.to_string(),
                            leased: m.leased.to_string(),
                            remaining: m.remaining.to_string(),
                            enforcement: String::from(match m.enforcement {
                                Enforcement::Hard => "hard",
                                Enforcement::Soft => "soft",
                            }),
                            source: source(m.source),
                            period: PeriodAnswer {
                                start: m.period.start_ms.div_euclid(1000),
                                end: m.period.end_ms.div_euclid(1000),
                            },
                        },
                    )
                })
                .collect(),
        }
    }
}

#[utoipa::path(get, path = "/v1/entitlements/{customer}", tag = "entitlements", params(("customer" = String, Path)),
    responses((status = 200, body = EntitlementsAnswer), (status = 400, body = ErrorBody)))]
pub(super) async fn get_entitlements(
    State(shared): St,
    Path(c): Path<String>,
) -> ApiResult<EntitlementsAnswer> {
    let c = customer(&c, "customer")?;
    let ent = shared.entitlements()?;
    let v = blocking(&shared, move |_| ent.view(&c)).await?;
    Ok(axum::Json(EntitlementsAnswer::of(&v)))
}

/// Checks a customer's plan exists and builds its new entitlement settings (`None`: nothing
/// of them changes). Used by `PUT /v1/customers/{customer}`.
pub(crate) async fn customer_settings(
    shared: &std::sync::Arc<super::ApiState>,
    c: &tally_protocol::names::CustomerId,
    plan: Option<&str>,
    overrides: Option<crate::core::entitlements::Overrides>,
    anchor_day: Option<u8>,
) -> Result<Option<crate::core::entitlements::CustomerSettings>, ApiError> {
    let ent = shared.entitlements()?;
    if let Some(p) = plan {
        let name = super::plans::plan_name(p)?;
        let e = ent.clone();
        if blocking(shared, move |_| e.plan(&name)).await?.is_none() {
            return Err(ApiError::invalid(
                "unknown_plan",
                "plan",
                format!("no such plan: {p} (create it with PUT /v1/plans/{p})"),
            ));
        }
    }
    if overrides.is_none() && anchor_day.is_none() {
        return Ok(None);
    }
    let cust = c.clone();
    let mut s = blocking(shared, move |_| ent.settings(&cust)).await?;
    if let Some(o) = overrides {
        s.overrides = o;
    }
    if anchor_day.is_some() {
        s.anchor_day = anchor_day;
    }
    s.check()
        .map_err(|e| ApiError::invalid("invalid_overrides", "overrides", e.to_string()))?;
    Ok(Some(s))
}

/// Applies a verified, first-seen Stripe event to entitlements (summary updates).
pub(crate) async fn apply_stripe_event(
    shared: &std::sync::Arc<super::ApiState>,
    raw: &[u8],
) -> Result<(), ApiError> {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return Ok(());
    };
    let ent = shared.entitlements()?;
    let n = blocking(shared, move |_| ent.apply_stripe_event(&event)).await?;
    tracing::debug!(customers = n, "stripe entitlements applied");
    Ok(())
}

/// `POST /v1/customers/{customer}/stripe-entitlements/refresh`.
#[derive(Serialize, ToSchema)]
pub struct RefreshAnswer {
    /// Our customer.
    pub customer: String,
    /// The Stripe customer asked.
    pub stripe_customer_id: String,
    /// Features of its active entitlements now.
    pub features: Vec<String>,
}

#[utoipa::path(post, path = "/v1/customers/{customer}/stripe-entitlements/refresh", tag = "entitlements",
    params(("customer" = String, Path)),
    responses((status = 200, body = RefreshAnswer), (status = 400, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub(super) async fn refresh_stripe(
    State(shared): St,
    Path(c): Path<String>,
) -> ApiResult<RefreshAnswer> {
    let c = customer(&c, "customer")?;
    if shared.forwarding.stripe.client().is_none() {
        return Err(ApiError::invalid(
            "stripe_not_configured",
            "customer",
            "no Stripe API key is configured (STRIPE_API_KEY)",
        ));
    }
    let key = c.as_str().to_owned();
    let rec = blocking(&shared, move |s| s.store.customer(&key)).await?;
    let stripe_id = if c.as_str().starts_with("cus_") {
        c.as_str().to_owned()
    } else {
        rec.and_then(|r| r.stripe_customer_id).ok_or_else(|| {
            ApiError::invalid(
                "no_stripe_customer",
                "customer",
                "the customer has no stripe_customer_id",
            )
        })?
    };
    let names = fetch_stripe_features(&shared, &c, &stripe_id).await?;
    Ok(axum::Json(RefreshAnswer {
        customer: c.to_string(),
        stripe_customer_id: stripe_id,
        features: names,
    }))
}

/// Fetches `stripe_id`'s active entitlements and sets them as `c`'s Stripe features; returns
/// the features' names.
pub(super) async fn fetch_stripe_features(
    shared: &std::sync::Arc<super::ApiState>,
    c: &tally_protocol::names::CustomerId,
    stripe_id: &str,
) -> Result<Vec<String>, ApiError> {
    let Some(client) = shared.forwarding.stripe.client().cloned() else {
        return Err(ApiError::invalid(
            "stripe_not_configured",
            "customer",
            "no Stripe API key is configured (STRIPE_API_KEY)",
        ));
    };
    let keys = match client.active_entitlements(stripe_id).await {
        Ok(Ok(k)) => k,
        Ok(Err(a)) => {
            return Err(ApiError {
                status: axum::http::StatusCode::BAD_GATEWAY,
                kind: "api_error",
                code: "stripe_error",
                message: format!("stripe answered {}", a.status),
                param: None,
            });
        }
        Err(e) => {
            return Err(ApiError {
                status: axum::http::StatusCode::BAD_GATEWAY,
                kind: "api_error",
                code: "stripe_unreachable",
                message: e.to_string(),
                param: None,
            });
        }
    };
    let features = crate::core::entitlements::stripe::features(keys.iter().map(String::as_str));
    let names = features.iter().map(ToString::to_string).collect();
    let ent = shared.entitlements()?;
    let cc = c.clone();
    blocking(shared, move |_| ent.set_stripe_features(&cc, features)).await?;
    Ok(names)
}
