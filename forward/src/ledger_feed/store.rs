//! Where each destination's cursor, groups and backfill live: [`ForwardStore`], implemented on
//! redb ([`RedbForwardStore`], a file under the collector's data directory, or in memory for
//! tests — one implementation, two backends).
//!
//! Tables (key → value): `fwd_meta` (`namespace`), `fwd_cursor` (destination → last ledger
//! position planned), `fwd_groups` ((destination, id) → JSON [`FwdGroup`]), `fwd_open`
//! ((destination, id) → bucket time) for pending/unknown groups, `fwd_backfill_q`
//! ((destination, id) → ()) for groups in a backfill, `fwd_counts` ((destination, state) → n),
//! `fwd_backfill` (destination → JSON [`BackfillRecord`]).
//!
//! Guarantees: [`ForwardStore::commit_plan`] inserts the groups and moves the cursor in one
//! transaction, and refuses if the cursor moved ([`FwdStoreError::CursorMoved`]); every state
//! change goes through [`FwdGroup::step`]; indexes and counts change in the same transaction as
//! the group.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{Engine, FwdEvent, FwdGroup, FwdState, NewFwdGroup};

const META: TableDefinition<&str, &str> = TableDefinition::new("fwd_meta");
const CURSOR: TableDefinition<&str, u64> = TableDefinition::new("fwd_cursor");
const GROUPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("fwd_groups");
const OPEN: TableDefinition<(&str, u64), i64> = TableDefinition::new("fwd_open");
const BACKFILL_Q: TableDefinition<(&str, u64), ()> = TableDefinition::new("fwd_backfill_q");
const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("fwd_counts");
const NEXT_ID: TableDefinition<&str, u64> = TableDefinition::new("fwd_next_id");
const BACKFILL: TableDefinition<&str, &[u8]> = TableDefinition::new("fwd_backfill");

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum FwdStoreError {
    /// Another planner moved the cursor first: plan again.
    #[error("cursor moved: expected {expected}, found {found}")]
    CursorMoved {
        /// What the caller read.
        expected: u64,
        /// What is stored.
        found: u64,
    },
    /// No such group.
    #[error("no group {0}")]
    NotFound(u64),
    /// The backend failed.
    #[error("forward store: {0}")]
    Backend(String),
}

fn be<E: std::fmt::Display>(e: E) -> FwdStoreError {
    FwdStoreError::Backend(e.to_string())
}

/// Counts for metrics and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwdStats {
    /// Pending or unknown.
    pub open: u64,
    /// Waiting in an Orb backfill.
    pub backfill: u64,
    /// Delivered.
    pub sent: u64,
    /// Dead letters.
    pub dead: u64,
    /// Listed out of window.
    pub out_of_window: u64,
    /// Bucket time of the oldest open group.
    pub oldest_open_s: Option<i64>,
}

/// Where an Orb backfill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackfillPhase {
    /// `POST /v1/events/backfills` (with our key as `Idempotency-Key`, so a resend after a crash
    /// returns the same backfill).
    Create,
    /// Ingest its groups with `?backfill_id=`.
    Ingest,
    /// `POST …/{id}/close`.
    Close,
    /// `GET …/{id}` until `reflected`.
    Wait,
}

/// One Orb backfill in progress (at most one per destination: Orb refuses overlapping pending
/// windows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillRecord {
    /// Ours: the groups' `backfill` and the create request's `Idempotency-Key` (≤ 64 chars).
    pub key: String,
    /// `timeframe_start`, Unix seconds.
    pub start_s: i64,
    /// `timeframe_end`, Unix seconds (≤ 31 days after the start).
    pub end_s: i64,
    /// Orb's backfill id once created.
    pub orb_id: Option<String>,
    /// Where it stands.
    pub phase: BackfillPhase,
    /// Not before (Unix ms).
    pub next_attempt_ms: i64,
    /// Requests made for it.
    pub attempts: u32,
}

