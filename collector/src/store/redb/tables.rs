//! Every table of the collector's redb file, `<data_dir>/collector.redb`, and its on-disk format.
//!
//! # Format (version 2)
//!
//! Values are postcard unless said otherwise; ids are big-endian `u128`s of their 16 bytes.
//!
//! | table             | key                                   | value                            |
//! |-------------------|---------------------------------------|----------------------------------|
//! | `meta`            | `"catalog"`                           | current `Catalog`                |
//! |                   | `"format"`                            | [`FORMAT_VERSION`], `u64` LE     |
//! |                   | `"stripe_namespace"`                  | 12 hex digits, fixed at creation |
//! | `catalogs`        | version                               | every `Catalog` version          |
//! | `agents`          | agent id (u128)                       | `AgentRecord`                    |
//! | `dedup`           | (agent id, epoch)                     | `DedupState` (watermark, runs)   |
//! | `batches`         | (agent id, epoch, seq)                | `BatchRecord`                    |
//! | `accounts`        | account id                            | `Account`                        |
//! | `transfers`       | position (1, 2, …, append only)       | `Transfer`                       |
//! | `usage_idx`       | (customer, meter, period, account id) | `()`                             |
//! | `quarantine`      | position                              | `QuarantineRecord`               |
//! | `adjustments`     | idempotency key                       | position of its transfer (u64)   |
//! | `outbox`          | row id                                | Stripe outbox row                |
//! | `outbox_free`     | row id                                | `()` (rows not yet in a group)   |
//! | `outbox_open_ts`  | bucket time, s                        | open rows with that time (u64)   |
//! | `outbox_groups`   | group id                              | event group                      |
//! | `outbox_active`   | group id                              | `()` (groups not yet final)      |
//! | `outbox_ident`    | Stripe identifier                     | group id                         |
//! | `outbox_window`   | (customer, event, bucket time, row)   | `()`                             |
//! | `outbox_carry`    | (customer, event)                     | the unit carry                   |
//! | `outbox_counters` | counter name                          | u64                              |
//! | `customers`       | customer                              | `CustomerRecord`                 |
//! | `stripe_webhooks` | Stripe event id                       | webhook record                   |
//! | `enroll_tokens`, `enroll_token_hashes`, `agent_enrolment` | see [`super::enrolment`] |  |
//! | `plans`, `ent_customers`, `grants`, `grants_by_customer`, `leases` | see [`super::entitlements`] | JSON |
//!
//! The Stripe tables (`outbox*`, `customers`, `stripe_webhooks`) are described, with their
//! guarantees, in [`super::outbox`]: rows are written by [`super::outbox_rows`] in the ingest or
//! adjustment transaction that posts their usage (SPEC §6.4).
//!
//! A store written before the format was recorded has no `"format"` key: it is version 1 (the
//! layout did not change), and opening it records that. A newer version than this build knows
//! is refused; an older one goes through [`migrate`].

use crate::store::StoreError;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

/// The on-disk format this build writes.
pub const FORMAT_VERSION: u64 = 2;

/// The `meta` key holding [`FORMAT_VERSION`].
pub const FORMAT_KEY: &str = "format";
/// The `meta` key holding the current catalog.
pub const CATALOG_KEY: &str = "catalog";
/// The `meta` key holding the Stripe namespace (part of every Stripe identifier).
pub const NAMESPACE_KEY: &str = "stripe_namespace";

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const CATALOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("catalogs");
pub(crate) const AGENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("agents");
pub(crate) const DEDUP: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("dedup");
pub(crate) const BATCHES: TableDefinition<(u128, u64, u64), &[u8]> =
    TableDefinition::new("batches");
pub(crate) const ACCOUNTS: TableDefinition<u128, &[u8]> = TableDefinition::new("accounts");
pub(crate) const TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("transfers");
/// (customer, meter, period, account id).
pub(crate) type UsageKey<'a> = (&'a str, &'a str, &'a str, u128);
pub(crate) const USAGE_IDX: TableDefinition<UsageKey<'static>, ()> =
    TableDefinition::new("usage_idx");
