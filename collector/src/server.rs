//! The admin API state's old name, kept while `api/stripe_routes.rs` names it; the collector is
//! started by [`crate::start`].

/// The admin API's state, [`crate::api::ApiState`].
pub type Shared = crate::api::ApiState;
