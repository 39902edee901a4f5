//! `tally-collector dev` (SPEC §8): a whole local deployment in one process — the collector with
//! its embedded store, the sample catalog, and an in-process agent connected over real QUIC whose
//! sidecar endpoints (OpenMeter and Stripe compatible, SPEC §4) listen on `--agent-http`.
//!
//! Owns [`DevOptions`] and [`run`]. Guarantees: the data directory is initialised on first start
//! and reused after; sample meters are added only when missing (a meter changed through the API
//! is never reset); on shutdown the agent seals and ships first, then the collector commits
//! what it received, then `run` returns.

use crate::catalog::sample_meters;
use crate::config::CollectorConfig;
use crate::start::{Collector, CollectorHandle};
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
    Start(#[from] crate::start::StartError),
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
    /// The sidecar's HTTP address.
    pub agent_http: SocketAddr,
    /// Whether to start the in-process agent.
    pub agent: bool,
    /// Stripe forwarding (log-only without an API key).
    pub stripe: crate::forwarding::stripe::StripeSettings,
    /// The continuous analytics export (`--export-dir`), off by default.
    pub export: Option<crate::export::ExportJob>,
    /// Orb and Metronome forwarding (each on when its key is set: `ORB_API_KEY`,
    /// `METRONOME_API_KEY` or the `--*-api-key-file` flags), off by default.
    pub forward: crate::forwarding::ledger_feed::ForwardSettings,
}

impl DevOptions {
    /// Everything on `127.0.0.1` port 0 with its data in `data_dir`: for tests and for running
    /// several deployments side by side.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        DevOptions {
            data_dir: data_dir.into(),
            quic: any,
            http: any,
            agent_http: any,
            ..DevOptions::default()
        }
    }
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            data_dir: PathBuf::from("./tally-dev"),
            quic: SocketAddr::from(([127, 0, 0, 1], 7443)),
            http: SocketAddr::from(([127, 0, 0, 1], 7080)),
            agent_http: SocketAddr::from(([127, 0, 0, 1], 7070)),
            agent: true,
            stripe: crate::forwarding::stripe::StripeSettings::default(),
            export: None,
            forward: crate::forwarding::ledger_feed::ForwardSettings::default(),
        }
    }
}

/// A running dev deployment.
pub struct Dev {
    /// The collector.
    pub collector: CollectorHandle,
    /// The in-process agent, if it started.
    pub agent: Option<tally_agent::Agent>,
    sidecar: Option<Sidecar>,
}

/// The dev agent's sidecar HTTP server.
struct Sidecar {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves the sidecar endpoints of `agent` on `addr` until stopped.
async fn serve_sidecar(agent: &tally_agent::Agent, addr: SocketAddr) -> Result<Sidecar, DevError> {
    use tally_sidecar::{backend::AgentBackend, http};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| DevError::Agent(format!("sidecar cannot listen on {addr}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| DevError::Agent(e.to_string()))?;
    let app = http::router(
        AgentBackend::new(agent.clone()),
        http::HttpConfig::default(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let graceful = async move {
            let _ = stopped.await;
        };
        let limits = tally_http::HttpLimits::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "using the default HTTP limits");
            tally_http::HttpLimits::default()
        });
        if let Err(e) = tally_http::serve(listener, app, limits, graceful).await {
            tracing::error!(error = %e, "sidecar HTTP server failed");
        }
    });
    Ok(Sidecar { addr, stop, task })
}

