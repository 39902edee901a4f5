//! Configuration of the `tally-collector` commands: every flag is also a `TALLY_*` environment
//! variable or a key in the `--config` TOML file.
//!
//! Owns [`CollectorConfig`] (what [`crate::Collector::start`] takes), [`FileConfig`] and the precedence rule: a flag wins over its environment variable (clap
//! merges those two), which wins over the file, which wins over the default.

use crate::ingest::GroupLimits;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tally_clock::{SharedClock, SystemClock};

/// Everything a collector needs to start.
#[derive(Clone)]
pub struct CollectorConfig {
    /// The data directory (made by [`crate::init::init`]).
    pub data_dir: PathBuf,
    /// QUIC listen address (port 0 picks one).
    pub quic_addr: SocketAddr,
    /// Admin HTTP listen address (port 0 picks one).
    pub http_addr: SocketAddr,
    /// Unacknowledged batches an agent may have in flight per connection.
    pub max_in_flight: u32,
    /// Most concurrent QUIC connections.
    pub max_connections: usize,
    /// Time allowed from connection to `Welcome`.
    pub handshake_timeout: Duration,
    /// New QUIC connections accepted per second (with as many in a burst); more are refused
    /// before any TLS or signature work, and the agents retry with backoff.
    pub max_handshakes_per_s: u32,
    /// Group commit limits.
    pub group: GroupLimits,
    /// Stripe forwarding (log-only without an API key).
    pub stripe: crate::forwarding::stripe::StripeSettings,
    /// Orb and Metronome forwarding (SPEC §6.4b), each off unless its key is set.
    pub forward: crate::forwarding::ledger_feed::ForwardSettings,
    /// Where the collector reads wall time (a [`tally_clock::ManualClock`] in tests).
    pub clock: SharedClock,
    /// The continuous analytics export (`--export-dir`), off by default.
    pub export: Option<crate::export::ExportJob>,
    /// The lease book's limits and timings (lease lifetime, reclaim grace).
    pub leases: crate::core::entitlements::LeaseBookLimits,
    /// `--ledger-url`: keep the ledger in this PostgreSQL database instead of the data
    /// directory's redb file (a secret when it holds a password: never logged).
    pub ledger_url: Option<String>,
    /// `--ledger-listen-url`: how other collectors' changes are heard on PostgreSQL — `None`:
    /// `LISTEN` on `ledger_url`; `"poll"`: poll the change log (behind a transaction-mode
    /// pooler); a URL: `LISTEN` on that direct connection (decision 0097).
    pub ledger_listen_url: Option<String>,
}

impl std::fmt::Debug for CollectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorConfig")
            .field("data_dir", &self.data_dir)
            .field("quic_addr", &self.quic_addr)
            .field("http_addr", &self.http_addr)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_connections", &self.max_connections)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshakes_per_s", &self.max_handshakes_per_s)
            .field("group", &self.group)
            .field("stripe", &self.stripe)
            .field("forward", &self.forward)
            .field("export", &self.export)
            .field("leases", &self.leases)
            .field(
                "ledger",
                &if self.ledger_url.is_some() {
                    "postgres"
                } else {
                    "redb"
                },
            )
            .field("now_ms", &self.clock.now_ms())
            .finish()
    }
}

impl CollectorConfig {
    /// Defaults: QUIC on `127.0.0.1:7443`, HTTP on `127.0.0.1:7080`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        CollectorConfig {
            data_dir: data_dir.into(),
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 7443)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7080)),
            max_in_flight: 32,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            max_handshakes_per_s: 1_000,
            group: GroupLimits::default(),
            stripe: crate::forwarding::stripe::StripeSettings::default(),
            forward: crate::forwarding::ledger_feed::ForwardSettings::default(),
            clock: Arc::new(SystemClock),
            export: None,
            leases: crate::core::entitlements::LeaseBookLimits::default(),
            ledger_url: None,
            ledger_listen_url: None,
        }
    }

    /// Both listeners on `127.0.0.1` with ports chosen by the OS (for tests).
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        let mut c = Self::new(data_dir);
        c.quic_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c
    }
}

