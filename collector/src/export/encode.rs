//! The exported rows and their encodings (Parquet, NDJSON): pure functions from rows to bytes,
//! deterministic, so that re-creating a file after a crash gives the same bytes.

use super::core::{Format, SCHEMA_VERSION};
use crate::core::ledger::{AccountKey, Transfer, TransferSource};
use arrow_array::{
    ArrayRef, Decimal128Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Decimal columns are DECIMAL(38, [`SCALE`]).
pub const PRECISION: u8 = 38;
/// 18 fractional digits and 20 integer digits: every quantity a meter reports in practice,
/// exactly. A value outside is refused ([`EncodeError::Decimal`]), never rounded.
pub const SCALE: i8 = 18;

/// The file metadata key holding [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_KEY: &str = "tally.schema_version";

/// Why rows could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A decimal does not fit DECIMAL(38, 18) exactly.
    #[error("ledger position {position}: {value} does not fit DECIMAL(38, 18) exactly")]
    Decimal {
        /// The ledger position.
        position: u64,
        /// The value.
        value: Decimal,
    },
    /// Arrow refused a column.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// The Parquet writer failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// JSON encoding failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A counter does not fit a signed 64-bit column.
    #[error("ledger position {0}: a counter exceeds 2^63")]
    Counter(u64),
}

/// What a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Usage from an agent's batch row.
    Usage,
    /// An adjustment made through the API (a correction is a new row, never an edit).
    Adjustment,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Usage => "usage",
            Kind::Adjustment => "adjustment",
        }
    }
}

/// One exported ledger transfer, with the usage account it touches resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Ledger position.
    pub position: u64,
    /// The transfer.
    pub transfer: Transfer,
    /// The usage account's meter dimensions as `(key, value)` pairs.
    pub dimensions: Vec<(String, String)>,
    /// The usage account's period, `YYYY-MM`.
    pub period: String,
    /// The change to the customer's usage: `+amount` when the usage account is credited,
    /// `-amount` when it is debited. Summing it gives `/v1/usage`.
    pub quantity: Decimal,
}

impl Row {
    /// Resolves a transfer against the usage account it touches (`usage` is that account's
    /// key; `credited` says on which side it is).
    pub fn new(position: u64, transfer: Transfer, usage: &AccountKey, credited: bool) -> Self {
        let (dimensions, period) = match usage {
            AccountKey::Usage {
                dimensions, period, ..
            } => (
                dimensions
                    .pairs()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
                    .collect(),
                period.to_string(),
            ),
            _ => (Vec::new(), String::new()),
        };
        let quantity = if credited {
            transfer.amount
        } else {
            -transfer.amount
        };
        Row {
            position,
            transfer,
            dimensions,
            period,
            quantity,
        }
    }

    fn kind(&self) -> Kind {
        match self.transfer.source {
            TransferSource::BatchRow { .. } => Kind::Usage,
            TransferSource::Adjustment { .. } | TransferSource::Grant { .. } => Kind::Adjustment,
        }
    }

    fn dimensions_json(&self) -> String {
        dims_json(&self.dimensions)
    }
}

fn dims_json(d: &[(String, String)]) -> String {
    let m: serde_json::Map<String, serde_json::Value> = d
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(m).to_string()
}

/// `value` as the unscaled integer of DECIMAL(38, 18), exactly, or `None`.
pub fn decimal_to_i128(value: Decimal) -> Option<i128> {
    let v = value.normalize();
    let scale = i8::try_from(v.scale()).ok()?;
    if scale > SCALE {
        return None;
    }
    let factor = 10i128.checked_pow(u32::try_from(SCALE - scale).ok()?)?;
    let x = v.mantissa().checked_mul(factor)?;
    (x.unsigned_abs() < 10u128.pow(u32::from(PRECISION))).then_some(x)
}

fn dec(position: u64, value: Decimal) -> Result<i128, EncodeError> {
    decimal_to_i128(value).ok_or(EncodeError::Decimal { position, value })
}

