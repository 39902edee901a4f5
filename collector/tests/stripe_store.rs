//! The redb outbox follows `tally_forward::stripe::MemoryStore`'s rules: the same random operation
//! sequences give the same answers on both stores, and the forwarder's exactness workload
//! (injected 500s, 429s, lock timeouts, lost answers, dropped connections) run against the redb
//! store ends with Stripe's totals equal to the outbox's, no identifier twice, and (v1) one
//! request in flight per customer and meter.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tally_collector::store::redb::RedbStore;
use tally_forward::stripe::outbox::{
    GroupState, NewGroup, NewOutboxRow, OutboxState, OutboxStore, StripeError, WebhookRecord,
    identifier_for,
};
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::stripe::{Api, MemoryStore};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn open() -> (tempfile::TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("c.redb")).unwrap();
    (dir, s)
}

fn err(code: &str) -> StripeError {
    StripeError {
        status: 400,
        code: code.into(),
        message: format!("{code} message"),
    }
}

fn row(rng: &mut Rng) -> NewOutboxRow {
    let ev = ["api_calls", "tokens"][rng.below(2) as usize];
    NewOutboxRow {
        customer: format!("cus_{}", rng.below(3)),
        meter: ev.into(),
        stripe_event_name: ev.into(),
        timestamp_s: 60 * (1000 + rng.below(5) as i64),
        value: 1 + rng.below(50),
    }
}

/// Random operations applied to both stores; every answer must match.
#[test]
fn redb_outbox_answers_like_the_memory_store() {
    for seed in [3u64, 77, 4242] {
        let (_dir, r) = open();
        let m = MemoryStore::with_namespace("x");
        let mut rng = Rng(seed);
        let mut rev_ident = 0u32;
        let mut seen: HashSet<GroupState> = HashSet::new();
        for step in 0..400 {
            match rng.below(10) {
                0..=2 => {
                    let nr = row(&mut rng);
                    let a = m.insert(nr.clone()).unwrap();
                    let b = r.append_outbox_row(nr).unwrap();
                    assert_eq!(a, b, "row ids");
                }
                3 => {
                    // Group a few pending rows (sometimes overlapping a grouped one → Conflict).
                    let (after, limit) = (rng.below(5), 1 + rng.below(6) as usize);
                    let pend = m.pending_rows(after, limit).unwrap();
                    assert_eq!(pend, r.pending_rows(after, limit).unwrap());
                    if pend.is_empty() {
                        continue;
                    }
                    let mut ids: Vec<u64> = pend.iter().map(|p| p.id).collect();
                    if rng.below(8) == 0 {
                        ids.push(1); // maybe grouped already
                        ids.sort_unstable();
                        ids.dedup();
                    }
                    rev_ident += 1;
                    let value: u64 = ids
                        .iter()
                        .map(|id| {
                            m.list(OutboxState::Pending, id - 1, 1)
                                .unwrap()
                                .first()
                                .filter(|e| e.row.id == *id)
                                .map_or(0, |e| e.row.value)
                        })
                        .sum();
                    let g = NewGroup {
                        identifier: format!("{}-{rev_ident}", identifier_for("x", &ids, 0)),
                        stripe_customer: "cus_0".into(),
                        event_name: "api_calls".into(),
                        meter: "api_calls".into(),
                        timestamp_s: 60_000,
                        value,
                        row_ids: ids,
                    };
                    let a = m.create_groups(vec![g.clone()]);
                    let b = r.create_groups(vec![g]);
                    assert_eq!(a.is_ok(), b.is_ok(), "step {step}: {a:?} vs {b:?}");
                    if let (Ok(a), Ok(b)) = (a, b) {
                        assert_eq!(a, b);
                    }
                }
                4 => {
                    let now = rng.below(100) as i64;
                    let a = m.ready_groups(now, 50).unwrap();
                    assert_eq!(a, r.ready_groups(now, 50).unwrap(), "step {step}");
                    if let Some(g) = a.first() {
                        m.record_attempt(&[g.id], now, now + 10).unwrap();
                        r.record_attempt(&[g.id], now, now + 10).unwrap();
                    }
                }
                5 => {
                    if let Some(g) = m.ready_groups(i64::MAX, 50).unwrap().first() {
                        m.mark_sent(&[g.id]).unwrap();
                        r.mark_sent(&[g.id]).unwrap();
                    }
                }
                6 => {
                    let open = m.ready_groups(i64::MAX, 50).unwrap();
                    let pick = if rng.below(4) == 0 {
                        m.groups().unwrap()
                    } else {
                        open
                    };
                    if let Some(g) = pick.get(rng.below(pick.len().max(1) as u64) as usize) {
                        let unknown = rng.below(2) == 0;
                        let at = rng.below(50) as i64;
                        m.mark_retry(g.id, at, unknown, Some(err("lock_timeout")))
                            .unwrap();
                        r.mark_retry(g.id, at, unknown, Some(err("lock_timeout")))
                            .unwrap();
                    }
                }
                7 => {
                    let gs = m.groups().unwrap();
                    if let Some(g) = gs.get(rng.below(gs.len().max(1) as u64) as usize) {
                        if rng.below(2) == 0 {
                            m.mark_dead(g.id, err("resource_missing")).unwrap();
                            r.mark_dead(g.id, err("resource_missing")).unwrap();
                        } else {
                            let id = g.event.identifier.clone();
                            assert_eq!(
                                m.mark_dead_by_identifier(&id, err("x")).unwrap(),
                                r.mark_dead_by_identifier(&id, err("x")).unwrap()
                            );
                        }
                    }
                    assert!(!r.mark_dead_by_identifier("nope", err("x")).unwrap());
                }
                8 => {
                    let id = 1 + rng.below(20);
                    let a = m.requeue(id);
                    let b = r.requeue(id);
                    assert_eq!(a.is_ok(), b.is_ok(), "step {step}: {a:?} vs {b:?}");
                    if let (Ok(a), Ok(b)) = (a, b) {
                        assert_eq!(a, b);
                    }
                }
                _ => {
                    let w = WebhookRecord {
                        id: format!("evt_{}", rng.below(5)),
                        event_type: "x".into(),
                        created: 0,
                        body: "{}".into(),
                    };
                    assert_eq!(
                        m.record_webhook(w.clone()).unwrap(),
                        r.record_webhook(w).unwrap()
                    );
                }
            }
            for st in [
                OutboxState::Pending,
                OutboxState::Unknown,
                OutboxState::Sent,
                OutboxState::Dead,
            ] {
                assert_eq!(
                    m.list(st, 0, 1000).unwrap(),
                    r.list(st, 0, 1000).unwrap(),
                    "step {step} {st:?}"
                );
            }
            assert_eq!(m.stats().unwrap(), r.stats().unwrap(), "step {step}");
            assert_eq!(
                m.pending_rows(0, 1000).unwrap(),
                r.pending_rows(0, 1000).unwrap()
            );
            let mut a = m.window_groups("cus_0", "api_calls", 0, 100_000).unwrap();
            let mut b = r.window_groups("cus_0", "api_calls", 0, 100_000).unwrap();
            a.sort_by_key(|g| g.id);
            b.sort_by_key(|g| g.id);
            assert_eq!(a, b);
            seen.extend(m.groups().unwrap().iter().map(|g| g.state));
        }
        // Groups of every state were exercised.
        assert_eq!(seen.len(), 4, "{seen:?}");
    }
}

