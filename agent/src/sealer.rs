//! Sealing: aggregates and logged events become numbered, signed batches on disk.
//!
//! Owns: [`SealerCore`], a plain state machine (no I/O, no clock: the caller passes `now_ms`)
//! that merges deltas by `(customer, meter, dimensions, 1-minute bucket)` and cuts them into
//! [`BatchBody`]s numbered from the store's `next_seq`; and the sealer thread that runs it every
//! `flush_interval`, early when a size threshold is hit, or on request.
//!
//! Guarantees:
//! - Seqs are consecutive from the store's `next_seq` and never reused: a failed write rolls the
//!   core back, and the store refuses a seq that does not follow.
//! - A batch is signed and committed to the store (fsynced) before the shipper can see it (A1).
//! - Usage drained from memory whose write fails is carried to the next attempt, not dropped;
//!   durable-log records are folded (the store's `log_folded` watermark) only in the transaction
//!   that inserts the batch folding them in, and their segments are recycled only after it.
//! - Batches are deterministic for given input: deltas are sorted by key and bucket.

use crate::aggregate::Aggregator;
use crate::error::SealError;
use crate::seglog::SegmentLog;
use crate::store::{LoggedEvent, SealCommit, StoredBatch};
use tally_protocol::batch::{AgentId, BatchBody, BatchError, Delta, SignedBatch};

/// Deltas per batch: far below the protocol's 10,000 and, at the largest possible delta
/// (~1.5 KiB), within the 8 MiB body limit.
pub const MAX_DELTAS_PER_SEALED_BATCH: usize = 4_000;
/// Durable-log rows folded into one seal; the rest wait for the next.
pub const MAX_LOG_ROWS_PER_SEAL: usize = 200_000;
/// Segment-log records (requests) folded into one seal at most.
pub const MAX_LOG_RECORDS_PER_SEAL: usize = 100_000;
/// Segment-log bytes folded into one seal, about (at least one record).
pub const MAX_LOG_BYTES_PER_SEAL: u64 = 32 << 20;

fn key_cmp(a: &Delta, b: &Delta) -> std::cmp::Ordering {
    (&a.customer, &a.meter, &a.dimensions, a.bucket_start_ms).cmp(&(
        &b.customer,
        &b.meter,
        &b.dimensions,
        b.bucket_start_ms,
    ))
}

/// Merges deltas with equal customer, meter, dimensions and bucket, and sorts them by that key
/// (a stable sort, so the result depends only on the input). Two deltas whose sum would
/// overflow a `Decimal` stay separate. Nothing is cloned: this runs on every seal.
pub fn merge_deltas(mut deltas: Vec<Delta>) -> Vec<Delta> {
    deltas.sort_by(key_cmp);
    let mut out: Vec<Delta> = Vec::with_capacity(deltas.len());
    for d in deltas {
        if let Some(last) = out.last_mut()
            && key_cmp(last, &d).is_eq()
            && merge_into(last, &d)
        {
            continue;
        }
        out.push(d);
    }
    out
}

/// Adds `d` into `into` (same key and bucket); false if the sum would overflow.
fn merge_into(into: &mut Delta, d: &Delta) -> bool {
    let (Some(sum), Some(count)) = (into.sum.checked_add(d.sum), into.count.checked_add(d.count))
    else {
        return false;
    };
    into.sum = sum;
    into.count = count;
    if d.last_at_ms >= into.last_at_ms {
        into.last = d.last;
        into.last_at_ms = d.last_at_ms;
    }
    into.first_at_ms = into.first_at_ms.min(d.first_at_ms);
    true
}

/// The delta of one logged event.
pub fn delta_of(e: &LoggedEvent) -> Delta {
    Delta::single(
        e.customer.clone(),
        e.meter.clone(),
        e.dimensions.clone(),
        e.at_ms,
        e.quantity,
    )
}

/// The numbering state machine of sealing.
#[derive(Debug, Clone)]
pub struct SealerCore {
    agent_id: AgentId,
    epoch: u64,
    next_seq: u64,
    max_deltas: usize,
}

