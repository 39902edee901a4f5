//! The catalog compiled for ingest: which meters a CloudEvents `type` or a Stripe `event_name`
//! feeds, and how to read value and dimensions.

use crate::json_path::{JsonPath, Leaf, PathError, leaf};
use crate::quantity::{QuantityError, parse_quantity};
use rust_decimal::Decimal;
use serde_json::value::RawValue;
use std::collections::HashMap;
use tally_protocol::catalog::{Aggregation, Catalog};
use tally_protocol::names::{CustomerId, DimensionKey, DimensionValue, Dimensions, MeterName};

/// One usage event, validated and ready for `record_durable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedEvent {
    /// Who pays.
    pub customer: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// Dimensions read through the meter's `group_by`.
    pub dimensions: Dimensions,
    /// The quantity (1 for `count` meters).
    pub quantity: Decimal,
    /// Event time, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Idempotency key, deduped by the agent within its window.
    pub id: Option<String>,
}

/// A meter as ingest needs it.
#[derive(Debug, Clone)]
pub struct CompiledMeter {
    /// The meter.
    pub name: MeterName,
    /// How it aggregates.
    pub aggregation: Aggregation,
    value: Option<JsonPath>,
    group_by: Vec<(DimensionKey, JsonPath)>,
}

/// Why data could not be read for a meter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// The value path is missing from `data`.
    #[error("data has no value at {path} for meter {meter}")]
    MissingValue {
        /// The meter.
        meter: String,
        /// Its value path.
        path: String,
    },
    /// The value is not a number or numeric string, or is negative.
    #[error("value for meter {meter}: {source}")]
    BadValue {
        /// The meter.
        meter: String,
        /// Why.
        source: QuantityError,
    },
    /// A dimension value is not a string or number, or is not a valid dimension value.
    #[error(
        "dimension {key} for meter {meter} must be a string or number of at most 256 bytes without control characters"
    )]
    BadDimension {
        /// The meter.
        meter: String,
        /// The dimension key.
        key: String,
    },
}

impl CompiledMeter {
    /// Whether `key` is one of this meter's `group_by` dimensions.
    pub fn has_dimension(&self, key: &str) -> bool {
        self.group_by.iter().any(|(k, _)| k.as_str() == key)
    }

    /// Reads quantity and dimensions for this meter from CloudEvents `data`.
    pub fn read(&self, data: Option<&RawValue>) -> Result<(Decimal, Dimensions), DataError> {
        let meter = || self.name.to_string();
        let quantity = match (&self.value, self.aggregation) {
            (_, Aggregation::Count) => Decimal::ONE,
            (Some(path), _) => {
                let missing = || DataError::MissingValue {
                    meter: meter(),
                    path: format!("{path:?}"),
                };
                let raw = data.and_then(|d| path.find(d)).ok_or_else(missing)?;
                let text = match leaf(raw) {
                    Leaf::Number(t) | Leaf::Str(t) => t,
                    Leaf::Other => return Err(missing()),
                };
                parse_quantity(&text).map_err(|source| DataError::BadValue {
                    meter: meter(),
                    source,
                })?
            }
            (None, _) => Decimal::ONE,
        };
        let mut dims = Vec::with_capacity(self.group_by.len());
        for (key, path) in &self.group_by {
            let Some(raw) = data.and_then(|d| path.find(d)) else {
                continue;
            };
            let bad = || DataError::BadDimension {
                meter: meter(),
                key: key.to_string(),
            };
            let text = match leaf(raw) {
                Leaf::Str(s) | Leaf::Number(s) => s,
                Leaf::Other if raw.get().trim() == "null" => continue,
                Leaf::Other => return Err(bad()),
            };
            dims.push((key.clone(), DimensionValue::new(text).map_err(|_| bad())?));
        }
        let dimensions = Dimensions::new(dims).map_err(|_| DataError::BadDimension {
            meter: meter(),
            key: String::from("(set)"),
        })?;
        Ok((quantity, dimensions))
    }
}

/// The catalog indexed by CloudEvents type and by Stripe event name.
#[derive(Debug, Clone, Default)]
pub struct IngestCatalog {
    /// Catalog version this was built from.
    pub version: u64,
    by_type: HashMap<String, Vec<CompiledMeter>>,
    by_stripe_name: HashMap<String, CompiledMeter>,
}

impl IngestCatalog {
    /// Compiles the catalog's paths; a meter with a path outside the supported subset is an error.
    pub fn compile(catalog: &Catalog) -> Result<Self, PathError> {
        let mut out = IngestCatalog {
            version: catalog.version,
            ..Default::default()
        };
        for m in catalog.meters.iter() {
            let compiled = CompiledMeter {
                name: m.name.clone(),
                aggregation: m.aggregation,
                value: m
                    .value_property
                    .as_deref()
                    .map(JsonPath::parse)
                    .transpose()?,
                group_by: m
                    .group_by
                    .iter()
                    .map(|(k, p)| Ok((k.clone(), JsonPath::parse(p)?)))
                    .collect::<Result<_, PathError>>()?,
            };
            if let Some(name) = &m.stripe_event_name {
                out.by_stripe_name.insert(name.clone(), compiled.clone());
            }
            out.by_type
                .entry(m.event_type.clone())
                .or_default()
                .push(compiled);
        }
        Ok(out)
    }

    /// Whether the catalog has this meter.
    pub fn has_meter(&self, meter: &str) -> bool {
        self.by_type
            .values()
            .flatten()
            .any(|m| m.name.as_str() == meter)
    }

    /// Meters fed by a CloudEvents type.
    pub fn for_type(&self, event_type: &str) -> &[CompiledMeter] {
        self.by_type.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// The meter whose Stripe event name this is.
    pub fn for_stripe_event(&self, event_name: &str) -> Option<&CompiledMeter> {
        self.by_stripe_name.get(event_name)
    }
}
