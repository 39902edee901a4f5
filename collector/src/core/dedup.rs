//! Exactly-once per `(agent_id, epoch)`: which batch sequence numbers are already done.
//!
//! Owns [`DedupState`], a plain value with no I/O: a contiguous watermark (every seq `1..=w` is
//! done) plus the set of done seqs above it. A seq is "done" once its batch was committed to the
//! ledger or quarantined, in the same transaction that records it here (SPEC §6.1). The state is
//! kept forever, not for a window: a batch resent a year later is still a duplicate.
//!
//! Guarantees: [`DedupState::insert`] returns `true` exactly once per seq; after every insert
//! the watermark is maximal (`watermark + 1` is never in `above`) and `above` holds only seqs
//! greater than `watermark + 1`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Most done seqs kept above the watermark for one `(agent, epoch)`. An agent keeps at most
/// `max_in_flight` batches unacknowledged, so gaps stay small; a peer that opens more holes is
/// refused rather than allowed to grow the state without bound.
pub const MAX_ABOVE_WATERMARK: usize = 65_536;

/// Why a seq could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DedupError {
    /// Seq 0 is never valid.
    #[error("seq 0 is not valid")]
    ZeroSeq,
    /// Too many holes below this seq.
    #[error("more than {MAX_ABOVE_WATERMARK} batches are done above the watermark")]
    TooManyGaps,
}

/// The done seqs of one `(agent_id, epoch)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupState {
    /// Every seq in `1..=watermark` is done.
    pub watermark: u64,
    /// Done seqs above `watermark + 1`.
    pub above: BTreeSet<u64>,
}

impl DedupState {
    /// True when `seq` is already done.
    pub fn contains(&self, seq: u64) -> bool {
        seq != 0 && (seq <= self.watermark || self.above.contains(&seq))
    }

    /// Records `seq` as done. `Ok(true)` if it was new, `Ok(false)` if it was a duplicate.
    pub fn insert(&mut self, seq: u64) -> Result<bool, DedupError> {
        if seq == 0 {
            return Err(DedupError::ZeroSeq);
        }
        if self.contains(seq) {
            return Ok(false);
        }
        if seq == self.watermark + 1 {
            self.watermark = seq;
            while self.above.remove(&(self.watermark + 1)) {
                self.watermark += 1;
            }
        } else {
            if self.above.len() >= MAX_ABOVE_WATERMARK {
                return Err(DedupError::TooManyGaps);
            }
            self.above.insert(seq);
        }
        debug_assert!(!self.above.contains(&(self.watermark + 1)));
        debug_assert!(self.above.iter().all(|s| *s > self.watermark + 1));
        Ok(true)
    }

    /// The highest done seq.
    pub fn highest(&self) -> u64 {
        self.above.last().copied().unwrap_or(self.watermark)
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

    #[test]
    fn in_order_and_holes() {
        let mut d = DedupState::default();
        assert_eq!(d.insert(1), Ok(true));
        assert_eq!(d.insert(3), Ok(true));
        assert_eq!(d.watermark, 1);
        assert_eq!(d.insert(3), Ok(false));
        assert_eq!(d.insert(2), Ok(true));
        assert_eq!(d.watermark, 3);
        assert!(d.above.is_empty());
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
                prop_assert!(!d.above.contains(&(d.watermark + 1)));
            }
            let contiguous = (1..).take_while(|s| model.contains(s)).count() as u64;
            prop_assert_eq!(d.watermark, contiguous);
        }
    }
}
