//! OpenMeter-compatible ingest: CloudEvents 1.0 in JSON, one event or a batch, mapped through
//! the catalog. A request is accepted or refused whole.

use crate::mapping::{DataError, IngestCatalog, MappedEvent};
use serde::Deserialize;
use serde_json::value::RawValue;
use tally_protocol::names::{CustomerId, NameError};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Most events in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
/// Longest `id` or `source`, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// How the body is framed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/cloudevents+json`: one event.
    Structured,
    /// `application/cloudevents-batch+json`: an array.
    Batch,
    /// `application/json`: one event or an array.
    Json,
}

impl Mode {
    /// The mode for a `Content-Type` header value, ignoring parameters such as `charset`.
    pub fn from_content_type(ct: &str) -> Option<Mode> {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/cloudevents+json" => Some(Mode::Structured),
            "application/cloudevents-batch+json" => Some(Mode::Batch),
            "application/json" => Some(Mode::Json),
            _ => None,
        }
    }
}

/// Why a request was refused; `index` is the event's position in a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The body is not JSON of the expected shape.
    #[error("body is not a valid CloudEvents JSON {expected}: {detail}")]
    Malformed {
        /// What was expected.
        expected: &'static str,
        /// serde's message.
        detail: String,
    },
    /// More events than [`MAX_EVENTS_PER_REQUEST`].
    #[error("a request may carry at most {MAX_EVENTS_PER_REQUEST} events, got {0}")]
    TooMany(usize),
    /// A batch with no events.
    #[error("the batch is empty")]
    Empty,
    /// One event is invalid.
    #[error("event {index}: {reason}")]
    Event {
        /// Position in the request.
        index: usize,
        /// Why.
        reason: EventError,
    },
}

/// Why one event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// `specversion` is not `1.0`.
    #[error("specversion must be \"1.0\"")]
    SpecVersion,
    /// A required attribute is missing or empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// `id` or `source` over the limit.
    #[error("{0} must be at most {MAX_ID_BYTES} bytes")]
    TooLong(&'static str),
    /// `subject` is not a valid customer key.
    #[error("subject: {0}")]
    Subject(NameError),
    /// `time` is not RFC 3339.
    #[error("time must be an RFC 3339 timestamp")]
    Time,
    /// No meter in the catalog has this `type`.
    #[error("no meter has event type {0:?}")]
    UnknownType(String),
    /// `datacontenttype` other than JSON.
    #[error("datacontenttype must be application/json")]
    DataContentType,
    /// `data` does not fit a meter.
    #[error(transparent)]
    Data(DataError),
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

fn malformed(expected: &'static str, e: serde_json::Error) -> IngestError {
    IngestError::Malformed {
        expected,
        detail: e.to_string(),
    }
}

/// Parses and maps a request body; `now_ms` is the time given to events without `time`.
pub fn parse(
    body: &[u8],
    mode: Mode,
    catalog: &IngestCatalog,
    now_ms: i64,
) -> Result<Vec<MappedEvent>, IngestError> {
    let events: Vec<RawEvent<'_>> = match mode {
        Mode::Structured => vec![serde_json::from_slice(body).map_err(|e| malformed("event", e))?],
        Mode::Batch => serde_json::from_slice(body).map_err(|e| malformed("batch", e))?,
        Mode::Json => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'[') {
                serde_json::from_slice(body).map_err(|e| malformed("batch", e))?
            } else {
                vec![serde_json::from_slice(body).map_err(|e| malformed("event", e))?]
            }
        }
    };
    if events.is_empty() {
        return Err(IngestError::Empty);
    }
    if events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(IngestError::TooMany(events.len()));
    }
    let mut out = Vec::with_capacity(events.len());
    for (index, ev) in events.iter().enumerate() {
        map_event(ev, catalog, now_ms, &mut out)
            .map_err(|reason| IngestError::Event { index, reason })?;
    }
    Ok(out)
}

fn required<'a>(v: &'a Option<String>, name: &'static str) -> Result<&'a str, EventError> {
    match v.as_deref() {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(EventError::Missing(name)),
    }
}

fn map_event(
    ev: &RawEvent<'_>,
    catalog: &IngestCatalog,
    now_ms: i64,
    out: &mut Vec<MappedEvent>,
) -> Result<(), EventError> {
    if required(&ev.specversion, "specversion")? != "1.0" {
        return Err(EventError::SpecVersion);
    }
    let id = required(&ev.id, "id")?;
    let source = required(&ev.source, "source")?;
    for (name, v) in [("id", id), ("source", source)] {
        if v.len() > MAX_ID_BYTES {
            return Err(EventError::TooLong(name));
        }
    }
    let ty = required(&ev.ty, "type")?;
    let customer =
        CustomerId::new(required(&ev.subject, "subject")?).map_err(EventError::Subject)?;
    if let Some(ct) = &ev.datacontenttype
        && Mode::from_content_type(ct) != Some(Mode::Json)
    {
        return Err(EventError::DataContentType);
    }
    let timestamp_ms = match &ev.time {
        None => now_ms,
        Some(t) => {
            let t = OffsetDateTime::parse(t, &Rfc3339).map_err(|_| EventError::Time)?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| EventError::Time)?
        }
    };
    let meters = catalog.for_type(ty);
    if meters.is_empty() {
        return Err(EventError::UnknownType(ty.to_string()));
    }
    for meter in meters {
        let (quantity, dimensions) = meter.read(ev.data).map_err(EventError::Data)?;
        out.push(MappedEvent {
            customer: customer.clone(),
            meter: meter.name.clone(),
            dimensions,
            quantity,
            timestamp_ms,
            // `source` + `id` identify a CloudEvent (the length prefix keeps the pair
            // unambiguous); the meter keeps one event that feeds two meters from deduping
            // against itself.
            id: Some(format!("ce:{}:{source}{id}:{}", source.len(), meter.name)),
        });
    }
    Ok(())
}