/// Starts the deployment and prints how to use it.
pub async fn start(opts: &DevOptions) -> Result<Dev, DevError> {
    let files = crate::init::init(&opts.data_dir, &[])?;
    let mut config = CollectorConfig::new(&opts.data_dir);
    config.quic_addr = opts.quic;
    config.http_addr = opts.http;
    config.stripe = opts.stripe.clone();
    config.export = opts.export.clone();
    config.forward = opts.forward.clone();
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
    let sidecar = match &agent {
        Some(a) => match serve_sidecar(a, opts.agent_http).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "the sidecar endpoints are not served");
                None
            }
        },
        None => None,
    };
    print_banner(
        &files.admin_token,
        &collector,
        opts,
        agent.is_some(),
        sidecar.as_ref().map(|s| s.addr),
    );
    Ok(Dev {
        collector,
        agent,
        sidecar,
    })
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
    /// Where the sidecar endpoints listen, if they are served.
    pub fn sidecar_addr(&self) -> Option<SocketAddr> {
        self.sidecar.as_ref().map(|s| s.addr)
    }

    /// Graceful shutdown: the sidecar stops taking requests and finishes those in flight, the
    /// agent seals and ships, then the collector commits and stops.
    pub async fn shutdown(self) {
        if let Some(s) = self.sidecar {
            let _ = s.stop.send(());
            let _ = s.task.await;
        }
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

fn print_banner(
    token_path: &Path,
    c: &CollectorHandle,
    opts: &DevOptions,
    agent: bool,
    sidecar: Option<SocketAddr>,
) {
    let token = token_path.display();
    let http = c.http_addr();
    let auth = format!("-H \"Authorization: Bearer $(cat {token})\"");
    println!("tally dev is running");
    println!("  collector QUIC   {}", c.quic_addr());
    println!("  admin API        http://{http}");
    println!("  console          http://{http}/console/ (sign in with the admin token)");
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
    let f = &opts.stripe.forwarder;
    match &f.api_key {
        Some(k) => println!(
            "  stripe           forwarding meter events ({:?}, {} key) to {}",
            f.api,
            k.mode(),
            f.base_url
        ),
        None => println!(
            "  stripe           log-only: set STRIPE_API_KEY to forward (target {})",
            f.base_url
        ),
    }
    for (name, d, var) in [
        ("orb", &opts.forward.orb, "ORB_API_KEY"),
        ("metronome", &opts.forward.metronome, "METRONOME_API_KEY"),
    ] {
        match d {
            Some(c) => println!("  {name:<16} forwarding decimal usage to {}", c.base_url),
            None => println!("  {name:<16} off: set {var} to forward"),
        }
    }
    match sidecar {
        Some(a) => println!("  sidecar HTTP     http://{a} (OpenMeter and Stripe compatible)"),
        None => println!(
            "  sidecar HTTP     NOT SERVED on {} (see the log above)",
            opts.agent_http
        ),
    }
    println!();
    if let Some(a) = sidecar {
        println!("send usage through the sidecar (a 2xx means it is on the agent's disk):");
        println!(
            "  curl -s -X POST http://{a}/api/v1/events -H 'Content-Type: application/cloudevents+json' -d '{{\"specversion\":\"1.0\",\"type\":\"api_call\",\"id\":\"evt-1\",\"source\":\"quickstart\",\"subject\":\"acme\",\"data\":{{\"count\":3}}}}'"
        );
        println!(
            "  curl -s -X POST http://{a}/v1/billing/meter_events -d event_name=tokens -d identifier=req-1 -d 'payload[stripe_customer_id]=acme' -d 'payload[value]=1500' -d 'payload[model]=gpt-4o'"
        );
        println!("  curl -s -X POST http://{a}/v1/flush");
        println!();
    }
    println!("read it back, and more:");
    println!("  curl -s {auth} http://{http}/v1/meters");
    println!("  curl -s {auth} 'http://{http}/v1/usage?customer=acme&meter=api_calls'");
    println!("  curl -s {auth} 'http://{http}/v1/usage?customer=acme&meter=tokens'");
    println!("  curl -s {auth} http://{http}/v1/agents");
    println!("  curl -s {auth} http://{http}/v1/ledger/verify");
    println!(
        "  curl -s {auth} -X POST http://{http}/v1/adjustments -d '{{\"customer\":\"acme\",\"meter\":\"api_calls\",\"quantity\":\"10\",\"reason\":\"welcome credit\",\"idempotency_key\":\"demo-1\"}}'"
    );
    println!(
        "  curl -s {auth} -X PUT http://{http}/v1/customers/acme -d '{{\"stripe_customer_id\":\"cus_123\"}}'"
    );
    println!("  curl -s {auth} 'http://{http}/v1/stripe/outbox?state=pending'");
    for d in opts.forward.orb.iter().chain(opts.forward.metronome.iter()) {
        println!(
            "  curl -s {auth} 'http://{http}/v1/outbox?destination={}&state=sent'",
            d.destination.as_str()
        );
    }
    println!("  curl -s {auth} http://{http}/metrics");
    println!();
    println!("Ctrl-C stops it gracefully.");
}