/// Persistence for the Orb and Metronome forwarders.
pub trait ForwardStore: Send + Sync + 'static {
    /// A short `[a-z0-9]` name of this store, part of every key.
    fn namespace(&self) -> Result<String, FwdStoreError>;
    /// The last ledger position planned for `dest`.
    fn cursor(&self, dest: Engine) -> Result<u64, FwdStoreError>;
    /// Inserts `groups` and moves the cursor from `expected` to `cursor`, atomically.
    fn commit_plan(
        &self,
        dest: Engine,
        expected: u64,
        cursor: u64,
        groups: Vec<NewFwdGroup>,
    ) -> Result<Vec<FwdGroup>, FwdStoreError>;
    /// Open groups with `next_attempt_ms <= now_ms`, ascending id, at most `limit`.
    fn ready(
        &self,
        dest: Engine,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError>;
    /// Open groups with a bucket time before `before_s`, ascending id, at most `limit`.
    fn open_older_than(
        &self,
        dest: Engine,
        before_s: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError>;
    /// Groups in backfill `key`, ascending id, at most `limit`.
    fn backfill_groups(
        &self,
        dest: Engine,
        key: &str,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError>;
    /// Applies `ev` to each group (the rules are [`FwdGroup::step`]'s); returns the groups after.
    fn apply(
        &self,
        dest: Engine,
        ids: &[u64],
        ev: FwdEvent,
    ) -> Result<Vec<FwdGroup>, FwdStoreError>;
    /// Groups in `state` with `id > after`, ascending, at most `limit`.
    fn list(
        &self,
        dest: Engine,
        state: Option<FwdState>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError>;
    /// Counts.
    fn stats(&self, dest: Engine) -> Result<FwdStats, FwdStoreError>;
    /// The backfill in progress.
    fn backfill(&self, dest: Engine) -> Result<Option<BackfillRecord>, FwdStoreError>;
    /// Stores the backfill in progress (`None`: it is done).
    fn put_backfill(&self, dest: Engine, rec: Option<&BackfillRecord>)
    -> Result<(), FwdStoreError>;
    /// Starts backfill `rec` and moves `ids` into it, atomically.
    fn start_backfill(
        &self,
        dest: Engine,
        rec: &BackfillRecord,
        ids: &[u64],
    ) -> Result<(), FwdStoreError>;
    /// Takes or renews `dest`'s claim for `holder` until `until_ms`; false while another
    /// holder's claim runs past `now_ms`. Forwarders sharing a store (collectors on one
    /// PostgreSQL database) take turns this way, so one process plans, sends and drives
    /// backfills for a destination at a time (docs/decisions/0125); a store one process owns
    /// (redb) always grants it.
    fn claim(
        &self,
        dest: Engine,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, FwdStoreError> {
        let _ = (dest, holder, now_ms, until_ms);
        Ok(true)
    }
}

/// [`ForwardStore`] on redb.
#[derive(Debug)]
pub struct RedbForwardStore {
    db: Database,
    namespace: String,
}

/// The in-memory store for tests: the same code on redb's memory backend.
pub type MemoryForwardStore = RedbForwardStore;

fn state_name(s: FwdState) -> &'static str {
    match s {
        FwdState::Pending => "pending",
        FwdState::Unknown => "unknown",
        FwdState::Backfill => "backfill",
        FwdState::Sent => "sent",
        FwdState::Dead => "dead",
        FwdState::OutOfWindow => "out_of_window",
    }
}

const ALL_STATES: [FwdState; 6] = [
    FwdState::Pending,
    FwdState::Unknown,
    FwdState::Backfill,
    FwdState::Sent,
    FwdState::Dead,
    FwdState::OutOfWindow,
];

fn dec(bytes: &[u8]) -> Result<FwdGroup, FwdStoreError> {
    serde_json::from_slice(bytes).map_err(|e| FwdStoreError::Backend(format!("corrupt group: {e}")))
}

impl RedbForwardStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, FwdStoreError> {
        // A small page cache: the forwarding state is a cursor and the open groups (redb's
        // default ceiling is 1 GiB a database).
        Self::init(
            Database::builder()
                .set_cache_size(16 << 20)
                .create(path)
                .map_err(be)?,
        )
    }

    /// A store in memory (tests).
    pub fn in_memory() -> Result<Self, FwdStoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(be)?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, FwdStoreError> {
        let txn = db.begin_write().map_err(be)?;
        let namespace = {
            let mut meta = txn.open_table(META).map_err(be)?;
            let existing = meta
                .get("namespace")
                .map_err(be)?
                .map(|v| v.value().to_owned());
            match existing {
                Some(ns) => ns,
                None => {
                    let mut b = [0u8; 6];
                    getrandom::getrandom(&mut b).map_err(be)?;
                    let ns = hex::encode(b);
                    meta.insert("namespace", ns.as_str()).map_err(be)?;
                    ns
                }
            }
        };
        for_tables(&txn)?;
        txn.commit().map_err(be)?;
        Ok(Self { db, namespace })
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, FwdStoreError>,
    ) -> Result<T, FwdStoreError> {
        let txn = self.db.begin_write().map_err(be)?;
        let out = f(&txn)?;
        txn.commit().map_err(be)?;
        Ok(out)
    }

    /// Ids of `dest`'s open groups whose timestamp passes `keep`, in id order, at most `max`.
    fn open_ids(
        &self,
        dest: Engine,
        max: usize,
        mut keep: impl FnMut(i64) -> bool,
    ) -> Result<Vec<u64>, FwdStoreError> {
        let txn = self.db.begin_read().map_err(be)?;
        let t = txn.open_table(OPEN).map_err(be)?;
        let d = dest.as_str();
        let mut ids = Vec::new();
        for r in t.range((d, 0)..=(d, u64::MAX)).map_err(be)? {
            let (k, ts) = r.map_err(be)?;
            if keep(ts.value()) {
                ids.push(k.value().1);
                if ids.len() >= max {
                    break;
                }
            }
        }
        Ok(ids)
    }

    fn read_groups(
        &self,
        dest: Engine,
        ids: impl Iterator<Item = u64>,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let txn = self.db.begin_read().map_err(be)?;
        let t = txn.open_table(GROUPS).map_err(be)?;
        let mut out = Vec::new();
        for id in ids {
            let v = t
                .get((dest.as_str(), id))
                .map_err(be)?
                .ok_or(FwdStoreError::NotFound(id))?;
            out.push(dec(v.value())?);
        }
        Ok(out)
    }
}

/// Creates every table, so reads never meet a missing one.
fn for_tables(txn: &WriteTransaction) -> Result<(), FwdStoreError> {
    txn.open_table(CURSOR).map_err(be)?;
    txn.open_table(GROUPS).map_err(be)?;
    txn.open_table(OPEN).map_err(be)?;
    txn.open_table(BACKFILL_Q).map_err(be)?;
    txn.open_table(COUNTS).map_err(be)?;
    txn.open_table(NEXT_ID).map_err(be)?;
    txn.open_table(BACKFILL).map_err(be)?;
    Ok(())
}

/// Writes `g` (after `before`, if it existed), keeping the indexes and counts in step.
fn put_group(
    txn: &WriteTransaction,
    dest: Engine,
    before: Option<&FwdGroup>,
    g: &FwdGroup,
) -> Result<(), FwdStoreError> {
    let d = dest.as_str();
    let mut groups = txn.open_table(GROUPS).map_err(be)?;
    let mut open = txn.open_table(OPEN).map_err(be)?;
    let mut bq = txn.open_table(BACKFILL_Q).map_err(be)?;
    let mut counts = txn.open_table(COUNTS).map_err(be)?;
    let bytes = serde_json::to_vec(g).map_err(be)?;
    groups.insert((d, g.id), bytes.as_slice()).map_err(be)?;
    if let Some(b) = before {
        let name = state_name(b.state);
        let n = counts.get((d, name)).map_err(be)?.map_or(0, |v| v.value());
        counts.insert((d, name), n.saturating_sub(1)).map_err(be)?;
    }
    let name = state_name(g.state);
    let n = counts.get((d, name)).map_err(be)?.map_or(0, |v| v.value());
    counts.insert((d, name), n + 1).map_err(be)?;
    if g.state.is_open() {
        open.insert((d, g.id), g.event.timestamp_s).map_err(be)?;
    } else {
        open.remove((d, g.id)).map_err(be)?;
    }
    if g.state == FwdState::Backfill {
        bq.insert((d, g.id), ()).map_err(be)?;
    } else {
        bq.remove((d, g.id)).map_err(be)?;
    }
    Ok(())
}

fn apply_in(
    txn: &WriteTransaction,
    dest: Engine,
    ids: &[u64],
    ev: &FwdEvent,
) -> Result<Vec<FwdGroup>, FwdStoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let cur = {
            let t = txn.open_table(GROUPS).map_err(be)?;
            let v = t
                .get((dest.as_str(), *id))
                .map_err(be)?
                .ok_or(FwdStoreError::NotFound(*id))?;
            dec(v.value())?
        };
        match cur.step(ev.clone()) {
            Some(next) => {
                put_group(txn, dest, Some(&cur), &next)?;
                out.push(next);
            }
            None => out.push(cur),
        }
    }
    Ok(out)
}

