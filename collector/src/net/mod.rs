//! The QUIC shell: accepts connections and moves frames between the network and the core.

pub mod quic;
pub mod registry;
