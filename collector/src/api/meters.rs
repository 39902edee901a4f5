//! `GET /v1/meters` and `PUT /v1/meters/{meter}`: the catalog, pushed to agents on change.

use super::errors::*;
use super::state::{St, blocking};
use axum::body::Bytes;
use axum::extract::{Path, State};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::{Aggregation, MeterDef};
use tally_protocol::names::DimensionKey;
use utoipa::ToSchema;

use crate::store::{DestNames, NameKind};

/// A meter as the API shows and takes it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MeterBody {
    /// The meter's name (from the path on `PUT`).
    #[serde(default)]
    pub name: Option<String>,
    /// `sum`, `count` or `last`.
    pub aggregation: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// JSON path of the value (`$.count`); not for `count` meters.
    #[serde(default)]
    pub value_property: Option<String>,
    /// Dimension → JSON path.
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
    /// Stripe meter event name.
    #[serde(default)]
    pub stripe_event_name: Option<String>,
    /// Multiplier to Stripe's whole units, a decimal string; default `"1"`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub stripe_unit_scale: Option<serde_json::Value>,
    /// Orb `event_name` (default: the configuration's `orb_meters`, else the meter's name);
    /// `""` removes it. Not part of the catalog agents get.
    #[serde(default)]
    pub orb_event_name: Option<String>,
    /// Metronome `event_type` (default: `metronome_meters`, else the meter's name); `""`
    /// removes it.
    #[serde(default)]
    pub metronome_event_type: Option<String>,
}

/// The catalog's meters with their destination names.
fn meters_of(
    c: &tally_protocol::catalog::Catalog,
    names: &[(String, DestNames)],
) -> Vec<MeterBody> {
    let names: BTreeMap<&str, &DestNames> = names.iter().map(|(k, n)| (k.as_str(), n)).collect();
    c.meters
        .iter()
        .map(|m| MeterBody::of(m, names.get(m.name.as_str()).copied()))
        .collect()
}

/// Reads the catalog and its meters' destination names.
fn catalog_with_names(
    s: &super::ApiState,
    c: Option<tally_protocol::catalog::Catalog>,
) -> Result<Meters, crate::store::StoreError> {
    let c = match c {
        Some(c) => c,
        None => s.store.catalog()?,
    };
    let keys: Vec<String> = c.meters.iter().map(|m| m.name.to_string()).collect();
    let names = s.store.dest_names(NameKind::Meter, &keys)?;
    Ok(Meters {
        version: c.version,
        data: meters_of(&c, &names),
    })
}

impl MeterBody {
    fn of(def: &MeterDef, names: Option<&DestNames>) -> Self {
        MeterBody {
            name: Some(def.name.to_string()),
            aggregation: String::from(match def.aggregation {
                Aggregation::Sum => "sum",
                Aggregation::Count => "count",
                Aggregation::Last => "last",
            }),
            event_type: def.event_type.clone(),
            value_property: def.value_property.clone(),
            group_by: def
                .group_by
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            stripe_event_name: def.stripe_event_name.clone(),
            stripe_unit_scale: Some(serde_json::Value::String(def.stripe_unit_scale.to_string())),
            orb_event_name: names.and_then(|n| n.orb.clone()),
            metronome_event_type: names.and_then(|n| n.metronome.clone()),
        }
    }
}

/// The catalog.
#[derive(Serialize, ToSchema)]
pub struct Meters {
    /// Catalog version; increases with every change.
    pub version: u64,
    /// The meters.
    pub data: Vec<MeterBody>,
}

#[utoipa::path(get, path = "/v1/meters", tag = "meters", responses((status = 200, body = Meters)))]
pub(super) async fn list_meters(State(shared): St) -> ApiResult<Meters> {
    Ok(axum::Json(
        blocking(&shared, |s| catalog_with_names(s, None)).await?,
    ))
}

#[utoipa::path(put, path = "/v1/meters/{meter}", tag = "meters", params(("meter" = String, Path)),
    request_body = MeterBody, responses((status = 200, body = Meters), (status = 400, body = ErrorBody)))]
pub(super) async fn put_meter(
    State(shared): St,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Meters> {
    let name = meter_name(&name, "meter")?;
    let b: MeterBody = json_body(&body)?;
    if b.name.as_deref().is_some_and(|n| n != name.as_str()) {
        return Err(ApiError::invalid(
            "name_mismatch",
            "name",
            "name differs from the path",
        ));
    }
    let aggregation = match b.aggregation.as_str() {
        "sum" => Aggregation::Sum,
        "count" => Aggregation::Count,
        "last" => Aggregation::Last,
        _ => {
            return Err(ApiError::invalid(
                "invalid_aggregation",
                "aggregation",
                "aggregation must be sum, count or last",
            ));
        }
    };
    let mut group_by = Vec::new();
    for (k, v) in b.group_by {
        let k = DimensionKey::new(k)
            .map_err(|e| ApiError::invalid("invalid_group_by", "group_by", e.to_string()))?;
        group_by.push((k, v));
    }
    let group_by = BoundedVec::new(group_by)
        .map_err(|e| ApiError::invalid("invalid_group_by", "group_by", e.to_string()))?;
    let orb = ApiError::dest_name(b.orb_event_name.as_ref(), "orb_event_name")?;
    let met = ApiError::dest_name(b.metronome_event_type.as_ref(), "metronome_event_type")?;
    let scale = match &b.stripe_unit_scale {
        None => Decimal::ONE,
        Some(v) => decimal(v, "stripe_unit_scale")?,
    };
    let def = MeterDef {
        name,
        aggregation,
        event_type: b.event_type,
        value_property: b.value_property,
        group_by,
        stripe_event_name: b.stripe_event_name,
        stripe_unit_scale: scale,
    };
    def.validate()
        .map_err(|e| ApiError::invalid("invalid_meter_definition", "meter", e.to_string()))?;
    let m = blocking(&shared, move |s| {
        let c = s.put_meter(&def)?;
        if orb.is_some() || met.is_some() {
            let key = def.name.to_string();
            let mut n = s
                .store
                .dest_names(NameKind::Meter, std::slice::from_ref(&key))?
                .pop()
                .map(|(_, n)| n)
                .unwrap_or_default();
            if let Some(v) = orb {
                n.orb = v;
            }
            if let Some(v) = met {
                n.metronome = v;
            }
            s.store.put_dest_names(NameKind::Meter, &key, &n)?;
        }
        catalog_with_names(s, Some(c))
    })
    .await?;
    // Events planned from now on use the new names (the next planning step reads them).
    shared.forwarding.notify();
    Ok(axum::Json(m))
}
