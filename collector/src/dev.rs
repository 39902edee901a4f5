//! `tally-collector dev` (SPEC §8): a whole local deployment in one process — the collector with
//! its embedded store, the sample catalog, and an in-process agent connected over real QUIC.
//!
//! Owns [`DevOptions`] and [`run`]. Guarantees: the data directory is initialised on first start
//! and reused after; sample meters are added only when missing (a meter changed through the API
//! is never reset); on shutdown the agent seals and ships first, then the collector commits
//! what it received, then `run` returns.

use crate::catalog::sample_meters;
use crate::server::{Collector, CollectorConfig, CollectorHandle};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the dev deployment did not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The data directory could not be initialised.
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    /// The collector did not start.
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    /// The catalog could not be seeded.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The in-process agent did not start.
    #[error("agent: {0}")]
    Agent(String),
    /// A task failed.
    #[error("task: {0}")]
    Task(String),
}

/// Options of the dev command.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The data directory (default `./tally-dev`).
    pub data_dir: PathBuf,
    /// QUIC listen address.
    pub quic: SocketAddr,
    /// Admin API listen address.
    pub http: SocketAddr,
    /// The sidecar's HTTP address (not yet served).
    pub agent_http: SocketAddr,
    /// Whether to start the in-process agent.
    pub agent: bool,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            data_dir: PathBuf::from("./tally-dev"),
            quic: SocketAddr::from(([127, 0, 0, 1], 7443)),
            http: SocketAddr::from(([127, 0, 0, 1], 7080)),
            agent_http: SocketAddr::from(([127, 0, 0, 1], 7070)),
            agent: true,
        }
    }
}

/// A running dev deployment.
pub struct Dev {
    /// The collector.
    pub collector: CollectorHandle,
    /// The in-process agent, if it started.
    pub agent: Option<tally_agent::Agent>,
}

/// Starts the deployment and prints how to use it.
pub async fn start(opts: &DevOptions) -> Result<Dev, DevError> {
    let files = crate::init::init(&opts.data_dir, &[])?;
    let mut config = CollectorConfig::new(&opts.data_dir);
    config.quic_addr = opts.quic;
    config.http_addr = opts.http;
    let collector = Collector::start(config).await?;
    let shared = collector.shared().clone();
    tokio::task::spawn_blocking(move || -> Result<(), DevError> {
        let catalog = shared.store.catalog()?;
        let sample = sample_meters().map_err(|e| DevError::Task(e.to_string()))?;
        for def in sample {
            if catalog.meter(def.name.as_str()).is_none() {
                shared.put_meter(&def)?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| DevError::Task(e.to_string()))??;
    let agent = if opts.agent {
        match start_dev_agent(&collector, &opts.data_dir.join("agent")).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::error!(error = %e, "the in-process agent did not start");
                None
            }
        }
    } else {
        None
    };
    print_banner(&files.admin_token, &collector, opts, agent.is_some());
    Ok(Dev { collector, agent })
}

// ---------------------------------------------------------------------------------------------
// The in-process agent: starting and stopping it is these two functions.

/// Starts the dev deployment's agent (`tally-agent` library) with its data in `dir`, connected
/// over real QUIC to `collector`, enrolled with the collector's enrolment token.
pub async fn start_dev_agent(
    collector: &CollectorHandle,
    dir: &Path,
) -> Result<tally_agent::Agent, DevError> {
    let ca =
        std::fs::read(&collector.files().ca_pem).map_err(|e| DevError::Agent(e.to_string()))?;
    let agent = tally_agent::Agent::builder()
        .data_dir(dir)
        .collector(collector.quic_addr().to_string())
        .ca_pem(ca)
        .enroll_token(collector.enroll_token())
        .flush_interval(Duration::from_millis(250))
        .start()
        .await
        .map_err(|e| DevError::Agent(e.to_string()))?;
    Ok(agent)
}

/// Stops the dev agent: seals what it holds and ships it, for at most `timeout`; what is not
/// acknowledged stays in its store for the next start.
pub async fn stop_dev_agent(agent: tally_agent::Agent, timeout: Duration) {
    if let Err(e) = agent.shutdown(timeout).await {
        tracing::warn!(error = %e, "the dev agent left batches unacknowledged on its disk");
    }
}

// ---------------------------------------------------------------------------------------------

impl Dev {
    /// Graceful shutdown: the agent seals and ships, then the collector commits and stops.
    pub async fn shutdown(self) {
        if let Some(agent) = self.agent {
            stop_dev_agent(agent, Duration::from_secs(5)).await;
        }
        self.collector.shutdown().await;
    }
}

/// Runs until `stop` resolves, then shuts down gracefully.
pub async fn run(opts: DevOptions, stop: impl Future<Output = ()>) -> Result<(), DevError> {
    let dev = start(&opts).await?;
    stop.await;
    println!("shutting down: the agent ships what it holds, the collector commits, then exit");
    dev.shutdown().await;
    Ok(())
}

fn print_banner(token_path: &Path, c: &CollectorHandle, opts: &DevOptions, agent: bool) {
    let token = token_path.display();
    let http = c.http_addr();
    let auth = format!("-H \"Authorization: Bearer $(cat {token})\"");
    println!("tally dev is running");
    println!("  collector QUIC   {}", c.quic_addr());
    println!("  admin API        http://{http}");
    println!("  admin token      {token}");
    println!("  data             {}", opts.data_dir.display());
    if agent {
        println!(
            "  agent            in-process, data in {}, connected over QUIC",
            opts.data_dir.join("agent").display()
        );
    } else {
        println!("  agent            NOT RUNNING (see the log above)");
    }
    println!(
        "  sidecar HTTP     {} is not yet served (the sidecar's endpoints are a later issue)",
        opts.agent_http
    );
    println!("  stripe           forwarding is not yet served (a later issue)");
    println!();
    println!("try:");
    println!("  curl -s {auth} http://{http}/v1/meters");
    println!("  curl -s {auth} 'http://{http}/v1/usage?customer=acme&meter=api_calls'");
    println!("  curl -s {auth} http://{http}/v1/agents");
    println!("  curl -s {auth} http://{http}/v1/ledger/verify");
    println!(
        "  curl -s {auth} -X POST http://{http}/v1/adjustments -d '{{\"customer\":\"acme\",\"meter\":\"api_calls\",\"quantity\":\"10\",\"reason\":\"welcome credit\",\"idempotency_key\":\"demo-1\"}}'"
    );
    println!("  curl -s {auth} http://{http}/metrics");
    println!();
    println!("Ctrl-C stops it gracefully.");
}
