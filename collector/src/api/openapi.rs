//! The OpenAPI document of the admin API (`GET /openapi.json`).

use super::errors::*;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tally collector admin API", description = "Usage, meters, ledger, agents, entitlements (plans, grants), Stripe, Orb and Metronome forwarding. Errors in Stripe's shape. Bearer admin token."),
    paths(super::usage::usage, super::usage::customer_usage, super::meters::list_meters, super::meters::put_meter, super::ledger::entries, super::ledger::verify,
        super::agents::agents, super::agents::revoke, super::enroll_tokens::create, super::enroll_tokens::list, super::enroll_tokens::revoke, super::adjustments::adjust, super::quarantine::quarantine, super::ops::metrics, super::ops::healthz,
        super::stripe::put_customer, super::stripe::list_outbox, super::stripe::retry_outbox, super::stripe::webhook, super::forward::reconciliation, super::forward::outbox, super::forward::retry_orb, super::forward::retry_metronome,
        super::plans::put_plan, super::plans::get_plan, super::grants::create_grant, super::entitlements::get_entitlements, super::entitlements::refresh_stripe,
        super::series::series, super::customers::list_customers, super::customers::get_customer, super::overview::overview),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "admin_token",
            Vec::<String>::new(),
        )]);
    }
}

/// The OpenAPI document of this API.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(super) async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(openapi_doc())
}
