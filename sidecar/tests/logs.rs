//! The binary's logs when stderr is a pipe: no ANSI colour codes in `text`, one JSON object per
//! line in `json` (`--log-format` and `TALLY_LOG_FORMAT`).
#![allow(clippy::unwrap_used)]

// The agent's collector stand-in, one copy for both crates' tests.
#[path = "../../agent/tests/common/mod.rs"]
mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs the sidecar with stderr to a pipe until it logs that it listens (or 20 s pass), kills
/// it, and returns every stderr line it wrote.
fn stderr_lines(extra_args: &[&str], extra_env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, common::certs().ca_pem).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally-agent"));
    cmd.args(extra_args)
        .args(["run", "--data-dir"])
        .arg(dir.path().join("agent"))
        // Nothing listens there: the agent keeps its usage on disk and logs its attempts.
        .args(["--collector", "127.0.0.1:9", "--ca"])
        .arg(&ca)
        .args(["--http", "127.0.0.1:0"])
        .env("RUST_LOG", "debug")
        .env_remove("TALLY_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let listening = String::from_utf8_lossy(&line).contains("sidecar listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    assert!(
        lines
            .iter()
            .any(|l| String::from_utf8_lossy(l).contains("sidecar listening")),
        "the sidecar never logged that it listens: {lines:?}"
    );
    for line in &lines {
        assert!(
            !line.contains(&0x1b),
            "an ANSI escape in a piped log line: {:?}",
            String::from_utf8_lossy(line)
        );
    }
    lines
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap())
        .collect()
}

#[test]
fn text_logs_to_a_pipe_have_no_ansi_codes() {
    let lines = stderr_lines(&[], &[]);
    assert!(lines.iter().any(|l| l.contains("INFO")));
}

#[test]
fn json_logs_parse_line_by_line() {
    for (args, env) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("TALLY_LOG_FORMAT", "json")][..]),
    ] {
        let lines = stderr_lines(args, env);
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            assert!(
                v.get("level").is_some() && v.get("timestamp").is_some(),
                "{line}"
            );
        }
        assert!(lines.iter().any(|l| l.contains("\"sidecar listening\"")));
    }
}
