//! Configuration of the `tally-collector` commands: every flag is also a `TALLY_*` environment
//! variable or a key in the `--config` TOML file.
//!
//! Owns [`FileConfig`] and the precedence rule: a flag wins over its environment variable (clap
//! merges those two), which wins over the file, which wins over the default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The keys of `collector.toml`; all optional.
///
/// ```toml
/// data_dir = "/var/lib/tally"
/// quic = "0.0.0.0:7443"
/// http = "127.0.0.1:7080"
/// san = ["collector.internal"]
/// max_in_flight = 32
/// agent_http = "127.0.0.1:7070"   # dev only
/// stripe_api_key_file = "/run/secrets/stripe"   # or STRIPE_API_KEY
/// stripe_base_url = "https://api.stripe.com"
/// stripe_meter_events_url = "https://meter-events.stripe.com"
/// stripe_api = "v1"                 # or "v2"
/// stripe_version = "2025-03-31.basil"
/// stripe_webhook_secret_file = "/run/secrets/whsec"   # or STRIPE_WEBHOOK_SECRET
/// stripe_request_timeout = 30       # seconds
/// stripe_rate = 20                  # requests per second
/// stripe_reconcile_interval = 600   # seconds, 0 = off
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
    /// The dev sidecar's HTTP address.
    pub agent_http: Option<SocketAddr>,
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
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
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
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
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
