//! What the collector keeps about entitlements, and the checks applied before anything is
//! stored: plans (features and limits per meter), per-customer overrides, grants and the
//! customer's entitlement settings. Every record is plain data; JSON is its stored form (the
//! records are small, written rarely, and new fields must not break old files).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tally_protocol::entitlements::{Enforcement, MAX_ITEMS_PER_CUSTOMER};
use tally_protocol::names::{CustomerId, FeatureName, MeterName};

/// Most grants kept per customer and meter (active or not yet effective).
pub const MAX_GRANTS_PER_METER: usize = 1_000;
/// Longest idempotency key, bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Why a plan, override or grant is refused. Nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// More features or limits than a snapshot carries.
    #[error("too many {what}: {n} (at most {max})")]
    TooMany {
        /// Features or limits.
        what: &'static str,
        /// How many were given.
        n: usize,
        /// The limit.
        max: usize,
    },
    /// A quantity is negative (or zero where it must be positive).
    #[error("{field} must be {rule}")]
    Quantity {
        /// The field.
        field: &'static str,
        /// What it must be.
        rule: &'static str,
    },
    /// Times out of order.
    #[error("expires_at must be after effective_at")]
    Times,
    /// An idempotency key is empty, too long or not printable ASCII.
    #[error("idempotency_key must be 1 to {MAX_KEY_BYTES} printable ascii characters")]
    Key,
    /// An anchor day outside 1–31.
    #[error("anchor_day must be 1 to 31")]
    AnchorDay,
}

/// When a limit's usage starts again from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reset {
    /// On the first day of every calendar month (UTC).
    #[default]
    Calendar,
    /// Monthly on the customer's anchor day (`anchor_day`, default 1).
    Anchor,
}

/// A metered limit of a plan or an override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitDef {
    /// Included in each period.
    pub included: Decimal,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// When it resets.
    #[serde(default)]
    pub reset: Reset,
}

impl LimitDef {
    fn check(&self) -> Result<(), ModelError> {
        if self.included.is_sign_negative() && !self.included.is_zero() {
            return Err(ModelError::Quantity {
                field: "included",
                rule: "zero or more",
            });
        }
        Ok(())
    }
}

/// A plan: boolean features and metered limits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Features the plan gives.
    #[serde(default)]
    pub features: BTreeSet<FeatureName>,
    /// Limits per meter.
    #[serde(default)]
    pub limits: BTreeMap<MeterName, LimitDef>,
}

fn at_most(what: &'static str, n: usize) -> Result<(), ModelError> {
    if n > MAX_ITEMS_PER_CUSTOMER {
        return Err(ModelError::TooMany {
            what,
            n,
            max: MAX_ITEMS_PER_CUSTOMER,
        });
    }
    Ok(())
}

impl Plan {
    /// Checks the plan fits a snapshot and its quantities are valid.
    pub fn check(&self) -> Result<(), ModelError> {
        at_most("features", self.features.len())?;
        at_most("limits", self.limits.len())?;
        self.limits.values().try_for_each(LimitDef::check)
    }
}

/// A customer's departures from its plan.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Features given on top of the plan.
    #[serde(default)]
    pub add_features: BTreeSet<FeatureName>,
    /// Plan features taken away.
    #[serde(default)]
    pub remove_features: BTreeSet<FeatureName>,
    /// Limits replacing the plan's (`null` removes the plan's limit on that meter).
    #[serde(default)]
    pub limits: BTreeMap<MeterName, Option<LimitDef>>,
}

impl Overrides {
    /// Checks sizes and quantities.
    pub fn check(&self) -> Result<(), ModelError> {
        at_most("features", self.add_features.len())?;
        at_most("features", self.remove_features.len())?;
        at_most("limits", self.limits.len())?;
        self.limits.values().flatten().try_for_each(LimitDef::check)
    }

