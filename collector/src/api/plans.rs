//! `PUT /v1/plans/{plan}` and `GET /v1/plans/{plan}`: plans (features and limits per meter),
//! pushed to every agent tracking a customer on a change.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::entitlements::Plan;
use axum::body::Bytes;
use axum::extract::{Path, State};
use serde::Serialize;
use std::collections::BTreeMap;
use tally_protocol::names::PlanName;
use utoipa::ToSchema;

/// A plan as the API shows it (the body of `PUT` is the same without `plan`).
#[derive(Serialize, ToSchema)]
pub struct PlanAnswer {
    /// The plan's name.
    pub plan: String,
    /// Features the plan gives.
    pub features: Vec<String>,
    /// Per meter: `included` (decimal string), `enforcement` (`hard` | `soft`), `reset`
    /// (`calendar` | `anchor`).
    #[schema(value_type = Object)]
    pub limits: BTreeMap<String, serde_json::Value>,
}

impl PlanAnswer {
    fn of(name: &PlanName, p: &Plan) -> Self {
        PlanAnswer {
            plan: name.to_string(),
            features: p.features.iter().map(ToString::to_string).collect(),
            limits: p
                .limits
                .iter()
                .map(|(m, l)| (m.to_string(), serde_json::to_value(l).unwrap_or_default()))
                .collect(),
        }
    }
}

pub(crate) fn plan_name(s: &str) -> Result<PlanName, ApiError> {
    PlanName::new(s).map_err(|e| ApiError::invalid("invalid_plan", "plan", e.to_string()))
}

#[utoipa::path(put, path = "/v1/plans/{plan}", tag = "entitlements", params(("plan" = String, Path)),
    request_body(content = Object, description = r#"{"features":["gpt4"],"limits":{"api_calls":{"included":"1000","enforcement":"hard","reset":"calendar"}}}"#),
    responses((status = 200, body = PlanAnswer), (status = 400, body = ErrorBody)))]
pub(super) async fn put_plan(
    State(shared): St,
    Path(plan): Path<String>,
    body: Bytes,
) -> ApiResult<PlanAnswer> {
    let name = plan_name(&plan)?;
    let p: Plan = json_body(&body)?;
    p.check()
        .map_err(|e| ApiError::invalid("invalid_plan", "limits", e.to_string()))?;
    let ent = shared.entitlements()?;
    let (n, q) = (name.clone(), p.clone());
    blocking(&shared, move |_| ent.put_plan(&n, &q)).await?;
    Ok(axum::Json(PlanAnswer::of(&name, &p)))
}

#[utoipa::path(get, path = "/v1/plans/{plan}", tag = "entitlements", params(("plan" = String, Path)),
    responses((status = 200, body = PlanAnswer), (status = 404, body = ErrorBody)))]
pub(super) async fn get_plan(State(shared): St, Path(plan): Path<String>) -> ApiResult<PlanAnswer> {
    let name = plan_name(&plan)?;
    let ent = shared.entitlements()?;
    let n = name.clone();
    match blocking(&shared, move |_| ent.plan(&n)).await? {
        Some(p) => Ok(axum::Json(PlanAnswer::of(&name, &p))),
        None => Err(ApiError::not_found(
            "resource_missing",
            format!("no such plan: {name}"),
        )),
    }
}