impl SealerCore {
    /// A core that numbers batches of `agent_id` in `epoch` from `next_seq` (≥ 1).
    pub fn new(agent_id: AgentId, epoch: u64, next_seq: u64) -> Self {
        SealerCore {
            agent_id,
            epoch,
            next_seq: next_seq.max(1),
            max_deltas: MAX_DELTAS_PER_SEALED_BATCH,
        }
    }

    /// Sets the most deltas per batch (1 ..= [`MAX_DELTAS_PER_SEALED_BATCH`]).
    pub fn with_max_deltas(mut self, n: usize) -> Self {
        self.max_deltas = n.clamp(1, MAX_DELTAS_PER_SEALED_BATCH);
        self
    }

    /// The seq the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Merges `deltas` and cuts them into bodies sealed at `now_ms`, numbered from `next_seq`.
    /// No deltas, no batch.
    pub fn seal(&mut self, deltas: Vec<Delta>, now_ms: i64) -> Result<Vec<BatchBody>, BatchError> {
        let merged = merge_deltas(deltas);
        let mut bodies = Vec::with_capacity(merged.len().div_ceil(self.max_deltas));
        let mut it = merged.into_iter().peekable();
        let mut seq = self.next_seq;
        while it.peek().is_some() {
            let chunk: Vec<Delta> = it.by_ref().take(self.max_deltas).collect();
            bodies.push(BatchBody::new(
                self.agent_id,
                self.epoch,
                seq,
                now_ms,
                chunk,
            )?);
            seq += 1;
        }
        self.next_seq = seq;
        Ok(bodies)
    }

    /// Undoes every seal since `seq` was next: those seqs will be used again.
    pub fn rollback_to(&mut self, seq: u64) {
        assert!(seq <= self.next_seq, "a rollback goes back, not forward");
        self.next_seq = seq.max(1);
    }

    /// Undoes a [`SealerCore::seal`] whose bodies were not stored; returns their deltas.
    pub fn rollback(&mut self, bodies: Vec<BatchBody>) -> Vec<Delta> {
        if let Some(first) = bodies.first() {
            assert_eq!(
                first.seq + bodies.len() as u64,
                self.next_seq,
                "only the last seal is rolled back"
            );
            self.next_seq = first.seq;
        }
        bodies
            .into_iter()
            .flat_map(|b| b.deltas.into_inner())
            .collect()
    }
}

/// Signs bodies into the rows the store keeps.
pub fn sign_all(
    bodies: &[BatchBody],
    key: &ed25519_dalek::SigningKey,
) -> Result<Vec<(u64, StoredBatch)>, BatchError> {
    bodies
        .iter()
        .map(|b| {
            Ok((
                b.seq,
                StoredBatch {
                    sealed_at_ms: b.sealed_at_ms,
                    batch: SignedBatch::seal(b, key)?,
                },
            ))
        })
        .collect()
}

/// Usage taken from memory but not yet stored, kept for the next attempt.
#[derive(Debug, Default)]
pub(crate) struct Carry {
    pub(crate) deltas: Vec<Delta>,
    pub(crate) ids: Vec<(String, i64)>,
}

/// What one seal did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sealed {
    pub(crate) batches: Vec<crate::store::BatchMeta>,
    pub(crate) log_rows: u64,
    pub(crate) log_bytes: u64,
    pub(crate) ids: Vec<String>,
}

impl Carry {
    /// Keeps usage whose write failed for the next attempt (after what is already kept).
    fn keep(&mut self, back: Carry) {
        self.deltas.extend(back.deltas);
        self.ids.extend(back.ids);
    }
}