fn i64_of(position: u64, v: u64) -> Result<i64, EncodeError> {
    i64::try_from(v).map_err(|_| EncodeError::Counter(position))
}

/// One hour of one customer's usage of a meter with some dimensions in a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourRow {
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// Dimensions as a JSON object.
    pub dimensions: String,
    /// `YYYY-MM`.
    pub period: String,
    /// Start of the hour of the usage (`event_at`), ms.
    pub hour_ms: i64,
    /// Sum of the quantities.
    pub quantity: Decimal,
    /// Sum of the events.
    pub events: u64,
    /// Transfers summed.
    pub transfers: u64,
    /// Lowest position summed (for tracing back to the transfers).
    pub first_position: u64,
    /// Highest position summed.
    pub last_position: u64,
}

/// The rows rolled up per customer, meter, dimensions, period and hour, in that order.
pub fn roll_up(rows: &[Row]) -> Vec<HourRow> {
    let mut by: BTreeMap<(String, String, String, String, i64), HourRow> = BTreeMap::new();
    for r in rows {
        let t = &r.transfer;
        let hour_ms = t.event_at_ms.div_euclid(3_600_000) * 3_600_000;
        let key = (
            t.customer.to_string(),
            t.unit.to_string(),
            r.dimensions_json(),
            r.period.clone(),
            hour_ms,
        );
        let h = by.entry(key.clone()).or_insert_with(|| HourRow {
            customer: key.0,
            meter: key.1,
            dimensions: key.2,
            period: key.3,
            hour_ms,
            quantity: Decimal::ZERO,
            events: 0,
            transfers: 0,
            first_position: r.position,
            last_position: r.position,
        });
        h.quantity += r.quantity;
        h.events = h.events.saturating_add(t.events);
        h.transfers += 1;
        h.first_position = h.first_position.min(r.position);
        h.last_position = h.last_position.max(r.position);
    }
    by.into_values().collect()
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Digits of the largest u64.
const EPOCH_DIGITS: u8 = 20;

fn decimal() -> DataType {
    DataType::Decimal128(PRECISION, SCALE)
}

/// The transfers data set's columns.
pub fn transfers_schema() -> Schema {
    Schema::new(vec![
        Field::new("position", DataType::Int64, false),
        Field::new("transfer_id", DataType::Utf8, false),
        Field::new("debit_account", DataType::Utf8, false),
        Field::new("credit_account", DataType::Utf8, false),
        Field::new("customer", DataType::Utf8, false),
        Field::new("meter", DataType::Utf8, false),
        Field::new("dimensions", DataType::Utf8, false),
        Field::new("period", DataType::Utf8, false),
        Field::new("amount", decimal(), false),
        Field::new("quantity", decimal(), false),
        Field::new("events", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("agent", DataType::Utf8, true),
        // An epoch is a random u64 chosen by the agent: DECIMAL(20, 0) holds every one exactly
        // and loads in every warehouse (BigQuery has no unsigned 64-bit integer).
        Field::new("epoch", DataType::Decimal128(EPOCH_DIGITS, 0), true),
        Field::new("seq", DataType::Int64, true),
        Field::new("row", DataType::Int64, true),
        Field::new("idempotency_key", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        Field::new("event_at", ts(), false),
        Field::new("posted_at", ts(), false),
    ])
}

/// The usage_hourly data set's columns.
pub fn hourly_schema() -> Schema {
    Schema::new(vec![
        Field::new("customer", DataType::Utf8, false),
        Field::new("meter", DataType::Utf8, false),
        Field::new("dimensions", DataType::Utf8, false),
        Field::new("period", DataType::Utf8, false),
        Field::new("hour", ts(), false),
        Field::new("quantity", decimal(), false),
        Field::new("events", DataType::Int64, false),
        Field::new("transfers", DataType::Int64, false),
        Field::new("first_position", DataType::Int64, false),
        Field::new("last_position", DataType::Int64, false),
    ])
}

fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

fn decimals(v: Vec<i128>) -> Result<ArrayRef, EncodeError> {
    Ok(Arc::new(
        Decimal128Array::from(v).with_precision_and_scale(PRECISION, SCALE)?,
    ))
}

fn times(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
}

/// The transfers as one Arrow record batch.
pub fn transfers_batch(rows: &[Row]) -> Result<RecordBatch, EncodeError> {
    let mut position = Vec::with_capacity(rows.len());
    let (mut amount, mut quantity, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let (mut agent, mut epoch, mut seq, mut row) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut key, mut reason) = (Vec::new(), Vec::new());
    let (mut ids, mut debits, mut credits, mut dims) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        let t = &r.transfer;
        position.push(i64_of(r.position, r.position)?);
        ids.push(format!("{:032x}", t.id));
        debits.push(format!("{:032x}", t.debit));
        credits.push(format!("{:032x}", t.credit));
        dims.push(r.dimensions_json());
        amount.push(dec(r.position, t.amount)?);
        quantity.push(dec(r.position, r.quantity)?);
        events.push(i64_of(r.position, t.events)?);
        match &t.source {
            TransferSource::BatchRow {
                agent: a,
                epoch: e,
                seq: s,
                row: w,
            } => {
                agent.push(Some(a.to_string()));
                epoch.push(Some(i128::from(*e)));
                seq.push(Some(i64_of(r.position, *s)?));
                row.push(Some(i64::from(*w)));
                key.push(None);
                reason.push(None);
            }
            TransferSource::Adjustment {
                idempotency_key,
                reason: why,
            } => {
                agent.push(None);
                epoch.push(None);
                seq.push(None);
                row.push(None);
                key.push(Some(idempotency_key.clone()));
                reason.push(Some(why.clone()));
            }
            TransferSource::Grant { idempotency_key } => {
                agent.push(None);
                epoch.push(None);
                seq.push(None);
                row.push(None);
                key.push(Some(idempotency_key.clone()));
                reason.push(Some(String::from("grant")));
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(position)),
        strings(ids.iter().map(String::as_str)),
        strings(debits.iter().map(String::as_str)),
        strings(credits.iter().map(String::as_str)),
        strings(rows.iter().map(|r| r.transfer.customer.as_str())),
        strings(rows.iter().map(|r| r.transfer.unit.as_str())),
        strings(dims.iter().map(String::as_str)),
        strings(rows.iter().map(|r| r.period.as_str())),
        decimals(amount)?,
        decimals(quantity)?,
        Arc::new(Int64Array::from(events)),
        strings(rows.iter().map(|r| r.kind().as_str())),
        Arc::new(StringArray::from(agent)),
        Arc::new(Decimal128Array::from(epoch).with_precision_and_scale(EPOCH_DIGITS, 0)?),
        Arc::new(Int64Array::from(seq)),
        Arc::new(Int64Array::from(row)),
        Arc::new(StringArray::from(key)),
        Arc::new(StringArray::from(reason)),
        times(rows.iter().map(|r| r.transfer.event_at_ms).collect()),
        times(rows.iter().map(|r| r.transfer.posted_at_ms).collect()),
    ];
    Ok(RecordBatch::try_new(Arc::new(transfers_schema()), columns)?)
}

/// The hourly roll-up as one Arrow record batch.
pub fn hourly_batch(rows: &[HourRow]) -> Result<RecordBatch, EncodeError> {
    let mut quantity = Vec::with_capacity(rows.len());
    let (mut events, mut transfers, mut first, mut last) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for h in rows {
        quantity.push(dec(h.first_position, h.quantity)?);
        events.push(i64_of(h.first_position, h.events)?);
        transfers.push(i64_of(h.first_position, h.transfers)?);
        first.push(i64_of(h.first_position, h.first_position)?);
        last.push(i64_of(h.last_position, h.last_position)?);
    }
    let columns: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|h| h.customer.as_str())),
        strings(rows.iter().map(|h| h.meter.as_str())),
        strings(rows.iter().map(|h| h.dimensions.as_str())),
        strings(rows.iter().map(|h| h.period.as_str())),
        times(rows.iter().map(|h| h.hour_ms).collect()),
        decimals(quantity)?,
        Arc::new(Int64Array::from(events)),
        Arc::new(Int64Array::from(transfers)),
        Arc::new(Int64Array::from(first)),
        Arc::new(Int64Array::from(last)),
    ];
    Ok(RecordBatch::try_new(Arc::new(hourly_schema()), columns)?)
}

