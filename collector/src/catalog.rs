//! The meter catalog as the collector keeps it: the sample meters of the quickstart (SPEC §8)
//! and the checks applied before a meter is stored.
//!
//! The catalog itself lives in the [`crate::store::Store`] (versioned: every change bumps the
//! version and is kept); [`crate::server::Shared::put_meter`] stores it and pushes it to every
//! connected agent.

/// The quickstart's meters (SPEC §8); defined beside the catalog types so agents' tests and the
/// collector share one definition.
pub use tally_protocol::catalog::sample_meters;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_valid() {
        let m = sample_meters().unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|d| d.validate().is_ok()));
        assert_eq!(m[1].group_by.len(), 1);
    }
}
