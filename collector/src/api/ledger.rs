//! `GET /v1/ledger/entries` and `GET /v1/ledger/verify`: the transfers and the invariant check.

use super::errors::*;
use super::state::{St, blocking};
use crate::core::ledger::{Transfer, TransferSource, VerifyReport};
use axum::extract::{RawQuery, State};
use rust_decimal::Decimal;
use serde::Serialize;
use utoipa::ToSchema;

/// One ledger transfer.
#[derive(Serialize, ToSchema)]
pub struct Entry {
    /// Position in the ledger (use as `after` to page).
    pub position: u64,
    /// The transfer id, 32 hex digits.
    pub id: String,
    /// Debited account id.
    pub debit_account: String,
    /// Credited account id.
    pub credit_account: String,
    /// The unit (meter).
    pub unit: String,
    /// The amount, a decimal string.
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// The signed change to the customer's usage (`amount`, negative when the usage account is
    /// debited), a decimal string.
    #[schema(value_type = String)]
    pub quantity: Decimal,
    /// Events carried.
    pub events: u64,
    /// The customer.
    pub customer: String,
    /// When the usage happened, ms.
    pub event_at_ms: i64,
    /// When it was posted, ms.
    pub posted_at_ms: i64,
    /// `batch_row` or `adjustment`, with its fields.
    #[schema(value_type = Object)]
    pub source: serde_json::Value,
}

impl Entry {
    fn of(position: u64, t: &Transfer) -> Self {
        let source = match &t.source {
            TransferSource::BatchRow {
                agent,
                epoch,
                seq,
                row,
            } => serde_json::json!({
                "type": "batch_row", "agent": agent.to_string(), "epoch": epoch, "seq": seq, "row": row,
            }),
            TransferSource::Adjustment {
                idempotency_key,
                reason,
            } => serde_json::json!({
                "type": "adjustment", "idempotency_key": idempotency_key, "reason": reason,
            }),
            TransferSource::Grant { idempotency_key } => serde_json::json!({
                "type": "grant", "idempotency_key": idempotency_key,
            }),
        };
        Entry {
            position,
            id: format!("{:032x}", t.id),
            debit_account: format!("{:032x}", t.debit),
            credit_account: format!("{:032x}", t.credit),
            unit: t.unit.to_string(),
            amount: t.amount,
            quantity: super::series::signed_amount(t),
            events: t.events,
            customer: t.customer.to_string(),
            event_at_ms: t.event_at_ms,
            posted_at_ms: t.posted_at_ms,
            source,
        }
    }
}

/// A page of ledger entries.
#[derive(Serialize, ToSchema)]
pub struct Entries {
    /// The entries.
    pub data: Vec<Entry>,
    /// True when more may follow.
    pub has_more: bool,
    /// Pass as `after` for the next page.
    pub next_after: Option<u64>,
}

#[utoipa::path(get, path = "/v1/ledger/entries", tag = "ledger",
    params(("customer" = Option<String>, Query), ("after" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, body = Entries), (status = 400, body = ErrorBody)))]
pub(super) async fn entries(State(shared): St, RawQuery(raw): RawQuery) -> ApiResult<Entries> {
    let q = query(raw)?;
    let c = q
        .get("customer")
        .map(|c| customer(c, "customer"))
        .transpose()?;
    let after = number(&q, "after", 0)?;
    let limit = number(&q, "limit", 100)?;
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "invalid_limit",
            "limit",
            "limit must be 1 to 1000",
        ));
    }
    let limit = limit as usize;
    let rows = blocking(&shared, move |s| s.store.entries(c.as_ref(), after, limit)).await?;
    let next_after = rows.last().map(|(p, _)| *p);
    Ok(axum::Json(Entries {
        has_more: rows.len() == limit,
        data: rows.iter().map(|(p, t)| Entry::of(*p, t)).collect(),
        next_after,
    }))
}

/// The ledger verification report.
#[derive(Serialize, ToSchema)]
pub struct VerifyBody {
    /// True when every invariant holds.
    pub ok: bool,
    /// Accounts checked.
    pub accounts: u64,
    /// Transfers checked.
    pub transfers: u64,
    /// Units checked.
    pub units: u64,
    /// Batches recorded.
    pub batches: u64,
    /// Violations found.
    pub violation_count: u64,
    /// The first violations.
    pub violations: Vec<String>,
}

impl From<VerifyReport> for VerifyBody {
    fn from(r: VerifyReport) -> Self {
        VerifyBody {
            ok: r.ok,
            accounts: r.accounts,
            transfers: r.transfers,
            units: r.units,
            batches: r.batches,
            violation_count: r.violation_count,
            violations: r.violations,
        }
    }
}

#[utoipa::path(get, path = "/v1/ledger/verify", tag = "ledger", responses((status = 200, body = VerifyBody)))]
pub(super) async fn verify(State(shared): St) -> ApiResult<VerifyBody> {
    let r = blocking(&shared, |s| s.verify()).await?;
    Ok(axum::Json(r.into()))
}
