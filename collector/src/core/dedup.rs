//! Exactly-once per `(agent_id, epoch)`: which batch sequence numbers are already done.
//!
//! Owns [`DedupState`], a plain value with no I/O: a contiguous watermark (every seq `1..=w` is
//! done) plus the runs of done seqs above it, as ranges. A seq is "done" once its batch was
//! committed to the ledger or quarantined, in the same transaction that records it here (SPEC
//! §6.1). The state is kept forever, not for a window: a batch resent a year later is still a
//! duplicate.
//!
//! Guarantees: [`DedupState::insert`] returns `true` exactly once per seq; after every insert
//! the watermark is maximal (no run starts at `watermark + 1`) and the runs are disjoint,
//! non-adjacent and above `watermark + 1`. Size: 8 bytes plus 16 per run, and at most
//! [`MAX_GAPS`] runs, so the state of an epoch is under 17 KiB however many batches it holds and
//! however they arrive (docs/SECURITY.md, "Bounds").

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most runs of done seqs kept above the watermark (each run is preceded by a gap) for one
/// `(agent, epoch)`. An honest agent keeps at most `max_in_flight` batches unacknowledged and
/// resends the oldest first, so it opens a handful; a peer that opens more is refused
/// ([`tally_protocol::error::ErrorCode::TooManyGaps`]) rather than allowed to grow the state.
pub const MAX_GAPS: usize = 1_024;

/// Why a seq could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DedupError {
    /// Seq 0 is never valid.
    #[error("seq 0 is not valid")]
    ZeroSeq,
    /// Too many holes below this seq.
    #[error("more than {MAX_GAPS} gaps above the watermark")]
    TooManyGaps,
}

/// The done seqs of one `(agent_id, epoch)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupState {
    /// Every seq in `1..=watermark` is done.
    pub watermark: u64,
    /// Runs of done seqs above `watermark + 1`: first seq → last seq (inclusive).
    pub runs: BTreeMap<u64, u64>,
}

impl DedupState {
    /// True when `seq` is already done.
    pub fn contains(&self, seq: u64) -> bool {
        seq != 0
            && (seq <= self.watermark
                || self
                    .runs
                    .range(..=seq)
                    .next_back()
                    .is_some_and(|(_, &last)| seq <= last))
    }

    /// Whether inserting `seq` (not yet done) would need a new run past [`MAX_GAPS`].
    pub fn would_open_too_many_gaps(&self, seq: u64) -> bool {
        self.runs.len() >= MAX_GAPS
            && seq != self.watermark + 1
            && !self.runs.contains_key(&(seq + 1))
            && self
                .runs
                .range(..seq)
                .next_back()
                .is_none_or(|(_, &last)| last + 1 != seq)
    }

    /// Records `seq` as done. `Ok(true)` if it was new, `Ok(false)` if it was a duplicate.
    pub fn insert(&mut self, seq: u64) -> Result<bool, DedupError> {
        if seq == 0 {
            return Err(DedupError::ZeroSeq);
        }
        if self.contains(seq) {
            return Ok(false);
        }
        if self.would_open_too_many_gaps(seq) {
            return Err(DedupError::TooManyGaps);
        }
        if seq == self.watermark + 1 {
            self.watermark = seq;
            if let Some(last) = self.runs.remove(&(seq + 1)) {
                self.watermark = last;
            }
        } else {
            let next = self.runs.remove(&(seq + 1));
            let last = next.unwrap_or(seq);
            match self.runs.range_mut(..seq).next_back() {
                Some((_, prev_last)) if *prev_last + 1 == seq => *prev_last = last,
                _ => {
                    self.runs.insert(seq, last);
                }
            }
        }
        debug_assert!(!self.runs.contains_key(&(self.watermark + 1)));
        debug_assert!(self.runs.keys().all(|s| *s > self.watermark + 1));
        debug_assert!(self.runs.len() <= MAX_GAPS);
        Ok(true)
    }

    /// The highest done seq.
    pub fn highest(&self) -> u64 {
        self.runs
            .last_key_value()
            .map_or(self.watermark, |(_, &last)| last)
    }

