//! Stripe routes of the admin API (SPEC §6.4, §6.6): customer mapping, the outbox listing and
//! operator retry, the webhook endpoint (signature, no token) and reconciliation.

use super::errors::{ApiError, ApiResult, json_body, number, query};
use super::state::{ApiState, St, blocking};
use crate::store::{CustomerRecord, StoreError};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tally_forward::stripe::outbox::{OutboxEntry, OutboxStats, StoreError as OutboxError};
use tally_forward::{Destination, DestinationError, DestinationKind, Listing, Retried};
use utoipa::ToSchema;

fn outbox_error(e: OutboxError) -> ApiError {
    match e {
        OutboxError::NotFound(m) => ApiError::not_found("resource_missing", m),
        OutboxError::Invalid(m) => ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "outbox_row_not_dead",
            message: m,
            param: Some(String::from("id")),
        },
        other => ApiError::from(StoreError::Outbox(other)),
    }
}

/// A destination error as the API answers it: Stripe's outbox errors as before, a state that is
/// not one of the destination's as `invalid_state`.
pub(super) fn destination_error(e: DestinationError) -> ApiError {
    match e {
        DestinationError::InvalidState(m) => ApiError::invalid("invalid_state", "state", m),
        DestinationError::NotFound(m) => ApiError::not_found("resource_missing", m),
        DestinationError::NotDead(m) => ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: "outbox_row_not_dead",
            message: m,
            param: Some(String::from("id")),
        },
        DestinationError::Outbox(e) => outbox_error(e),
        DestinationError::Store(m) => ApiError::internal(m),
    }
}

/// Calls Stripe's running forwarder off the async threads (its store calls block).
async fn destination_call<T: Send + 'static>(
    shared: &std::sync::Arc<ApiState>,
    f: impl FnOnce(&dyn Destination) -> Result<T, DestinationError> + Send + 'static,
) -> Result<T, ApiError> {
    let Some(d) = shared.forwarding.get(DestinationKind::Stripe).cloned() else {
        return Err(ApiError::internal("the stripe forwarder is not running"));
    };
    match tokio::task::spawn_blocking(move || f(d.as_ref())).await {
        Ok(r) => r.map_err(destination_error),
        Err(e) => Err(ApiError::task_failed(&e)),
    }
}

/// `PUT /v1/customers/{customer}`: both fields optional; an absent field keeps its value.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerBody {
    /// The Stripe customer (`cus_…`) this customer's usage is forwarded to.
    pub stripe_customer_id: Option<String>,
    /// The plan; it must exist (`PUT /v1/plans/{plan}`).
    pub plan: Option<String>,
    /// Overrides of the plan (`add_features`, `remove_features`, `limits`; `null` limit removes
    /// the plan's); replaces the stored overrides.
    #[schema(value_type = Option<Object>)]
    pub overrides: Option<crate::core::entitlements::Overrides>,
    /// Day of the month `reset: anchor` limits start again (1–31).
    pub anchor_day: Option<u8>,
    /// Orb `external_customer_id` (default: `orb_customers` of the configuration, else the
    /// customer key); `""` removes it.
    pub orb_external_customer_id: Option<String>,
    /// Metronome `customer_id` — a customer id or ingest alias (default: `metronome_customers`,
    /// else the customer key as an alias); `""` removes it.
    pub metronome_customer_id: Option<String>,
}

/// A customer's settings.
#[derive(Serialize, ToSchema)]
pub struct CustomerAnswer {
    /// Our customer key.
    pub customer: String,
    /// The Stripe customer usage goes to (`cus_…` keys map to themselves).
    pub stripe_customer_id: Option<String>,
    /// The stored plan.
    pub plan: Option<String>,
    /// What the plan does today.
    pub plan_note: String,
    /// Orb `external_customer_id` set through the API (`null`: the configuration's default).
    pub orb_external_customer_id: Option<String>,
    /// Metronome customer id or alias set through the API (`null`: the default).
    pub metronome_customer_id: Option<String>,
}

#[utoipa::path(put, path = "/v1/customers/{customer}", tag = "stripe", params(("customer" = String, Path)),
    request_body = CustomerBody, responses((status = 200, body = CustomerAnswer), (status = 400, body = super::errors::ErrorBody)))]
