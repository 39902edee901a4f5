//! Orb and Metronome routes of the admin API (SPEC §6.4b): `GET /v1/outbox?destination=…`
//! (the Stripe listing for `destination=stripe` or none) and `GET /v1/reconciliation?destination=…`
//! (Stripe's report for `stripe` or none).

use super::errors::{ApiError, number, query};
use super::state::St;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tally_forward::ledger_feed::runner::{DestinationStatus, OutboxView};
use tally_forward::ledger_feed::store::FwdStats;
use tally_forward::ledger_feed::{Engine, FwdState};
use tally_forward::{Destination, Listing, Retried};

/// `GET /v1/outbox?destination=orb|metronome`.
#[derive(Serialize)]
pub struct DestinationOutbox {
    /// `orb` or `metronome`.
    pub destination: String,
    /// Events in the asked state (all states when none is asked).
    pub data: Vec<OutboxView>,
    /// Counts.
    pub stats: FwdStats,
}

fn destination(q: &std::collections::HashMap<String, String>) -> Result<Option<Engine>, ApiError> {
    match q.get("destination").map(String::as_str) {
        None | Some("stripe") => Ok(None),
        Some(d) => d
            .parse()
            .map(Some)
            .map_err(|m: String| ApiError::invalid("invalid_destination", "destination", m)),
    }
}

/// The running destination `d`, or 404 when it is off.
fn running(
    shared: &std::sync::Arc<super::ApiState>,
    d: Engine,
) -> Result<std::sync::Arc<dyn Destination>, ApiError> {
    shared
        .forwarding
        .get(d.into())
        .cloned()
        .ok_or_else(|| not_configured(d))
}

fn not_configured(d: Engine) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "destination_not_configured",
        message: format!(
            "{} forwarding is off (set {}_API_KEY)",
            d.as_str(),
            d.as_str().to_uppercase()
        ),
        param: Some(String::from("destination")),
    }
}

/// `GET /v1/outbox`: the Stripe outbox, or one destination's events.
#[utoipa::path(get, path = "/v1/outbox", tag = "forwarding",
    params(("destination" = Option<String>, Query, description = "stripe (default: the /v1/stripe/outbox listing), orb or metronome"),
           ("state" = Option<String>, Query, description = "orb/metronome: pending, unknown, backfill, sent, dead or out_of_window (default: all)"),
           ("after" = Option<u64>, Query), ("limit" = Option<u64>, Query)),
    responses((status = 200, description = "stripe: as /v1/stripe/outbox; orb/metronome: {destination, data:[{id,state,key,customer,meter,value,timestamp,attempts,error}], stats}"),
              (status = 400, body = super::errors::ErrorBody), (status = 404, body = super::errors::ErrorBody)))]
pub(super) async fn outbox(
    State(shared): St,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = query(raw.clone())?;
    let Some(d) = destination(&q)? else {
        return Ok(super::stripe::list_outbox(State(shared), RawQuery(raw))
            .await
            .into_response());
    };
    let f = running(&shared, d)?;
    let state = q.get("state").cloned();
    let after = number(&q, "after", 0)?;
    let limit = number(&q, "limit", 100)?.clamp(1, super::errors::MAX_PAGE) as usize;
    let listing = tokio::task::spawn_blocking(move || f.list(state.as_deref(), after, limit))
        .await
        .map_err(|e| ApiError::task_failed(&e))?
        .map_err(super::stripe::destination_error)?;
    let Listing::Feed { data, stats } = listing else {
        return Err(ApiError::internal(
            "a decimal destination listed a stripe outbox",
        ));
    };
    Ok(axum::Json(DestinationOutbox {
        destination: d.as_str().to_owned(),
        data,
        stats,
    })
    .into_response())
}

/// `POST /v1/{orb,metronome}/outbox/{id}/retry`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct FwdRequeued {
    /// `orb` or `metronome`.
    pub destination: String,
    /// The group returned to the queue.
    pub id: u64,
    /// Its idempotency key / transaction id — the same as before: a copy the destination did
    /// take is deduplicated.
    pub key: String,
    /// `pending`, or `unknown` when it was sent before.
    #[schema(value_type = String)]
    pub state: FwdState,
}

