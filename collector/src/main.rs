//! `tally-collector`: `init`, `run`, `ledger verify` and `dev`. Every flag is also a `TALLY_*`
//! environment variable or a key of the `--config` TOML file (see `tally_collector::config`).

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tally_collector::config::FileConfig;
use tally_collector::dev::DevOptions;
use tally_collector::export::{ExportJob, ExportOptions};
use tally_collector::forwarding::stripe::StripeSettings;
use tally_collector::store::Store;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::redb::RedbStore;
use tally_collector::{Collector, CollectorConfig, InitFiles};
use tally_forward::stripe::{Api, ApiKey, WebhookSecret};

/// Tally collector: verified, exactly-once ingest into a double-entry ledger.
#[derive(Parser)]
#[command(name = "tally-collector", version)]
struct Cli {
    /// A TOML file with defaults for the flags (keys: data_dir, quic, http, san, max_in_flight,
    /// max_handshakes_per_s, agent_http, ledger_url, ledger_listen_url, stripe_api_key_file,
    /// stripe_base_url,
    /// stripe_meter_events_url, stripe_api,
    /// stripe_version, stripe_webhook_secret_file, stripe_request_timeout, stripe_rate,
    /// stripe_reconcile_interval).
    #[arg(long, env = "TALLY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr: text (ANSI colours only when stderr is a terminal) or json (one
    /// object a line).
    #[arg(long, env = "TALLY_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the CA, the collector certificate and the tokens (never overwrites).
    Init(InitArgs),
    /// Run the collector.
    Run(RunArgs),
    /// Ledger tools.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Everything in one process: collector, sample catalog and an in-process agent.
    Dev(DevArgs),
    /// Exports a stopped collector's ledger to Parquet (or NDJSON) files, from the last
    /// checkpoint on; run it again to add what is new.
    Export(ExportCmdArgs),
    /// Enrolment tokens of a running collector, through its admin API (SPEC §6.7).
    EnrollToken {
        #[command(flatten)]
        api: AdminApiArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
}

/// Where the admin API is and how to authenticate to it.
#[derive(Args)]
struct AdminApiArgs {
    /// The admin API [default: http://127.0.0.1:7080].
    #[arg(long, env = "TALLY_ADMIN_URL", global = true)]
    admin_url: Option<String>,
    /// A file holding the admin token [default: DATA_DIR/admin-token, or ./tally-dev/admin-token].
    #[arg(long, env = "TALLY_ADMIN_TOKEN_FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// The data directory whose `admin-token` to use.
    #[arg(long, env = "TALLY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it as JSON; its secret (`token`) is shown only here.
    Create {
        /// Seconds until it stops enrolling [default: 86400; at most a year].
        #[arg(long)]
        expires_in: Option<u64>,
        /// How many agents it may enrol [default: 1].
        #[arg(long)]
        max_uses: Option<u32>,
        /// A label carried onto the agents it enrols, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Lists every token as JSON (never a secret).
    List,
    /// Revokes a token; the agents it enrolled keep working until revoked themselves.
    Revoke {
        /// The token's id (`et_…`).
        id: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// The admin token: `TALLY_ADMIN_TOKEN`, else the file given, else the data directory's.
fn admin_token(a: &AdminApiArgs, file: &FileConfig) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("TALLY_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(t);
    }
    let path = match (
        &a.admin_token_file,
        a.data_dir.as_ref().or(file.data_dir.as_ref()),
    ) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => d.join("admin-token"),
        (None, None) => PathBuf::from("tally-dev/admin-token"),
    };
    let t = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the admin token from {} (give --admin-token-file, --data-dir or TALLY_ADMIN_TOKEN)",
            path.display()
        )
    })?;
    anyhow::ensure!(!t.trim().is_empty(), "{} is empty", path.display());
    Ok(t)
}