pub(super) async fn put_customer(
    State(shared): St,
    Path(customer): Path<String>,
    body: Bytes,
) -> ApiResult<CustomerAnswer> {
    let c = super::errors::customer(&customer, "customer")?;
    let b: CustomerBody = json_body(&body)?;
    if let Some(sc) = &b.stripe_customer_id {
        let ok = sc.starts_with("cus_")
            && sc.len() <= 255
            && sc[4..]
                .bytes()
                .all(|x| x.is_ascii_alphanumeric() || x == b'_');
        if !ok || sc.len() == 4 {
            return Err(ApiError::invalid(
                "invalid_stripe_customer",
                "stripe_customer_id",
                "stripe_customer_id must be a Stripe customer id like cus_123",
            ));
        }
        if c.as_str().starts_with("cus_") && sc != c.as_str() {
            return Err(ApiError::invalid(
                "invalid_stripe_customer",
                "stripe_customer_id",
                "a customer key starting with cus_ is its own Stripe customer",
            ));
        }
    }
    if let Some(p) = &b.plan
        && (p.is_empty() || p.len() > 128 || p.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(
            "invalid_plan",
            "plan",
            "plan must be 1 to 128 characters",
        ));
    }
    let orb = ApiError::dest_name(
        b.orb_external_customer_id.as_ref(),
        "orb_external_customer_id",
    )?;
    let met = ApiError::dest_name(b.metronome_customer_id.as_ref(), "metronome_customer_id")?;
    let key = c.as_str().to_owned();
    let settings = super::entitlements::customer_settings(
        &shared,
        &c,
        b.plan.as_deref(),
        b.overrides.clone(),
        b.anchor_day,
    )
    .await?;
    let ent = shared.entitlements()?;
    let cust = c.clone();
    let (rec, newly_mapped, names) = blocking(&shared, move |s| {
        use crate::store::NameKind;
        let mut names = s
            .store
            .dest_names(NameKind::Customer, std::slice::from_ref(&key))?
            .pop()
            .map(|(_, n)| n)
            .unwrap_or_default();
        if orb.is_some() || met.is_some() {
            if let Some(v) = orb {
                names.orb = v;
            }
            if let Some(v) = met {
                names.metronome = v;
            }
            s.store.put_dest_names(NameKind::Customer, &key, &names)?;
        }
        let mut rec: CustomerRecord = s.store.customer(&key)?.unwrap_or_default();
        let newly_mapped =
            b.stripe_customer_id.is_some() && b.stripe_customer_id != rec.stripe_customer_id;
        if b.stripe_customer_id.is_some() {
            rec.stripe_customer_id = b.stripe_customer_id;
        }
        if b.plan.is_some() {
            rec.plan = b.plan;
        }
        ent.put_customer(&cust, &rec, settings.as_ref())?;
        Ok((rec, newly_mapped, names))
    })
    .await?;
    shared.forwarding.notify();
    // A customer newly mapped to a Stripe customer gets its active Stripe entitlements at once
    // (when Stripe is configured), not only at the next summary webhook; in the background,
    // so Stripe being slow or down never fails the PUT (the refresh endpoint retries by hand).
    if newly_mapped
        && shared.forwarding.stripe.client().is_some()
        && let Some(sc) = rec.stripe_customer_id.clone()
    {
        let (shared, c) = (shared.clone(), c.clone());
        tokio::spawn(async move {
            if let Err(e) = super::entitlements::fetch_stripe_features(&shared, &c, &sc).await {
                tracing::warn!(customer = %c, error = %e.message, "stripe entitlements fetch failed");
            }
        });
    }
    let stripe_customer_id = if c.as_str().starts_with("cus_") {
        Some(c.as_str().to_owned())
    } else {
        rec.stripe_customer_id
    };
    Ok(axum::Json(CustomerAnswer {
        customer: c.as_str().to_owned(),
        stripe_customer_id,
        plan: rec.plan,
        plan_note: String::from("see GET /v1/entitlements/{customer}"),
        orb_external_customer_id: names.orb,
        metronome_customer_id: names.metronome,
    }))
}

/// `GET /v1/stripe/outbox`.
#[derive(Serialize, ToSchema)]
pub struct OutboxListing {
    /// Rows in the asked state (`row`, `state`, `group` = [id, identifier], `error` = Stripe's
    /// status, code and message).
    #[schema(value_type = Vec<Object>)]
    pub data: Vec<OutboxEntry>,
    /// Counts over the whole outbox.
    #[schema(value_type = Object)]
    pub stats: OutboxStats,
    /// Rows waiting for a customer mapping, per customer key (as of the forwarder's last pass).
    pub unmapped: BTreeMap<String, u64>,
    /// `send`, or `log_only` without an API key.
    pub mode: String,
    /// The forwarder's last error, if any (never contains secrets).
    pub last_error: Option<String>,
}

#[utoipa::path(get, path = "/v1/stripe/outbox", tag = "stripe",
    params(("state" = Option<String>, Query, description = "pending (default), unknown, sent or dead"),
           ("after" = Option<u64>, Query), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = OutboxListing), (status = 400, body = super::errors::ErrorBody)))]
pub(super) async fn list_outbox(
    State(shared): St,
    RawQuery(raw): RawQuery,
) -> ApiResult<OutboxListing> {
    let q = query(raw)?;
    let state = q.get("state").cloned();
    let after = number(&q, "after", 0)?;
    let limit = number(&q, "limit", 100)?.clamp(1, super::errors::MAX_PAGE) as usize;
    let listing =
        destination_call(&shared, move |d| d.list(state.as_deref(), after, limit)).await?;
    let Listing::Stripe { data, stats } = listing else {
        return Err(ApiError::internal(
            "stripe listed another destination's outbox",
        ));
    };
    let status = shared.forwarding.stripe_status();
    Ok(axum::Json(OutboxListing {
        data,
        stats,
        unmapped: status.unmapped,
        mode: String::from(if shared.forwarding.stripe.sends() {
            "send"
        } else {
            "log_only"
        }),
        last_error: status.last_error,
    }))
}

