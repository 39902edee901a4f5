//! Event groups — the meter events planned over outbox rows — and their state machine: the one
//! place that says how a group moves, for every store.
//!
//! ```text
//!            Attempt / Retry{unknown: false}            Retry{unknown: true} / Attempt
//!          ┌───────────┐                               ┌───────────┐
//!          ▼           │        Retry{unknown: true}   ▼           │
//!  create → Pending ───┴──────────────────────────────→ Unknown ───┘
//!          │  │                                         │  │
//!          │  └──────── Delivered ───→ Sent ←── Delivered ┘  │
//!          │                            │ Reported          │
//!          └──── Rejected / Reported ─→ Dead ←── Rejected / Reported
//!                                        │ Requeue (operator): the group dissolves,
//!                                        ▼ its rows go back to pending with revision + 1
//! ```
//!
//! `Sent` and `Dead` are final for the forwarder: a late answer (`Attempt`, `Retry`,
//! `Delivered`, `Rejected`) on a final group changes nothing ([`EventGroup::step`] returns
//! `Ok(None)`), so an answer racing a webhook or an unknown-outcome check can never reopen or
//! flip a settled group. Only Stripe's own asynchronous report ([`GroupEvent::Reported`], a
//! webhook) moves `Sent` to `Dead`, and only an operator ([`GroupEvent::Requeue`]) leaves `Dead`.
//! `Unknown` is sticky: once a send's outcome was unknown, only a final state leaves it.
//!
//! Invariants asserted on every step (release builds too): the group's id, identifier, value
//! and rows never change; `attempts` never decreases; `first_attempt_ms`, once set, never
//! changes.

use serde::{Deserialize, Serialize};

/// Outbox row id, assigned by the store, strictly increasing.
pub type RowId = u64;
/// Event group id, assigned by the store.
pub type GroupId = u64;

/// Stripe's error as it came back (or as a webhook reported it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeError {
    /// HTTP status, 0 when it came from a webhook.
    pub status: u16,
    /// Stripe's `error.code` (or `error.type` when there is no code).
    pub code: String,
    /// Stripe's `error.message`.
    pub message: String,
}

/// Where a group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupState {
    /// Not yet delivered, no send with an unknown outcome yet.
    Pending,
    /// At least one send may have reached Stripe; retried with the same identifier.
    Unknown,
    /// Stripe accepted it (or told us it already had our identifier).
    Sent,
    /// Rejected permanently; waits for an operator.
    Dead,
}

/// A meter event to be sent, covering one or more outbox rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewGroup {
    /// Deterministic identifier, see [`crate::stripe::outbox::identifier_for`].
    pub identifier: String,
    /// Stripe customer id (`cus_…`).
    pub stripe_customer: String,
    /// Stripe `event_name`.
    pub event_name: String,
    /// Our meter name (for reconciliation and listing).
    pub meter: String,
    /// Bucket time, Unix seconds.
    pub timestamp_s: i64,
    /// Σ row values, > 0.
    pub value: u64,
    /// Covered rows, ascending.
    pub row_ids: Vec<RowId>,
}

/// A persisted group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventGroup {
    /// Store-assigned id.
    pub id: GroupId,
    /// What was planned.
    pub event: NewGroup,
    /// Current state.
    pub state: GroupState,
    /// Sends started.
    pub attempts: u32,
    /// When the first send started (Unix ms), if any.
    pub first_attempt_ms: Option<i64>,
    /// Not to be sent before this time (Unix ms).
    pub next_attempt_ms: i64,
    /// Last error seen.
    pub last_error: Option<StripeError>,
}

