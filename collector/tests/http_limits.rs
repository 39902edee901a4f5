//! 10,000 idle connections against `tally-collector dev` — first its sidecar, then its admin
//! API — leave both serving everyone else, and the server closes them at the header-read
//! timeout, giving their file descriptors back.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::Proc;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IDLE: usize = 10_000;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Opens `IDLE` connections that send nothing, many handshakes in flight at once.
async fn open_idle(target: SocketAddr) -> Vec<tokio::net::TcpStream> {
    let mut set: tokio::task::JoinSet<std::io::Result<tokio::net::TcpStream>> =
        tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        if set.len() >= 512
            && let Some(r) = set.join_next().await
        {
            out.push(r.unwrap().unwrap());
        }
        set.spawn(tokio::net::TcpStream::connect(target));
    }
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap().unwrap());
    }
    out
}

async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_neither_take_the_servers_offline_nor_stay() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("skipped: needs /proc to count file descriptors");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (quic, http, agent_http) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .arg("dev")
        .arg("--data-dir")
        .arg(dir.path().join("tally-dev"))
        .args(["--quic", &quic.to_string(), "--http", &http.to_string()])
        .args(["--agent-http", &agent_http.to_string()])
        .env("TALLY_HTTP_HEADER_TIMEOUT_MS", "8000")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _proc = Proc(child);
    for addr in [http, agent_http] {
        wait_until("started", async || {
            tokio::net::TcpStream::connect(addr).await.is_ok()
                && common::http(addr, "GET", "/healthz", None, None).await.0 == 200
        })
        .await;
    }
    let token = std::fs::read_to_string(dir.path().join("tally-dev/admin-token")).unwrap();
    let token = token.trim().to_string();
    let baseline = open_fds(pid);
    eprintln!("started: server fds {baseline}, RSS {} KiB", rss_kib(pid));

    for (target, name) in [(agent_http, "sidecar"), (http, "admin API")] {
        let opened = Instant::now();
        let idle = open_idle(target).await;
        let held = open_fds(pid);
        eprintln!(
            "{name}: {IDLE} connections opened in {:?}; server fds {baseline} -> {held}, RSS {} KiB",
            opened.elapsed(),
            rss_kib(pid)
        );
        assert!(
            held >= baseline + IDLE / 2,
            "the idle connections were accepted"
        );
        // Everyone else is still served, on both servers.
        let (s, _) = common::http(http, "GET", "/v1/meters", Some(&token), None).await;
        assert_eq!(
            s, 200,
            "admin API while {IDLE} idle connections sit on the {name}"
        );
        let event = r#"{"specversion":"1.0","type":"api_call","id":"e-NAME","source":"t","subject":"acme","data":{"count":1}}"#
            .replace("NAME", &name.replace(' ', "-"));
        let (s, body) =
            common::http(agent_http, "POST", "/api/v1/events", None, Some(&event)).await;
        assert_eq!(
            s, 204,
            "sidecar ingest while the {name} holds {IDLE} idle connections: {body}"
        );
        assert!(
            open_fds(pid) >= baseline + IDLE / 2,
            "the idle connections were accepted"
        );
        // The server closes them at the header-read timeout (8 s here): its descriptors return.
        wait_until("idle connections reclaimed", async || {
            open_fds(pid) < baseline + 100
        })
        .await;
        eprintln!(
            "{name}: reclaimed; server fds {}, RSS {} KiB",
            open_fds(pid),
            rss_kib(pid)
        );
        drop(idle);
    }
}