pub(crate) const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
pub(crate) const ADJUSTMENTS: TableDefinition<&str, u64> = TableDefinition::new("adjustments");

pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
pub(crate) const OUTBOX_FREE: TableDefinition<u64, ()> = TableDefinition::new("outbox_free");
pub(crate) const OUTBOX_OPEN: TableDefinition<i64, u64> = TableDefinition::new("outbox_open_ts");
pub(crate) const OUTBOX_GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_groups");
pub(crate) const OUTBOX_ACTIVE: TableDefinition<u64, ()> = TableDefinition::new("outbox_active");
pub(crate) const OUTBOX_IDENT: TableDefinition<&str, u64> = TableDefinition::new("outbox_ident");
/// (customer, event, bucket time, row id).
pub(crate) type WindowKey<'a> = (&'a str, &'a str, i64, u64);
pub(crate) const OUTBOX_WINDOW: TableDefinition<WindowKey<'static>, ()> =
    TableDefinition::new("outbox_window");
/// (customer, meter) → open buckets not yet sealed into rows (`outbox_rows::BucketRec`).
pub(crate) const OUTBOX_BUCKETS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("outbox_buckets");
pub(crate) const OUTBOX_CARRY: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("outbox_carry");
pub(crate) const OUTBOX_COUNTERS: TableDefinition<&str, u64> =
    TableDefinition::new("outbox_counters");
pub(crate) const CUSTOMERS: TableDefinition<&str, &[u8]> = TableDefinition::new("customers");
pub(crate) const WEBHOOKS: TableDefinition<&str, &[u8]> = TableDefinition::new("stripe_webhooks");

/// Creates every table that does not exist yet.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(META)?;
    txn.open_table(CATALOGS)?;
    txn.open_table(AGENTS)?;
    txn.open_table(DEDUP)?;
    txn.open_table(BATCHES)?;
    txn.open_table(ACCOUNTS)?;
    txn.open_table(TRANSFERS)?;
    txn.open_table(USAGE_IDX)?;
    txn.open_table(QUARANTINE)?;
    txn.open_table(ADJUSTMENTS)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(OUTBOX_FREE)?;
    txn.open_table(OUTBOX_OPEN)?;
    txn.open_table(OUTBOX_GROUPS)?;
    txn.open_table(OUTBOX_ACTIVE)?;
    txn.open_table(OUTBOX_IDENT)?;
    txn.open_table(OUTBOX_WINDOW)?;
    txn.open_table(OUTBOX_CARRY)?;
    txn.open_table(OUTBOX_BUCKETS)?;
    txn.open_table(OUTBOX_COUNTERS)?;
    txn.open_table(CUSTOMERS)?;
    txn.open_table(WEBHOOKS)?;
    super::enrolment::create_tables(txn)?;
    Ok(())
}

/// Checks the recorded format, migrates an older one and records [`FORMAT_VERSION`].
pub(crate) fn check_format(txn: &WriteTransaction) -> Result<(), StoreError> {
    let meta = txn.open_table(META)?;
    let found = match meta.get(FORMAT_KEY)? {
        None => 1,
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(|_| StoreError::Corrupt {
                table: "meta",
                detail: String::from("format version is not 8 bytes"),
            })?;
            u64::from_le_bytes(bytes)
        }
    };
    if found > FORMAT_VERSION {
        return Err(StoreError::Format {
            found,
            supported: FORMAT_VERSION,
        });
    }
    drop(meta);
    migrate(txn, found)?;
    let mut meta = txn.open_table(META)?;
    meta.insert(FORMAT_KEY, FORMAT_VERSION.to_le_bytes().as_slice())?;
    Ok(())
}

