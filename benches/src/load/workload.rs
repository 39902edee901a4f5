//! The events every phase of a load run sends: a pure function of (stream, index), so the
//! in-process agents, the sidecar clients and the PostgreSQL baseline send the same events, and
//! the expected totals are recomputed after a phase instead of being counted on the hot path.

use rust_decimal::Decimal;
use std::collections::BTreeMap;

/// How many customers, meters and dimension values events are spread over.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Workload {
    /// Distinct customers.
    pub customers: u32,
    /// Distinct meters (`meter_0` …), every one a sum of `$.value`.
    pub meters: u32,
    /// Distinct values of the one dimension `model` (`m0` …).
    pub dimensions: u32,
}

/// One event: indexes into [`Names`] and an exact quantity (0.01 to 4.00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ev {
    /// Customer index.
    pub customer: u32,
    /// Meter index.
    pub meter: u32,
    /// Dimension value index.
    pub dim: u32,
    /// Quantity, two decimal places.
    pub quantity: Decimal,
}

/// The names behind the indexes, formatted once so the recording loop does not allocate.
pub struct Names {
    /// `cus_00042`.
    pub customers: Vec<String>,
    /// `meter_3`.
    pub meters: Vec<String>,
    /// `m1`.
    pub dims: Vec<String>,
}

/// Expected usage per (customer, meter) index pair.
pub type Totals = BTreeMap<(u32, u32), Decimal>;

impl Workload {
    /// Event `i` of `stream`: the key is spread uniformly by a splitmix64 round.
    pub fn event(&self, stream: u64, i: u64) -> Ev {
        let mut x = (stream << 40) ^ i ^ 0x9e37_79b9_7f4a_7c15;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        Ev {
            customer: (x % u64::from(self.customers.max(1))) as u32,
            meter: ((x >> 20) % u64::from(self.meters.max(1))) as u32,
            dim: ((x >> 36) % u64::from(self.dimensions.max(1))) as u32,
            quantity: Decimal::new(((x >> 48) % 400 + 1) as i64, 2),
        }
    }

    /// The names of every index.
    pub fn names(&self) -> Names {
        Names {
            customers: (0..self.customers).map(customer_name).collect(),
            meters: (0..self.meters).map(|m| format!("meter_{m}")).collect(),
            dims: (0..self.dimensions).map(|d| format!("m{d}")).collect(),
        }
    }

    /// Adds events `0..count` of each `(stream, count)` to `into`.
    pub fn add_totals(&self, streams: &[(u64, u64)], into: &mut Totals) {
        for &(stream, count) in streams {
            for i in 0..count {
                let e = self.event(stream, i);
                *into.entry((e.customer, e.meter)).or_default() += e.quantity;
            }
        }
    }
}

/// `cus_00042`: a `cus_` key is its own Stripe customer, so forwarding needs no mapping.
pub fn customer_name(c: u32) -> String {
    format!("cus_{c:05}")
}

/// A CloudEvents JSON object for event `i` of `stream`, with a unique `id`.
pub fn cloudevent(w: &Workload, names: &Names, stream: u64, i: u64) -> String {
    let e = w.event(stream, i);
    format!(
        r#"{{"specversion":"1.0","id":"s{stream}-{i}","source":"load","type":"{m}","subject":"{c}","data":{{"value":"{q}","model":"{d}"}}}}"#,
        m = names.meters[e.meter as usize],
        c = names.customers[e.customer as usize],
        q = e.quantity,
        d = names.dims[e.dim as usize],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_spread_and_exact() {
        let w = Workload {
            customers: 10,
            meters: 3,
            dimensions: 2,
        };
        let mut seen = std::collections::HashSet::new();
        for i in 0..2_000 {
            let e = w.event(1, i);
            assert!(e.customer < 10 && e.meter < 3 && e.dim < 2);
            assert!(e.quantity > Decimal::ZERO && e.quantity <= Decimal::new(400, 2));
            assert_eq!(e, w.event(1, i), "a pure function");
            seen.insert((e.customer, e.meter, e.dim));
        }
        assert_eq!(seen.len(), 60, "every key is reached");
        let mut t = Totals::new();
        w.add_totals(&[(1, 2_000)], &mut t);
        let sum: Decimal = (0..2_000).map(|i| w.event(1, i).quantity).sum();
        assert_eq!(t.values().copied().sum::<Decimal>(), sum);
    }
}
