//! The meter catalog: defined once at the collector, pushed to agents (versioned), kept on their
//! disk.

use crate::bounded::BoundedVec;
use crate::names::{DimensionKey, MeterName, NameError};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Most meters in one catalog.
pub const MAX_METERS: usize = 1024;
/// Longest path or event type string, in bytes (checked by [`MeterDef::validate`]).
pub const MAX_PATH_BYTES: usize = 256;

/// How a meter's events combine, as Stripe meters do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Add the values.
    Sum,
    /// Count the events; values are ignored.
    Count,
    /// Keep the value with the latest timestamp.
    Last,
}

/// One meter of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterDef {
    /// The meter's name.
    pub name: MeterName,
    /// How events combine.
    pub aggregation: Aggregation,
    /// CloudEvents `type` that maps to this meter.
    pub event_type: String,
    /// JSON path of the value in CloudEvents `data` (`$.count`); none for `count` meters.
    pub value_property: Option<String>,
    /// Dimensions read from CloudEvents `data`: key → JSON path.
    pub group_by: BoundedVec<(DimensionKey, String), { crate::names::MAX_DIMENSIONS }>,
    /// Stripe meter `event_name` this meter forwards to.
    pub stripe_event_name: Option<String>,
    /// Multiplier from this meter's unit to Stripe's whole units.
    #[serde(with = "crate::wire_decimal")]
    pub stripe_unit_scale: Decimal,
}

/// Why a meter definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeterDefError {
    /// A path, event type or event name is empty, too long or has control characters.
    #[error("{0} must be 1 to {MAX_PATH_BYTES} bytes without control characters")]
    BadText(&'static str),
    /// `stripe_unit_scale` must be positive.
    #[error("stripe_unit_scale must be greater than zero")]
    BadScale,
    /// `sum` and `last` meters need a value path.
    #[error("a {0:?} meter needs a value_property")]
    MissingValue(Aggregation),
}

fn text_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_PATH_BYTES && !s.chars().any(char::is_control)
}

impl MeterDef {
    /// Checks the fields that the type system does not.
    pub fn validate(&self) -> Result<(), MeterDefError> {
        if !text_ok(&self.event_type) {
            return Err(MeterDefError::BadText("event_type"));
        }
        match (&self.value_property, self.aggregation) {
            (Some(p), _) if !text_ok(p) => return Err(MeterDefError::BadText("value_property")),
            (None, a @ (Aggregation::Sum | Aggregation::Last)) => {
                return Err(MeterDefError::MissingValue(a));
            }
            _ => {}
        }
        if self.group_by.iter().any(|(_, p)| !text_ok(p)) {
            return Err(MeterDefError::BadText("group_by path"));
        }
        if self
            .stripe_event_name
            .as_deref()
            .is_some_and(|s| !text_ok(s))
        {
            return Err(MeterDefError::BadText("stripe_event_name"));
        }
        if self.stripe_unit_scale <= Decimal::ZERO {
            return Err(MeterDefError::BadScale);
        }
        Ok(())
    }
}

/// A versioned catalog; a higher version replaces a lower one whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Catalog {
    /// Increases with every change.
    pub version: u64,
    /// The meters.
    pub meters: BoundedVec<MeterDef, MAX_METERS>,
}

impl Catalog {
    /// The meter with this name.
    pub fn meter(&self, name: &str) -> Option<&MeterDef> {
        self.meters.iter().find(|m| m.name.as_str() == name)
    }
}

/// The quickstart's meters (SPEC §8): `api_calls` (sum of `$.count` of `api_call` events) and
/// `tokens` (sum of `$.tokens` of `llm_tokens` events, grouped by `model` = `$.model`), both
/// forwarded to Stripe under their own names with `stripe_unit_scale` 1.
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