/// One seal against the store: drain memory (unless `memory` is false), fold the log, number,
/// sign, commit.
///
/// `memory: false` is the seal of `Overflow::Block` over the disk budget: usage in memory (and
/// the carry) stays where it is, but the durable log is still folded into batches. The log is on
/// disk already and counts against the budget, so folding it never grows the backlog by more
/// than a batch's framing; not folding it would leave an agent whose log alone exceeds the
/// budget blocked for good (issue 13).
#[allow(clippy::too_many_arguments)]
pub(crate) fn seal_once(
    agg: &Aggregator,
    store: &crate::store::Store,
    seglog: &SegmentLog,
    key: &ed25519_dalek::SigningKey,
    core: &mut SealerCore,
    carry: &mut Carry,
    pending: Vec<(Delta, Option<(String, i64)>)>,
    memory: bool,
    now_ms: i64,
) -> Result<Sealed, SealError> {
    let (mut deltas, mut ids) = (Vec::new(), Vec::new());
    if memory {
        deltas = std::mem::take(&mut carry.deltas);
        ids = std::mem::take(&mut carry.ids);
        deltas.extend(agg.drain());
    }
    for (d, id) in pending {
        deltas.push(d);
        ids.extend(id);
    }
    let log = match store.read_log(MAX_LOG_ROWS_PER_SEAL) {
        Ok(l) => l,
        Err(e) => {
            carry.keep(Carry { deltas, ids });
            return Err(e.into());
        }
    };
    let unfolded = match seglog.read_unfolded(MAX_LOG_RECORDS_PER_SEAL, MAX_LOG_BYTES_PER_SEAL) {
        Ok(u) => u,
        Err(e) => {
            carry.keep(Carry { deltas, ids });
            return Err(crate::error::StoreError::from(e).into());
        }
    };
    let mut seg_events = Vec::new();
    for r in &unfolded.records {
        match postcard::from_bytes::<Vec<LoggedEvent>>(&r.payload) {
            Ok(evs) => seg_events.extend(evs),
            Err(e) => {
                // The CRC matched, so this is a bug or a foreign writer, not a torn write.
                carry.keep(Carry { deltas, ids });
                return Err(crate::error::StoreError::Corrupt {
                    table: "seglog",
                    detail: format!("record {}: {e}", r.lsn),
                }
                .into());
            }
        }
    }
    if deltas.is_empty() && log.is_empty() && ids.is_empty() && seg_events.is_empty() {
        return Ok(Sealed::default());
    }
    // Usage from memory and from the durable log go into separate batches, so that a failed
    // write gives back exactly the memory part (the log rows stay in the log).
    let memory_ids = ids.len();
    let mut log_bytes = 0;
    let mut log_deltas = Vec::with_capacity(log.len());
    for (_, e) in &log {
        log_deltas.push(delta_of(e));
        if let Some(id) = &e.id {
            ids.push((id.clone(), e.accepted_at_ms));
        }
        log_bytes += postcard::experimental::serialized_size(e).unwrap_or(0) as u64;
    }
    for e in &seg_events {
        log_deltas.push(delta_of(e));
        if let Some(id) = &e.id {
            ids.push((id.clone(), e.accepted_at_ms));
        }
    }
    log_bytes += unfolded.bytes;
    let first_seq = core.next_seq();
    let restore = |core: &mut SealerCore, bodies: Vec<BatchBody>, n: usize, mut ids: Vec<_>| {
        core.rollback_to(first_seq);
        ids.truncate(memory_ids);
        Carry {
            deltas: bodies
                .into_iter()
                .take(n)
                .flat_map(|b| b.deltas.into_inner())
                .collect(),
            ids,
        }
    };
    // `seal` only fails on limits that its chunking rules out; if it ever did, the usage of
    // that call could not be kept, so it is reported loudly.
    let mut bodies = core.seal(deltas, now_ms).map_err(|e| {
        tracing::error!(error = %e, "sealing usage from memory failed; it is lost");
        SealError::from(e)
    })?;
    let memory_bodies = bodies.len();
    match core.seal(log_deltas, now_ms) {
        Ok(b) => bodies.extend(b),
        Err(e) => {
            carry.keep(restore(core, bodies, memory_bodies, ids));
            return Err(e.into());
        }
    }
    let rows = match sign_all(&bodies, key) {
        Ok(r) => r,
        Err(e) => {
            carry.keep(restore(core, bodies, memory_bodies, ids));
            return Err(e.into());
        }
    };
    // What is written is what the shipper will read back and check: a mismatch here is a bug.
    let vk = key.verifying_key();
    for (seq, row) in &rows {
        if let Err(e) = crate::store::check_batch(*seq, core.epoch(), row, &vk) {
            panic!("a freshly sealed batch fails its check: {e}");
        }
    }
    let commit = SealCommit {
        batches: rows,
        next_seq: core.next_seq(),
        log_upto: log.last().map(|(k, _)| *k),
        seglog_upto: unfolded.records.last().map(|r| r.lsn),
        ids,
        now_ms,
    };
    let sizes = match store.commit_seal(&commit) {
        Ok(s) => s,
        Err(e) => {
            carry.keep(restore(core, bodies, memory_bodies, commit.ids));
            return Err(e.into());
        }
    };
    // Committed: the records are folded. If recycling their segments fails, the next open
    // recycles them (they are at or below the store's watermark).
    if let Err(e) = seglog.folded(&unfolded) {
        tracing::warn!(error = %e, "durable log: could not recycle folded segments");
    }
    let batches = commit
        .batches
        .iter()
        .zip(sizes)
        .map(|((seq, b), bytes)| crate::store::BatchMeta {
            seq: *seq,
            bytes,
            sealed_at_ms: b.sealed_at_ms,
        })
        .collect();
    Ok(Sealed {
        batches,
        log_rows: (log.len() + seg_events.len()) as u64,
        log_bytes,
        ids: commit.ids.into_iter().map(|(id, _)| id).collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rust_decimal::Decimal;
    use tally_protocol::names::{CustomerId, Dimensions, MeterName};

    fn d(c: &str, at: i64, q: i64) -> Delta {
        Delta::single(
            CustomerId::new(c).unwrap(),
            MeterName::new("m").unwrap(),
            Dimensions::default(),
            at,
            Decimal::from(q),
        )
    }

    #[test]
    fn numbering_is_consecutive_and_rollback_restores_it() {
        let id = AgentId([1; 16]);
        let mut core = SealerCore::new(id, 42, 1).with_max_deltas(2);
        let bodies = core
            .seal(vec![d("a", 0, 1), d("b", 0, 1), d("c", 0, 1)], 1000)
            .unwrap();
        assert_eq!(bodies.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(
            bodies
                .iter()
                .all(|b| b.epoch == 42 && b.sealed_at_ms == 1000)
        );
        assert_eq!(core.next_seq(), 3);
        assert!(core.seal(vec![], 2000).unwrap().is_empty());
        assert_eq!(core.next_seq(), 3);
        let more = core.seal(vec![d("a", 0, 5)], 3000).unwrap();
        assert_eq!(more[0].seq, 3);
        let back = core.rollback(more);
        assert_eq!(back.len(), 1);
        assert_eq!(core.next_seq(), 3);
        assert_eq!(SealerCore::new(id, 1, 0).next_seq(), 1);
    }

    #[test]
    fn deltas_merge_per_key_and_minute_bucket() {
        let t = 1_700_000_080_000; // 40 s into a minute
        let mut core = SealerCore::new(AgentId([1; 16]), 1, 7);
        let bodies = core
            .seal(
                vec![
                    d("a", t, 1),
                    d("a", t + 19_999, 2), // same minute
                    d("a", t + 20_000, 4), // next minute
                    d("b", t, 8),
                ],
                t,
            )
            .unwrap();
        assert_eq!(bodies.len(), 1);
        let ds = &bodies[0].deltas;
        assert_eq!(ds.len(), 3);
        assert_eq!(
            (ds[0].sum, ds[0].count, ds[0].last),
            (Decimal::from(3), 2, Decimal::from(2))
        );
        assert_eq!((ds[0].first_at_ms, ds[0].last_at_ms), (t, t + 19_999));
        assert_eq!(ds[1].bucket_start_ms, t + 20_000);
        assert_eq!(ds[2].customer.as_str(), "b");
        for d in ds.iter() {
            d.validate().unwrap();
        }
    }

    #[test]
    fn overflowing_sums_stay_separate() {
        let mut a = d("a", 0, 1);
        a.sum = Decimal::MAX;
        let merged = merge_deltas(vec![a.clone(), d("a", 0, 1)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged.iter().map(|d| d.count).sum::<u64>(), 2);
    }
}