/// The keys of `collector.toml`; all optional.
///
/// ```toml
/// data_dir = "/var/lib/tally"
/// quic = "0.0.0.0:7443"
/// http = "127.0.0.1:7080"
/// san = ["collector.internal"]
/// max_in_flight = 32
/// max_handshakes_per_s = 1000
/// agent_http = "127.0.0.1:7070"   # dev only
/// ledger_url = "postgres://tally@db:5432/tally"   # or TALLY_LEDGER_URL; default: redb
/// ledger_listen_url = "poll"   # or a direct postgres:// URL; or TALLY_LEDGER_LISTEN_URL
/// stripe_api_key_file = "/run/secrets/stripe"   # or STRIPE_API_KEY
/// stripe_base_url = "https://api.stripe.com"
/// stripe_meter_events_url = "https://meter-events.stripe.com"
/// stripe_api = "v1"                 # or "v2"
/// stripe_version = "2025-03-31.basil"
/// stripe_webhook_secret_file = "/run/secrets/whsec"   # or STRIPE_WEBHOOK_SECRET
/// stripe_request_timeout = 30       # seconds
/// stripe_rate = 20                  # requests per second
/// stripe_reconcile_interval = 600   # seconds, 0 = off
/// orb_api_key_file = "/run/secrets/orb"             # or ORB_API_KEY; unset = Orb off
/// orb_base_url = "https://api.withorb.com"
/// orb_grace_hours = 12                              # the Orb account's grace period
/// orb_meters = { tokens = "llm_tokens" }           # meter → event_name; unset = every meter
/// orb_customers = { acme = "acme-orb" }            # customer → external_customer_id
/// metronome_api_key_file = "/run/secrets/metronome" # or METRONOME_API_KEY; unset = off
/// metronome_base_url = "https://api.metronome.com"
/// metronome_meters = { tokens = "llm_tokens" }     # meter → event_type; unset = every meter
/// metronome_customers = { acme = "a1b2…" }         # customer → customer id or ingest alias
/// ```
///
/// Secrets (the API key, the webhook secret) are never keys of this file: only paths to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The data directory.
    pub data_dir: Option<PathBuf>,
    /// QUIC listen address.
    pub quic: Option<SocketAddr>,
    /// Admin HTTP listen address.
    pub http: Option<SocketAddr>,
    /// Extra certificate SANs for `init`.
    pub san: Option<Vec<String>>,
    /// In-flight batches per agent connection.
    pub max_in_flight: Option<u32>,
    /// New agent connections per second (and burst).
    pub max_handshakes_per_s: Option<u32>,
    /// The dev sidecar's HTTP address.
    pub agent_http: Option<SocketAddr>,
    /// The PostgreSQL ledger (`--ledger-url`).
    pub ledger_url: Option<String>,
    /// How changes are heard on PostgreSQL (`--ledger-listen-url`).
    pub ledger_listen_url: Option<String>,
    /// A file holding the Stripe API key (when `STRIPE_API_KEY` is unset).
    pub stripe_api_key_file: Option<PathBuf>,
    /// Stripe base URL.
    pub stripe_base_url: Option<String>,
    /// v2 meter event stream host.
    pub stripe_meter_events_url: Option<String>,
    /// `v1` or `v2`.
    pub stripe_api: Option<String>,
    /// Pinned `Stripe-Version`.
    pub stripe_version: Option<String>,
    /// A file holding the webhook signing secret.
    pub stripe_webhook_secret_file: Option<PathBuf>,
    /// Per-request timeout, seconds.
    pub stripe_request_timeout: Option<u64>,
    /// Requests per second to Stripe.
    pub stripe_rate: Option<u32>,
    /// Seconds between reconciliation runs (0 = off).
    pub stripe_reconcile_interval: Option<u64>,
    /// A file holding the Orb API key (when `ORB_API_KEY` is unset).
    pub orb_api_key_file: Option<PathBuf>,
    /// Orb base URL.
    pub orb_base_url: Option<String>,
    /// The Orb account's grace period, hours (default 12).
    pub orb_grace_hours: Option<u64>,
    /// Meter → Orb `event_name` (unset: every meter under its own name).
    pub orb_meters: Option<std::collections::BTreeMap<String, String>>,
    /// Customer → Orb `external_customer_id` (default: the customer key).
    pub orb_customers: Option<std::collections::BTreeMap<String, String>>,
    /// A file holding the Metronome API token (when `METRONOME_API_KEY` is unset).
    pub metronome_api_key_file: Option<PathBuf>,
    /// Metronome base URL.
    pub metronome_base_url: Option<String>,
    /// Meter → Metronome `event_type` (unset: every meter under its own name).
    pub metronome_meters: Option<std::collections::BTreeMap<String, String>>,
    /// Customer → Metronome customer id or ingest alias (default: the customer key).
    pub metronome_customers: Option<std::collections::BTreeMap<String, String>>,
}

/// Why the configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is not valid TOML for [`FileConfig`].
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
}

impl FileConfig {
    /// Reads `path`, or the empty config when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c = FileConfig::parse("data_dir = \"/d\"\nquic = \"127.0.0.1:9\"\nsan = [\"a\"]\n")
            .unwrap();
        assert_eq!(c.data_dir.as_deref(), Some(Path::new("/d")));
        assert_eq!(c.quic, Some(SocketAddr::from(([127, 0, 0, 1], 9))));
        assert!(FileConfig::parse("quik = \"x\"").is_err());
    }
}
