//! `GET /v1/agents` and `POST /v1/agents/{id}/revoke`: the registry as the operator sees it.

use super::errors::*;
use super::state::{St, blocking};
use axum::extract::{Path, State};
use serde::Serialize;
use tally_protocol::batch::AgentId;
use utoipa::ToSchema;

/// One agent.
#[derive(Serialize, ToSchema)]
pub struct AgentBody {
    /// The agent id, 32 hex digits.
    pub id: String,
    /// Its public key, hex.
    pub public_key: String,
    /// When it enrolled, ms.
    pub registered_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// Last handshake or ack, ms.
    pub last_seen_ms: i64,
    /// Milliseconds since it was last seen.
    pub lag_ms: i64,
    /// True while it has a live connection to this collector.
    pub connected: bool,
    /// Its latest epoch.
    pub epoch: Option<u64>,
    /// In that epoch, every seq up to this one is durable (the watermark).
    pub acked_seq: Option<u64>,
    /// The highest durable seq in that epoch.
    pub highest_seq: Option<u64>,
    /// Durable seqs above the watermark (a hole below them is still missing).
    pub pending_above_watermark: Option<u64>,
}

/// Every agent.
#[derive(Serialize, ToSchema)]
pub struct Agents {
    /// The agents.
    pub data: Vec<AgentBody>,
}

#[utoipa::path(get, path = "/v1/agents", tag = "agents", responses((status = 200, body = Agents)))]
pub(super) async fn agents(State(shared): St) -> ApiResult<Agents> {
    let (agents, epochs) =
        blocking(&shared, |s| Ok((s.store.agents()?, s.store.epochs()?))).await?;
    let now = shared.now_ms();
    let data = agents
        .into_iter()
        .map(|a| {
            let live = shared.live_info(a.id);
            let latest = epochs
                .iter()
                .filter(|e| e.agent == a.id)
                .max_by_key(|e| e.epoch);
            let last_seen_ms = live.last_seen_ms.max(a.last_seen_ms);
            AgentBody {
                id: a.id.to_string(),
                public_key: hex::encode(a.public_key),
                registered_at_ms: a.registered_at_ms,
                revoked_at_ms: a.revoked_at_ms,
                last_seen_ms,
                lag_ms: now.saturating_sub(last_seen_ms),
                connected: shared.registry.live_connections(a.id) > 0,
                epoch: latest.map(|e| e.epoch),
                acked_seq: latest.map(|e| e.dedup.watermark),
                highest_seq: latest.map(|e| e.dedup.highest()),
                pending_above_watermark: latest.map(|e| e.dedup.above.len() as u64),
            }
        })
        .collect();
    Ok(axum::Json(Agents { data }))
}

/// The answer to a revocation.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    /// The agent id.
    pub id: String,
    /// Always true.
    pub revoked: bool,
}

#[utoipa::path(post, path = "/v1/agents/{id}/revoke", tag = "agents", params(("id" = String, Path, description = "32 hex digits")),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke(State(shared): St, Path(id): Path<String>) -> ApiResult<Revoked> {
    let agent = AgentId::from_hex(&id).ok_or_else(|| {
        ApiError::invalid("invalid_agent_id", "id", "an agent id is 32 hex digits")
    })?;
    if !blocking(&shared, move |s| s.revoke(agent)).await? {
        return Err(ApiError::not_found(
            "resource_missing",
            format!("no agent {id}"),
        ));
    }
    tracing::info!(agent = %agent, "agent revoked");
    Ok(axum::Json(Revoked {
        id: agent.to_string(),
        revoked: true,
    }))
}
