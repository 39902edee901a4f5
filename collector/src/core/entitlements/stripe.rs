//! Stripe Entitlements, read without I/O: an `entitlements.active_entitlement_summary.updated`
//! event names a Stripe customer and its active entitlements; each one's `lookup_key` is a
//! feature of ours (SPEC §6.3). Lookup keys that are not valid feature names are skipped.

use std::collections::BTreeSet;
use tally_protocol::entitlements::MAX_ITEMS_PER_CUSTOMER;
use tally_protocol::names::FeatureName;

/// The event type that carries a customer's active entitlements.
pub const SUMMARY_UPDATED: &str = "entitlements.active_entitlement_summary.updated";

/// Features from lookup keys (invalid names skipped, at most a snapshot's worth).
pub fn features<'a>(lookup_keys: impl IntoIterator<Item = &'a str>) -> BTreeSet<FeatureName> {
    lookup_keys
        .into_iter()
        .filter_map(|k| FeatureName::new(k).ok())
        .take(MAX_ITEMS_PER_CUSTOMER)
        .collect()
}

/// The Stripe customer and its features, when `event` is a summary update.
pub fn summary_update(event: &serde_json::Value) -> Option<(String, BTreeSet<FeatureName>)> {
    if event.get("type")?.as_str()? != SUMMARY_UPDATED {
        return None;
    }
    let obj = event.pointer("/data/object")?;
    let customer = obj.get("customer")?.as_str()?.to_owned();
    let keys = obj
        .pointer("/entitlements/data")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("lookup_key").and_then(serde_json::Value::as_str));
    Some((customer, features(keys)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_update_names_the_customer_and_its_features() {
        let ev = serde_json::json!({
            "id": "evt_1", "type": SUMMARY_UPDATED,
            "data": {"object": {"object": "entitlements.active_entitlement_summary",
                "customer": "cus_123",
                "entitlements": {"object": "list", "has_more": false, "data": [
                    {"id": "ent_1", "object": "entitlements.active_entitlement", "feature": "feat_1", "lookup_key": "gpt4"},
                    {"id": "ent_2", "object": "entitlements.active_entitlement", "feature": "feat_2", "lookup_key": "Not Valid!"}
                ]}}}
        });
        let (c, f) = summary_update(&ev).unwrap();
        assert_eq!(c, "cus_123");
        assert_eq!(f.len(), 1);
        assert!(f.contains(&FeatureName::new("gpt4").unwrap()));
        let other = serde_json::json!({"id": "evt_2", "type": "customer.subscription.updated"});
        assert!(summary_update(&other).is_none());
    }
}
