//! The sidecar's secrets: an empty token is refused rather than turning authentication off, and
//! listening beyond loopback without one is warned about loudly.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn sidecar(dir: &std::path::Path, extra: &[&str]) -> Command {
    let ca = dir.join("ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally-agent"));
    cmd.args(["run", "--data-dir"])
        .arg(dir.join("agent"))
        .args(["--collector", "127.0.0.1:9", "--ca"])
        .arg(&ca)
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("TALLY_HTTP_TOKEN");
    cmd
}

#[test]
fn an_empty_http_or_enroll_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let cases: [&[&str]; 3] = [
        &["--http", "127.0.0.1:0", "--http-token", ""],
        &[
            "--http",
            "127.0.0.1:0",
            "--http-token-file",
            empty.to_str().unwrap(),
        ],
        &[
            "--http",
            "127.0.0.1:0",
            "--enroll-token-file",
            empty.to_str().unwrap(),
        ],
    ];
    for args in cases {
        let out = sidecar(dir.path(), args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(err.contains("is empty"), "{args:?}: {err}");
    }
}

#[test]
fn listening_beyond_loopback_without_a_token_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = sidecar(dir.path(), &["--http", "0.0.0.0:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let warned = lines
        .by_ref()
        .take(50)
        .map_while(Result::ok)
        .any(|l| l.contains("beyond loopback with no HTTP token"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(warned, "no warning");
}
