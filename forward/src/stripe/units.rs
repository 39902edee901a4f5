//! Decimal usage → whole Stripe units, with the fractional remainder carried.
//!
//! Owns the one conversion the collector performs inside its ledger transaction. Stripe accepts
//! positive whole numbers only, so usage is sent as `quantity × stripe_unit_scale`, and the part
//! below one unit is carried in a per-(customer, meter) cumulative rather than rounded away.
//!
//! Guarantee: if the collector stores the returned `cumulative_scaled` and passes it back as
//! `cumulative_scaled_before` on the next call, then after any sequence of calls
//! `Σ units_now = ⌊Σ quantity × scale⌋` exactly (`Decimal` arithmetic, never floats).
//!
//! [`Carry::step`] is the one rule, reductions included: per (customer, meter) the collector
//! keeps the net scaled quantity posted and the whole units written; usage writes
//! `⌊net⌋ − sent` units when positive, a reduction (negative adjustment, a `last` meter going
//! down) lowers `net` and writes nothing, so later usage nets it out before anything more is sent
//! (docs/decisions/0022). [`carry_units`] is the same rule for usage only.

use rust_decimal::Decimal;

/// The result of [`carry_units`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitStep {
    /// Whole Stripe units to write to the outbox now (no row is written when zero).
    pub units_now: u64,
    /// The new cumulative scaled quantity to store for the next call.
    pub cumulative_scaled: Decimal,
}

/// Why a quantity could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    /// Usage quantities are ≥ 0; corrections go through meter event adjustments instead.
    #[error("quantity must not be negative: {0}")]
    NegativeQuantity(Decimal),
    /// `stripe_unit_scale` must be > 0.
    #[error("stripe unit scale must be positive: {0}")]
    InvalidScale(Decimal),
    /// The stored cumulative must be ≥ 0.
    #[error("cumulative scaled quantity must not be negative: {0}")]
    NegativeCumulative(Decimal),
    /// `quantity × scale` or the new cumulative does not fit a `Decimal` / `u64`.
    #[error("scaled quantity overflows")]
    Overflow,
}

/// Per (customer, meter): what was posted and what was written to the outbox, in Stripe units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carry {
    /// Net `Σ signed quantity × stripe_unit_scale` posted so far.
    pub net_scaled: Decimal,
    /// Whole units written to the outbox so far (never decreases).
    pub sent_units: u64,
}

impl Carry {
    /// Posts `signed_quantity` (negative for a reduction) at `stripe_unit_scale`; returns the
    /// new carry and the whole units to write now (`max(0, ⌊net⌋ − sent)`).
    ///
    /// Asserted: `sent_units` never decreases, and afterwards `sent_units ≥ ⌊net⌋` — every whole
    /// unit posted is written exactly once.
    pub fn step(
        &self,
        signed_quantity: Decimal,
        stripe_unit_scale: Decimal,
    ) -> Result<(Carry, u64), UnitsError> {
        if stripe_unit_scale <= Decimal::ZERO {
            return Err(UnitsError::InvalidScale(stripe_unit_scale));
        }
        let scaled = signed_quantity
            .checked_mul(stripe_unit_scale)
            .ok_or(UnitsError::Overflow)?;
        let net_scaled = self
            .net_scaled
            .checked_add(scaled)
            .ok_or(UnitsError::Overflow)?;
        let due = net_scaled
            .floor()
            .checked_sub(Decimal::from(self.sent_units))
            .ok_or(UnitsError::Overflow)?;
        let units: u64 = if due > Decimal::ZERO {
            due.try_into().map_err(|_| UnitsError::Overflow)?
        } else {
            0
        };
        let next = Carry {
            net_scaled,
            sent_units: self
                .sent_units
                .checked_add(units)
                .ok_or(UnitsError::Overflow)?,
        };
        assert!(
            next.sent_units >= self.sent_units,
            "sent units never decrease"
        );
        assert!(
            Decimal::from(next.sent_units) >= next.net_scaled.floor(),
            "every whole unit posted is written"
        );
        Ok((next, units))
    }
}