async fn enroll_token(
    a: AdminApiArgs,
    command: TokenCommand,
    file: &FileConfig,
) -> anyhow::Result<ExitCode> {
    use tally_collector::admin_client::AdminClient;
    let url = a
        .admin_url
        .clone()
        .unwrap_or_else(|| String::from("http://127.0.0.1:7080"));
    let client = AdminClient::new(&url, &admin_token(&a, file)?)?;
    let answer = match command {
        TokenCommand::Create {
            expires_in,
            max_uses,
            labels,
        } => {
            let mut body = serde_json::json!({
                "labels": labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            });
            if let Some(s) = expires_in {
                body["expires_in_s"] = s.into();
            }
            if let Some(n) = max_uses {
                body["max_uses"] = n.into();
            }
            client
                .call(reqwest::Method::POST, "/v1/enroll-tokens", Some(&body))
                .await?
        }
        TokenCommand::List => {
            client
                .call(reqwest::Method::GET, "/v1/enroll-tokens", None)
                .await?
        }
        TokenCommand::Revoke { id } => {
            client
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/enroll-tokens/{id}"),
                    None,
                )
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct ExportArgs {
    /// Export the ledger continuously into this directory.
    #[arg(long, env = "TALLY_EXPORT_DIR")]
    export_dir: Option<PathBuf>,
    /// Seconds between export runs (default 60; fractions allowed).
    #[arg(long, env = "TALLY_EXPORT_INTERVAL")]
    export_interval: Option<f64>,
    /// parquet (default) or ndjson.
    #[arg(long, env = "TALLY_EXPORT_FORMAT")]
    export_format: Option<String>,
    /// Ledger positions per file at most (default and maximum 100000).
    #[arg(long, env = "TALLY_EXPORT_MAX_ROWS_PER_FILE")]
    export_max_rows_per_file: Option<u64>,
}

impl ExportArgs {
    fn job(self) -> anyhow::Result<Option<ExportJob>> {
        let Some(dir) = self.export_dir else {
            return Ok(None);
        };
        let mut options = ExportOptions::new(dir);
        if let Some(f) = self.export_format {
            options.format = f.parse().map_err(anyhow::Error::msg)?;
        }
        if let Some(n) = self.export_max_rows_per_file {
            options.max_rows_per_file = n;
        }
        let secs = self.export_interval.unwrap_or(60.0);
        anyhow::ensure!(
            secs.is_finite() && (0.01..=86_400.0).contains(&secs),
            "--export-interval must be 0.01 to 86400 seconds"
        );
        Ok(Some(ExportJob {
            options,
            interval: std::time::Duration::from_secs_f64(secs),
        }))
    }
}

#[derive(Args)]
struct ExportCmdArgs {
    #[command(flatten)]
    dir: DataDirArg,
    #[command(flatten)]
    ledger: LedgerUrlArg,
    /// The export directory.
    #[arg(long)]
    to: PathBuf,
    /// parquet (default) or ndjson.
    #[arg(long, default_value = "parquet")]
    format: String,
    /// Ledger positions per file at most.
    #[arg(long, default_value_t = tally_collector::export::core::MAX_ROWS_PER_FILE)]
    max_rows_per_file: u64,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check every ledger invariant; exit 1 on any violation (redb: the collector must be
    /// stopped; PostgreSQL: reads one snapshot while collectors run).
    Verify(VerifyArgs),
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    dir: DataDirArg,
    #[command(flatten)]
    ledger: LedgerUrlArg,
}

/// Where the ledger lives: the data directory's redb file, or PostgreSQL.
#[derive(Args)]
struct LedgerUrlArg {
    /// Keep the ledger in PostgreSQL (`postgres://user@host:port/db`) instead of the data
    /// directory's redb file; any number of collectors may share one database.
    #[arg(long, env = "TALLY_LEDGER_URL", hide_env_values = true)]
    ledger_url: Option<String>,
}

impl LedgerUrlArg {
    fn url(self, file: &FileConfig) -> Option<String> {
        self.ledger_url.or_else(|| file.ledger_url.clone())
    }
}

#[derive(Args)]
struct DataDirArg {
    /// The data directory.
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Extra subject alternative names for the collector certificate (repeatable).
    #[arg(long = "san", env = "TALLY_SAN", value_delimiter = ',')]
    san: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    dir: DataDirArg,
    #[command(flatten)]
    ledger: LedgerUrlArg,
    /// With --ledger-url behind a transaction-mode pooler (pgBouncer), where LISTEN does not
    /// work: a direct postgres:// URL to LISTEN on, or `poll` to poll the change log every
    /// 250 ms [default: LISTEN on the ledger URL].
    #[arg(long, env = "TALLY_LEDGER_LISTEN_URL", hide_env_values = true)]
    ledger_listen_url: Option<String>,
    /// QUIC listen address [default: 127.0.0.1:7443].
    #[arg(long, env = "TALLY_QUIC")]
    quic: Option<SocketAddr>,
    /// Admin API listen address [default: 127.0.0.1:7080].
    #[arg(long, env = "TALLY_HTTP")]
    http: Option<SocketAddr>,
    /// Unacknowledged batches an agent may have in flight [default: 32].
    #[arg(long, env = "TALLY_MAX_IN_FLIGHT")]
    max_in_flight: Option<u32>,
    /// New agent connections accepted per second, and in a burst; more are refused before any
    /// TLS work and the agents retry with backoff [default: 1000].
    #[arg(long, env = "TALLY_MAX_HANDSHAKES_PER_S")]
    max_handshakes_per_s: Option<u32>,
    #[command(flatten)]
    stripe: StripeArgs,
    #[command(flatten)]
    export: ExportArgs,
}

/// Stripe forwarding. The API key comes from `STRIPE_API_KEY` or `--stripe-api-key-file`;
/// without one, usage is only logged (what would be sent). The key is never logged.
#[derive(Args)]
struct StripeArgs {
    /// A file holding the Stripe secret key (used when STRIPE_API_KEY is unset).
    #[arg(long, env = "TALLY_STRIPE_API_KEY_FILE")]
    stripe_api_key_file: Option<PathBuf>,
    /// Stripe (or Stripe-compatible) base URL [default: https://api.stripe.com].
    #[arg(long, env = "TALLY_STRIPE_BASE_URL")]
    stripe_base_url: Option<String>,
    /// v2 meter event stream host [default: https://meter-events.stripe.com, or the base URL
    /// when only --stripe-base-url is given].
    #[arg(long, env = "TALLY_STRIPE_METER_EVENTS_URL")]
    stripe_meter_events_url: Option<String>,
    /// Meter events API: v1 (one request per event) or v2 (sessions and streams) [default: v1].
    #[arg(long, env = "TALLY_STRIPE_API")]
    stripe_api: Option<String>,
    /// Pinned Stripe-Version header [default: the version tally_forward was written against].
    #[arg(long, env = "TALLY_STRIPE_VERSION")]
    stripe_version: Option<String>,
    /// Webhook signing secret (whsec_…) for POST /v1/stripe/webhooks.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    stripe_webhook_secret: Option<String>,
    /// A file holding the webhook signing secret.
    #[arg(long, env = "TALLY_STRIPE_WEBHOOK_SECRET_FILE")]
    stripe_webhook_secret_file: Option<PathBuf>,
    /// Per-request timeout in seconds, also the lease on an event in flight [default: 30].
    #[arg(long, env = "TALLY_STRIPE_REQUEST_TIMEOUT")]
    stripe_request_timeout: Option<u64>,
    /// Requests per second to Stripe [default: 20 for test keys, 900 for live keys].
    #[arg(long, env = "TALLY_STRIPE_RATE")]
    stripe_rate: Option<u32>,
    /// Seconds between reconciliation runs; 0 turns the job off [default: 600].
    #[arg(long, env = "TALLY_STRIPE_RECONCILE_INTERVAL")]
    stripe_reconcile_interval: Option<u64>,
    /// A file holding the Orb API key (used when ORB_API_KEY is unset); Orb is off without one.
    #[arg(long, env = "TALLY_ORB_API_KEY_FILE")]
    orb_api_key_file: Option<PathBuf>,
    /// Orb base URL [default: https://api.withorb.com].
    #[arg(long, env = "TALLY_ORB_BASE_URL")]
    orb_base_url: Option<String>,
    /// A file holding the Metronome API token (used when METRONOME_API_KEY is unset);
    /// Metronome is off without one.
    #[arg(long, env = "TALLY_METRONOME_API_KEY_FILE")]
    metronome_api_key_file: Option<PathBuf>,
    /// Metronome base URL [default: https://api.metronome.com].
    #[arg(long, env = "TALLY_METRONOME_BASE_URL")]
    metronome_base_url: Option<String>,
    /// Orb and Metronome per-request timeout in seconds, also the lease on an event in flight;
    /// with `--ledger-url`, a destination's claim lasts this plus 5 s [default: 30].
    #[arg(long, env = "TALLY_FORWARD_REQUEST_TIMEOUT")]
    forward_request_timeout: Option<u64>,
}

impl StripeArgs {
    /// Orb and Metronome (SPEC §6.4b): each on when its key is set.
    fn forward(
        &self,
        file: &FileConfig,
    ) -> anyhow::Result<tally_collector::forwarding::ledger_feed::ForwardSettings> {
        let mut out = forward_settings(
            self.orb_api_key_file.clone(),
            self.orb_base_url.clone(),
            self.metronome_api_key_file.clone(),
            self.metronome_base_url.clone(),
            file,
        )?;
        if let Some(t) = self.forward_request_timeout {
            for c in [&mut out.orb, &mut out.metronome].into_iter().flatten() {
                c.request_timeout = std::time::Duration::from_secs(t.max(1));
            }
        }
        Ok(out)
    }

    fn settings(self, file: &FileConfig) -> anyhow::Result<StripeSettings> {
        let key_file = self
            .stripe_api_key_file
            .or_else(|| file.stripe_api_key_file.clone());
        let api_key = ApiKey::from_env_or_file(key_file.as_deref())
            .context("cannot read the Stripe API key file")?;
        let api: Api = match self.stripe_api.or_else(|| file.stripe_api.clone()) {
            Some(a) => a.parse().map_err(anyhow::Error::msg)?,
            None => Api::V1,
        };
        let secret = match self.stripe_webhook_secret {
            Some(s) if !s.trim().is_empty() => Some(WebhookSecret::new(s)),
            _ => match self
                .stripe_webhook_secret_file
                .or_else(|| file.stripe_webhook_secret_file.clone())
            {
                Some(p) => {
                    let s = std::fs::read_to_string(&p).with_context(|| {
                        format!("cannot read the webhook secret file {}", p.display())
                    })?;
                    Some(WebhookSecret::new(s))
                }
                None => None,
            },
        };
        let mut st = StripeSettings::from_parts(
            api,
            api_key,
            self.stripe_base_url
                .or_else(|| file.stripe_base_url.clone()),
            self.stripe_meter_events_url
                .or_else(|| file.stripe_meter_events_url.clone()),
            self.stripe_version.or_else(|| file.stripe_version.clone()),
            secret,
        );
        if let Some(t) = self.stripe_request_timeout.or(file.stripe_request_timeout) {
            st.forwarder.request_timeout = std::time::Duration::from_secs(t.max(1));
        }
        if let Some(r) = self.stripe_rate.or(file.stripe_rate) {
            st.forwarder.rate_per_s = Some(r.max(1));
        }
        if let Some(i) = self
            .stripe_reconcile_interval
            .or(file.stripe_reconcile_interval)
        {
            st.reconcile_interval = (i > 0).then(|| std::time::Duration::from_secs(i));
        }
        Ok(st)
    }
}

/// Orb and Metronome (SPEC §6.4b): each on when its key is set (environment or file).
fn forward_settings(
    orb_key_file: Option<PathBuf>,
    orb_base_url: Option<String>,
    metronome_key_file: Option<PathBuf>,
    metronome_base_url: Option<String>,
    file: &FileConfig,
) -> anyhow::Result<tally_collector::forwarding::ledger_feed::ForwardSettings> {
    use tally_collector::forwarding::ledger_feed::key_from_env_or_file;
    use tally_forward::ledger_feed::{DestinationConfig, Engine, Routes};
    let mut out = tally_collector::forwarding::ledger_feed::ForwardSettings::default();
    let orb_file = orb_key_file.or_else(|| file.orb_api_key_file.clone());
    if let Some(key) = key_from_env_or_file("ORB_API_KEY", orb_file.as_deref())
        .context("cannot read the Orb API key file")?
    {
        let mut c = DestinationConfig::new(
            Engine::Orb,
            key,
            orb_base_url.or_else(|| file.orb_base_url.clone()),
        );
        if let Some(h) = file.orb_grace_hours {
            c.window = std::time::Duration::from_secs(h.max(1) * 3600);
        }
        c.routes = Routes {
            meters: file.orb_meters.clone(),
            customers: file.orb_customers.clone().unwrap_or_default(),
        };
        out.orb = Some(c);
    }
    let met_file = metronome_key_file.or_else(|| file.metronome_api_key_file.clone());
    if let Some(key) = key_from_env_or_file("METRONOME_API_KEY", met_file.as_deref())
        .context("cannot read the Metronome API key file")?
    {
        let mut c = DestinationConfig::new(
            Engine::Metronome,
            key,
            metronome_base_url.or_else(|| file.metronome_base_url.clone()),
        );
        c.routes = Routes {
            meters: file.metronome_meters.clone(),
            customers: file.metronome_customers.clone().unwrap_or_default(),
        };
        out.metronome = Some(c);
    }
    Ok(out)
}

#[derive(Args)]
struct DevArgs {
    /// The data directory [default: ./tally-dev].
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC listen address [default: 127.0.0.1:7443].
    #[arg(long, env = "TALLY_QUIC")]
    quic: Option<SocketAddr>,
    /// Admin API listen address [default: 127.0.0.1:7080].
    #[arg(long, env = "TALLY_HTTP")]
    http: Option<SocketAddr>,
    /// The sidecar's HTTP address [default: 127.0.0.1:7070].
    #[arg(long, env = "TALLY_AGENT_HTTP")]
    agent_http: Option<SocketAddr>,
    #[command(flatten)]
    stripe: StripeArgs,
    #[command(flatten)]
    export: ExportArgs,
}

fn data_dir(flag: Option<PathBuf>, file: &FileConfig) -> anyhow::Result<PathBuf> {
    flag.or_else(|| file.data_dir.clone())
        .context("--data-dir (or TALLY_DATA_DIR, or data_dir in the config file) is required")
}

/// Opens a stopped collector's store for an offline command; `online` names what to use while
/// it runs (redb allows one process at a time).
fn open_stopped(dir: PathBuf, online: &str) -> anyhow::Result<RedbStore> {
    let files = InitFiles::at(&dir);
    anyhow::ensure!(
        files.store.exists(),
        "no store at {}",
        files.store.display()
    );
    RedbStore::open(&files.store)
        .with_context(|| format!("cannot open the store (is the collector running? use {online})"))
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// Logs to stderr at `RUST_LOG` (default `info`); colours only on a terminal, so files and
/// pipes get plain text.
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = FileConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Init(a) => {
            let dir = data_dir(a.dir.data_dir, &file)?;
            let mut sans = a.san;
            if sans.is_empty() {
                sans = file.san.clone().unwrap_or_default();
            }
            let f = tally_collector::init(&dir, &sans)?;
            println!("initialised {}", f.data_dir.display());
            for p in [&f.ca_pem, &f.collector_pem, &f.admin_token, &f.enroll_token] {
                println!("  {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => {
            let dir = data_dir(a.dir.data_dir, &file)?;
            let mut config = CollectorConfig::new(&dir);
            config.ledger_url = a.ledger.url(&file);
            config.ledger_listen_url = a.ledger_listen_url.or(file.ledger_listen_url.clone());
            if let Some(q) = a.quic.or(file.quic) {
                config.quic_addr = q;
            }
            if let Some(h) = a.http.or(file.http) {
                config.http_addr = h;
            }
            if let Some(n) = a.max_in_flight.or(file.max_in_flight) {
                config.max_in_flight = n.max(1);
            }
            if let Some(n) = a.max_handshakes_per_s.or(file.max_handshakes_per_s) {
                config.max_handshakes_per_s = n.max(1);
            }
            config.forward = a.stripe.forward(&file)?;
            config.stripe = a.stripe.settings(&file)?;
            config.export = a.export.job()?;
            let handle = Collector::start(config).await?;
            println!(
                "collector: quic {} admin http://{} (token in {})",
                handle.quic_addr(),
                handle.http_addr(),
                handle.files().admin_token.display()
            );
            stop_signal().await;
            handle.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger {
            command: LedgerCommand::Verify(a),
        } => {
            let store: Box<dyn Store> = match a.ledger.url(&file) {
                Some(url) => {
                    Box::new(PgStore::open(&url).context("cannot open the PostgreSQL ledger")?)
                }
                None => Box::new(open_stopped(
                    data_dir(a.dir.data_dir, &file)?,
                    "GET /v1/ledger/verify",
                )?),
            };
            let report = store.verify()?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::EnrollToken { api, command } => enroll_token(api, command, &file).await,
        Command::Export(a) => {
            // On PostgreSQL the collectors may be running: the export takes the same claim as
            // their export jobs (decision 0098), so one exporter writes a directory at a time.
            let store: Box<dyn Store> = match a.ledger.url(&file) {
                Some(url) => {
                    Box::new(PgStore::open(&url).context("cannot open the PostgreSQL ledger")?)
                }
                None => Box::new(open_stopped(
                    data_dir(a.dir.data_dir, &file)?,
                    "--export-dir or POST /v1/export",
                )?),
            };
            let mut options = ExportOptions::new(a.to);
            options.format = a.format.parse().map_err(anyhow::Error::msg)?;
            options.max_rows_per_file = a.max_rows_per_file;
            let holder = tally_collector::export::claim_holder("export-command");
            let r = tally_collector::export::export_claimed(store.as_ref(), &options, &holder)?;
            if r.held_by_other {
                anyhow::bail!(
                    "another exporter holds {} now; try again once it is done",
                    options.dir.display()
                );
            }
            println!(
                "exported {} ledger positions in {} files ({} bytes); checkpoint {}",
                r.rows, r.files, r.bytes, r.last_position
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(a) => {
            let d = DevOptions::default();
            let forward = a.stripe.forward(&file)?;
            let stripe = a.stripe.settings(&file)?;
            let opts = DevOptions {
                stripe,
                forward,
                data_dir: a.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
                quic: a.quic.or(file.quic).unwrap_or(d.quic),
                http: a.http.or(file.http).unwrap_or(d.http),
                agent_http: a.agent_http.or(file.agent_http).unwrap_or(d.agent_http),
                agent: true,
                export: a.export.job()?,
            };
            tally_collector::dev::run(opts, stop_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
