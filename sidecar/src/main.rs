//! `tally-agent`: the sidecar (SPEC §4). `run` starts an agent and its HTTP endpoints, `keygen`
//! makes the agent's key, `status` shows the local backlog.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tally_agent::{Agent, OfflinePolicy, Overflow};
use tally_protocol::names::MeterName;
use tally_sidecar::backend::AgentBackend;
use tally_sidecar::http::{DEFAULT_MAX_BODY_BYTES, HttpConfig, router};

#[derive(Parser)]
#[command(
    name = "tally-agent",
    version,
    about = "Tally sidecar agent: meter usage locally, ship it exactly once"
)]
struct Cli {
    /// Log lines as `text` (colour only when stderr is a terminal) or `json` (one object a line).
    #[arg(long, global = true, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How the binary writes its logs to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the stderr subscriber: `RUST_LOG` filters (default `info`), and ANSI colour codes
/// only when stderr is a terminal, so files and pipes get plain text.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent and its HTTP endpoints.
    Run(Box<RunArgs>),
    /// Create the agent's key in the data directory (if it has none) and print its id.
    Keygen {
        /// The agent's data directory.
        #[arg(long, env = "TALLY_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Show the agent's backlog: from the running sidecar if it is up, else from the store.
    Status {
        /// The agent's data directory.
        #[arg(long, env = "TALLY_DATA_DIR")]
        data_dir: PathBuf,
        /// The running sidecar's HTTP address.
        #[arg(long, env = "TALLY_HTTP", default_value = "127.0.0.1:7070")]
        http: SocketAddr,
        /// Bearer token of the running sidecar.
        #[arg(long, env = "TALLY_HTTP_TOKEN")]
        token: Option<String>,
    },
    /// Export the batches this agent quarantined (signed by a key it no longer holds, or
    /// refused by the collector) as JSON: from the running sidecar if it is up, else from the
    /// store. Nothing is removed.
    Quarantine {
        /// The agent's data directory.
        #[arg(long, env = "TALLY_DATA_DIR")]
        data_dir: PathBuf,
        /// The running sidecar's HTTP address.
        #[arg(long, env = "TALLY_HTTP", default_value = "127.0.0.1:7070")]
        http: SocketAddr,
        /// Bearer token of the running sidecar.
        #[arg(long, env = "TALLY_HTTP_TOKEN")]
        token: Option<String>,
    },
}

/// Every flag is also a `TALLY_*` variable and a key of `--config agent.toml`; flags win over
/// variables, variables over the file.
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    /// TOML file with any of these settings (keys as the flags, with `_` for `-`).
    #[arg(long, env = "TALLY_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Where the agent keeps its key, sealed batches and caches.
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Collector QUIC address, `HOST:PORT`; repeat for failover in order.
    #[arg(long = "collector", env = "TALLY_COLLECTORS", value_delimiter = ',')]
    #[serde(default)]
    collectors: Vec<String>,
    /// PEM file of the deployment's CA.
    #[arg(long, env = "TALLY_CA")]
    ca: Option<PathBuf>,
    /// Enrolment token (first contact registers this agent's key).
    #[arg(long, env = "TALLY_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// File holding the enrolment token, instead of `--enroll-token`.
    #[arg(long, env = "TALLY_ENROLL_TOKEN_FILE")]
    enroll_token_file: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long, env = "TALLY_HTTP")]
    http: Option<SocketAddr>,
    /// Bearer token required by the HTTP endpoints (health checks excepted). Prefer
    /// `--http-token-file` or the variable: a flag shows in `ps`.
    #[arg(long, env = "TALLY_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
    /// File holding the HTTP bearer token, instead of `--http-token`.
    #[arg(long, env = "TALLY_HTTP_TOKEN_FILE")]
    http_token_file: Option<PathBuf>,
    /// Oldest accepted event time, in seconds before now (default 35 days, as Stripe).
    #[arg(long, env = "TALLY_MAX_EVENT_AGE_S")]
    max_event_age_s: Option<u64>,
    /// Latest accepted event time, in seconds after now (default 300, as Stripe).
    #[arg(long, env = "TALLY_MAX_EVENT_LEAD_S")]
    max_event_lead_s: Option<u64>,
    /// Seal interval in milliseconds (the `kill -9` loss window of `record()`).
    #[arg(long, env = "TALLY_FLUSH_INTERVAL_MS")]
    flush_interval_ms: Option<u64>,
    /// Disk budget in bytes for sealed, unacknowledged batches.
    #[arg(long, env = "TALLY_DISK_BUDGET")]
    disk_budget: Option<u64>,
    /// `block` or `reject` once the disk budget is used up.
    #[arg(long, env = "TALLY_OVERFLOW")]
    overflow: Option<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Seconds without a connected collector after which the entitlement snapshot is stale and
    /// the offline policy decides (default 900).
    #[arg(long, env = "TALLY_STALE_AFTER_SECS")]
    stale_after_secs: Option<u64>,
    /// Offline policy of features and of meters without one of their own: `deny` (default),
    /// `allow` or `allow_up_to:Q`.
    #[arg(long, env = "TALLY_OFFLINE_POLICY")]
    offline_policy: Option<String>,
    /// Offline policy of one meter, `METER=POLICY` (e.g. `api_calls=allow_up_to:100`); repeat.
    #[arg(
        long = "meter-policy",
        env = "TALLY_METER_POLICIES",
        value_delimiter = ','
    )]
    #[serde(default)]
    meter_policies: Vec<String>,
    /// Milliseconds an entitlement endpoint waits for a new customer's snapshot or a first
    /// lease (default 100).
    #[arg(long, env = "TALLY_ENTITLEMENTS_WAIT_MS")]
    entitlements_wait_ms: Option<u64>,
    /// Seconds a reservation is held without a commit (default 300).
    #[arg(long, env = "TALLY_RESERVATION_TTL_SECS")]
    reservation_ttl_secs: Option<u64>,
}

