//! The entitlement snapshots received, merged: what the store keeps and what a restarted agent
//! decides from before any collector answers.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tally_protocol::entitlements::{CustomerEntitlements, EntitlementsSnapshot};

/// The entitlement snapshots received, merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EntitlementsCache {
    /// Version of the last snapshot applied.
    pub version: u64,
    /// When the collector built it, ms since the Unix epoch.
    pub built_at_ms: i64,
    /// Every customer's entitlements.
    pub customers: Vec<CustomerEntitlements>,
}

impl EntitlementsCache {
    /// Applies a pushed snapshot: a full one replaces everything, a partial one replaces the
    /// customers it lists. An older version than the one held is ignored; returns whether it
    /// was applied.
    pub fn apply(&mut self, s: EntitlementsSnapshot) -> bool {
        if s.version < self.version {
            return false;
        }
        self.version = s.version;
        self.built_at_ms = s.built_at_ms;
        let incoming = s.customers.into_inner();
        if s.full {
            self.customers = incoming;
            return true;
        }
        let mut at: HashMap<String, usize> = self
            .customers
            .iter()
            .enumerate()
            .map(|(i, c)| (c.customer.as_str().to_owned(), i))
            .collect();
        for c in incoming {
            match at.get(c.customer.as_str()) {
                Some(&i) => self.customers[i] = c,
                None => {
                    at.insert(c.customer.as_str().to_owned(), self.customers.len());
                    self.customers.push(c);
                }
            }
        }
        true
    }
}
