//! What the agent does when it cannot decide from a current snapshot: for a customer it has no
//! snapshot of yet, or when its snapshot is older than the configured age (decision 0066).

use rust_decimal::Decimal;
use std::collections::HashMap;
use std::time::Duration;
use tally_protocol::names::MeterName;

/// Default age past which a snapshot is stale (while no collector confirms it).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(15 * 60);
/// Default bound the waiting variants (`check_wait`, …) wait for a new customer's snapshot.
pub const DEFAULT_WAIT: Duration = Duration::from_millis(100);

/// The rule for a meter (or a feature) when no current snapshot decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OfflinePolicy {
    /// Refuse.
    #[default]
    Deny,
    /// Allow everything.
    Allow,
    /// Allow up to this quantity per customer and meter, counted from the moment the policy
    /// started to apply until a current snapshot arrives.
    AllowUpTo(Decimal),
}

impl std::str::FromStr for OfflinePolicy {
    type Err = String;

    /// `deny`, `allow`, or `allow_up_to:Q` (Q a decimal ≥ 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(OfflinePolicy::Deny),
            "allow" => Ok(OfflinePolicy::Allow),
            other => {
                let q = other.strip_prefix("allow_up_to:").ok_or_else(|| {
                    format!("unknown policy {other:?}: use deny, allow or allow_up_to:Q")
                })?;
                let q: Decimal = q.parse().map_err(|e| format!("allow_up_to: {e}"))?;
                if q.is_sign_negative() {
                    return Err("allow_up_to: quantity must not be negative".into());
                }
                Ok(OfflinePolicy::AllowUpTo(q))
            }
        }
    }
}

/// Entitlement settings of an agent.
#[derive(Debug, Clone)]
pub struct EntitlementsConfig {
    /// A snapshot not confirmed by a connected collector for this long is stale.
    pub stale_after: Duration,
    /// The policy of meters not listed in `meter_policy`, and of features.
    pub default_policy: OfflinePolicy,
    /// Per-meter policies.
    pub meter_policy: HashMap<MeterName, OfflinePolicy>,
    /// How long the waiting variants wait for a new customer's snapshot or a first lease.
    pub wait: Duration,
}

impl Default for EntitlementsConfig {
    fn default() -> Self {
        EntitlementsConfig {
            stale_after: DEFAULT_STALE_AFTER,
            default_policy: OfflinePolicy::Deny,
            meter_policy: HashMap::new(),
            wait: DEFAULT_WAIT,
        }
    }
}

impl EntitlementsConfig {
    /// The policy of `meter`.
    pub fn policy(&self, meter: &str) -> OfflinePolicy {
        self.meter_policy
            .iter()
            .find(|(m, _)| m.as_str() == meter)
            .map_or(self.default_policy, |(_, p)| *p)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn policies_parse() {
        assert_eq!("deny".parse(), Ok(OfflinePolicy::Deny));
        assert_eq!("allow".parse(), Ok(OfflinePolicy::Allow));
        assert_eq!(
            "allow_up_to:2.5".parse(),
            Ok(OfflinePolicy::AllowUpTo(Decimal::new(25, 1)))
        );
        assert!("allow_up_to:-1".parse::<OfflinePolicy>().is_err());
        assert!("maybe".parse::<OfflinePolicy>().is_err());
    }
}