/// Something that happens to a persisted group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// A send starts: `attempts + 1`, the first attempt's time kept, and a lease until
    /// `lease_until_ms` that keeps other claimers (and a restarted forwarder) off the group.
    Attempt {
        /// When the send starts (Unix ms).
        now_ms: i64,
        /// Not to be sent again before this time (Unix ms).
        lease_until_ms: i64,
    },
    /// Try again at `next_attempt_ms`; `unknown` when Stripe may have processed the send.
    Retry {
        /// Not before this time (Unix ms).
        next_attempt_ms: i64,
        /// The send's outcome is unknown (moves the group to `Unknown`, which is sticky).
        unknown: bool,
        /// What Stripe said, if anything (kept as the last error).
        error: Option<StripeError>,
    },
    /// Stripe has the event.
    Delivered,
    /// Stripe rejected the send permanently (forwarder dead letter).
    Rejected(StripeError),
    /// Stripe reported the event failed after accepting it (webhook): overrides `Sent`.
    Reported(StripeError),
    /// An operator retries a dead group: it dissolves and its rows return to pending.
    Requeue,
}

/// An event that cannot apply to the group in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Only a dead group can be requeued.
    #[error("group {id} is {state:?}, not dead")]
    NotDead {
        /// The group.
        id: GroupId,
        /// Its state.
        state: GroupState,
    },
}

impl GroupState {
    /// Pending or unknown: the forwarder may still send it.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Pending | Self::Unknown)
    }

    /// Sent or dead: settled for the forwarder.
    pub fn is_final(self) -> bool {
        !self.is_open()
    }
}

impl EventGroup {
    /// A newly persisted group: pending, never attempted, ready at once.
    pub fn new(id: GroupId, event: NewGroup) -> Self {
        assert!(
            event.value > 0 && !event.row_ids.is_empty(),
            "a group covers at least one row and one unit"
        );
        Self {
            id,
            event,
            state: GroupState::Pending,
            attempts: 0,
            first_attempt_ms: None,
            next_attempt_ms: 0,
            last_error: None,
        }
    }

    /// The group after `event`: `Ok(None)` when the event changes nothing (a late answer on a
    /// final group), an error when it cannot apply.
    pub fn step(&self, event: GroupEvent) -> Result<Option<EventGroup>, TransitionError> {
        let mut next = self.clone();
        match event {
            GroupEvent::Attempt {
                now_ms,
                lease_until_ms,
            } => {
                if self.state.is_final() {
                    return Ok(None);
                }
                next.attempts = next.attempts.saturating_add(1);
                next.first_attempt_ms.get_or_insert(now_ms);
                next.next_attempt_ms = lease_until_ms;
            }
            GroupEvent::Retry {
                next_attempt_ms,
                unknown,
                error,
            } => {
                if self.state.is_final() {
                    return Ok(None);
                }
                next.next_attempt_ms = next_attempt_ms;
                if unknown {
                    next.state = GroupState::Unknown;
                }
                if error.is_some() {
                    next.last_error = error;
                }
            }
            GroupEvent::Delivered => {
                if self.state.is_final() {
                    return Ok(None);
                }
                next.state = GroupState::Sent;
                next.last_error = None;
            }
            GroupEvent::Rejected(error) => {
                if self.state.is_final() {
                    return Ok(None);
                }
                next.state = GroupState::Dead;
                next.last_error = Some(error);
            }
            GroupEvent::Reported(error) => {
                next.state = GroupState::Dead;
                next.last_error = Some(error);
            }
            GroupEvent::Requeue => {
                if self.state != GroupState::Dead {
                    return Err(TransitionError::NotDead {
                        id: self.id,
                        state: self.state,
                    });
                }
                next.state = GroupState::Pending;
            }
        }
        self.assert_successor(&next);
        Ok(Some(next))
    }

    /// [`EventGroup::step`], keeping the group as it is when the event changes nothing.
    pub fn apply(&self, event: GroupEvent) -> Result<EventGroup, TransitionError> {
        Ok(self.step(event)?.unwrap_or_else(|| self.clone()))
    }

