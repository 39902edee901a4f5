//! The order of ingest, once, above storage: for each verified batch of a group, in order,
//! dedup → refuse → post → quarantine → outbox, then the dedup states and account totals of the
//! whole group. A plain function over a narrow read/write trait ([`IngestTxn`], as
//! [`crate::core::ledger::Accounts`] is for the ledger), so the embedded store and the in-memory
//! reference store run the same rules.
//!
//! Owns the records a batch leaves behind ([`BatchRecord`], [`QuarantineRecord`]) and their
//! checks: a record is checked before it is written (a failure is a programming error: panic)
//! and after it is read (a failure is corruption: a typed error).
//!
//! Guarantees of [`ingest_group`]: one outcome per batch, in order; a seq already done is
//! `Duplicate` and writes nothing; a batch that would open more than
//! [`MAX_GAPS`](crate::core::dedup::MAX_GAPS) gaps in its epoch is refused (`TooManyGaps`) and
//! writes nothing; otherwise it is posted
//! (its transfers appended, its outbox rows written) or quarantined whole, recorded, and its seq
//! marked done. Before the totals are handed to the store the working set is checked to
//! balance (Σdebits = Σcredits per unit).

use crate::core::dedup::DedupState;
use crate::core::ledger::{
    self, Accounts, Posting, Rejection, Transfer, WorkingSet, source_account_id,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tally_protocol::batch::{AgentId, BatchBody, SignedBatch};
use tally_protocol::catalog::{Aggregation, Catalog};
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::AckOutcome;

/// What happened to a recorded batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOutcome {
    /// Posted to the ledger.
    Committed,
    /// Kept in quarantine with this reason.
    Quarantined(ErrorCode),
}

/// A batch the collector has made durable (committed or quarantined).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Number of deltas.
    pub deltas: u32,
    /// Ledger position of the transfer of row 0 (row `r` is at `first_transfer + r`); 0 when
    /// quarantined.
    pub first_transfer: u64,
    /// What happened.
    pub outcome: BatchOutcome,
    /// When the agent sealed it, ms.
    pub sealed_at_ms: i64,
    /// When the collector committed it, ms.
    pub committed_at_ms: i64,
}

/// A batch that verified but could not be posted, kept whole with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    /// Position in the quarantine, from 1.
    pub id: u64,
    /// The agent.
    pub agent: AgentId,
    /// The epoch.
    pub epoch: u64,
    /// The seq.
    pub seq: u64,
    /// Why.
    pub rejection: Rejection,
    /// When it was received, ms.
    pub received_at_ms: i64,
    /// The batch exactly as signed (body and signature).
    pub batch: SignedBatch,
}

/// One verified batch for [`crate::store::Store::ingest`].
#[derive(Debug, Clone, PartialEq)]
pub struct IngestBatch {
    /// The decoded, verified body.
    pub body: BatchBody,
    /// The signed batch as received (kept if quarantined).
    pub signed: SignedBatch,
}

/// The outcome of one batch of [`Store::ingest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Durable; send this ack.
    Ack(AckOutcome),
    /// Not recorded (the dedup state of its epoch has too many holes): refuse with this code.
    Refused(ErrorCode),
}

/// Why a stored record is not consistent with itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A committed batch with deltas does not point at its transfers.
    #[error("a committed batch with deltas has no first transfer")]
    NoTransfers,
    /// A quarantined batch points at transfers.
    #[error("a quarantined batch points at transfers")]
    QuarantinedWithTransfers,
    /// A quarantined batch's signed bytes do not decode.
    #[error("quarantined batch {id} does not decode: {source}")]
    Undecodable {
        /// The quarantine position.
        id: u64,
        /// Why.
        source: postcard::Error,
    },
    /// A quarantined batch's signed bytes are another batch.
    #[error("quarantined batch {id} is not agent {agent} epoch {epoch} seq {seq}")]
    OtherBatch {
        /// The quarantine position.
        id: u64,
        /// The agent the record names.
        agent: AgentId,
        /// The epoch it names.
        epoch: u64,
        /// The seq it names.
        seq: u64,
    },
}

