//! The admin HTTP API (SPEC §6.6): JSON, decimals as strings, errors in Stripe's shape
//! (`{"error":{"type","code","message","param"}}`), `Authorization: Bearer <admin token>` on
//! every route except `/healthz` and `/openapi.json`.
//!
//! Owns the routes, their request parsing and their answers. Guarantees: a request that fails
//! to parse or validate is answered 400 and changes nothing; a missing or wrong token is 401
//! before anything is read; the token is compared in constant time and never logged.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

mod adjustments;
mod agents;
mod customers;
mod enroll_tokens;
mod entitlements;
mod errors;
mod forward;
mod grants;
mod ledger;
mod meters;
mod openapi;
mod ops;
pub mod overview;
mod plans;
mod quarantine;
pub mod series;
mod state;
mod stripe;
mod usage;

pub use errors::{ApiError, ErrorBody, ErrorDetail};
pub use openapi::openapi_doc;
pub use state::ApiState;
use state::St;

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<ApiState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(shared);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    // Timeouts and a connection cap: idle or slow clients cannot take the API offline.
    let limits = tally_http::HttpLimits::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "using the default HTTP limits");
        tally_http::HttpLimits::default()
    });
    let r = tally_http::serve(listener, app, limits, stop).await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin api stopped");
    }
}

/// The API's routes.
pub fn router(shared: Arc<ApiState>) -> Router {
    let private = Router::new()
        .route("/v1/usage", get(usage::usage))
        .route("/v1/usage/series", get(series::series))
        .route("/v1/customers", get(customers::list_customers))
        .route("/v1/overview", get(overview::overview))
        .route("/v1/customers/{customer}/usage", get(usage::customer_usage))
        .route("/v1/meters", get(meters::list_meters))
        .route("/v1/meters/{meter}", put(meters::put_meter))
        .route("/v1/ledger/entries", get(ledger::entries))
        .route("/v1/ledger/verify", get(ledger::verify))
        .route("/v1/agents", get(agents::agents))
        .route("/v1/agents/{id}/revoke", post(agents::revoke))
        .route(
            "/v1/enroll-tokens",
            post(enroll_tokens::create).get(enroll_tokens::list),
        )
        .route("/v1/enroll-tokens/{id}", delete(enroll_tokens::revoke))
        .route("/v1/adjustments", post(adjustments::adjust))
        .route("/v1/quarantine", get(quarantine::quarantine))
        .route(
            "/v1/customers/{customer}",
            put(stripe::put_customer).get(customers::get_customer),
        )
        .route(
            "/v1/plans/{plan}",
            put(plans::put_plan).get(plans::get_plan),
        )
        .route("/v1/grants", post(grants::create_grant))
        .route(
            "/v1/customers/{customer}/stripe-entitlements/refresh",
            post(entitlements::refresh_stripe),
        )
        .route(
            "/v1/entitlements/{customer}",
            get(entitlements::get_entitlements),
        )
        .route("/v1/stripe/outbox", get(stripe::list_outbox))
        .route("/v1/stripe/outbox/{id}/retry", post(stripe::retry_outbox))
        .route("/v1/outbox", get(forward::outbox))
        .route("/v1/orb/outbox/{id}/retry", post(forward::retry_orb))
        .route(
            "/v1/metronome/outbox/{id}/retry",
            post(forward::retry_metronome),
        )
        .route("/v1/reconciliation", get(forward::reconciliation))
        .route("/v1/export", post(crate::export::route::export))
        .route("/metrics", get(ops::metrics))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(private)
        .route("/healthz", get(ops::healthz))
        .route("/v1/stripe/webhooks", post(stripe::webhook))
        .route("/openapi.json", get(openapi::openapi))
        .merge(crate::console::routes())
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .with_state(shared)
}

async fn auth(State(shared): St, headers: HeaderMap, req: Request, next: Next) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t)
            if !t.is_empty() && bool::from(t.as_bytes().ct_eq(shared.admin_token().as_bytes())) =>
        {
            next.run(req).await
        }
        _ => ApiError::unauthorized().into_response(),
    }
}
