//! Validated names. Construction checks length and alphabet, so a value of these types is always
//! safe to store, log and send; deserialization runs the same checks.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or longer than the limit, in bytes.
    #[error("{kind} must be 1 to {max} bytes long, got {len}")]
    Length {
        /// Which kind of name.
        kind: &'static str,
        /// The limit in bytes.
        max: usize,
        /// The length given.
        len: usize,
    },
    /// A character outside the allowed alphabet.
    #[error("{kind} contains a character that is not allowed at byte {at}")]
    Alphabet {
        /// Which kind of name.
        kind: &'static str,
        /// Byte offset of the first bad character.
        at: usize,
    },
}

/// Longest customer key, in bytes.
pub const CUSTOMER_MAX_BYTES: usize = 128;
/// Longest meter name, in bytes.
pub const METER_MAX_BYTES: usize = 64;
/// Longest dimension key, in bytes.
pub const DIMENSION_KEY_MAX_BYTES: usize = 64;
/// Longest dimension value, in bytes.
pub const DIMENSION_VALUE_MAX_BYTES: usize = 256;
/// Most dimensions on one event or delta.
pub const MAX_DIMENSIONS: usize = 4;

fn check_len(kind: &'static str, s: &str, min: usize, max: usize) -> Result<(), NameError> {
    if s.len() < min || s.len() > max {
        return Err(NameError::Length {
            kind,
            max,
            len: s.len(),
        });
    }
    Ok(())
}

fn check_no_control(kind: &'static str, s: &str) -> Result<(), NameError> {
    match s.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, _)) => Err(NameError::Alphabet { kind, at }),
        None => Ok(()),
    }
}

fn check_ascii(kind: &'static str, s: &str, ok: impl Fn(u8) -> bool) -> Result<(), NameError> {
    match s.bytes().position(|b| !ok(b)) {
        Some(at) => Err(NameError::Alphabet { kind, at }),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $validate:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `s` without allocating; the hot path validates a key once with this.
            pub fn validate(s: &str) -> Result<(), NameError> {
                let f: fn(&str) -> Result<(), NameError> = $validate;
                f(s)
            }

            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                Self::validate(&s)?;
                Ok(Self(s))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

name_type!(
    /// The product's key for who pays: UTF-8, 1–128 bytes, no control characters.
    CustomerId,
    |s| {
        check_len("customer", s, 1, CUSTOMER_MAX_BYTES)?;
        check_no_control("customer", s)
    }
);

name_type!(
    /// A kind of usage defined in the catalog: `[a-z0-9_.-]{1,64}`.
    MeterName,
    |s| {
        check_len("meter", s, 1, METER_MAX_BYTES)?;
        check_ascii("meter", s, |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
    }
);

/// Longest feature name (a plan's feature or a Stripe entitlement feature's `lookup_key`), in bytes.
pub const FEATURE_MAX_BYTES: usize = 128;
/// Longest plan name, in bytes.
pub const PLAN_MAX_BYTES: usize = 64;

name_type!(
    /// A boolean feature: `[A-Za-z0-9_.:-]{1,128}` (a Stripe feature's `lookup_key` fits).
    FeatureName,
    |s| {
        check_len("feature", s, 1, FEATURE_MAX_BYTES)?;
        check_ascii("feature", s, |b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')
        })
    }
);

name_type!(
    /// A plan: `[a-z0-9_.-]{1,64}`, like a meter name.
    PlanName,
    |s| {
        check_len("plan", s, 1, PLAN_MAX_BYTES)?;
        check_ascii("plan", s, |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
    }
);

name_type!(
    /// A dimension key: `[A-Za-z0-9_.-]{1,64}`.
    DimensionKey,
    |s| {
        check_len("dimension key", s, 1, DIMENSION_KEY_MAX_BYTES)?;
        check_ascii("dimension key", s, |b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
        })
    }
);

name_type!(
    /// A dimension value: UTF-8, 0–256 bytes, no control characters.
    DimensionValue,
    |s| {
        check_len("dimension value", s, 0, DIMENSION_VALUE_MAX_BYTES)?;
        check_no_control("dimension value", s)
    }
);

/// Why a set of dimensions was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DimensionsError {
    /// More than [`MAX_DIMENSIONS`].
    #[error("at most {MAX_DIMENSIONS} dimensions are allowed, got {0}")]
    TooMany(usize),
    /// The same key twice.
    #[error("dimension key {0:?} appears twice")]
    DuplicateKey(String),
    /// A key or value is not a valid name.
    #[error(transparent)]
    Name(#[from] NameError),
}

/// At most four `key → value` pairs, kept sorted by key so that equal sets encode equally.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(
    try_from = "Vec<(DimensionKey, DimensionValue)>",
    into = "Vec<(DimensionKey, DimensionValue)>"
)]
pub struct Dimensions(Vec<(DimensionKey, DimensionValue)>);

