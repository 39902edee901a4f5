//! The `tally-agent` sidecar as a child process, shared by the process-level tests: a free
//! loopback port, the `run` command with the flags every test passes, and a handle that kills
//! the process (SIGKILL) when dropped, so a failing test leaves nothing behind.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A running sidecar, killed when dropped.
pub struct Sidecar(pub Child);

impl Sidecar {
    /// Starts `cmd` (from [`run_command`], with a test's own flags added).
    pub fn spawn(cmd: &mut Command) -> Sidecar {
        Sidecar(cmd.spawn().unwrap())
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(&mut self) {
        self.0.kill().unwrap(); // SIGKILL on Unix
        self.0.wait().unwrap();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tally-agent run` on `dir`, one collector, its CA, HTTP on `http`, a 20 ms flush interval;
/// logs at `TEST_SIDECAR_LOG` (default `warn`) to the test's stderr.
pub fn run_command(dir: &Path, collector: &str, ca: &Path, http: SocketAddr) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally-agent"));
    cmd.args(["run", "--data-dir"])
        .arg(dir)
        .args(["--collector", collector, "--ca"])
        .arg(ca)
        .args(["--http", &http.to_string(), "--flush-interval-ms", "20"])
        .env(
            "RUST_LOG",
            std::env::var("TEST_SIDECAR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}