impl RunArgs {
    /// Fills what flags and variables left unset from the config file.
    fn merge(mut self) -> Result<RunArgs> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: RunArgs =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            data_dir,
            ca,
            enroll_token,
            enroll_token_file,
            http,
            http_token,
            http_token_file,
            max_event_age_s,
            max_event_lead_s,
            flush_interval_ms,
            disk_budget,
            overflow,
            max_body_bytes,
            stale_after_secs,
            offline_policy,
            entitlements_wait_ms,
            reservation_ttl_secs
        );
        if self.collectors.is_empty() {
            self.collectors = file.collectors;
        }
        if self.meter_policies.is_empty() {
            self.meter_policies = file.meter_policies;
        }
        Ok(self)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Run(args) => rt.block_on(run((*args).merge()?)),
        Command::Keygen { data_dir } => keygen(&data_dir),
        Command::Status {
            data_dir,
            http,
            token,
        } => rt.block_on(status(&data_dir, http, token)),
        Command::Quarantine {
            data_dir,
            http,
            token,
        } => rt.block_on(quarantine(&data_dir, http, token)),
    }
}

fn keygen(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = tally_agent::keys::load_or_create(dir)?;
    let id = tally_protocol::batch::AgentId::from_public_key(&key.verifying_key());
    println!("agent id:   {id}");
    println!(
        "public key: {}",
        hex::encode(key.verifying_key().as_bytes())
    );
    println!(
        "key file:   {}",
        dir.join(tally_agent::keys::KEY_FILE).display()
    );
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    let data_dir = args.data_dir.context("--data-dir is required")?;
    if args.collectors.is_empty() {
        bail!("at least one --collector is required");
    }
    let ca_path = args.ca.context("--ca is required")?;
    let ca = std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let token = secret("enroll token", args.enroll_token, args.enroll_token_file)?;
    let http_token = secret("HTTP token", args.http_token, args.http_token_file)?;
    let mut builder = Agent::builder()
        .data_dir(&data_dir)
        .collectors(args.collectors)
        .ca_pem(ca);
    if let Some(t) = token {
        builder = builder.enroll_token(t);
    }
    if args.max_event_age_s.is_some() || args.max_event_lead_s.is_some() {
        builder = builder.event_time_window(
            args.max_event_age_s.map_or(
                tally_agent::config::DEFAULT_MAX_EVENT_AGE,
                Duration::from_secs,
            ),
            args.max_event_lead_s.map_or(
                tally_agent::config::DEFAULT_MAX_EVENT_LEAD,
                Duration::from_secs,
            ),
        );
    }
    if let Some(ms) = args.flush_interval_ms {
        builder = builder.flush_interval(Duration::from_millis(ms));
    }
    if let Some(b) = args.disk_budget {
        builder = builder.disk_budget(b);
    }
    match args.overflow.as_deref() {
        None | Some("block") => {}
        Some("reject") => builder = builder.overflow(Overflow::Reject),
        Some(other) => bail!("--overflow must be block or reject, not {other:?}"),
    }
    if let Some(s) = args.stale_after_secs {
        builder = builder.stale_after(Duration::from_secs(s));
    }
    if let Some(p) = &args.offline_policy {
        let p: OfflinePolicy = p
            .parse()
            .map_err(|e| anyhow::anyhow!("--offline-policy: {e}"))?;
        builder = builder.default_offline_policy(p);
    }
    for mp in &args.meter_policies {
        let (m, p) = mp
            .split_once('=')
            .with_context(|| format!("--meter-policy {mp:?}: use METER=POLICY"))?;
        let m = MeterName::new(m).map_err(|e| anyhow::anyhow!("--meter-policy {mp:?}: {e}"))?;
        let p: OfflinePolicy = p
            .parse()
            .map_err(|e| anyhow::anyhow!("--meter-policy {mp:?}: {e}"))?;
        builder = builder.offline_policy(m, p);
    }
    if let Some(ms) = args.entitlements_wait_ms {
        builder = builder.entitlements_wait(Duration::from_millis(ms));
    }
    let ttl = Duration::from_secs(args.reservation_ttl_secs.unwrap_or(300));
    let agent = builder.start().await?;
    let http = args
        .http
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070)));
    if http_token.is_none() && !http.ip().is_loopback() {
        tracing::warn!(
            %http,
            "the sidecar listens beyond loopback with no HTTP token: anyone who reaches {http} \
             can record usage for any customer; set --http-token-file"
        );
    }
    let config = HttpConfig {
        token: http_token,
        max_body_bytes: args.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
    };
    serve(agent, http, config, ttl).await
}