/// Brings a store of format `from` to [`FORMAT_VERSION`], in the opening transaction. The
/// migration hook: a new format adds its step here and bumps [`FORMAT_VERSION`].
///
/// - 1 → 2: dedup states kept every done seq above the watermark as a set; they are runs now
///   (`DedupState::runs`), so a row stays small however the seqs arrived.
pub(crate) fn migrate(txn: &WriteTransaction, from: u64) -> Result<(), StoreError> {
    match from {
        1 => {
            dedup_sets_to_runs(txn)?;
            migrate(txn, 2)
        }
        FORMAT_VERSION => Ok(()),
        other => Err(StoreError::Format {
            found: other,
            supported: FORMAT_VERSION,
        }),
    }
}

/// Format 1's dedup state.
#[derive(serde::Deserialize)]
struct DedupStateV1 {
    watermark: u64,
    above: std::collections::BTreeSet<u64>,
}

fn dedup_sets_to_runs(txn: &WriteTransaction) -> Result<(), StoreError> {
    use crate::core::dedup::DedupState;
    let mut table = txn.open_table(DEDUP)?;
    let mut rewritten = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let old: DedupStateV1 =
            postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                table: "dedup",
                detail: format!("format 1 dedup state: {e}"),
            })?;
        let mut new = DedupState {
            watermark: old.watermark,
            ..DedupState::default()
        };
        for seq in old.above {
            // Format 1 kept at most 65,536 seqs; their runs fit unless they were all apart.
            new.insert(seq).map_err(|e| StoreError::Corrupt {
                table: "dedup",
                detail: format!("format 1 dedup state of {:?}: {e}", k.value()),
            })?;
        }
        rewritten.push((k.value(), postcard::to_allocvec(&new)?));
    }
    for (k, v) in rewritten {
        table.insert(k, v.as_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_and_an_unversioned_store_is_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        create_all(&txn).unwrap();
        check_format(&txn).unwrap();
        {
            let meta = txn.open_table(META).unwrap();
            let v = meta.get(FORMAT_KEY).unwrap().unwrap();
            assert_eq!(v.value(), FORMAT_VERSION.to_le_bytes().as_slice());
        }
        txn.open_table(META)
            .unwrap()
            .insert(FORMAT_KEY, (FORMAT_VERSION + 1).to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(db);
        match super::super::RedbStore::open(&path) {
            Err(StoreError::Format { found, supported }) => {
                assert_eq!((found, supported), (FORMAT_VERSION + 1, FORMAT_VERSION));
            }
            other => panic!("expected a format refusal, got {:?}", other.err()),
        }
    }

    #[test]
    fn format_1_dedup_sets_become_runs() {
        #[derive(serde::Serialize)]
        struct V1 {
            watermark: u64,
            above: std::collections::BTreeSet<u64>,
        }
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("s.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        create_all(&txn).unwrap();
        let v1 = V1 {
            watermark: 4,
            above: [6, 7, 8, 10, 12, 13].into(),
        };
        txn.open_table(META)
            .unwrap()
            .insert(FORMAT_KEY, 1u64.to_le_bytes().as_slice())
            .unwrap();
        txn.open_table(DEDUP)
            .unwrap()
            .insert(
                (7u128, 3u64),
                postcard::to_allocvec(&v1).unwrap().as_slice(),
            )
            .unwrap();
        check_format(&txn).unwrap();
        let dedup = txn.open_table(DEDUP).unwrap();
        let row = dedup.get((7u128, 3u64)).unwrap().unwrap();
        let state: crate::core::dedup::DedupState = postcard::from_bytes(row.value()).unwrap();
        assert_eq!(state.watermark, 4);
        assert_eq!(state.runs, [(6, 8), (10, 10), (12, 13)].into());
        assert_eq!(state.done(), 4 + 6);
        assert!((1..=14).all(|s| state.contains(s) == (s <= 4 || v1.above.contains(&s))));
    }
}
