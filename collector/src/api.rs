//! The admin HTTP API (SPEC §6.6).

use crate::server::Shared;
use axum::Router;
use axum::routing::get;
use std::sync::Arc;
use tokio::sync::watch;

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let app = router(shared);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared)
}