    fn assert_successor(&self, next: &EventGroup) {
        assert!(
            next.id == self.id && next.event == self.event,
            "a group's id, identifier, value and rows never change"
        );
        assert!(next.attempts >= self.attempts, "attempts never decrease");
        assert!(
            self.first_attempt_ms.is_none() || next.first_attempt_ms == self.first_attempt_ms,
            "the first attempt's time never changes"
        );
        assert!(
            self.state != GroupState::Unknown || next.state != GroupState::Pending,
            "unknown is sticky"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn group() -> EventGroup {
        EventGroup::new(
            7,
            NewGroup {
                identifier: "tly-t-1-2-r0-00".into(),
                stripe_customer: "cus_a".into(),
                event_name: "m".into(),
                meter: "m".into(),
                timestamp_s: 60,
                value: 5,
                row_ids: vec![1, 2],
            },
        )
    }

    fn err(code: &str) -> StripeError {
        StripeError {
            status: 400,
            code: code.into(),
            message: code.into(),
        }
    }

    fn event() -> impl Strategy<Value = GroupEvent> {
        prop_oneof![
            (0i64..1000, 0i64..1000).prop_map(|(now_ms, l)| GroupEvent::Attempt {
                now_ms,
                lease_until_ms: now_ms + l
            }),
            (0i64..1000, any::<bool>(), any::<bool>()).prop_map(|(at, unknown, e)| {
                GroupEvent::Retry {
                    next_attempt_ms: at,
                    unknown,
                    error: e.then(|| err("lock_timeout")),
                }
            }),
            Just(GroupEvent::Delivered),
            Just(GroupEvent::Rejected(err("resource_missing"))),
            Just(GroupEvent::Reported(err("webhook"))),
            Just(GroupEvent::Requeue),
        ]
    }

    #[test]
    fn the_paths_of_the_diagram() {
        let g = group();
        let a = g
            .apply(GroupEvent::Attempt {
                now_ms: 10,
                lease_until_ms: 40,
            })
            .unwrap();
        assert_eq!(
            (a.attempts, a.first_attempt_ms, a.next_attempt_ms),
            (1, Some(10), 40)
        );
        let u = a
            .apply(GroupEvent::Retry {
                next_attempt_ms: 50,
                unknown: true,
                error: None,
            })
            .unwrap();
        assert_eq!(u.state, GroupState::Unknown);
        let still = u
            .apply(GroupEvent::Retry {
                next_attempt_ms: 60,
                unknown: false,
                error: Some(err("lock_timeout")),
            })
            .unwrap();
        assert_eq!(still.state, GroupState::Unknown, "unknown is sticky");
        let s = still.apply(GroupEvent::Delivered).unwrap();
        assert_eq!((s.state, s.last_error.clone()), (GroupState::Sent, None));
        assert_eq!(s.step(GroupEvent::Rejected(err("late"))).unwrap(), None);
        let d = s.apply(GroupEvent::Reported(err("webhook"))).unwrap();
        assert_eq!(d.state, GroupState::Dead);
        assert_eq!(d.step(GroupEvent::Delivered).unwrap(), None);
        assert!(g.step(GroupEvent::Requeue).is_err());
        assert_eq!(
            d.apply(GroupEvent::Requeue).unwrap().state,
            GroupState::Pending
        );
    }

    proptest! {
        #[test]
        fn no_forwarder_event_leaves_a_final_state_and_identity_never_changes(
            events in proptest::collection::vec(event(), 0..60),
        ) {
            let first = group();
            let mut g = first.clone();
            for ev in events {
                let before = g.clone();
                let is_requeue = ev == GroupEvent::Requeue;
                let is_report = matches!(ev, GroupEvent::Reported(_));
                match before.step(ev) {
                    Ok(Some(next)) => {
                        if before.state.is_final() {
                            // Only Stripe's report or an operator moves a settled group.
                            prop_assert!(is_report || is_requeue, "{before:?} → {next:?}");
                        }
                        g = next;
                    }
                    Ok(None) => prop_assert!(before.state.is_final()),
                    Err(TransitionError::NotDead { .. }) => {
                        prop_assert!(is_requeue && before.state != GroupState::Dead);
                    }
                }
                prop_assert_eq!(g.id, first.id);
                prop_assert_eq!(&g.event, &first.event);
                prop_assert!(g.attempts >= before.attempts);
                if before.first_attempt_ms.is_some() {
                    prop_assert_eq!(g.first_attempt_ms, before.first_attempt_ms);
                }
            }
        }
    }
}
