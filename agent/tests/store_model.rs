//! The local store against a model (proptest): random seal / log / ack / crash-reopen sequences
//! never lose an unacknowledged batch, never resurrect an acknowledged one, never reuse a seq,
//! and fold every logged event into exactly one batch.
//!
//! "Crash" here is closing the database between two committed calls and opening it again, as a
//! restarted process does; every mutating call commits with `Durability::Immediate`, so this is
//! the state a `kill -9` between calls leaves. A kill *during* a commit is left to redb's own
//! crash-safety and is exercised end to end by `tests/kill.rs`.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use tally_agent::store::{LoggedEvent, SealCommit, Store, StoredBatch};
use tally_protocol::Decimal;
use tally_protocol::batch::{AgentId, BatchBody, Delta, SignedBatch};
use tally_protocol::names::{CustomerId, Dimensions, MeterName};

#[derive(Debug, Clone)]
enum Op {
    /// Seal this many batches (0 = a seal with nothing new), folding the whole log in.
    Seal(u8),
    /// Append this many events to the durable log.
    Log(u8),
    /// Acknowledge the unacked batch at this position (mod the count), plus one unknown seq.
    Ack(u8),
    /// Acknowledge every unacked batch.
    AckAll,
    /// Close and reopen.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(Op::Seal),
        2 => (1u8..5).prop_map(Op::Log),
        3 => any::<u8>().prop_map(Op::Ack),
        1 => Just(Op::AckAll),
        2 => Just(Op::Reopen),
    ]
}

fn key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9; 32])
}

fn batch(epoch: u64, seq: u64, quantity: Decimal) -> StoredBatch {
    let key = key();
    let delta = Delta::single(
        CustomerId::new("c").unwrap(),
        MeterName::new("m").unwrap(),
        Dimensions::default(),
        1_000,
        quantity,
    );
    let body = BatchBody::new(
        AgentId::from_public_key(&key.verifying_key()),
        epoch,
        seq,
        2_000,
        vec![delta],
    )
    .unwrap();
    StoredBatch {
        sealed_at_ms: 2_000,
        batch: SignedBatch::seal(&body, &key).unwrap(),
    }
}

fn event(n: u64) -> LoggedEvent {
    LoggedEvent {
        customer: CustomerId::new("c").unwrap(),
        meter: MeterName::new("m").unwrap(),
        dimensions: Dimensions::default(),
        at_ms: 1_000,
        quantity: Decimal::from(n),
        id: Some(format!("id-{n}")),
        accepted_at_ms: 1_000,
    }
}

fn open(path: &Path) -> Store {
    Store::open(path, Duration::from_secs(3600)).unwrap()
}

#[derive(Default)]
struct Model {
    unacked: BTreeMap<u64, Decimal>,
    acked: BTreeSet<u64>,
    next_seq: u64,
    log: Vec<u64>,
    /// Events folded into a batch, by event number.
    folded: BTreeSet<u64>,
    events: u64,
}

fn check(store: &Store, m: &Model, epoch: u64) {
    assert_eq!(store.epoch(), epoch, "epoch changed");
    assert_eq!(store.next_seq().unwrap(), m.next_seq);
    let on_disk: Vec<u64> = store.unacked().unwrap().iter().map(|b| b.seq).collect();
    let expected: Vec<u64> = m.unacked.keys().copied().collect();
    assert_eq!(on_disk, expected, "unacked batches differ");
    for (seq, q) in &m.unacked {
        let b = store.batch(*seq).unwrap().expect("unacked batch is there");
        let body = b.batch.verify(&key().verifying_key()).unwrap();
        assert_eq!((body.epoch, body.seq), (epoch, *seq));
        assert_eq!(body.deltas[0].sum, *q);
    }
    for seq in &m.acked {
        assert!(
            store.batch(*seq).unwrap().is_none(),
            "acked {seq} came back"
        );
    }
    let log: Vec<u64> = store
        .read_log(usize::MAX)
        .unwrap()
        .iter()
        .map(|(_, e)| e.quantity.try_into().unwrap())
        .collect();
    assert_eq!(log, m.log, "durable log differs");
    for n in &m.folded {
        assert!(store.seen_id(&format!("id-{n}"), 1_000).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.redb");
        let mut store = open(&path);
        let epoch = store.epoch();
        let mut m = Model { next_seq: 1, ..Model::default() };
        for op in ops {
            match op {
                Op::Seal(n) => {
                    let mut batches = Vec::new();
                    // The log is folded into the first new batch (as the sealer does).
                    let folded: Decimal = m.log.iter().map(|n| Decimal::from(*n)).sum();
                    let n = if n == 0 && !m.log.is_empty() { 1 } else { n };
                    for i in 0..u64::from(n) {
                        let seq = m.next_seq + i;
                        let q = if i == 0 { folded + Decimal::from(seq) } else { Decimal::from(seq) };
                        batches.push((seq, batch(epoch, seq, q)));
                    }
                    let rows = store.read_log(usize::MAX).unwrap();
                    let commit = SealCommit {
                        next_seq: m.next_seq + u64::from(n),
                        log_upto: rows.last().map(|(k, _)| *k),
                        seglog_upto: None,
                        ids: rows.iter().filter_map(|(_, e)| Some((e.id.clone()?, e.accepted_at_ms))).collect(),
                        batches: batches.clone(),
                        now_ms: 1_000,
                    };
                    // A seq that does not follow is refused and changes nothing.
                    if let Some((seq, b)) = batches.first() {
                        let bad = SealCommit { batches: vec![(seq + 1, b.clone())], next_seq: seq + 2, ..SealCommit::default() };
                        prop_assert!(store.commit_seal(&bad).is_err());
                    }
                    store.commit_seal(&commit).unwrap();
                    for (seq, b) in &batches {
                        let body = b.batch.verify(&key().verifying_key()).unwrap();
                        m.unacked.insert(*seq, body.deltas[0].sum);
                    }
                    m.next_seq += u64::from(n);
                    m.folded.extend(m.log.drain(..));
                }
                Op::Log(n) => {
                    let events: Vec<LoggedEvent> = (0..u64::from(n)).map(|i| event(m.events + i)).collect();
                    store.append_log(&events).unwrap();
                    m.log.extend((0..u64::from(n)).map(|i| m.events + i));
                    m.events += u64::from(n);
                }
                Op::Ack(i) => {
                    let unknown = m.next_seq + 100;
                    let pick = m.unacked.keys().nth(usize::from(i) % m.unacked.len().max(1)).copied();
                    let seqs: Vec<u64> = pick.into_iter().chain([unknown]).collect();
                    let removed = store.ack(&seqs).unwrap();
                    prop_assert_eq!(removed.iter().map(|b| b.seq).collect::<Vec<_>>(), pick.into_iter().collect::<Vec<_>>());
                    if let Some(s) = pick {
                        m.unacked.remove(&s);
                        m.acked.insert(s);
                    }
                }
                Op::AckAll => {
                    let seqs: Vec<u64> = m.unacked.keys().copied().collect();
                    store.ack(&seqs).unwrap();
                    m.acked.extend(seqs);
                    m.unacked.clear();
                }
                Op::Reopen => {
                    drop(store);
                    store = open(&path);
                }
            }
            check(&store, &m, epoch);
        }
        drop(store);
        check(&open(&path), &m, epoch);
    }
}