/// Converts `quantity` (in the meter's unit) to whole Stripe units given the cumulative scaled
/// quantity recorded so far for the same customer and meter: [`Carry::step`] for usage only,
/// with nothing outstanding (`sent = ⌊before⌋`).
///
/// `units_now = ⌊before + quantity × scale⌋ − ⌊before⌋`.
pub fn carry_units(
    cumulative_scaled_before: Decimal,
    quantity: Decimal,
    stripe_unit_scale: Decimal,
) -> Result<UnitStep, UnitsError> {
    if quantity.is_sign_negative() && !quantity.is_zero() {
        return Err(UnitsError::NegativeQuantity(quantity));
    }
    if stripe_unit_scale <= Decimal::ZERO {
        return Err(UnitsError::InvalidScale(stripe_unit_scale));
    }
    if cumulative_scaled_before.is_sign_negative() && !cumulative_scaled_before.is_zero() {
        return Err(UnitsError::NegativeCumulative(cumulative_scaled_before));
    }
    let before = Carry {
        net_scaled: cumulative_scaled_before,
        sent_units: cumulative_scaled_before
            .floor()
            .try_into()
            .map_err(|_| UnitsError::Overflow)?,
    };
    let (after, units_now) = before.step(quantity, stripe_unit_scale)?;
    Ok(UnitStep {
        units_now,
        cumulative_scaled: after.net_scaled,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    #[test]
    fn thirds_carry() {
        let third = Decimal::from_str("0.3333333333").unwrap();
        let mut cum = Decimal::ZERO;
        let mut sent = 0u64;
        for _ in 0..3 {
            let s = carry_units(cum, third, Decimal::ONE).unwrap();
            sent += s.units_now;
            cum = s.cumulative_scaled;
        }
        assert_eq!(sent, 0, "0.9999999999 is not a whole unit yet");
        let s = carry_units(
            cum,
            Decimal::from_str("0.0000000001").unwrap(),
            Decimal::ONE,
        )
        .unwrap();
        assert_eq!(s.units_now, 1);
    }

    #[test]
    fn a_reduction_writes_nothing_and_is_netted_out_first() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        let mut c = Carry::default();
        let mut sum = 0;
        for q in ["0.4", "0.4", "0.4", "2.25", "0"] {
            let (n, u) = c.step(d(q), d("1")).unwrap();
            (c, sum) = (n, sum + u);
        }
        assert_eq!((sum, c.net_scaled), (3, d("3.45")));
        let (c, u) = c.step(d("-2"), d("1")).unwrap();
        assert_eq!(u, 0);
        let (c, u) = c.step(d("1.5"), d("1")).unwrap();
        assert_eq!(u, 0);
        let (c, u) = c.step(d("1.1"), d("1")).unwrap();
        assert_eq!((u, c.sent_units, c.net_scaled), (1, 4, d("4.05")));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(carry_units(Decimal::ZERO, Decimal::NEGATIVE_ONE, Decimal::ONE).is_err());
        assert!(carry_units(Decimal::ZERO, Decimal::ONE, Decimal::ZERO).is_err());
        assert!(carry_units(Decimal::NEGATIVE_ONE, Decimal::ONE, Decimal::ONE).is_err());
        assert_eq!(
            carry_units(Decimal::MAX, Decimal::ONE, Decimal::ONE),
            Err(UnitsError::Overflow)
        );
    }

    fn quantity() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            // many small fractional quantities
            (0u64..1000, 0u32..6).prop_map(|(m, s)| Decimal::new(m as i64, s + 3)),
            (0u64..1_000_000, 0u32..4).prop_map(|(m, s)| Decimal::new(m as i64, s)),
        ]
    }

    fn scale() -> impl Strategy<Value = Decimal> {
        prop_oneof![
            Just(Decimal::ONE),
            Just(Decimal::new(1000, 0)),
            Just(Decimal::new(1, 3)),
            (1u64..10_000, 0u32..3).prop_map(|(m, s)| Decimal::new(m as i64, s)),
        ]
    }

    proptest! {
        #[test]
        fn sent_equals_floor_of_ledger_times_scale(
            quantities in proptest::collection::vec(quantity(), 0..300),
            scale in scale(),
        ) {
            let mut cum = Decimal::ZERO;
            let mut ledger = Decimal::ZERO;
            let mut sent: u64 = 0;
            for q in quantities {
                let step = carry_units(cum, q, scale).unwrap();
                cum = step.cumulative_scaled;
                ledger += q;
                sent += step.units_now;
                let expected: u64 = (ledger * scale).floor().try_into().unwrap();
                prop_assert_eq!(sent, expected);
            }
        }

        /// Units are conserved through the carry, reductions included: what was written is
        /// always `max` over time of `⌊net⌋`, and once usage has netted out every reduction,
        /// exactly `⌊net⌋`.
        #[test]
        fn carry_conserves_units_through_reductions(
            steps in proptest::collection::vec((quantity(), any::<bool>()), 0..200),
            scale in scale(),
        ) {
            let mut c = Carry::default();
            let mut net = Decimal::ZERO;
            let mut written: u64 = 0;
            let mut high: Decimal = Decimal::ZERO;
            for (q, reduce) in steps {
                let signed = if reduce { -q } else { q };
                let (next, units) = c.step(signed, scale).unwrap();
                net += signed * scale;
                written += units;
                high = high.max(net.floor());
                prop_assert_eq!(next.net_scaled, net);
                prop_assert_eq!(next.sent_units, written);
                prop_assert_eq!(Decimal::from(written), high);
                c = next;
            }
        }
    }
}