impl BatchRecord {
    /// The record's own consistency: a committed batch points at its transfers, a quarantined
    /// one at none.
    pub fn check(&self) -> Result<(), RecordError> {
        match self.outcome {
            BatchOutcome::Committed if self.first_transfer == 0 && self.deltas > 0 => {
                Err(RecordError::NoTransfers)
            }
            BatchOutcome::Quarantined(_) if self.first_transfer != 0 => {
                Err(RecordError::QuarantinedWithTransfers)
            }
            _ => Ok(()),
        }
    }
}

impl QuarantineRecord {
    /// The record's own consistency: its signed bytes are the batch it names.
    pub fn check(&self) -> Result<(), RecordError> {
        let body: BatchBody =
            postcard::from_bytes(&self.batch.body).map_err(|source| RecordError::Undecodable {
                id: self.id,
                source,
            })?;
        if (body.agent_id, body.epoch, body.seq) != (self.agent, self.epoch, self.seq) {
            return Err(RecordError::OtherBatch {
                id: self.id,
                agent: self.agent,
                epoch: self.epoch,
                seq: self.seq,
            });
        }
        Ok(())
    }
}

/// The committer's answer for one batch: its outcome once durable, or why it was not written.
pub type IngestReply = Result<IngestOutcome, ErrorCode>;

/// What [`ingest_group`] reads and writes, inside one store transaction. Reads see what was
/// committed before the transaction; the account reads are [`Accounts::load`].
pub trait IngestTxn: Accounts {
    /// The committed dedup state of `(agent, epoch)` (default when none).
    fn dedup_state(&mut self, agent: AgentId, epoch: u64) -> Result<DedupState, Self::Error>;
    /// How many epochs of `agent` have committed dedup state (at most a little over
    /// [`MAX_EPOCHS_PER_AGENT`], which is what keeps the count cheap).
    fn epoch_count(&mut self, agent: AgentId) -> Result<usize, Self::Error>;
    /// The position the next quarantined batch gets.
    fn next_quarantine_id(&mut self) -> Result<u64, Self::Error>;
    /// Appends a posting's transfers; returns the position of the first.
    fn append(&mut self, posting: &Posting) -> Result<u64, Self::Error>;
    /// Writes the Stripe outbox row of a posted transfer (`positive`: usage goes up).
    fn outbox(
        &mut self,
        catalog: &Catalog,
        transfer: &Transfer,
        positive: bool,
        bucket_s: i64,
    ) -> Result<(), Self::Error>;
    /// Keeps a quarantined batch.
    fn quarantine(&mut self, rec: &QuarantineRecord) -> Result<(), Self::Error>;
    /// Records a batch as done; an existing record is an error of the store's.
    fn record_batch(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        rec: &BatchRecord,
    ) -> Result<(), Self::Error>;
    /// Writes the dedup state of `(agent, epoch)`.
    fn put_dedup(
        &mut self,
        agent: AgentId,
        epoch: u64,
        state: &DedupState,
    ) -> Result<(), Self::Error>;
    /// Writes every account of the working set (and indexes the created ones).
    fn put_accounts(&mut self, ws: &WorkingSet) -> Result<(), Self::Error>;
}

/// Most epochs kept per agent. An epoch is a life of an agent's store, so a real agent has a
/// handful; the agent chooses the number, so without a cap one key could make the collector
/// keep dedup state without end. A batch that would open one more is refused
/// ([`ErrorCode::TooManyEpochs`]) and nothing of it is written.
pub const MAX_EPOCHS_PER_AGENT: usize = 64;