/// One record batch as a Parquet file: Snappy, the schema version in the key-value metadata.
pub fn parquet_bytes(batch: &RecordBatch) -> Result<Vec<u8>, EncodeError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            SCHEMA_VERSION_KEY.to_owned(),
            SCHEMA_VERSION.to_string(),
        )]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    w.write(batch)?;
    w.close()?;
    Ok(out)
}

fn ndjson_transfers(rows: &[Row]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    for r in rows {
        let t = &r.transfer;
        let mut v = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "position": r.position,
            "transfer_id": format!("{:032x}", t.id),
            "debit_account": format!("{:032x}", t.debit),
            "credit_account": format!("{:032x}", t.credit),
            "customer": t.customer.as_str(),
            "meter": t.unit.as_str(),
            "dimensions": serde_json::from_str::<serde_json::Value>(&r.dimensions_json())?,
            "period": r.period,
            "amount": t.amount.to_string(),
            "quantity": r.quantity.to_string(),
            "events": t.events,
            "kind": r.kind().as_str(),
            "event_at_ms": t.event_at_ms,
            "posted_at_ms": t.posted_at_ms,
        });
        if let Some(m) = v.as_object_mut() {
            match &t.source {
                TransferSource::BatchRow {
                    agent,
                    epoch,
                    seq,
                    row,
                } => {
                    m.insert("agent".into(), agent.to_string().into());
                    // A string, like the decimals: JSON readers lose integers past 2^53.
                    m.insert("epoch".into(), epoch.to_string().into());
                    m.insert("seq".into(), (*seq).into());
                    m.insert("row".into(), (*row).into());
                }
                TransferSource::Adjustment {
                    idempotency_key,
                    reason,
                } => {
                    m.insert("idempotency_key".into(), idempotency_key.clone().into());
                    m.insert("reason".into(), reason.clone().into());
                }
                TransferSource::Grant { idempotency_key } => {
                    m.insert("idempotency_key".into(), idempotency_key.clone().into());
                    m.insert("reason".into(), "grant".into());
                }
            }
        }
        serde_json::to_writer(&mut out, &v)?;
        out.push(b'\n');
    }
    Ok(out)
}