/// `POST /v1/stripe/outbox/{id}/retry`.
#[derive(Serialize, ToSchema)]
pub struct Requeued {
    /// Rows returned to pending (the whole dead event), with a new identifier revision.
    pub requeued: Vec<u64>,
}

#[utoipa::path(post, path = "/v1/stripe/outbox/{id}/retry", tag = "stripe", params(("id" = u64, Path)),
    responses((status = 200, body = Requeued), (status = 400, body = super::errors::ErrorBody), (status = 404, body = super::errors::ErrorBody)))]
pub(super) async fn retry_outbox(State(shared): St, Path(id): Path<String>) -> ApiResult<Requeued> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid_integer", "id", "id must be an outbox row id"))?;
    let Retried::Rows(requeued) = destination_call(&shared, move |d| d.retry(id)).await? else {
        return Err(ApiError::internal(
            "stripe requeued another destination's event",
        ));
    };
    tracing::info!(
        row = id,
        rows = requeued.len(),
        "stripe dead letter requeued by an operator"
    );
    Ok(axum::Json(Requeued { requeued }))
}

/// The answer to a webhook delivery.
#[derive(Serialize, ToSchema)]
pub struct WebhookAnswer {
    /// Always true.
    pub received: bool,
    /// The event id was seen before; nothing was done.
    pub duplicate: bool,
    /// Events of ours turned into dead letters by an error report.
    pub dead_lettered: usize,
}

#[utoipa::path(post, path = "/v1/stripe/webhooks", tag = "stripe", security(),
    params(("Stripe-Signature" = String, Header)),
    request_body(content = String, content_type = "application/json", description = "the Stripe event, raw"),
    responses((status = 200, body = WebhookAnswer), (status = 400, body = super::errors::ErrorBody)))]
pub(super) async fn webhook(
    State(shared): St,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<WebhookAnswer> {
    use tally_forward::stripe::webhook::{Handled, WebhookError};
    let Some(secret) = shared.forwarding.stripe.webhook_secret.clone() else {
        return Err(ApiError::invalid(
            "webhook_not_configured",
            "Stripe-Signature",
            "no webhook signing secret is configured (STRIPE_WEBHOOK_SECRET)",
        ));
    };
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::missing("Stripe-Signature"))?;
    let now_s = shared.forwarding.now_ms() / 1000;
    let st = shared.clone();
    let raw = body.clone();
    let r = tokio::task::spawn_blocking(move || {
        tally_forward::stripe::webhook::handle_webhook(
            st.store.as_ref(),
            &header,
            &body,
            &secret,
            now_s,
        )
    })
    .await
    .map_err(|e| ApiError::task_failed(&e))?;
    let handled = match r {
        Ok(h) => h,
        Err(WebhookError::Store(e)) => return Err(outbox_error(e)),
        Err(WebhookError::BadBody(m)) => {
            return Err(ApiError::invalid("invalid_event", "body", m));
        }
        Err(e) => {
            tracing::warn!(error = %e, "stripe webhook refused");
            return Err(ApiError::invalid(
                "signature_verification_failed",
                "Stripe-Signature",
                format!("the Stripe-Signature header does not verify: {e}"),
            ));
        }
    };
    let (duplicate, dead_lettered) = match handled {
        Handled::Duplicate => (true, 0),
        Handled::DeadLettered(n) => (false, n),
        Handled::Stored | Handled::Ignored => (false, 0),
    };
    if handled == Handled::Stored {
        super::entitlements::apply_stripe_event(&shared, &raw).await?;
    }
    Ok(axum::Json(WebhookAnswer {
        received: true,
        duplicate,
        dead_lettered,
    }))
}

#[utoipa::path(get, path = "/v1/reconciliation", tag = "stripe",
    params(("days" = Option<u64>, Query, description = "UTC days to compare (default 7)"),
           ("include_today" = Option<bool>, Query, description = "also today (summaries lag; default false)")),
    responses((status = 200, body = crate::forwarding::stripe::ReconciliationReport), (status = 502, body = super::errors::ErrorBody)))]
pub(super) async fn reconciliation(
    State(shared): St,
    RawQuery(raw): RawQuery,
) -> ApiResult<crate::forwarding::stripe::ReconciliationReport> {
    let q = query(raw)?;
    let days = number(&q, "days", 7)?.clamp(1, 35);
    let include_today = matches!(
        q.get("include_today").map(String::as_str),
        Some("true" | "1")
    );
    let days = i64::try_from(days).unwrap_or(7);
    match shared
        .forwarding
        .stripe
        .reconcile(&shared.store, days, include_today)
        .await
    {
        Ok(r) => Ok(axum::Json(r)),
        Err(e) => Err(ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "api_error",
            code: "reconciliation_failed",
            message: e.to_string(),
            param: None,
        }),
    }
}
