//! Agent settings and their defaults (SPEC §3).

use std::path::PathBuf;
use std::time::Duration;

/// Default `flush_interval`: the most `record()` usage a `kill -9` can lose (SPEC A2).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Default disk budget: 1 GiB.
pub const DEFAULT_DISK_BUDGET: u64 = 1 << 30;
/// Default dedup window: 35 days.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(35 * 24 * 3600);

/// Default for [`Config::failback_interval`].
pub const DEFAULT_FAILBACK_INTERVAL: Duration = Duration::from_secs(30);

/// What the agent does once its disk backlog reaches `disk_budget` (SPEC A3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Keep accepting: `record()` keeps aggregating in memory (bounded by the number of
    /// distinct keys, not events), sealing pauses until the backlog drains below the budget,
    /// and `record_durable` waits for room.
    #[default]
    Block,
    /// Refuse new usage with [`crate::RecordError::OverBudget`] until the backlog drains.
    Reject,
}

/// Default for [`Config::max_event_age`]: Stripe's 35 days.
pub const DEFAULT_MAX_EVENT_AGE: Duration = Duration::from_secs(35 * 86_400);
/// Default for [`Config::max_event_lead`]: Stripe's 5 minutes.
pub const DEFAULT_MAX_EVENT_LEAD: Duration = Duration::from_secs(300);

/// The settings an agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the key and the store live.
    pub data_dir: PathBuf,
    /// Collector addresses (`host:port`), tried in order.
    pub collectors: Vec<String>,
    /// PEM of the deployment CA.
    pub ca_pem: Option<Vec<u8>>,
    /// Enrolment token presented on connect.
    pub enroll_token: Option<String>,
    /// How often aggregates are sealed.
    pub flush_interval: Duration,
    /// Bytes of sealed batches and durable-log rows kept before `overflow` applies.
    pub disk_budget: u64,
    /// The overflow policy.
    pub overflow: Overflow,
    /// How long event ids are remembered.
    pub dedup_window: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Time allowed for a QUIC connection and handshake.
    pub connect_timeout: Duration,
    /// While connected to another than the first collector, how often the first is tried
    /// again; when it answers the agent moves back to it (fail back). Zero: stay (sticky).
    pub failback_interval: Duration,
    /// How far in the past an event's own time may be (default 35 days, as Stripe allows).
    pub max_event_age: Duration,
    /// How far in the future an event's own time may be (default 5 minutes, as Stripe allows).
    pub max_event_lead: Duration,
    /// Entitlement settings: stale age, offline policies, wait bound.
    pub entitlements: crate::entitlements::EntitlementsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::new(),
            collectors: Vec::new(),
            ca_pem: None,
            enroll_token: None,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            disk_budget: DEFAULT_DISK_BUDGET,
            overflow: Overflow::Block,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            failback_interval: DEFAULT_FAILBACK_INTERVAL,
            max_event_age: DEFAULT_MAX_EVENT_AGE,
            max_event_lead: DEFAULT_MAX_EVENT_LEAD,
            entitlements: crate::entitlements::EntitlementsConfig::default(),
        }
    }
}
