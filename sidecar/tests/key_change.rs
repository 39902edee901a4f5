//! An agent whose key was replaced while it held batches signed with the old key, end to end
//! with the real collector (in-process) and `tally-agent` processes: the old batches can never
//! be accepted, so they are quarantined — kept on disk, counted in `status`, exported whole by
//! `GET /v1/quarantine` and `tally-agent quarantine` — and the batches sealed with the new key
//! reach the ledger; nothing of the old batches is counted and nothing is resent forever.
#![allow(clippy::unwrap_used)]

mod process;

use process::{Sidecar, free_port, json, run_command, wait_ready};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tally_collector::{Collector, CollectorConfig, CollectorHandle};

fn events(ids: &[&str]) -> String {
    let events: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                r#"{{"specversion":"1.0","type":"api_call","id":"{id}","source":"t","subject":"acme","data":{{"count":1}}}}"#
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

async fn post_events(http: SocketAddr, ids: &[&str]) {
    let (s, v) = json(http, "POST", "/api/v1/events", None, &events(ids)).await;
    assert_eq!(s, 204, "{v}");
}

async fn status(http: SocketAddr) -> serde_json::Value {
    let (s, v) = json(http, "GET", "/v1/status", None, "").await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn start_collector(dir: &Path) -> CollectorHandle {
    Collector::start(CollectorConfig::ephemeral(dir))
        .await
        .unwrap()
}

/// `tally-agent <command> --data-dir dir` with no sidecar listening: read from the store.
fn offline(command: &str, dir: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tally-agent"))
        .arg(command)
        .arg("--data-dir")
        .arg(dir)
        .args(["--http", &free_port().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_signed_with_a_replaced_key_are_quarantined_and_new_ones_flow() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("collector");
    tally_collector::init(&cdir, &[]).unwrap();
    let collector = start_collector(&cdir).await;
    for m in tally_collector::catalog::sample_meters().unwrap() {
        collector.shared().put_meter(&m).unwrap();
    }
    let ca = collector.files().ca_pem.clone();
    let enroll = collector.enroll_token().to_string();
    let adir = dir.path().join("agent");
    let http = free_port();
    let spawn = |quic: SocketAddr| {
        Sidecar::spawn(
            run_command(&adir, &quic.to_string(), &ca, http).args(["--enroll-token", &enroll]),
        )
    };

    // The first key learns the catalog, then the collector goes away: three events are sealed
    // into batches signed with that key and stay unacknowledged.
    let mut old = spawn(collector.quic_addr());
    wait_ready(http).await;
    let old_id = status(http).await["agent_id"].as_str().unwrap().to_owned();
    collector.shutdown().await;
    post_events(http, &["old-1", "old-2", "old-3"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(http).await["backlog_batches"].as_u64() == Some(0) {
        assert!(Instant::now() < deadline, "the events were never sealed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old.kill9();

    // The key is replaced; the collector comes back.
    std::fs::remove_file(adir.join(tally_agent::keys::KEY_FILE)).unwrap();
    let collector = start_collector(&cdir).await;
    let admin = collector.http_addr();
    let token = collector.admin_token().to_string();
    let _new = spawn(collector.quic_addr());
    wait_ready(http).await;
    let new_status = status(http).await;
    assert_ne!(new_status["agent_id"].as_str().unwrap(), old_id);
    post_events(http, &["new-1", "new-2"]).await;
    let (s, v) = json(http, "POST", "/v1/flush", None, "").await;
    assert_eq!(
        s, 200,
        "a quarantined batch must not hold up the flush: {v}"
    );

    // Only the new key's events are in the ledger; the old batch is quarantined, not counted.
    let (s, v) = json(
        admin,
        "GET",
        "/v1/usage?customer=acme&meter=api_calls",
        Some(&token),
        "",
    )
    .await;
    assert_eq!((s, v["quantity"].as_str()), (200, Some("2")), "{v}");
    let st = status(http).await;
    assert_eq!(st["backlog_batches"], 0, "{st}");
    let quarantined = st["quarantined_batches"].as_u64().unwrap();
    assert!(quarantined >= 1, "{st}");
    assert_eq!(
        st["connection"]["state"], "connected",
        "the agent ships on, it does not reconnect forever: {st}"
    );

    // The export holds every old event, exactly, with the old agent's id and the reason.
    let check_export = |v: &serde_json::Value| {
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len() as u64, quarantined, "{v}");
        let mut count = 0;
        for b in data {
            assert_eq!(b["agent_id"].as_str(), Some(old_id.as_str()), "{b}");
            assert!(
                b["reason"].as_str().unwrap().contains("replaced"),
                "{}",
                b["reason"]
            );
            assert!(!b["body_hex"].as_str().unwrap().is_empty());
            assert_eq!(b["signature_hex"].as_str().unwrap().len(), 128);
            for d in b["deltas"].as_array().unwrap() {
                assert_eq!(
                    (d["customer"].as_str(), d["meter"].as_str()),
                    (Some("acme"), Some("api_calls"))
                );
                count += d["sum"].as_str().unwrap().parse::<u64>().unwrap();
            }
        }
        assert_eq!(count, 3, "{v}");
    };
    let (s, v) = json(http, "GET", "/v1/quarantine", None, "").await;
    assert_eq!(s, 200, "{v}");
    check_export(&v);
    let (_, metrics) = json(http, "GET", "/metrics", None, "").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains(&format!("tally_agent_quarantined_batches {quarantined}")),
        "{metrics}"
    );

    // With the agent stopped, the CLI reads the same from the store: kept across restarts.
    drop(_new);
    check_export(&offline("quarantine", &adir));
    assert_eq!(offline("status", &adir)["quarantined_batches"], quarantined);
    let (_, v) = json(admin, "GET", "/v1/ledger/verify", Some(&token), "").await;
    assert_eq!(v["ok"], true, "{v}");
    collector.shutdown().await;
}
