//! A damaged collector store stops the collector with a clear error and is left as it was:
//! started afresh, it would forget its dedup state and count resent batches again.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

const RUN: &[&str] = &["run", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0"];

#[test]
fn empty_foreign_and_truncated_stores_stop_run_and_verify_and_stay_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let files = tally_collector::init(dir.path(), &[]).unwrap();
    // A store with something in it, as a stopped collector leaves it.
    let store = tally_collector::store::redb::RedbStore::open(&files.store).unwrap();
    drop(store);
    let whole = std::fs::read(&files.store).unwrap();
    let cases: [(Vec<u8>, &str); 3] = [
        (Vec::new(), "empty"),
        (b"PAR1 not a database".to_vec(), "not a Tally store"),
        (whole[..whole.len() / 2].to_vec(), "truncated"),
    ];
    for (contents, says) in cases {
        std::fs::write(&files.store, &contents).unwrap();
        for args in [RUN, &["ledger", "verify"][..]] {
            let out = run(dir.path(), args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} went on: {err}");
            assert!(err.contains(says), "{args:?}: {err}");
            assert_eq!(
                std::fs::read(&files.store).unwrap(),
                contents,
                "left as it was"
            );
        }
    }
    std::fs::remove_file(&files.store).unwrap();
    let out = run(dir.path(), RUN);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is missing"), "{err}");
    assert!(!files.store.exists(), "nothing created in its place");
}

#[cfg(unix)]
#[test]
fn init_and_the_store_keep_data_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let files = tally_collector::init(&data, &[]).unwrap();
    drop(tally_collector::store::redb::RedbStore::open(&files.store).unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in [
        &files.store,
        &files.admin_token,
        &files.enroll_token,
        &files.ca_key,
    ] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
}