/// A secret from its flag or variable, else from its file (trimmed). An empty one is refused:
/// an empty HTTP token would silently turn authentication off.
fn secret(what: &str, value: Option<String>, file: Option<PathBuf>) -> Result<Option<String>> {
    let value = match (value, file) {
        (Some(v), _) => v,
        (None, Some(p)) => std::fs::read_to_string(&p)
            .with_context(|| format!("reading the {what} from {}", p.display()))?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    if value.trim().is_empty() {
        bail!("the {what} is empty; leave it unset instead (an empty token is not a token)");
    }
    Ok(Some(value))
}

/// Serves the sidecar until Ctrl-C or SIGTERM, then shuts the agent down gracefully.
async fn serve(agent: Agent, addr: SocketAddr, config: HttpConfig, ttl: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, agent_id = %agent.agent_id(), "sidecar listening");
    let backend = AgentBackend::with_reservation_ttl(agent.clone(), ttl);
    let sweep = backend.sweeper();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            sweep();
        }
    });
    let app = router(backend, config);
    // Timeouts and a connection cap: idle or slow clients cannot take ingest offline.
    let limits = tally_http::HttpLimits::from_env().map_err(anyhow::Error::msg)?;
    tally_http::serve(listener, app, limits, shutdown_signal()).await?;
    sweeper.abort();
    tracing::info!("shutting down: sealing and shipping what is left");
    if let Err(e) = agent.shutdown(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "shutdown left batches on disk; they ship on the next start");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn status(dir: &Path, http: SocketAddr, token: Option<String>) -> Result<()> {
    // A running agent holds its store open; ask it over HTTP first.
    if let Ok(json) = http_get(http, "/v1/status", token.as_deref()).await {
        println!("{json}");
        return Ok(());
    }
    let store = open_store(dir)?;
    let unacked = store.unacked()?;
    let (log_rows, log_bytes) = store.log_size()?;
    let json = serde_json::json!({
        "running": false,
        "epoch": store.epoch(),
        "backlog_batches": unacked.len(),
        "backlog_bytes": unacked.iter().map(|b| b.bytes).sum::<u64>() + log_bytes,
        "durable_log_events": log_rows,
        "oldest_unacked_seq": unacked.first().map(|b| b.seq),
        "catalog_version": store.catalog()?.map(|c| c.version),
        "entitlements_version": store.entitlements()?.map(|e| e.version),
        "quarantined_batches": store.quarantined()?.len(),
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

async fn quarantine(dir: &Path, http: SocketAddr, token: Option<String>) -> Result<()> {
    if let Ok(json) = http_get(http, "/v1/quarantine", token.as_deref()).await {
        println!("{json}");
        return Ok(());
    }
    let q = open_store(dir)?.quarantined()?;
    let json = tally_sidecar::backend::quarantine_json(&q);
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}

/// The agent's store, for the commands that read it while the agent is not running.
fn open_store(dir: &Path) -> Result<tally_agent::store::Store> {
    tally_agent::store::Store::open(
        &dir.join("agent.redb"),
        tally_agent::config::DEFAULT_DEDUP_WINDOW,
    )
    .with_context(|| {
        format!(
            "opening the store in {} (is the agent running elsewhere?)",
            dir.display()
        )
    })
}

async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8(out)?;
    let (head, body) = text.split_once("\r\n\r\n").context("bad response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("sidecar answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
