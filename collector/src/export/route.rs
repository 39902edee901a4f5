//! `POST /v1/export`: runs the configured export now and answers what it wrote.

use super::ExportError;
use crate::api::{ApiError, ApiState};
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use std::sync::Arc;

/// What one export run wrote.
#[derive(Serialize)]
pub struct ExportBody {
    /// Files written (both data sets).
    pub files: u64,
    /// Ledger positions exported.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The checkpoint after the run: every position up to it is exported.
    pub last_position: u64,
}

fn error(status: StatusCode, code: &'static str, message: String) -> ApiError {
    ApiError {
        status,
        kind: if status.is_server_error() {
            "api_error"
        } else {
            "invalid_request_error"
        },
        code,
        message,
        param: None,
    }
}

/// Runs the export now (serialised with the continuous job). 409 when the collector runs
/// without `--export-dir`, or when another collector on the same database holds the
/// directory's claim (decision 0098).
pub(crate) async fn export(
    State(shared): State<Arc<ApiState>>,
) -> Result<axum::Json<ExportBody>, ApiError> {
    let Some(runner) = shared.export.get() else {
        return Err(error(
            StatusCode::CONFLICT,
            "export_not_configured",
            "the collector runs without --export-dir".into(),
        ));
    };
    match runner.run().await {
        Ok(r) if r.held_by_other => Err(error(
            StatusCode::CONFLICT,
            "export_held_elsewhere",
            "another collector sharing the database exports this directory now".into(),
        )),
        Ok(r) => Ok(axum::Json(ExportBody {
            files: r.files,
            rows: r.rows,
            bytes: r.bytes,
            last_position: r.last_position,
        })),
        Err(e) => {
            let code = match e {
                ExportError::Core(_) | ExportError::Encode(_) => "export_refused",
                _ => "export_failed",
            };
            tracing::warn!(error = %e, "export failed");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                code,
                e.to_string(),
            ))
        }
    }
}