impl ForwardStore for RedbForwardStore {
    fn namespace(&self) -> Result<String, FwdStoreError> {
        Ok(self.namespace.clone())
    }

    fn cursor(&self, dest: Engine) -> Result<u64, FwdStoreError> {
        let txn = self.db.begin_read().map_err(be)?;
        let t = txn.open_table(CURSOR).map_err(be)?;
        Ok(t.get(dest.as_str()).map_err(be)?.map_or(0, |v| v.value()))
    }

    fn commit_plan(
        &self,
        dest: Engine,
        expected: u64,
        cursor: u64,
        groups: Vec<NewFwdGroup>,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        assert!(cursor >= expected, "the cursor only moves forward");
        self.write(|txn| {
            {
                let mut c = txn.open_table(CURSOR).map_err(be)?;
                let found = c.get(dest.as_str()).map_err(be)?.map_or(0, |v| v.value());
                if found != expected {
                    return Err(FwdStoreError::CursorMoved { expected, found });
                }
                c.insert(dest.as_str(), cursor).map_err(be)?;
            }
            let mut next = {
                let t = txn.open_table(NEXT_ID).map_err(be)?;
                t.get(dest.as_str()).map_err(be)?.map_or(1, |v| v.value())
            };
            let mut out = Vec::with_capacity(groups.len());
            for g in groups {
                assert!(
                    g.positions.iter().all(|p| *p > expected && *p <= cursor),
                    "a group covers positions of this pass only"
                );
                let fg = FwdGroup::new(next, g);
                next += 1;
                put_group(txn, dest, None, &fg)?;
                out.push(fg);
            }
            txn.open_table(NEXT_ID)
                .map_err(be)?
                .insert(dest.as_str(), next)
                .map_err(be)?;
            Ok(out)
        })
    }