#[test]
fn mapping_and_namespace_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let ns = {
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.stripe_customer("acme").unwrap(), None);
        s.set_stripe_customer("acme", "cus_1").unwrap();
        s.namespace().unwrap()
    };
    assert!(!ns.is_empty() && ns.len() <= 16);
    assert!(ns.bytes().all(|b| b.is_ascii_alphanumeric()));
    let s = RedbStore::open(&path).unwrap();
    assert_eq!(s.namespace().unwrap(), ns);
    assert_eq!(s.stripe_customer("acme").unwrap().as_deref(), Some("cus_1"));
    assert_eq!(
        tally_forward::stripe::outbox::resolve_customer(&s, "cus_9")
            .unwrap()
            .as_deref(),
        Some("cus_9")
    );
}

async fn exact(api: Api, seed: u64) {
    let server = FakeStripe::start().await.unwrap();
    server.inject_fault_mix(seed);
    let (_dir, store) = open();
    let store = Arc::new(store);
    let fwd = tally_forward::stripe::spawn(server.forwarder_config(api), store.clone(), None, None)
        .unwrap();
    let mut rng = Rng(seed);
    let mut expect: BTreeMap<(String, String), u64> = BTreeMap::new();
    let base = now_s() - 1800;
    for _ in 0..4 {
        for _ in 0..50 {
            let ev = ["api_calls", "tokens"][rng.below(2) as usize];
            let ts = base + 60 * rng.below(30) as i64;
            let r = NewOutboxRow {
                customer: format!("cus_{}", rng.below(5)),
                meter: ev.into(),
                stripe_event_name: ev.into(),
                timestamp_s: ts - ts.rem_euclid(60),
                value: 1 + rng.below(1000),
            };
            *expect
                .entry((r.customer.clone(), ev.to_owned()))
                .or_default() += r.value;
            store.append_outbox_row(r).unwrap();
        }
        fwd.notify();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let st = store.stats().unwrap();
        if st.pending_rows == 0 && server.totals() == expect {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = fwd.status();
    fwd.shutdown().await;
    assert_eq!(server.totals(), expect, "status {status:?}");
    let st = store.stats().unwrap();
    assert_eq!((st.pending_rows, st.dead_rows), (0, 0), "{st:?}");
    assert!(server.faults_injected() >= 5);
    let events = server.events();
    let ids: HashSet<_> = events.iter().map(|e| e.identifier.clone()).collect();
    assert_eq!(ids.len(), events.len(), "an identifier was accepted twice");
    if api == Api::V1 {
        for (k, n) in server.max_in_flight() {
            assert!(n <= 1, "{k:?}: {n} in flight");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_on_redb_is_exact_v1() {
    exact(Api::V1, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarder_on_redb_is_exact_v2() {
    exact(Api::V2, 99).await;
}
