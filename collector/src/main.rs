//! `tally-collector`: `init`, `run`, `ledger verify` and `dev`. Every flag is also a `TALLY_*`
//! environment variable or a key of the `--config` TOML file (see `tally_collector::config`).

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tally_collector::config::FileConfig;
use tally_collector::dev::DevOptions;
use tally_collector::redb_store::RedbStore;
use tally_collector::store::Store;
use tally_collector::{Collector, CollectorConfig, InitFiles};

/// Tally collector: verified, exactly-once ingest into a double-entry ledger.
#[derive(Parser)]
#[command(name = "tally-collector", version)]
struct Cli {
    /// A TOML file with defaults for the flags (keys: data_dir, quic, http, san, max_in_flight,
    /// agent_http).
    #[arg(long, env = "TALLY_CONFIG", global = true)]
    config: Option<PathBuf>,
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
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Check every ledger invariant; exit 1 on any violation (the collector must be stopped).
    Verify(DataDirArg),
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
    /// QUIC listen address [default: 127.0.0.1:7443].
    #[arg(long, env = "TALLY_QUIC")]
    quic: Option<SocketAddr>,
    /// Admin API listen address [default: 127.0.0.1:7080].
    #[arg(long, env = "TALLY_HTTP")]
    http: Option<SocketAddr>,
    /// Unacknowledged batches an agent may have in flight [default: 32].
    #[arg(long, env = "TALLY_MAX_IN_FLIGHT")]
    max_in_flight: Option<u32>,
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
    /// The sidecar's HTTP address [default: 127.0.0.1:7070] (not yet served).
    #[arg(long, env = "TALLY_AGENT_HTTP")]
    agent_http: Option<SocketAddr>,
    /// Stripe-compatible base URL (Stripe forwarding is not yet served).
    #[arg(long, env = "TALLY_STRIPE_BASE_URL")]
    stripe_base_url: Option<String>,
}

fn data_dir(flag: Option<PathBuf>, file: &FileConfig) -> anyhow::Result<PathBuf> {
    flag.or_else(|| file.data_dir.clone())
        .context("--data-dir (or TALLY_DATA_DIR, or data_dir in the config file) is required")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
            if let Some(q) = a.quic.or(file.quic) {
                config.quic_addr = q;
            }
            if let Some(h) = a.http.or(file.http) {
                config.http_addr = h;
            }
            if let Some(n) = a.max_in_flight.or(file.max_in_flight) {
                config.max_in_flight = n.max(1);
            }
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
            let dir = data_dir(a.data_dir, &file)?;
            let files = InitFiles::at(&dir);
            anyhow::ensure!(
                files.store.exists(),
                "no store at {}",
                files.store.display()
            );
            let store = RedbStore::open(&files.store).context(
                "cannot open the store (is the collector running? use GET /v1/ledger/verify)",
            )?;
            let report = store.verify()?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Dev(a) => {
            let d = DevOptions::default();
            if a.stripe_base_url.is_some() {
                println!("note: Stripe forwarding is not yet served; --stripe-base-url is ignored");
            }
            let opts = DevOptions {
                data_dir: a.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
                quic: a.quic.or(file.quic).unwrap_or(d.quic),
                http: a.http.or(file.http).unwrap_or(d.http),
                agent_http: a.agent_http.or(file.agent_http).unwrap_or(d.agent_http),
                agent: true,
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