    fn ready(
        &self,
        dest: Engine,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let ids = self.open_ids(dest, usize::MAX, |_| true)?;
        let mut out = Vec::new();
        for chunk in ids.chunks(256) {
            for g in self.read_groups(dest, chunk.iter().copied())? {
                if g.next_attempt_ms <= now_ms {
                    out.push(g);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    fn open_older_than(
        &self,
        dest: Engine,
        before_s: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let ids = self.open_ids(dest, limit, |ts| ts < before_s)?;
        self.read_groups(dest, ids.into_iter())
    }

    fn backfill_groups(
        &self,
        dest: Engine,
        key: &str,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let ids: Vec<u64> = {
            let txn = self.db.begin_read().map_err(be)?;
            let t = txn.open_table(BACKFILL_Q).map_err(be)?;
            let d = dest.as_str();
            let mut ids = Vec::new();
            for r in t.range((d, 0)..=(d, u64::MAX)).map_err(be)? {
                ids.push(r.map_err(be)?.0.value().1);
            }
            ids
        };
        let mut out = Vec::new();
        for g in self.read_groups(dest, ids.into_iter())? {
            if g.backfill.as_deref() == Some(key) {
                out.push(g);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn apply(
        &self,
        dest: Engine,
        ids: &[u64],
        ev: FwdEvent,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        self.write(|txn| apply_in(txn, dest, ids, &ev))
    }

    fn list(
        &self,
        dest: Engine,
        state: Option<FwdState>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let txn = self.db.begin_read().map_err(be)?;
        let t = txn.open_table(GROUPS).map_err(be)?;
        let d = dest.as_str();
        let mut out = Vec::new();
        for r in t
            .range((d, after.saturating_add(1))..=(d, u64::MAX))
            .map_err(be)?
        {
            let (_, v) = r.map_err(be)?;
            let g = dec(v.value())?;
            if state.is_none_or(|s| s == g.state) {
                out.push(g);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn stats(&self, dest: Engine) -> Result<FwdStats, FwdStoreError> {
        let txn = self.db.begin_read().map_err(be)?;
        let counts = txn.open_table(COUNTS).map_err(be)?;
        let d = dest.as_str();
        let mut n = [0u64; 6];
        for (i, s) in ALL_STATES.iter().enumerate() {
            n[i] = counts
                .get((d, state_name(*s)))
                .map_err(be)?
                .map_or(0, |v| v.value());
        }
        let open = txn.open_table(OPEN).map_err(be)?;
        let mut oldest: Option<i64> = None;
        for r in open.range((d, 0)..=(d, u64::MAX)).map_err(be)? {
            let ts = r.map_err(be)?.1.value();
            oldest = Some(oldest.map_or(ts, |o| o.min(ts)));
        }
        Ok(FwdStats {
            open: n[0] + n[1],
            backfill: n[2],
            sent: n[3],
            dead: n[4],
            out_of_window: n[5],
            oldest_open_s: oldest,
        })
    }

    fn backfill(&self, dest: Engine) -> Result<Option<BackfillRecord>, FwdStoreError> {
        let txn = self.db.begin_read().map_err(be)?;
        let t = txn.open_table(BACKFILL).map_err(be)?;
        match t.get(dest.as_str()).map_err(be)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(be)?)),
            None => Ok(None),
        }
    }

    fn put_backfill(
        &self,
        dest: Engine,
        rec: Option<&BackfillRecord>,
    ) -> Result<(), FwdStoreError> {
        self.write(|txn| {
            let mut t = txn.open_table(BACKFILL).map_err(be)?;
            match rec {
                Some(r) => {
                    let b = serde_json::to_vec(r).map_err(be)?;
                    t.insert(dest.as_str(), b.as_slice()).map_err(be)?;
                }
                None => {
                    t.remove(dest.as_str()).map_err(be)?;
                }
            }
            Ok(())
        })
    }

    fn start_backfill(
        &self,
        dest: Engine,
        rec: &BackfillRecord,
        ids: &[u64],
    ) -> Result<(), FwdStoreError> {
        self.write(|txn| {
            {
                let mut t = txn.open_table(BACKFILL).map_err(be)?;
                let b = serde_json::to_vec(rec).map_err(be)?;
                t.insert(dest.as_str(), b.as_slice()).map_err(be)?;
            }
            apply_in(txn, dest, ids, &FwdEvent::ToBackfill(rec.key.clone()))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ledger_feed::{LedgerItem, Routes, plan};
    use rust_decimal::Decimal;

    #[test]
    fn the_store_model_holds_on_redb() {
        crate::ledger_feed::conformance::check_store(&RedbForwardStore::in_memory().unwrap());
    }

    #[test]
    fn plan_commit_is_atomic_and_indexes_follow_states() {
        let s = RedbForwardStore::in_memory().unwrap();
        let d = Engine::Metronome;
        let items: Vec<_> = (1..=3)
            .map(|p| LedgerItem {
                position: p,
                customer: format!("c{p}"),
                meter: "m".into(),
                amount: Decimal::new(15, 1),
                timestamp_s: 60,
                dimensions: Default::default(),
            })
            .collect();
        let ns = s.namespace().unwrap();
        let p = plan(&ns, d, 0, 0, &items, &Routes::default());
        let gs = s.commit_plan(d, 0, p.cursor, p.groups.clone()).unwrap();
        assert_eq!(gs.len(), 3);
        assert!(matches!(
            s.commit_plan(d, 0, p.cursor, p.groups),
            Err(FwdStoreError::CursorMoved { .. })
        ));
        assert_eq!(s.cursor(d).unwrap(), 3);
        assert_eq!(s.cursor(Engine::Orb).unwrap(), 0);
        assert_eq!(s.ready(d, 0, 10).unwrap().len(), 3);
        s.apply(d, &[1], FwdEvent::Delivered).unwrap();
        s.apply(d, &[2], FwdEvent::OutOfWindow("old".into()))
            .unwrap();
        let st = s.stats(d).unwrap();
        assert_eq!((st.open, st.sent, st.out_of_window), (1, 1, 1));
        assert_eq!(
            s.list(d, Some(FwdState::OutOfWindow), 0, 10).unwrap()[0].id,
            2
        );
        assert_eq!(s.ready(d, 0, 10).unwrap().len(), 1);
    }
}
