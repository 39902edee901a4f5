//! The meter catalog as the collector keeps it: the sample meters of the quickstart (SPEC §8)
//! and the checks applied before a meter is stored.
//!
//! The catalog itself lives in the [`crate::store::Store`] (versioned: every change bumps the
//! version and is kept); [`crate::server::Shared::put_meter`] stores it and pushes it to every
//! connected agent.

use rust_decimal::Decimal;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::names::{DimensionKey, MeterName, NameError};

/// The quickstart's meters: `api_calls` (sum of `$.count` of `api_call` events) and `tokens`
/// (sum of `$.tokens` of `llm_tokens` events, grouped by `model` = `$.model`), both with
/// `stripe_unit_scale` 1.
pub fn sample_meters() -> Result<Vec<MeterDef>, NameError> {
    let group_by = BoundedVec::new(vec![(DimensionKey::new("model")?, String::from("$.model"))])
        .unwrap_or_default();
    Ok(vec![
        MeterDef {
            name: MeterName::new("api_calls")?,
            aggregation: Aggregation::Sum,
            event_type: String::from("api_call"),
            value_property: Some(String::from("$.count")),
            group_by: BoundedVec::default(),
            stripe_event_name: Some(String::from("api_calls")),
            stripe_unit_scale: Decimal::ONE,
        },
        MeterDef {
            name: MeterName::new("tokens")?,
            aggregation: Aggregation::Sum,
            event_type: String::from("llm_tokens"),
            value_property: Some(String::from("$.tokens")),
            group_by,
            stripe_event_name: Some(String::from("tokens")),
            stripe_unit_scale: Decimal::ONE,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_valid() {
        let m = sample_meters().unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|d| d.validate().is_ok()));
        assert_eq!(m[1].group_by.len(), 1);
    }
}
