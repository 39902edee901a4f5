//! Quantities from HTTP input, parsed exactly as decimals: never through a float.

use rust_decimal::Decimal;

/// Why a value is not a usable quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a decimal number.
    #[error("{0:?} is not a decimal number")]
    NotANumber(String),
    /// Below zero.
    #[error("{0} is negative; usage quantities must be zero or more")]
    Negative(Decimal),
}

/// Parses `12`, `1.50`, `1e3`, `-0` exactly; refuses negatives, NaN, infinities, and values
/// outside `Decimal`'s 28-digit range.
pub fn parse_quantity(text: &str) -> Result<Decimal, QuantityError> {
    let t = text.trim();
    let nan = || QuantityError::NotANumber(text.chars().take(64).collect());
    if t.is_empty()
        || t.len() > 64
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return Err(nan());
    }
    let d = if t.contains(['e', 'E']) {
        Decimal::from_scientific(t).map_err(|_| nan())?
    } else {
        Decimal::from_str_exact(t).map_err(|_| nan())?
    };
    if d.is_sign_negative() && !d.is_zero() {
        return Err(QuantityError::Negative(d));
    }
    Ok(d.abs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn exact() {
        assert_eq!(parse_quantity("0.1").unwrap().to_string(), "0.1");
        assert_eq!(
            parse_quantity("12345678901234567890.12345678")
                .unwrap()
                .to_string(),
            "12345678901234567890.12345678"
        );
        assert_eq!(parse_quantity("1e3").unwrap(), Decimal::from(1000));
        assert_eq!(parse_quantity("-0").unwrap(), Decimal::ZERO);
        assert!(matches!(
            parse_quantity("-1"),
            Err(QuantityError::Negative(_))
        ));
        for bad in [
            "",
            "abc",
            "NaN",
            "inf",
            "1.2.3",
            "0x10",
            "1e999",
            "99999999999999999999999999999999",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }
}
