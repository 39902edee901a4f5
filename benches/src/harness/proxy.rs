//! A small UDP relay between agents and the collector that drops, duplicates, reorders and
//! delays datagrams at set rates. Each agent address gets its own upstream socket, so the
//! collector sees one peer per agent; the relay outlives collector restarts (the collector comes
//! back on the same port). Reordering comes from the random delays (a datagram held longer is
//! overtaken) plus an extra hold on some datagrams.
//!
//! Limits: at most [`MAX_PEERS`] agent addresses; datagrams of new ones are dropped beyond it.

use crate::sim::rng::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

/// Most agent addresses relayed.
pub const MAX_PEERS: usize = 1_024;

/// Fault rates, parts per million per datagram, and the delay bound.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Dropped.
    pub drop_ppm: u32,
    /// Sent twice.
    pub dup_ppm: u32,
    /// Held back an extra 5–30 ms (overtaken by later ones).
    pub reorder_ppm: u32,
    /// Each datagram is delayed up to this, ms.
    pub delay_ms_max: u64,
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams received.
    pub datagrams: AtomicU64,
    /// Dropped.
    pub dropped: AtomicU64,
    /// Duplicated.
    pub duplicated: AtomicU64,
    /// Held back to reorder.
    pub reordered: AtomicU64,
}

struct Shared {
    rates: Rates,
    rng: Mutex<Rng>,
    stats: Arc<Stats>,
}

impl Shared {
    /// Sends `data` to `to` through `sock` with the faults.
    fn forward(self: &Arc<Self>, sock: Arc<UdpSocket>, data: Vec<u8>, to: SocketAddr) {
        let s = &self.stats;
        s.datagrams.fetch_add(1, Ordering::Relaxed);
        let (drop, dup, reorder, delay) = {
            let mut r = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            (
                r.chance_ppm(self.rates.drop_ppm),
                r.chance_ppm(self.rates.dup_ppm),
                r.chance_ppm(self.rates.reorder_ppm),
                r.below(self.rates.delay_ms_max + 1),
            )
        };
        if drop {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut delay = delay;
        if reorder {
            s.reordered.fetch_add(1, Ordering::Relaxed);
            delay += 5 + delay % 25;
        }
        let copies = if dup {
            s.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        tokio::spawn(async move {
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            for _ in 0..copies {
                let _ = sock.send_to(&data, to).await;
            }
        });
    }
}

/// Starts the relay on `127.0.0.1:0` towards `upstream`; returns its address and its counts.
/// It runs until the runtime stops.
pub async fn start(
    upstream: SocketAddr,
    rates: Rates,
    seed: u64,
) -> std::io::Result<(SocketAddr, Arc<Stats>)> {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = front.local_addr()?;
    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared {
        rates,
        rng: Mutex::new(Rng::new(seed)),
        stats: stats.clone(),
    });
    tokio::spawn(async move {
        let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                continue;
            };
            let up = match peers.get(&from) {
                Some(u) => u.clone(),
                None => {
                    if peers.len() >= MAX_PEERS {
                        continue;
                    }
                    let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                        continue;
                    };
                    let u = Arc::new(u);
                    peers.insert(from, u.clone());
                    // Collector → agent.
                    let (u2, front2, shared2) = (u.clone(), front.clone(), shared.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65_536];
                        while let Ok((n, _)) = u2.recv_from(&mut buf).await {
                            shared2.forward(front2.clone(), buf[..n].to_vec(), from);
                        }
                    });
                    u
                }
            };
            shared.forward(up, buf[..n].to_vec(), upstream);
        }
    });
    Ok((addr, stats))
}
