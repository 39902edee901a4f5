//! Decimals on the wire as `(mantissa: i128, scale: u8)`: compact, exact, and validated on the
//! way in (a scale above 28 or a mantissa beyond 96 bits is refused, never clamped).
//!
//! Use with `#[serde(with = "crate::wire_decimal")]`.

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

/// Serializes `d` as its mantissa and scale.
pub fn serialize<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    (d.mantissa(), d.scale() as u8).serialize(s)
}

/// Deserializes and validates a mantissa and scale.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    let (mantissa, scale) = <(i128, u8)>::deserialize(d)?;
    Decimal::try_from_i128_with_scale(mantissa, u32::from(scale))
        .map_err(|_| D::Error::custom("decimal out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct W(#[serde(with = "super")] Decimal);

    #[test]
    fn scale_is_preserved_and_range_checked() {
        let d = Decimal::new(12_300, 4);
        let bytes = postcard::to_stdvec(&W(d)).unwrap();
        let back: W = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.0.to_string(), "1.2300");
        let bad = postcard::to_stdvec(&(1_i128, 29_u8)).unwrap();
        assert!(postcard::from_bytes::<W>(&bad).is_err());
        let huge = postcard::to_stdvec(&(i128::MAX, 0_u8)).unwrap();
        assert!(postcard::from_bytes::<W>(&huge).is_err());
    }
}
