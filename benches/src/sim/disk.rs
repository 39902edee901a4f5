//! The agent's storage in the simulation: what the agent's store keeps (epoch, next seq,
//! sealed signed batches, the durable log, event ids seen, the budget), with a page cache in
//! front. Writes land in the cache; [`Disk::sync`] makes them durable; a crash
//! ([`Disk::crash`]) throws away what was not synced, as a power cut does to an fsync-less
//! write. A sync is also where the fault schedule may kill the process, which is how a crash
//! "between the write and the fsync" happens.
//!
//! The budget counts stored rows (batches and log rows); a full disk refuses new rows with
//! [`Full`], and deleting acknowledged batches makes room again.

use std::collections::{BTreeMap, BTreeSet};
use tally_agent::store::LoggedEvent;
use tally_protocol::batch::SignedBatch;

/// The disk refused a write: the budget is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// What the agent's store holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contents {
    /// The agent's epoch (fixed for the life of the disk).
    pub epoch: u64,
    /// The seq the next batch gets.
    pub next_seq: u64,
    /// Sealed, unacknowledged batches by seq.
    pub batches: BTreeMap<u64, SignedBatch>,
    /// Durable log rows not sealed yet, by row number.
    pub log: BTreeMap<u64, LoggedEvent>,
    /// The next log row number.
    pub next_row: u64,
    /// Event ids accepted (the id dedup of `record_event`).
    pub seen_ids: BTreeSet<String>,
}

impl Contents {
    /// Rows counted against the budget.
    pub fn rows(&self) -> usize {
        self.batches.len() + self.log.len()
    }
}

/// A disk that can crash.
#[derive(Debug, Clone)]
pub struct Disk {
    durable: Contents,
    cache: Contents,
    /// Most rows; `None` is unlimited.
    pub budget_rows: Option<usize>,
    /// Syncs done.
    pub syncs: u64,
}

impl Disk {
    /// A fresh disk for `epoch`.
    pub fn new(epoch: u64) -> Self {
        let c = Contents {
            epoch,
            next_seq: 1,
            next_row: 1,
            ..Contents::default()
        };
        Disk {
            durable: c.clone(),
            cache: c,
            budget_rows: None,
            syncs: 0,
        }
    }

    /// What a reader sees now (synced or not).
    pub fn read(&self) -> &Contents {
        &self.cache
    }

    /// What survives a crash.
    pub fn durable(&self) -> &Contents {
        &self.durable
    }

    /// Whether `more` rows fit.
    pub fn fits(&self, more: usize) -> bool {
        self.budget_rows
            .is_none_or(|b| self.cache.rows() + more <= b)
    }

    /// Changes the cached contents (not durable until [`Disk::sync`]); refuses when `adds` more
    /// rows do not fit.
    pub fn write<R>(&mut self, adds: usize, f: impl FnOnce(&mut Contents) -> R) -> Result<R, Full> {
        if adds > 0 && !self.fits(adds) {
            return Err(Full);
        }
        Ok(f(&mut self.cache))
    }

    /// Makes every write so far durable.
    pub fn sync(&mut self) {
        self.syncs += 1;
        if self.durable != self.cache {
            self.durable = self.cache.clone();
        }
    }

    /// The power is cut: unsynced writes are lost.
    pub fn crash(&mut self) {
        self.cache = self.durable.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_loses_only_unsynced_writes() {
        let mut d = Disk::new(1);
        d.write(0, |c| c.next_seq = 2).expect("no budget");
        d.sync();
        d.write(0, |c| c.next_seq = 3).expect("no budget");
        d.crash();
        assert_eq!(d.read().next_seq, 2);
        d.budget_rows = Some(0);
        assert_eq!(d.write(1, |_| ()), Err(Full));
    }
}
