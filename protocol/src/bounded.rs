//! Collections and byte strings with a hard length limit checked *while decoding*: a hostile
//! length prefix is refused before anything is allocated for it.

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

/// A collection longer than its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("collection of {len} items is over the limit of {max}")]
pub struct LimitError {
    /// The length given.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

/// A `Vec<T>` of at most `N` items.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BoundedVec<T, const N: usize>(Vec<T>);

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T, const N: usize> BoundedVec<T, N> {
    /// Wraps `v`, refusing it when longer than `N`.
    pub fn new(v: Vec<T>) -> Result<Self, LimitError> {
        if v.len() > N {
            return Err(LimitError {
                len: v.len(),
                max: N,
            });
        }
        Ok(Self(v))
    }

    /// The items.
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }
}

impl<T, const N: usize> Deref for BoundedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for BoundedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = BoundedVec<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > N {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                // The hint is bounded by N, and N by the frame limit, so this cannot be abused.
                let mut v = Vec::with_capacity(hint.min(1024));
                while let Some(item) = seq.next_element()? {
                    if v.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    v.push(item);
                }
                Ok(BoundedVec(v))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// A byte string of at most `N` bytes, encoded as bytes (not as a sequence of integers).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct BoundedBytes<const N: usize>(Vec<u8>);

impl<const N: usize> BoundedBytes<N> {
    /// Wraps `v`, refusing it when longer than `N`.
    pub fn new(v: Vec<u8>) -> Result<Self, LimitError> {
        if v.len() > N {
            return Err(LimitError {
                len: v.len(),
                max: N,
            });
        }
        Ok(Self(v))
    }

    /// The bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl<const N: usize> Deref for BoundedBytes<N> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for BoundedBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl<const N: usize> Serialize for BoundedBytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for BoundedBytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> Visitor<'_> for V<N> {
            type Value = BoundedBytes<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {N} bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Self::Value, E> {
                if b.len() > N {
                    return Err(E::invalid_length(b.len(), &self));
                }
                Ok(BoundedBytes(b.to_vec()))
            }
        }
        d.deserialize_bytes(V::<N>)
    }
}

/// An ed25519 signature (64 bytes), encoded as bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sig64(pub [u8; 64]);

impl fmt::Debug for Sig64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig64({}…)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Sig64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Sig64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Sig64, E> {
                <[u8; 64]>::try_from(b)
                    .map(Sig64)
                    .map_err(|_| E::invalid_length(b.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_length_prefix_is_refused_before_allocation() {
        // A varint claiming u32::MAX items followed by nothing.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0x0f];
        let r = postcard::from_bytes::<BoundedVec<u64, 10>>(&bytes);
        assert!(r.is_err());
        let ok = postcard::to_stdvec(&vec![1u64, 2, 3]).unwrap();
        assert_eq!(
            &*postcard::from_bytes::<BoundedVec<u64, 3>>(&ok).unwrap(),
            &[1, 2, 3]
        );
        assert!(postcard::from_bytes::<BoundedVec<u64, 2>>(&ok).is_err());
    }

    #[test]
    fn bytes_bounded() {
        let b = postcard::to_stdvec(&BoundedBytes::<4>::new(vec![1, 2, 3]).unwrap()).unwrap();
        assert!(postcard::from_bytes::<BoundedBytes<3>>(&b).is_ok());
        assert!(postcard::from_bytes::<BoundedBytes<2>>(&b).is_err());
        assert!(BoundedBytes::<2>::new(vec![0; 3]).is_err());
    }
}
