//! `POST/GET /v1/enroll-tokens`, `DELETE /v1/enroll-tokens/{id}`: enrolment tokens as objects
//! (SPEC §6.7). The secret is shown once, in the answer to its creation; only its SHA-256 is
//! kept.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::registry::{EnrollToken, token_hash};
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Default lifetime of a token: 24 hours.
pub const DEFAULT_EXPIRES_IN_S: u64 = 86_400;
/// Longest lifetime a token may be given: one year.
pub const MAX_EXPIRES_IN_S: u64 = 366 * 86_400;

/// A token request; every field is optional.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Seconds until it stops enrolling; default 86400 (24 h), at most one year.
    pub expires_in_s: Option<u64>,
    /// How many agents it may enrol; default 1.
    pub max_uses: Option<u32>,
    /// Carried onto the agents it enrols (at most 16).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A token as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct TokenBody {
    /// `et_` and 12 hex digits.
    pub id: String,
    /// The secret: only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When it was created, Unix seconds.
    pub created_at: i64,
    /// When it stops enrolling, Unix seconds; null never.
    pub expires_at: Option<i64>,
    /// How many agents it may enrol; null no limit.
    pub max_uses: Option<u32>,
    /// How many it has enrolled.
    pub uses: u32,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When it was revoked, Unix seconds.
    pub revoked_at: Option<i64>,
    /// Whether it can enrol one more agent now.
    pub usable: bool,
}

fn body(t: EnrollToken, secret: Option<String>, now_ms: i64) -> TokenBody {
    TokenBody {
        usable: t.usable(now_ms).is_ok(),
        id: t.id,
        token: secret,
        created_at: t.created_at_ms.div_euclid(1000),
        expires_at: t.expires_at_ms.map(|ms| ms.div_euclid(1000)),
        max_uses: t.max_uses,
        uses: t.uses,
        labels: t.labels,
        revoked_at: t.revoked_at_ms.map(|ms| ms.div_euclid(1000)),
    }
}

/// Every token.
#[derive(Serialize, ToSchema)]
pub struct Tokens {
    /// The tokens, without their secrets.
    pub data: Vec<TokenBody>,
}

#[utoipa::path(post, path = "/v1/enroll-tokens", tag = "agents", request_body = CreateTokenRequest,
    responses((status = 200, body = TokenBody), (status = 400, body = ErrorBody)))]
pub(super) async fn create(State(shared): St, raw: Bytes) -> ApiResult<TokenBody> {
    let r: CreateTokenRequest = if raw.iter().all(u8::is_ascii_whitespace) {
        CreateTokenRequest::default()
    } else {
        json_body(&raw)?
    };
    let expires_in = r.expires_in_s.unwrap_or(DEFAULT_EXPIRES_IN_S);
    if expires_in == 0 || expires_in > MAX_EXPIRES_IN_S {
        return Err(ApiError::invalid(
            "invalid_expires_in_s",
            "expires_in_s",
            format!("expires_in_s must be 1 to {MAX_EXPIRES_IN_S}"),
        ));
    }
    let max_uses = r.max_uses.unwrap_or(1);
    if max_uses == 0 {
        return Err(ApiError::invalid(
            "invalid_max_uses",
            "max_uses",
            "max_uses must be at least 1",
        ));
    }
    EnrollToken::check_labels(&r.labels)
        .map_err(|m| ApiError::invalid("invalid_labels", "labels", m))?;
    let secret = crate::init::random_token()
        .map_err(|e| ApiError::internal(format!("random source: {e}")))?;
    let id = crate::init::random_token()
        .map_err(|e| ApiError::internal(format!("random source: {e}")))?;
    let now = shared.now_ms();
    let token = EnrollToken {
        id: format!("et_{}", &id[..12]),
        hash: token_hash(secret.as_bytes()),
        created_at_ms: now,
        expires_at_ms: Some(now.saturating_add(expires_in as i64 * 1000)),
        max_uses: Some(max_uses),
        uses: 0,
        labels: r.labels,
        revoked_at_ms: None,
    };
    let stored = token.clone();
    if !blocking(&shared, move |s| s.store.create_enroll_token(&stored, now)).await? {
        return Err(ApiError::internal("a token with this id exists; retry"));
    }
    tracing::info!(token = %token.id, "enrolment token created");
    Ok(axum::Json(body(token, Some(secret), now)))
}

#[utoipa::path(get, path = "/v1/enroll-tokens", tag = "agents", responses((status = 200, body = Tokens)))]
pub(super) async fn list(State(shared): St) -> ApiResult<Tokens> {
    let mut tokens = blocking(&shared, |s| s.store.enroll_tokens()).await?;
    tokens.sort_by_key(|t| std::cmp::Reverse(t.created_at_ms));
    let now = shared.now_ms();
    Ok(axum::Json(Tokens {
        data: tokens.into_iter().map(|t| body(t, None, now)).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/enroll-tokens/{id}", tag = "agents", params(("id" = String, Path, description = "et_…")),
    responses((status = 200, body = TokenBody), (status = 404, body = ErrorBody)))]
pub(super) async fn revoke(State(shared): St, Path(id): Path<String>) -> ApiResult<TokenBody> {
    let now = shared.now_ms();
    let key = id.clone();
    let Some(t) = blocking(&shared, move |s| s.store.revoke_enroll_token(&key, now)).await? else {
        return Err(ApiError::not_found(
            "resource_missing",
            format!("no enrolment token {id}"),
        ));
    };
    tracing::info!(token = %t.id, "enrolment token revoked");
    Ok(axum::Json(body(t, None, now)))
}
