//! Decimal usage → whole Stripe units, with the fractional remainder carried.
//!
//! Owns the one conversion the collector performs inside its ledger transaction. Stripe accepts
//! positive whole numbers only, so usage is sent as `quantity × stripe_unit_scale`, and the part
//! below one unit is carried in a per-(customer, meter) cumulative rather than rounded away.
//!
//! Guarantee: if the collector stores the returned `cumulative_scaled` and passes it back as
//! `cumulative_scaled_before` on the next call, then after any sequence of calls
//! `Σ units_now = ⌊Σ quantity × scale⌋` exactly (`Decimal` arithmetic, never floats).

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

/// Converts `quantity` (in the meter's unit) to whole Stripe units given the cumulative scaled
/// quantity recorded so far for the same customer and meter.
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
    let scaled = quantity
        .checked_mul(stripe_unit_scale)
        .ok_or(UnitsError::Overflow)?;
    let cumulative_scaled = cumulative_scaled_before
        .checked_add(scaled)
        .ok_or(UnitsError::Overflow)?;
    let whole_after = cumulative_scaled.floor();
    let whole_before = cumulative_scaled_before.floor();
    let diff = whole_after - whole_before;
    let units_now: u64 = diff.try_into().map_err(|_| UnitsError::Overflow)?;
    debug_assert!(cumulative_scaled >= cumulative_scaled_before);
    Ok(UnitStep {
        units_now,
        cumulative_scaled,
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
    }
}