    /// True when nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self.add_features.is_empty() && self.remove_features.is_empty() && self.limits.is_empty()
    }
}

/// A customer's entitlement settings beside its plan (kept apart from the Stripe customer
/// record so either can grow on its own).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CustomerSettings {
    /// Overrides of the plan.
    #[serde(default)]
    pub overrides: Overrides,
    /// Day of the month `reset: anchor` limits start again (1–31; none means 1).
    #[serde(default)]
    pub anchor_day: Option<u8>,
    /// Features of the customer's active Stripe entitlements (`lookup_key`s).
    #[serde(default)]
    pub stripe_features: BTreeSet<FeatureName>,
}

impl CustomerSettings {
    /// Checks the overrides and the anchor day.
    pub fn check(&self) -> Result<(), ModelError> {
        self.overrides.check()?;
        at_most("features", self.stripe_features.len())?;
        if self.anchor_day.is_some_and(|d| !(1..=31).contains(&d)) {
            return Err(ModelError::AnchorDay);
        }
        Ok(())
    }
}

/// A grant as requested (`POST /v1/grants`); its idempotency key names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRequest {
    /// Who receives it.
    pub customer: CustomerId,
    /// Which meter it raises.
    pub meter: MeterName,
    /// How much, positive.
    pub quantity: Decimal,
    /// Lower is consumed first.
    pub priority: u32,
    /// From when it counts, ms.
    pub effective_at_ms: i64,
    /// When it stops counting, ms (exclusive); `None`: never.
    pub expires_at_ms: Option<i64>,
    /// The idempotency key.
    pub idempotency_key: String,
}

impl GrantRequest {
    /// Checks the quantity, the times and the key.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.quantity <= Decimal::ZERO {
            return Err(ModelError::Quantity {
                field: "quantity",
                rule: "positive",
            });
        }
        if self
            .expires_at_ms
            .is_some_and(|e| e <= self.effective_at_ms)
        {
            return Err(ModelError::Times);
        }
        if self.idempotency_key.is_empty()
            || self.idempotency_key.len() > MAX_KEY_BYTES
            || !self.idempotency_key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ModelError::Key);
        }
        Ok(())
    }

    /// The field that differs from `other`, if any (a repeated key must repeat the body).
    pub fn differs_from(&self, other: &GrantRequest) -> Option<&'static str> {
        if self.customer != other.customer {
            Some("customer")
        } else if self.meter != other.meter {
            Some("meter")
        } else if self.quantity != other.quantity {
            Some("quantity")
        } else if self.priority != other.priority {
            Some("priority")
        } else if self.effective_at_ms != other.effective_at_ms {
            Some("effective_at")
        } else if self.expires_at_ms != other.expires_at_ms {
            Some("expires_at")
        } else {
            None
        }
    }
}

/// A stored grant: the request, its ledger transfer and when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// What was asked.
    pub request: GrantRequest,
    /// Its ledger transfer's id (hex in the API).
    pub transfer_id: u128,
    /// Its ledger position.
    pub position: u64,
    /// When it was made, ms.
    pub created_at_ms: i64,
}

impl Grant {
    /// True when it counts at `now_ms`.
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.request.effective_at_ms <= now_ms
            && self.request.expires_at_ms.is_none_or(|e| now_ms < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_json_shape_and_checks() {
        let p: Plan = serde_json::from_str(
            r#"{"features":["gpt4"],"limits":{"api_calls":{"included":"1000","enforcement":"hard","reset":"calendar"}}}"#,
        )
        .unwrap();
        assert!(p.check().is_ok());
        assert_eq!(p.limits.len(), 1);
        let bad: Plan = serde_json::from_str(
            r#"{"limits":{"api_calls":{"included":"-1","enforcement":"soft"}}}"#,
        )
        .unwrap();
        assert!(bad.check().is_err());
        assert!(serde_json::from_str::<Plan>(r#"{"feature":[]}"#).is_err());
    }
}
