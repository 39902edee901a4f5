//! The Orb and Metronome forwarders' state in PostgreSQL ([`PgForwardStore`]): one cursor,
//! group set, backfill and claim per destination, shared by every collector on the database
//! (docs/decisions/0125).
//!
//! Tables (migration 4): `fwd_cursor` (destination → last ledger position planned, next group
//! id), `fwd_groups` ((destination, id) → state, bucket time, next attempt, backfill and the
//! JSON [`FwdGroup`]), `fwd_counts` ((destination, state) → n), `fwd_backfill` (destination →
//! JSON [`BackfillRecord`]); claims in the shared `claims` table as `forward:{destination}`.
//!
//! Guarantees: [`ForwardStore::commit_plan`] locks the destination's cursor row, checks it,
//! inserts the groups and moves it in one transaction (a second planner gets `CursorMoved`);
//! every state change locks the groups' rows and goes through [`FwdGroup::step`], with the
//! counts in the same transaction. Keys use the database's namespace, so every collector
//! names a group the same way and a resend after another collector died carries the same key.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_forward::ledger_feed::store::{BackfillRecord, ForwardStore, FwdStats, FwdStoreError};
use tally_forward::ledger_feed::{Engine, FwdEvent, FwdGroup, FwdState, NewFwdGroup};

use super::pool::Tx;
use super::{PgStore, i, u};
use crate::store::{Store, StoreError};

/// [`ForwardStore`] on the collectors' PostgreSQL database.
#[derive(Clone)]
pub struct PgForwardStore {
    pg: Arc<PgStore>,
}

impl std::fmt::Debug for PgForwardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgForwardStore").finish_non_exhaustive()
    }
}

fn be(e: impl std::fmt::Display) -> FwdStoreError {
    FwdStoreError::Backend(e.to_string())
}

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

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table: "fwd_groups",
        detail: e.to_string(),
    }
}

fn group_of(bytes: &[u8]) -> Result<FwdGroup, StoreError> {
    serde_json::from_slice(bytes).map_err(corrupt)
}

fn groups_of(rows: &[postgres::Row]) -> Result<Vec<FwdGroup>, StoreError> {
    rows.iter()
        .map(|r| group_of(r.get::<_, &[u8]>(0)))
        .collect()
}