fn ndjson_hourly(rows: &[HourRow]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    for h in rows {
        let v = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "customer": h.customer,
            "meter": h.meter,
            "dimensions": serde_json::from_str::<serde_json::Value>(&h.dimensions)?,
            "period": h.period,
            "hour_ms": h.hour_ms,
            "quantity": h.quantity.to_string(),
            "events": h.events,
            "transfers": h.transfers,
            "first_position": h.first_position,
            "last_position": h.last_position,
        });
        serde_json::to_writer(&mut out, &v)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The transfers file's bytes and its row count.
pub fn encode_transfers(rows: &[Row], format: Format) -> Result<(Vec<u8>, u64), EncodeError> {
    let bytes = match format {
        Format::Parquet => parquet_bytes(&transfers_batch(rows)?)?,
        Format::Ndjson => ndjson_transfers(rows)?,
    };
    Ok((bytes, rows.len() as u64))
}

/// The usage_hourly file's bytes and its row count.
pub fn encode_hourly(rows: &[Row], format: Format) -> Result<(Vec<u8>, u64), EncodeError> {
    let hours = roll_up(rows);
    let bytes = match format {
        Format::Parquet => parquet_bytes(&hourly_batch(&hours)?)?,
        Format::Ndjson => ndjson_hourly(&hours)?,
    };
    Ok((bytes, hours.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ledger::{Transfer, TransferSource, usage_transfer_id};
    use tally_protocol::batch::AgentId;
    use tally_protocol::names::{CustomerId, Dimensions, MeterName};

    /// A real agent's epoch: random, above 2^63 half the time.
    const EPOCH: u64 = 16_614_833_290_247_471_335;

    fn row(position: u64, amount: Decimal, credited: bool) -> Row {
        let key = AccountKey::Usage {
            customer: CustomerId::new("acme").unwrap(),
            meter: MeterName::new("tokens").unwrap(),
            dimensions: Dimensions::from_strs([("model", "large")]).unwrap(),
            period: crate::core::ledger::Period {
                year: 2026,
                month: 12,
            },
        };
        let source = TransferSource::BatchRow {
            agent: AgentId([7; 16]),
            epoch: EPOCH,
            seq: position,
            row: 0,
        };
        let t = Transfer {
            id: usage_transfer_id(AgentId([7; 16]), EPOCH, position, 0),
            debit: 1,
            credit: key.id(),
            unit: MeterName::new("tokens").unwrap(),
            amount,
            events: 3,
            customer: CustomerId::new("acme").unwrap(),
            event_at_ms: 1_796_256_000_000 + position as i64 * 1_000_000,
            posted_at_ms: 1_796_256_000_000,
            source,
        };
        Row::new(position, t, &key, credited)
    }

    #[test]
    fn decimals_are_exact_or_refused() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(decimal_to_i128(d("1")), Some(10i128.pow(18)));
        assert_eq!(decimal_to_i128(d("-0.000000000000000001")), Some(-1));
        assert_eq!(
            decimal_to_i128(d("1.500000000000000000000")),
            Some(15 * 10i128.pow(17))
        );
        // rust_decimal holds 28 significant digits: 20 integer digits and 8 decimals fit.
        assert_eq!(
            decimal_to_i128(d("99999999999999999999.99999999")),
            Some((10i128.pow(28) - 1) * 10i128.pow(10))
        );
        assert_eq!(
            decimal_to_i128(d("0.0000000000000000001")),
            None,
            "19 decimals"
        );
        assert_eq!(decimal_to_i128(d("100000000000000000000")), None, "10^20");
        let r = row(1, d("0.0000000000000000001"), true);
        assert!(matches!(
            transfers_batch(&[r]),
            Err(EncodeError::Decimal { position: 1, .. })
        ));
    }

    #[test]
    fn the_same_rows_give_the_same_bytes_with_the_schema_version() {
        let rows: Vec<Row> = (1..=50)
            .map(|p| row(p, Decimal::new(p as i64 * 7, 3), p % 5 != 0))
            .collect();
        for format in [Format::Parquet, Format::Ndjson] {
            let (a, n) = encode_transfers(&rows, format).unwrap();
            let (b, _) = encode_transfers(&rows, format).unwrap();
            assert_eq!(n, 50);
            assert_eq!(a, b, "{format:?} transfers are deterministic");
            let (h1, hn) = encode_hourly(&rows, format).unwrap();
            assert_eq!(h1, encode_hourly(&rows, format).unwrap().0);
            assert!((1..50).contains(&hn), "rolled up: {hn}");
        }
        let (bytes, _) = encode_transfers(&rows, Format::Parquet).unwrap();
        let reader =
            parquet::file::serialized_reader::SerializedFileReader::new(bytes::Bytes::from(bytes))
                .unwrap();
        use parquet::file::reader::FileReader;
        let kv = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .cloned()
            .unwrap_or_default();
        assert!(
            kv.iter()
                .any(|k| k.key == SCHEMA_VERSION_KEY && k.value.as_deref() == Some("1"))
        );
    }

    #[test]
    fn the_roll_up_keeps_the_signed_sum() {
        let rows = vec![
            row(1, Decimal::new(5, 0), true),
            row(2, Decimal::new(2, 0), false),
            row(3, Decimal::new(1, 1), true),
        ];
        let total: Decimal = roll_up(&rows).iter().map(|h| h.quantity).sum();
        assert_eq!(total, Decimal::new(31, 1));
        let all: Decimal = rows.iter().map(|r| r.quantity).sum();
        assert_eq!(total, all);
    }
}