    /// How many seqs are done.
    pub fn done(&self) -> u64 {
        self.watermark + self.runs.iter().map(|(f, l)| l - f + 1).sum::<u64>()
    }

    /// Seqs below the highest done one that are not done yet.
    pub fn missing(&self) -> u64 {
        self.highest() - self.done()
    }

    /// The runs above the watermark (each one preceded by a gap).
    pub fn gaps(&self) -> usize {
        self.runs.len()
    }
}

/// A deliberately broken dedup for the simulation's self-test (feature `sim-faults`, off by
/// default): while a seq is set on this thread, every batch with that seq is treated as never
/// seen and is not recorded, so each delivery of it is posted again. Without the feature
/// [`fault::forgets`] is always false. Not part of the product.
#[doc(hidden)]
pub mod fault {
    #[cfg(feature = "sim-faults")]
    thread_local! {
        static FORGOTTEN: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    }

    /// Makes dedup on this thread forget `seq` (every agent and epoch); `None` heals it.
    #[cfg(feature = "sim-faults")]
    pub fn set_forgotten_seq(seq: Option<u64>) {
        FORGOTTEN.with(|f| f.set(seq));
    }

    /// Whether dedup forgets `seq` (always false without the feature).
    #[inline]
    pub fn forgets(seq: u64) -> bool {
        #[cfg(feature = "sim-faults")]
        {
            FORGOTTEN.with(|f| f.get() == Some(seq))
        }
        #[cfg(not(feature = "sim-faults"))]
        {
            let _ = seq;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_and_holes() {
        let mut d = DedupState::default();
        assert_eq!(d.insert(1), Ok(true));
        assert_eq!(d.insert(3), Ok(true));
        assert_eq!(d.watermark, 1);
        assert_eq!(d.insert(3), Ok(false));
        assert_eq!(d.insert(2), Ok(true));
        assert_eq!(d.watermark, 3);
        assert!(d.runs.is_empty());
        assert_eq!(d.insert(1), Ok(false));
        assert_eq!(d.insert(0), Err(DedupError::ZeroSeq));
        assert_eq!(d.highest(), 3);
    }

    proptest! {
        /// Against a model (a plain set): every seq is new exactly once, whatever the order and
        /// however often it repeats, and the state stays compact.
        #[test]
        fn matches_a_set(seqs in proptest::collection::vec(1u64..200, 0..400)) {
            let mut d = DedupState::default();
            let mut model = BTreeSet::new();
            for s in seqs {
                prop_assert_eq!(d.insert(s), Ok(model.insert(s)));
                for probe in 1..210 {
                    prop_assert_eq!(d.contains(probe), model.contains(&probe));
                }
                prop_assert!(!d.runs.contains_key(&(d.watermark + 1)));
                prop_assert_eq!(d.done(), model.len() as u64);
                prop_assert_eq!(d.highest(), model.last().copied().unwrap_or(0));
            }
            let contiguous = (1..).take_while(|s| model.contains(s)).count() as u64;
            prop_assert_eq!(d.watermark, contiguous);
            // Runs are maximal: one per maximal block of done seqs above the watermark.
            let blocks = model.iter().filter(|&&s| s > contiguous + 1 && !model.contains(&(s - 1))).count();
            prop_assert_eq!(d.gaps(), blocks);
        }

        /// However a peer orders its seqs, the state never holds more than MAX_GAPS runs, and a
        /// refused seq changes nothing.
        #[test]
        fn gaps_are_capped(step in 2u64..5, extra in proptest::collection::vec(1u64..20_000, 0..200)) {
            let mut d = DedupState::default();
            for i in 0..(MAX_GAPS as u64 + 10) {
                let seq = 2 + i * step;
                let before = d.clone();
                match d.insert(seq) {
                    Ok(_) => {}
                    Err(e) => {
                        prop_assert_eq!(e, DedupError::TooManyGaps);
                        prop_assert_eq!(&d, &before);
                    }
                }
                prop_assert!(d.gaps() <= MAX_GAPS);
            }
            for s in extra {
                let _ = d.insert(s);
                prop_assert!(d.gaps() <= MAX_GAPS);
            }
        }
    }
}
