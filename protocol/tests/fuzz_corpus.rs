//! Replays the fuzz corpora in `fuzz/corpus/` through the same entry points as the fuzz targets,
//! so the corpora run on every `cargo test` and cannot rot.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/corpus.rs"]
mod corpus;
use corpus::corpus;
use std::path::PathBuf;

#[test]
fn decode_frame_corpus() {
    let files = corpus("decode_frame");
    assert!(files.len() >= 5, "seed corpus too small");
    for (path, data) in files {
        eprintln!("{}", path.display());
        tally_protocol::fuzz::decode_frames(&data);
    }
}

#[test]
fn verify_batch_corpus() {
    let files = corpus("verify_batch");
    assert!(files.len() >= 3, "seed corpus too small");
    for (_, data) in files {
        tally_protocol::fuzz::verify_batch(&data);
    }
}

/// Writes the seed corpora. Run with `cargo test -p tally-protocol --test fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_seed_corpora() {
    use rust_decimal::Decimal;
    use tally_protocol::batch::*;
    use tally_protocol::frame::*;
    use tally_protocol::names::*;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let key = tally_protocol::fuzz::corpus_key();
    let agent = AgentId::from_public_key(&key.verifying_key());
    let delta = |c: &str, m: &str, q: i64| {
        Delta::single(
            CustomerId::new(c).unwrap(),
            MeterName::new(m).unwrap(),
            Dimensions::from_strs([("model", "gpt-4o")]).unwrap(),
            1_763_700_000_000,
            Decimal::new(q, 2),
        )
    };
    let batches: Vec<Frame> = [
        vec![],
        vec![delta("acme", "api_calls", 100)],
        (0..50)
            .map(|i| delta(&format!("cust-{i}"), "tokens", i * 7))
            .collect(),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, d)| {
        let body = BatchBody::new(agent, 7, i as u64 + 1, 1_763_700_001_000, d).unwrap();
        Frame::Batch(SignedBatch::seal(&body, &key).unwrap())
    })
    .collect();
    let (_, hello) =
        tally_protocol::handshake::ClientHandshake::start(key.clone(), vec![1; 32], Some("enroll"))
            .unwrap();
    let mut frames = vec![
        Frame::Hello(hello),
        Frame::Challenge(Challenge { nonce: [9; 32] }),
        Frame::Welcome(Welcome {
            agent_id: agent,
            max_in_flight: 32,
        }),
        Frame::Ack(Ack {
            epoch: 7,
            seq: 3,
            outcome: AckOutcome::Quarantined {
                code: tally_protocol::error::ErrorCode::UnknownMeter,
            },
        }),
        Frame::Error(ErrorFrame::new(
            tally_protocol::error::ErrorCode::RevokedAgent,
            "revoked",
        )),
    ];
    frames.extend(batches.iter().cloned());
    for (target, list) in [("decode_frame", &frames), ("verify_batch", &batches)] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, f) in list.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), encode_frame(f).unwrap()).unwrap();
        }
    }
}
