//! The PostgreSQL schema and its versioned migrations.
//!
//! Core state (dedup state, batch records, accounts, transfers, catalog, agents, events groups,
//! tokens) is stored as the same postcard (or, for entitlements, JSON) blobs the redb store
//! keeps, with only the columns queries need beside them: the pure rules decode them, and a
//! change to e.g. `DedupState`'s fields needs no migration here.
//!
//! Text keys are `COLLATE "C"`, so they sort bytewise like redb's keys (the console's customer
//! listing depends on it).
//!
//! Migrations run on start, in one transaction that first takes a transaction-scoped advisory
//! lock ([`MIGRATION_LOCK`]): collectors starting together migrate once, one after the other,
//! and a database migrated by a newer build is refused.

use super::pool::Tx;
use crate::store::StoreError;

/// The advisory lock key every collector takes while migrating ("tallymig" in ASCII).
pub const MIGRATION_LOCK: i64 = 0x7461_6c6c_796d_6967;

/// Every migration, in order; version `i + 1` at index `i`. Never edit one that shipped: add
/// another.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything of format 1 of the redb store.
    r#"
CREATE TABLE meta (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
-- The ledger's head: every writer of transfers, batch records, quarantine or outbox rows locks
-- this one row first (SELECT … FOR UPDATE), so positions (max + 1) are gapless and ingest
-- transactions never deadlock or fail to serialize against each other.
CREATE TABLE ledger_head (id int PRIMARY KEY CHECK (id = 1));
INSERT INTO ledger_head VALUES (1);
CREATE TABLE catalogs (version bigint PRIMARY KEY, catalog bytea NOT NULL);
CREATE TABLE agents (id bytea PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE dedup (agent bytea, epoch bigint, state bytea NOT NULL, PRIMARY KEY (agent, epoch));
CREATE TABLE batches (
  agent bytea, epoch bigint, seq bigint, rec bytea NOT NULL, PRIMARY KEY (agent, epoch, seq)
);
CREATE TABLE accounts (
  id bytea PRIMARY KEY,
  customer text COLLATE "C", meter text COLLATE "C", period text COLLATE "C",
  acct bytea NOT NULL
);
CREATE INDEX accounts_usage ON accounts (customer, meter, period) WHERE customer IS NOT NULL;
CREATE TABLE transfers (pos bigint PRIMARY KEY, customer text COLLATE "C" NOT NULL, t bytea NOT NULL);
CREATE INDEX transfers_customer ON transfers (customer, pos);
CREATE TABLE quarantine (id bigint PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE adjustments (key text COLLATE "C" PRIMARY KEY, pos bigint NOT NULL);
CREATE TABLE outbox (
  id bigint PRIMARY KEY,
  customer text COLLATE "C" NOT NULL,
  meter text COLLATE "C" NOT NULL,
  event_name text NOT NULL,
  ts bigint NOT NULL,
  value bigint NOT NULL,
  revision int NOT NULL,
  group_id bigint
);
CREATE INDEX outbox_free ON outbox (id) WHERE group_id IS NULL;
CREATE INDEX outbox_group ON outbox (group_id);
CREATE SEQUENCE outbox_group_ids;
CREATE TABLE outbox_groups (
  id bigint PRIMARY KEY,
  identifier text NOT NULL UNIQUE,
  stripe_customer text COLLATE "C" NOT NULL,
  event_name text COLLATE "C" NOT NULL,
  ts bigint NOT NULL,
  state text NOT NULL,
  next_attempt_ms bigint NOT NULL,
  g bytea NOT NULL
);
CREATE INDEX outbox_groups_window ON outbox_groups (stripe_customer, event_name, ts);
CREATE INDEX outbox_groups_open ON outbox_groups (id) WHERE state IN ('pending', 'unknown');
CREATE TABLE outbox_carry (
  customer text COLLATE "C", meter text COLLATE "C", carry bytea NOT NULL,
  PRIMARY KEY (customer, meter)
);
CREATE TABLE customers (
  customer text COLLATE "C" PRIMARY KEY, stripe_customer text, rec bytea NOT NULL
);
CREATE INDEX customers_stripe ON customers (stripe_customer);
CREATE TABLE stripe_webhooks (id text PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE enroll_tokens (id text COLLATE "C" PRIMARY KEY, hash bytea NOT NULL UNIQUE, tok bytea NOT NULL);
CREATE TABLE agent_enrolment (agent bytea PRIMARY KEY, rec bytea NOT NULL);
CREATE TABLE plans (name text COLLATE "C" PRIMARY KEY, plan bytea NOT NULL);
CREATE TABLE ent_customers (customer text COLLATE "C" PRIMARY KEY, settings bytea NOT NULL);
CREATE TABLE grants (
  key text COLLATE "C" PRIMARY KEY, customer text COLLATE "C" NOT NULL, grant_rec bytea NOT NULL
);
CREATE INDEX grants_customer ON grants (customer, key);
CREATE TABLE leases (id bigint PRIMARY KEY, lease bytea NOT NULL);
"#,
    // 2: Stripe sends in flight, one per (Stripe customer, event name) across collectors.
    r#"
CREATE TABLE stripe_inflight (
  stripe_customer text COLLATE "C", event_name text COLLATE "C",
  group_id bigint NOT NULL, until_ms bigint NOT NULL,
  PRIMARY KEY (stripe_customer, event_name)
);
"#,
    // 3: the lease book's truth across collectors (decision 0095): lease columns for lookups
    // (filled from the JSON of rows kept before, at open), one lock row per limit, ids from a
    // sequence.
    r#"
ALTER TABLE leases ADD COLUMN agent bytea, ADD COLUMN customer text COLLATE "C",
  ADD COLUMN meter text COLLATE "C", ADD COLUMN expires_at bigint, ADD COLUMN reclaimed_at bigint;
CREATE INDEX leases_limit ON leases (customer, meter, id);
CREATE INDEX leases_agent ON leases (agent, id);
CREATE INDEX leases_due ON leases (expires_at) WHERE reclaimed_at IS NULL;
CREATE TABLE lease_limits (
  customer text COLLATE "C", meter text COLLATE "C", PRIMARY KEY (customer, meter)
);
CREATE SEQUENCE lease_ids;
SELECT setval('lease_ids', coalesce((SELECT max(id) FROM leases), 0) + 1, false);
-- Jobs one collector does at a time (the analytics export of a directory), decision 0098.
CREATE TABLE claims (name text PRIMARY KEY, holder text NOT NULL, until_ms bigint NOT NULL);
-- Every NOTIFY also as a row, for collectors that poll instead of LISTEN (behind a
-- transaction-mode pooler, decision 0097); rows older than an hour are pruned.
CREATE TABLE tally_changes (
  id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(),
  channel text NOT NULL, payload text NOT NULL
);
CREATE INDEX tally_changes_at ON tally_changes (at);
"#,
    // 4: Orb and Metronome forwarding state shared by the collectors (decision 0125): a cursor
    // per destination, its groups (the JSON of the pure state machine's `FwdGroup` beside the
    // columns queries need), counts per state, the Orb backfill in progress.
    r#"
CREATE TABLE fwd_cursor (dest text PRIMARY KEY, pos bigint NOT NULL, next_id bigint NOT NULL);
CREATE TABLE fwd_groups (
  dest text NOT NULL, id bigint NOT NULL, state text NOT NULL, ts bigint NOT NULL,
  next_attempt_ms bigint NOT NULL, backfill text, g bytea NOT NULL,
  PRIMARY KEY (dest, id)
);
CREATE INDEX fwd_groups_open ON fwd_groups (dest, id) WHERE state IN ('pending', 'unknown');
CREATE INDEX fwd_groups_open_ts ON fwd_groups (dest, ts) WHERE state IN ('pending', 'unknown');
CREATE INDEX fwd_groups_backfill ON fwd_groups (dest, backfill, id) WHERE state = 'backfill';
CREATE INDEX fwd_groups_state ON fwd_groups (dest, state, id);
CREATE TABLE fwd_counts (dest text, state text, n bigint NOT NULL, PRIMARY KEY (dest, state));
CREATE TABLE fwd_backfill (dest text PRIMARY KEY, rec bytea NOT NULL);
"#,
    // 5: Orb and Metronome names of meters and customers set through the API (SPEC §6.4b), as
    // JSON beside the catalog and customer records (whose encodings agents and older rows share).
    r#"
CREATE TABLE dest_names (
  kind text NOT NULL, key text COLLATE "C" NOT NULL, names bytea NOT NULL, PRIMARY KEY (kind, key)
);
"#,
    // 6: open outbox buckets, one record per (customer, meter), sealed into rows by the
    // forwarder (decision 0106); `n` buckets, the oldest at `min_ts`, for stats.
    r#"
CREATE TABLE outbox_buckets (
  customer text COLLATE "C", meter text COLLATE "C", rec bytea NOT NULL,
  n int NOT NULL, min_ts bigint NOT NULL,
  PRIMARY KEY (customer, meter)
);
"#,
];

/// Brings the database to the newest version, once, under [`MIGRATION_LOCK`]; returns the
/// version found before.
pub fn migrate(tx: &mut Tx<'_>) -> Result<i32, StoreError> {
    tx.batch(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))?;
    tx.batch(
        "CREATE TABLE IF NOT EXISTS tally_schema \
         (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM tally_schema", &[])?
        .get(0);
    let newest = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if found > newest {
        return Err(StoreError::Format {
            found: u64::try_from(found).unwrap_or(0),
            supported: u64::try_from(newest).unwrap_or(0),
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.batch(sql)?;
        tx.execute(
            "INSERT INTO tally_schema (version) VALUES ($1)",
            &[&version],
        )?;
        tracing::info!(version, "postgres schema migrated");
    }
    Ok(found)
}
