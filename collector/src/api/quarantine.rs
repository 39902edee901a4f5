//! `GET /v1/quarantine`: batches that verified but could not be posted, kept whole.

use super::errors::*;
use super::state::{St, blocking};
use crate::store::QuarantineRecord;
use axum::extract::{RawQuery, State};
use serde::Serialize;
use utoipa::ToSchema;

/// A quarantined batch.
#[derive(Serialize, ToSchema)]
pub struct QuarantineBody {
    /// Position in the quarantine.
    pub id: u64,
    /// The agent.
    pub agent: String,
    /// The epoch.
    pub epoch: u64,
    /// The seq.
    pub seq: u64,
    /// The reason's code (`unknown_meter`, `invalid_delta`, `overflow`).
    pub code: String,
    /// The delta at fault, if one is.
    pub row: Option<u32>,
    /// Detail.
    pub message: String,
    /// When it was received, ms.
    pub received_at_ms: i64,
    /// The signed batch body, hex (verifiable with the agent's key).
    pub body_hex: String,
    /// The signature, hex.
    pub signature_hex: String,
}

/// Quarantined batches.
#[derive(Serialize, ToSchema)]
pub struct Quarantine {
    /// The batches.
    pub data: Vec<QuarantineBody>,
}

#[utoipa::path(get, path = "/v1/quarantine", tag = "ledger",
    params(("after" = Option<u64>, Query), ("limit" = Option<u64>, Query)),
    responses((status = 200, body = Quarantine)))]
pub(super) async fn quarantine(
    State(shared): St,
    RawQuery(raw): RawQuery,
) -> ApiResult<Quarantine> {
    let q = query(raw)?;
    let after = number(&q, "after", 0)?;
    let limit = number(&q, "limit", 100)?.clamp(1, MAX_PAGE) as usize;
    let rows = blocking(&shared, move |s| s.store.quarantined(after, limit)).await?;
    let data = rows
        .into_iter()
        .map(|r: QuarantineRecord| QuarantineBody {
            id: r.id,
            agent: r.agent.to_string(),
            epoch: r.epoch,
            seq: r.seq,
            code: r.rejection.code.name().to_owned(),
            row: r.rejection.row,
            message: r.rejection.message,
            received_at_ms: r.received_at_ms,
            body_hex: hex::encode(&*r.batch.body),
            signature_hex: hex::encode(r.batch.signature.0),
        })
        .collect();
    Ok(axum::Json(Quarantine { data }))
}
