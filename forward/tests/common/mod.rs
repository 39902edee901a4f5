//! Shared test helpers.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tally_forward::stripe::outbox::{MemoryStore, NewOutboxRow, OutboxStore};
use tally_forward::stripe::test_server::FakeStripe;
use tally_forward::stripe::{Api, ForwarderConfig};

pub fn config(api: Api, server: &FakeStripe) -> ForwarderConfig {
    server.forwarder_config(api)
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A small deterministic RNG.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub const EVENTS: [&str; 2] = ["api_calls", "tokens"];

/// Inserts `n` random rows for `cus_0..cus_{customers}` over the last 30 minutes.
pub fn workload(store: &MemoryStore, rng: &mut Rng, n: usize, customers: u64) {
    let base = now_s() - 1800;
    for _ in 0..n {
        let ev = EVENTS[rng.below(2) as usize];
        let ts = base + 60 * rng.below(30) as i64;
        store
            .insert(NewOutboxRow {
                customer: format!("cus_{}", rng.below(customers)),
                meter: ev.into(),
                stripe_event_name: ev.into(),
                timestamp_s: ts - ts.rem_euclid(60),
                value: 1 + rng.below(1000),
            })
            .unwrap();
    }
}

pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

pub fn all_sent(store: &Arc<MemoryStore>) -> bool {
    let s = store.stats().unwrap();
    s.pending_rows == 0 && s.dead_rows == 0
}
