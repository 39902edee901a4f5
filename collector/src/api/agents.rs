//! `GET /v1/agents` and `POST /v1/agents/{id}/revoke`: the registry as the operator sees it.

use super::errors::*;
use super::state::{St, blocking};
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// The enrolment token that enrolled it, if it was enrolled by one.
    pub enrolled_by: Option<String>,
    /// That token's labels.
    pub labels: BTreeMap<String, String>,
}

/// Every agent.
#[derive(Serialize, ToSchema)]
pub struct Agents {
    /// The agents.
    pub data: Vec<AgentBody>,
}

#[utoipa::path(get, path = "/v1/agents", tag = "agents", responses((status = 200, body = Agents)))]
pub(super) async fn agents(State(shared): St) -> ApiResult<Agents> {
    let (agents, epochs, enrolments) = blocking(&shared, |s| {
        let agents = s.store.agents()?;
        let enrolments = agents
            .iter()
            .map(|a| s.store.enrolment(a.id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((agents, s.store.epochs()?, enrolments))
    })
    .await?;
    let now = shared.now_ms();
    let data = agents
        .into_iter()
        .zip(enrolments)
        .map(|(a, enrolment)| {
            let (enrolled_by, labels) =
                enrolment.map_or((None, BTreeMap::new()), |e| (Some(e.token_id), e.labels));
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
                pending_above_watermark: latest.map(|e| e.dedup.done() - e.dedup.watermark),
                enrolled_by,
                labels,
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

/// A revocation's options; the body may be empty.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Also revoke the enrolment token that enrolled the agent, so the same host cannot enrol
    /// again with it.
    #[serde(default)]
    pub revoke_token: bool,
}

#[utoipa::path(post, path = "/v1/agents/{id}/revoke", tag = "agents", params(("id" = String, Path, description = "32 hex digits")),
    request_body(content = Option<RevokeRequest>),
    responses((status = 200, body = Revoked), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke(
    State(shared): St,
    Path(id): Path<String>,
    raw: Bytes,
) -> ApiResult<Revoked> {
    let agent = AgentId::from_hex(&id).ok_or_else(|| {
        ApiError::invalid("invalid_agent_id", "id", "an agent id is 32 hex digits")
    })?;
    let r: RevokeRequest = if raw.iter().all(u8::is_ascii_whitespace) {
        RevokeRequest::default()
    } else {
        json_body(&raw)?
    };
    if !blocking(&shared, move |s| s.revoke(agent, r.revoke_token)).await? {
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