async fn retry(
    shared: std::sync::Arc<super::ApiState>,
    d: Engine,
    id: String,
) -> Result<axum::Json<FwdRequeued>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid("invalid_integer", "id", "id must be an event id"))?;
    let f = running(&shared, d)?;
    let r = tokio::task::spawn_blocking(move || f.retry(id))
        .await
        .map_err(|e| ApiError::task_failed(&e))?;
    match r {
        Ok(Retried::Group(g)) => {
            tracing::info!(
                destination = d.as_str(),
                id,
                key = %g.event.key,
                "dead letter requeued by an operator"
            );
            Ok(axum::Json(FwdRequeued {
                destination: d.as_str().to_owned(),
                id,
                key: g.event.key,
                state: g.state,
            }))
        }
        Ok(Retried::Rows(_)) => Err(ApiError::internal(
            "a decimal destination requeued stripe rows",
        )),
        Err(e) => Err(super::stripe::destination_error(e)),
    }
}

/// `POST /v1/orb/outbox/{id}/retry`: an Orb dead letter back to the queue, same key.
#[utoipa::path(post, path = "/v1/orb/outbox/{id}/retry", tag = "forwarding", params(("id" = u64, Path)),
    responses((status = 200, body = FwdRequeued), (status = 400, body = super::errors::ErrorBody), (status = 404, body = super::errors::ErrorBody)))]
pub(super) async fn retry_orb(
    State(shared): St,
    Path(id): Path<String>,
) -> Result<axum::Json<FwdRequeued>, ApiError> {
    retry(shared, Engine::Orb, id).await
}

/// `POST /v1/metronome/outbox/{id}/retry`: a Metronome dead letter back to the queue, same key.
#[utoipa::path(post, path = "/v1/metronome/outbox/{id}/retry", tag = "forwarding", params(("id" = u64, Path)),
    responses((status = 200, body = FwdRequeued), (status = 400, body = super::errors::ErrorBody), (status = 404, body = super::errors::ErrorBody)))]
pub(super) async fn retry_metronome(
    State(shared): St,
    Path(id): Path<String>,
) -> Result<axum::Json<FwdRequeued>, ApiError> {
    retry(shared, Engine::Metronome, id).await
}

/// A destination's status beside its reconciliation report.
#[derive(Serialize)]
struct ForwardReconciliation {
    #[serde(flatten)]
    report: tally_forward::ledger_feed::reconcile::FwdReport,
    status: DestinationStatus,
}

/// `GET /v1/reconciliation`: Stripe's report, or one destination's.
#[utoipa::path(get, path = "/v1/reconciliation", tag = "stripe",
    params(("destination" = Option<String>, Query, description = "stripe (default), orb (sampled keys through event search) or metronome (daily usage)"),
           ("days" = Option<u64>, Query, description = "UTC days to compare (default 7)"),
           ("include_today" = Option<bool>, Query, description = "stripe: also today (summaries lag; default false)")),
    responses((status = 200, body = crate::forwarding::stripe::ReconciliationReport, description = "for orb/metronome: {destination, ran_at, compared, discrepancies:[{customer,what,day,ledger,destination}], skipped, status}"),
              (status = 400, body = super::errors::ErrorBody), (status = 502, body = super::errors::ErrorBody)))]
pub(super) async fn reconciliation(
    State(shared): St,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = query(raw.clone())?;
    let Some(d) = destination(&q)? else {
        return Ok(super::stripe::reconciliation(State(shared), RawQuery(raw))
            .await
            .into_response());
    };
    running(&shared, d)?;
    let days = i64::try_from(number(&q, "days", 7)?.clamp(1, 35)).unwrap_or(7);
    let Some((report, status)) = shared.forwarding.reconcile_feed(d, days).await else {
        return Err(not_configured(d));
    };
    Ok(axum::Json(ForwardReconciliation { report, status }).into_response())
}
