//! Events given to `record_event` and `record_durable`, and the outcome of recording one.

use rust_decimal::Decimal;

/// Longest event id (idempotency key), in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 256;

/// One usage event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Who pays (1–128 bytes of UTF-8, no control characters).
    pub customer: String,
    /// The meter (`[a-z0-9_.-]{1,64}`).
    pub meter: String,
    /// The quantity, zero or more.
    pub quantity: Decimal,
    /// Event time, ms since the Unix epoch; `None` means now.
    pub timestamp_ms: Option<i64>,
    /// Idempotency key: a repeated id within the dedup window is counted once.
    pub id: Option<String>,
    /// At most four dimensions.
    pub dimensions: Vec<(String, String)>,
}

impl Event {
    /// An event of `quantity` for `customer` on `meter`, now, with no id and no dimensions.
    pub fn new(customer: impl Into<String>, meter: impl Into<String>, quantity: Decimal) -> Self {
        Event {
            customer: customer.into(),
            meter: meter.into(),
            quantity,
            timestamp_ms: None,
            id: None,
            dimensions: Vec::new(),
        }
    }

    /// Sets the idempotency key.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the event time.
    pub fn at_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Adds a dimension.
    pub fn dimension(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.dimensions.push((key.into(), value.into()));
        self
    }
}

/// What recording an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The event was counted.
    New,
    /// Its id was already recorded within the dedup window: accepted, not counted again.
    Duplicate,
}