impl Dimensions {
    /// Sorts and checks the pairs.
    pub fn new(mut pairs: Vec<(DimensionKey, DimensionValue)>) -> Result<Self, DimensionsError> {
        if pairs.len() > MAX_DIMENSIONS {
            return Err(DimensionsError::TooMany(pairs.len()));
        }
        pairs.sort();
        if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(DimensionsError::DuplicateKey(w[0].0.to_string()));
        }
        Ok(Self(pairs))
    }

    /// Builds from plain strings, validating each.
    pub fn from_strs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, DimensionsError> {
        let pairs = pairs
            .into_iter()
            .map(|(k, v)| Ok((DimensionKey::new(k)?, DimensionValue::new(v)?)))
            .collect::<Result<Vec<_>, NameError>>()?;
        Self::new(pairs)
    }

    /// The pairs, sorted by key.
    pub fn pairs(&self) -> &[(DimensionKey, DimensionValue)] {
        &self.0
    }

    /// True when there are no dimensions.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Vec<(DimensionKey, DimensionValue)>> for Dimensions {
    type Error = DimensionsError;
    fn try_from(v: Vec<(DimensionKey, DimensionValue)>) -> Result<Self, DimensionsError> {
        // Canonical form only: a sender that did not sort is refused rather than silently fixed,
        // so a signed encoding has exactly one meaning.
        if v.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(DimensionsError::DuplicateKey(String::from(
                "(unsorted or repeated)",
            )));
        }
        Self::new(v)
    }
}

impl From<Dimensions> for Vec<(DimensionKey, DimensionValue)> {
    fn from(d: Dimensions) -> Self {
        d.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_rules() {
        assert!(CustomerId::new("acme").is_ok());
        assert!(CustomerId::new("cus_123 Ünïcode").is_ok());
        assert!(CustomerId::new("").is_err());
        assert!(CustomerId::new("a\nb").is_err());
        assert!(CustomerId::new("x".repeat(128)).is_ok());
        assert!(CustomerId::new("x".repeat(129)).is_err());
    }

    #[test]
    fn meter_rules() {
        assert!(MeterName::new("api_calls.v2-x").is_ok());
        assert!(MeterName::new("Api").is_err());
        assert!(MeterName::new("a b").is_err());
        assert!(MeterName::new("x".repeat(65)).is_err());
    }

    #[test]
    fn dimensions_sorted_unique_bounded() {
        let d = Dimensions::from_strs([("model", "gpt"), ("region", "eu")]).unwrap();
        let e = Dimensions::from_strs([("region", "eu"), ("model", "gpt")]).unwrap();
        assert_eq!(d, e);
        assert!(Dimensions::from_strs([("a", "1"), ("a", "2")]).is_err());
        assert!(
            Dimensions::from_strs([("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1")])
                .is_err()
        );
    }

    #[test]
    fn deserialization_validates() {
        let bytes = postcard::to_stdvec(&"Bad Meter").unwrap();
        assert!(postcard::from_bytes::<MeterName>(&bytes).is_err());
    }
}