/// Dedups and posts (or quarantines) a group of verified batches, in order; one outcome per
/// batch. Nothing is committed here: the caller commits `txn` when this returns `Ok`.
pub fn ingest_group<T: IngestTxn>(
    txn: &mut T,
    catalog: &Catalog,
    batches: &[IngestBatch],
    now_ms: i64,
) -> Result<Vec<IngestOutcome>, T::Error> {
    let mut ws = WorkingSet::new();
    let mut states: HashMap<(AgentId, u64), DedupState> = HashMap::new();
    // Epochs counted per agent in this group (committed ones plus those opened here).
    let mut epochs: HashMap<AgentId, usize> = HashMap::new();
    let mut next_q = txn.next_quarantine_id()?;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let body = &b.body;
        let key = (body.agent_id, body.epoch);
        let state = match states.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let state = txn.dedup_state(body.agent_id, body.epoch)?;
                if state == DedupState::default() {
                    // A new epoch: is there room for it?
                    let n = match epochs.entry(body.agent_id) {
                        std::collections::hash_map::Entry::Occupied(n) => n.into_mut(),
                        std::collections::hash_map::Entry::Vacant(n) => {
                            n.insert(txn.epoch_count(body.agent_id)?)
                        }
                    };
                    if *n >= MAX_EPOCHS_PER_AGENT {
                        out.push(IngestOutcome::Refused(ErrorCode::TooManyEpochs));
                        continue;
                    }
                    *n += 1;
                }
                e.insert(state)
            }
        };
        // Dedup (`forget` is the simulation's broken-dedup switch, false in the product).
        let forget = crate::core::dedup::fault::forgets(body.seq);
        if !forget && state.contains(body.seq) {
            out.push(IngestOutcome::Ack(AckOutcome::Duplicate));
            continue;
        }
        // Refuse: the epoch has too many holes.
        if state.would_open_too_many_gaps(body.seq) {
            out.push(IngestOutcome::Refused(ErrorCode::TooManyGaps));
            continue;
        }
        // Post, or quarantine.
        let mut first_transfer = 0;
        let outcome = match ledger::post_batch(&mut ws, txn, catalog, body, now_ms)? {
            Ok(posting) => {
                first_transfer = txn.append(&posting)?;
                // Outbox.
                for (t, delta) in posting.transfers.iter().zip(body.deltas.iter()) {
                    // Only a `last` meter going down moves usage back to the source.
                    let positive = catalog
                        .meter(t.unit.as_str())
                        .is_none_or(|m| m.aggregation != Aggregation::Last)
                        || t.debit == source_account_id(&t.unit);
                    txn.outbox(catalog, t, positive, delta.bucket_start_ms.div_euclid(1000))?;
                }
                BatchOutcome::Committed
            }
            Err(rejection) => {
                let code = rejection.code;
                let rec = QuarantineRecord {
                    id: next_q,
                    agent: body.agent_id,
                    epoch: body.epoch,
                    seq: body.seq,
                    rejection,
                    received_at_ms: now_ms,
                    batch: b.signed.clone(),
                };
                if let Err(e) = rec.check() {
                    panic!("quarantine record built wrong: {e}");
                }
                txn.quarantine(&rec)?;
                next_q += 1;
                BatchOutcome::Quarantined(code)
            }
        };
        if !forget {
            let inserted = state.insert(body.seq);
            assert_eq!(
                inserted,
                Ok(true),
                "dedup said seq {} of agent {} epoch {} was new and admissible",
                body.seq,
                body.agent_id,
                body.epoch
            );
            let rec = BatchRecord {
                deltas: u32::try_from(body.deltas.len()).unwrap_or(u32::MAX),
                first_transfer,
                outcome,
                sealed_at_ms: body.sealed_at_ms,
                committed_at_ms: now_ms,
            };
            if let Err(e) = rec.check() {
                panic!("batch record built wrong: {e}");
            }
            txn.record_batch(body.agent_id, body.epoch, body.seq, &rec)?;
        }
        out.push(IngestOutcome::Ack(match outcome {
            BatchOutcome::Committed => AckOutcome::Committed,
            BatchOutcome::Quarantined(code) => AckOutcome::Quarantined { code },
        }));
    }
    for ((agent, epoch), state) in &states {
        txn.put_dedup(*agent, *epoch, state)?;
    }
    ws.assert_balanced();
    txn.put_accounts(&ws)?;
    Ok(out)
}