fn lim(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds `delta` to each (destination, state) count.
fn count(tx: &mut Tx<'_>, d: &str, delta: &BTreeMap<&'static str, i64>) -> Result<(), StoreError> {
    for (state, n) in delta {
        if *n != 0 {
            tx.execute(
                "INSERT INTO fwd_counts (dest, state, n) VALUES ($1, $2, $3) \
                 ON CONFLICT (dest, state) DO UPDATE SET n = fwd_counts.n + EXCLUDED.n",
                &[&d, state, n],
            )?;
        }
    }
    Ok(())
}

/// Writes the changed groups `after` (their rows were locked and read as `before`).
fn write_groups(
    tx: &mut Tx<'_>,
    d: &str,
    changed: &[(FwdState, FwdGroup)],
) -> Result<(), StoreError> {
    if changed.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(changed.len());
    let mut states = Vec::with_capacity(changed.len());
    let mut next = Vec::with_capacity(changed.len());
    let mut backfill = Vec::with_capacity(changed.len());
    let mut blobs = Vec::with_capacity(changed.len());
    let mut delta: BTreeMap<&'static str, i64> = BTreeMap::new();
    for (before, g) in changed {
        ids.push(i(g.id));
        states.push(state_name(g.state).to_owned());
        next.push(g.next_attempt_ms);
        backfill.push(g.backfill.clone());
        blobs.push(serde_json::to_vec(g).map_err(corrupt)?);
        *delta.entry(state_name(*before)).or_default() -= 1;
        *delta.entry(state_name(g.state)).or_default() += 1;
    }
    tx.execute(
        "UPDATE fwd_groups f SET state = x.state, next_attempt_ms = x.next, \
         backfill = x.backfill, g = x.g \
         FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bytea[]) \
           AS x(id, state, next, backfill, g) \
         WHERE f.dest = $1 AND f.id = x.id",
        &[&d, &ids, &states, &next, &backfill, &blobs],
    )?;
    count(tx, d, &delta)
}

/// Locks and reads `ids` of `d`, applies `ev` to each, writes the changes; `Ok(Err)` when an
/// id does not exist (nothing written).
fn apply_in(
    tx: &mut Tx<'_>,
    d: &str,
    ids: &[u64],
    ev: &FwdEvent,
) -> Result<Result<Vec<FwdGroup>, FwdStoreError>, StoreError> {
    let keys: Vec<i64> = ids.iter().map(|x| i(*x)).collect();
    let rows = tx.query(
        "SELECT g FROM fwd_groups WHERE dest = $1 AND id = ANY($2) ORDER BY id FOR UPDATE",
        &[&d, &keys],
    )?;
    let mut found: BTreeMap<u64, FwdGroup> = BTreeMap::new();
    for g in groups_of(&rows)? {
        found.insert(g.id, g);
    }
    let mut out = Vec::with_capacity(ids.len());
    let mut changed = Vec::new();
    for id in ids {
        let Some(cur) = found.get(id).cloned() else {
            return Ok(Err(FwdStoreError::NotFound(*id)));
        };
        match cur.step(ev.clone()) {
            Some(next) => {
                found.insert(*id, next.clone());
                changed.push((cur.state, next.clone()));
                out.push(next);
            }
            None => out.push(cur),
        }
    }
    // An id given twice changes once per step; keep the last state of each.
    let mut last: BTreeMap<u64, (FwdState, FwdGroup)> = BTreeMap::new();
    for (before, g) in changed {
        last.entry(g.id)
            .and_modify(|e| e.1 = g.clone())
            .or_insert((before, g));
    }
    let changed: Vec<_> = last.into_values().collect();
    write_groups(tx, d, &changed)?;
    Ok(Ok(out))
}

/// Open groups due to be sent by `$2` (ms).
const OPEN_DUE: &str = "SELECT g FROM fwd_groups WHERE dest = $1 AND state IN ('pending', 'unknown') \
     AND next_attempt_ms <= $2 ORDER BY id LIMIT $3";
/// Open groups whose minute is before `$2` (s).
const OPEN_OLDER: &str = "SELECT g FROM fwd_groups WHERE dest = $1 AND state IN ('pending', 'unknown') \
     AND ts < $2 ORDER BY id LIMIT $3";

impl PgForwardStore {
    /// The forwarders' state in `pg`'s database (its tables come with the schema's migrations).
    pub fn new(pg: Arc<PgStore>) -> Self {
        Self { pg }
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnMut(&mut super::pool::Session) -> Result<Result<T, FwdStoreError>, StoreError>
        + Send
        + 'static,
    ) -> Result<T, FwdStoreError> {
        self.pg.run(f).map_err(be)?
    }

    fn read<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, FwdStoreError> {
        self.run(move |s| {
            let mut tx = s.begin()?;
            Ok(Ok(f(&mut tx)?))
        })
    }

    /// A destination's open groups (pending or unknown) by `sql` (one of the two `OPEN_*`
    /// statements, `$2` its bound), oldest first; statements are cached by their static text.
    fn open_where(
        &self,
        dest: Engine,
        sql: &'static str,
        value: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let (d, l) = (dest.as_str(), lim(limit));
        self.read(move |tx| groups_of(&tx.query(sql, &[&d, &value, &l])?))
    }
}

impl ForwardStore for PgForwardStore {
    fn namespace(&self) -> Result<String, FwdStoreError> {
        Ok(self.pg.namespace.clone())
    }

    fn cursor(&self, dest: Engine) -> Result<u64, FwdStoreError> {
        let d = dest.as_str();
        self.read(move |tx| {
            Ok(tx
                .query_opt("SELECT pos FROM fwd_cursor WHERE dest = $1", &[&d])?
                .map_or(0, |r| u(r.get(0))))
        })
    }

    fn commit_plan(
        &self,
        dest: Engine,
        expected: u64,
        cursor: u64,
        groups: Vec<NewFwdGroup>,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        assert!(cursor >= expected, "the cursor only moves forward");
        assert!(
            groups
                .iter()
                .all(|g| g.positions.iter().all(|p| *p > expected && *p <= cursor)),
            "a group covers positions of this pass only"
        );
        let d = dest.as_str();
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.execute(
                "INSERT INTO fwd_cursor (dest, pos, next_id) VALUES ($1, 0, 1) \
                 ON CONFLICT (dest) DO NOTHING",
                &[&d],
            )?;
            let row = tx.query_one(
                "SELECT pos, next_id FROM fwd_cursor WHERE dest = $1 FOR UPDATE",
                &[&d],
            )?;
            let (found, mut next) = (u(row.get(0)), u(row.get(1)));
            if found != expected {
                return Ok(Err(FwdStoreError::CursorMoved { expected, found }));
            }
            let mut out = Vec::with_capacity(groups.len());
            let (mut ids, mut states, mut ts, mut blobs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for g in &groups {
                let fg = FwdGroup::new(next, g.clone());
                next += 1;
                ids.push(i(fg.id));
                states.push(state_name(fg.state).to_owned());
                ts.push(fg.event.timestamp_s);
                blobs.push(serde_json::to_vec(&fg).map_err(corrupt)?);
                out.push(fg);
            }
            if !out.is_empty() {
                tx.execute(
                    "INSERT INTO fwd_groups (dest, id, state, ts, next_attempt_ms, g) \
                     SELECT $1, x.id, x.state, x.ts, 0, x.g \
                     FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bytea[]) \
                       AS x(id, state, ts, g)",
                    &[&d, &ids, &states, &ts, &blobs],
                )?;
                let n = lim(out.len());
                count(&mut tx, d, &BTreeMap::from([("pending", n)]))?;
            }
            tx.execute(
                "UPDATE fwd_cursor SET pos = $2, next_id = $3 WHERE dest = $1",
                &[&d, &i(cursor), &i(next)],
            )?;
            tx.commit()?;
            Ok(Ok(out.clone()))
        })
    }

    fn ready(
        &self,
        dest: Engine,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        self.open_where(dest, OPEN_DUE, now_ms, limit)
    }

    fn open_older_than(
        &self,
        dest: Engine,
        before_s: i64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        self.open_where(dest, OPEN_OLDER, before_s, limit)
    }

    fn backfill_groups(
        &self,
        dest: Engine,
        key: &str,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let (d, l, k) = (dest.as_str(), lim(limit), key.to_owned());
        self.read(move |tx| {
            groups_of(&tx.query(
                "SELECT g FROM fwd_groups WHERE dest = $1 AND state = 'backfill' \
                 AND backfill = $2 ORDER BY id LIMIT $3",
                &[&d, &k, &l],
            )?)
        })
    }

    fn apply(
        &self,
        dest: Engine,
        ids: &[u64],
        ev: FwdEvent,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let (d, ids) = (dest.as_str(), ids.to_vec());
        self.run(move |s| {
            let mut tx = s.begin()?;
            let out = apply_in(&mut tx, d, &ids, &ev)?;
            if out.is_ok() {
                tx.commit()?;
            }
            Ok(out)
        })
    }

    fn list(
        &self,
        dest: Engine,
        state: Option<FwdState>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<FwdGroup>, FwdStoreError> {
        let (d, l) = (dest.as_str(), lim(limit));
        let st = state.map(|s| state_name(s).to_owned());
        // Ids are small positive numbers (from 1 per destination): bigint order is id order.
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        self.read(move |tx| {
            groups_of(&tx.query(
                "SELECT g FROM fwd_groups WHERE dest = $1 AND ($2::text IS NULL OR state = $2) \
                 AND id > $3 ORDER BY id LIMIT $4",
                &[&d, &st, &after, &l],
            )?)
        })
    }

    fn stats(&self, dest: Engine) -> Result<FwdStats, FwdStoreError> {
        let d = dest.as_str();
        self.read(move |tx| {
            let mut st = FwdStats::default();
            for r in tx.query("SELECT state, n FROM fwd_counts WHERE dest = $1", &[&d])? {
                let n = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
                match r.get::<_, &str>(0) {
                    "pending" | "unknown" => st.open += n,
                    "backfill" => st.backfill += n,
                    "sent" => st.sent += n,
                    "dead" => st.dead += n,
                    "out_of_window" => st.out_of_window += n,
                    _ => {}
                }
            }
            st.oldest_open_s = tx
                .query_one(
                    "SELECT min(ts) FROM fwd_groups WHERE dest = $1 \
                     AND state IN ('pending', 'unknown')",
                    &[&d],
                )?
                .get(0);
            Ok(st)
        })
    }

    fn backfill(&self, dest: Engine) -> Result<Option<BackfillRecord>, FwdStoreError> {
        let d = dest.as_str();
        self.read(move |tx| {
            match tx.query_opt("SELECT rec FROM fwd_backfill WHERE dest = $1", &[&d])? {
                Some(r) => Ok(Some(
                    serde_json::from_slice(r.get::<_, &[u8]>(0)).map_err(corrupt)?,
                )),
                None => Ok(None),
            }
        })
    }

    fn put_backfill(
        &self,
        dest: Engine,
        rec: Option<&BackfillRecord>,
    ) -> Result<(), FwdStoreError> {
        let d = dest.as_str();
        let blob = rec.map(serde_json::to_vec).transpose().map_err(be)?;
        self.run(move |s| {
            let mut tx = s.begin()?;
            match &blob {
                Some(b) => tx.execute(
                    "INSERT INTO fwd_backfill (dest, rec) VALUES ($1, $2) \
                     ON CONFLICT (dest) DO UPDATE SET rec = EXCLUDED.rec",
                    &[&d, b],
                )?,
                None => tx.execute("DELETE FROM fwd_backfill WHERE dest = $1", &[&d])?,
            };
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn start_backfill(
        &self,
        dest: Engine,
        rec: &BackfillRecord,
        ids: &[u64],
    ) -> Result<(), FwdStoreError> {
        let d = dest.as_str();
        let blob = serde_json::to_vec(rec).map_err(be)?;
        let (ids, ev) = (ids.to_vec(), FwdEvent::ToBackfill(rec.key.clone()));
        self.run(move |s| {
            let mut tx = s.begin()?;
            tx.execute(
                "INSERT INTO fwd_backfill (dest, rec) VALUES ($1, $2) \
                 ON CONFLICT (dest) DO UPDATE SET rec = EXCLUDED.rec",
                &[&d, &blob],
            )?;
            if let Err(e) = apply_in(&mut tx, d, &ids, &ev)? {
                return Ok(Err(e));
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn claim(
        &self,
        dest: Engine,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, FwdStoreError> {
        self.pg
            .claim(
                &format!("forward:{}", dest.as_str()),
                holder,
                now_ms,
                until_ms,
            )
            .map_err(be)
    }
}
