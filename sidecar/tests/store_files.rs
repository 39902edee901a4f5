//! A damaged agent store stops the sidecar with a clear error and is left as it was: starting
//! afresh would give the agent a new epoch and drop its unacknowledged batches without a word.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn run_sidecar(dir: &Path) -> std::process::Output {
    let ca = dir.join("ca.pem");
    if !ca.exists() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
    }
    Command::new(env!("CARGO_BIN_EXE_tally-agent"))
        .args(["run", "--data-dir"])
        .arg(dir)
        .args(["--collector", "127.0.0.1:9", "--ca"])
        .arg(&ca)
        .args(["--http", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

#[test]
fn empty_and_foreign_store_files_stop_the_sidecar_and_stay_as_they_were() {
    for (contents, says) in [
        (&b""[..], "empty"),
        (&b"not a database"[..], "not a Tally store"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("agent.redb");
        std::fs::write(&store, contents).unwrap();
        let out = run_sidecar(dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started on a damaged store: {err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(std::fs::read(&store).unwrap(), contents, "left as it was");
    }
}

#[test]
fn a_store_deleted_beside_its_marker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("agent.redb");
    // Created once (the marker is written after the first commit)...
    tally_agent::store::Store::open(&store, std::time::Duration::from_secs(60)).unwrap();
    // ...then lost.
    std::fs::remove_file(&store).unwrap();
    let out = run_sidecar(dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started afresh: {err}");
    assert!(err.contains("is missing"), "{err}");
    assert!(!store.exists(), "nothing created in its place");
}

#[cfg(unix)]
#[test]
fn the_store_and_its_directory_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally-agent"))
        .args(["run", "--data-dir"])
        .arg(&data)
        .args(["--collector", "127.0.0.1:9", "--ca"])
        .arg(&ca)
        .args(["--http", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    let store = data.join("agent.redb");
    let marker = tally_storefile::marker_path(&store);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !marker.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&store), 0o600);
    assert_eq!(mode(&marker), 0o600);
    assert_eq!(mode(&data.join("agent.key")), 0o600);
}
