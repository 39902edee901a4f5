//! The simulated network between agent sessions and collector sessions, on the simulated
//! clock. A connection is one QUIC stream: frames arrive in order after a latency, a lost
//! packet shows up as a retransmission delay, and a connection can break (both ends hear of it
//! after an idle timeout; what was in flight is gone). On top of that the network misbehaves in
//! ways a correct stream never would, to test that the cores survive a peer that breaks the
//! protocol: a frame can be duplicated or overtake the frames sent before it.
//!
//! Limits: at most [`MAX_IN_FLIGHT`] frames in flight; beyond it a send breaks its connection.

use super::rng::Rng;
use std::collections::BTreeMap;
use tally_protocol::frame::Frame;

/// Most frames in flight over the whole network.
pub const MAX_IN_FLIGHT: usize = 100_000;

/// A connection's number.
pub type ConnId = u64;

/// The network's fault rates (parts per million per frame) and timings.
#[derive(Debug, Clone, Copy)]
pub struct NetRates {
    /// A packet is lost and the frame is retransmitted.
    pub loss_ppm: u32,
    /// The frame is delivered twice.
    pub dup_ppm: u32,
    /// The frame may overtake frames sent before it.
    pub reorder_ppm: u32,
    /// The connection breaks at this frame.
    pub break_ppm: u32,
    /// One-way latency bounds, ms.
    pub latency_ms: (i64, i64),
    /// Extra delay of a retransmission, ms.
    pub retransmit_ms: (i64, i64),
    /// Time until both ends notice a broken connection, ms.
    pub idle_timeout_ms: i64,
}

impl NetRates {
    /// A network that only delays.
    pub fn perfect() -> Self {
        NetRates {
            loss_ppm: 0,
            dup_ppm: 0,
            reorder_ppm: 0,
            break_ppm: 0,
            latency_ms: (1, 5),
            retransmit_ms: (200, 600),
            idle_timeout_ms: 1_000,
        }
    }
}

/// Something the network delivers.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// The agent's connection attempt succeeded.
    Connected {
        /// Which agent.
        agent: usize,
        /// The connection.
        conn: ConnId,
        /// Its TLS exporter binding (both ends see the same).
        binding: [u8; 32],
    },
    /// The agent's connection attempt failed (nobody listening).
    ConnectFailed {
        /// Which agent.
        agent: usize,
    },
    /// A frame for the collector.
    ToCollector {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// A frame for the agent.
    ToAgent {
        /// Which agent.
        agent: usize,
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// The agent's end of the connection is gone.
    AgentLost {
        /// Which agent.
        agent: usize,
        /// The connection.
        conn: ConnId,
    },
    /// The collector's end of the connection is gone (closed by the peer or broken).
    CollectorLost {
        /// The connection.
        conn: ConnId,
    },
}

#[derive(Debug)]
struct Conn {
    agent: usize,
    /// When the last in-order frame of each direction arrives (0: to the collector).
    last_due: [i64; 2],
}

/// Counts for the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetStats {
    /// Frames sent.
    pub frames: u64,
    /// Packets lost (and retransmitted).
    pub lost: u64,
    /// Frames duplicated.
    pub duplicated: u64,
    /// Frames that could overtake.
    pub reordered: u64,
    /// Connections broken.
    pub broken: u64,
    /// Connections opened.
    pub connections: u64,
}

/// The network.
#[derive(Debug)]
pub struct Net {
    rng: Rng,
    /// The rates in force.
    pub rates: NetRates,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    queue: BTreeMap<(i64, u64), Delivery>,
    order: u64,
    /// Counts.
    pub stats: NetStats,
}

impl Net {
    /// A network drawing from `rng`.
    pub fn new(rng: Rng, rates: NetRates) -> Self {
        Net {
            rng,
            rates,
            conns: BTreeMap::new(),
            next_conn: 1,
            queue: BTreeMap::new(),
            order: 0,
            stats: NetStats::default(),
        }
    }

    fn push(&mut self, at_ms: i64, d: Delivery) {
        self.order += 1;
        self.queue.insert((at_ms, self.order), d);
    }

    fn latency(&mut self) -> i64 {
        let (lo, hi) = self.rates.latency_ms;
        self.rng.range(lo, hi)
    }

    /// The agent connects; `listening` says whether a collector accepts. Returns the new
    /// connection (the collector must create its session for it now) or `None`.
    pub fn connect(
        &mut self,
        agent: usize,
        listening: bool,
        now_ms: i64,
    ) -> Option<(ConnId, [u8; 32])> {
        let at = now_ms + 2 * self.latency();
        if !listening {
            self.push(at, Delivery::ConnectFailed { agent });
            return None;
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        self.stats.connections += 1;
        let mut binding = [0u8; 32];
        for chunk in binding.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        self.conns.insert(
            conn,
            Conn {
                agent,
                last_due: [at, at],
            },
        );
        self.push(
            at,
            Delivery::Connected {
                agent,
                conn,
                binding,
            },
        );
        Some((conn, binding))
    }

    /// Whether the connection is open.
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Sends a frame; `to_collector` gives the direction.
    pub fn send(&mut self, conn: ConnId, to_collector: bool, frame: Frame, now_ms: i64) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let agent = c.agent;
        self.stats.frames += 1;
        if self.queue.len() >= MAX_IN_FLIGHT || self.rng.chance_ppm(self.rates.break_ppm) {
            return self.break_conn(conn, now_ms);
        }
        let dir = usize::from(!to_collector);
        let mut at = now_ms + self.latency();
        if self.rng.chance_ppm(self.rates.loss_ppm) {
            self.stats.lost += 1;
            let (lo, hi) = self.rates.retransmit_ms;
            at += self.rng.range(lo, hi);
        }
        let reorder = self.rng.chance_ppm(self.rates.reorder_ppm);
        let c = self.conns.get_mut(&conn).expect("checked above");
        if reorder {
            self.stats.reordered += 1;
        } else {
            at = at.max(c.last_due[dir]);
            c.last_due[dir] = at;
        }
        let make = |frame: Frame| {
            if to_collector {
                Delivery::ToCollector { conn, frame }
            } else {
                Delivery::ToAgent { agent, conn, frame }
            }
        };
        if self.rng.chance_ppm(self.rates.dup_ppm) {
            self.stats.duplicated += 1;
            let later = at + self.latency();
            self.push(later, make(frame.clone()));
        }
        self.push(at, make(frame));
    }

    /// One end closes the connection cleanly: the other end hears of it after the frames
    /// already sent.
    pub fn close(&mut self, conn: ConnId, by_agent: bool, now_ms: i64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let dir = usize::from(by_agent);
        let at = c.last_due[1 - dir].max(now_ms + self.latency());
        if by_agent {
            self.push(at, Delivery::CollectorLost { conn });
        } else {
            self.push(
                at,
                Delivery::AgentLost {
                    agent: c.agent,
                    conn,
                },
            );
        }
    }

    /// The connection breaks: frames in flight are dropped and both ends hear of it after the
    /// idle timeout.
    pub fn break_conn(&mut self, conn: ConnId, now_ms: i64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.stats.broken += 1;
        self.drop_frames_of(conn);
        let at = now_ms + self.rates.idle_timeout_ms;
        self.push(
            at,
            Delivery::AgentLost {
                agent: c.agent,
                conn,
            },
        );
        self.push(at, Delivery::CollectorLost { conn });
    }

    /// Every connection breaks at once (the collector process died): its ends are not told;
    /// the agents hear after the idle timeout.
    pub fn collector_died(&mut self, now_ms: i64) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            let c = self.conns.remove(&conn).expect("listed");
            self.drop_frames_of(conn);
            let at = now_ms + self.rates.idle_timeout_ms;
            self.push(
                at,
                Delivery::AgentLost {
                    agent: c.agent,
                    conn,
                },
            );
        }
        self.queue
            .retain(|_, d| !matches!(d, Delivery::CollectorLost { .. }));
    }

    /// The agent process died: its connections break; the collector hears after the idle
    /// timeout.
    pub fn agent_died(&mut self, agent: usize, now_ms: i64) {
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.agent == agent)
            .map(|(id, _)| *id)
            .collect();
        for conn in conns {
            self.conns.remove(&conn);
            self.drop_frames_of(conn);
            self.push(
                now_ms + self.rates.idle_timeout_ms,
                Delivery::CollectorLost { conn },
            );
        }
        self.queue.retain(|_, d| match d {
            Delivery::Connected { agent: a, .. }
            | Delivery::ConnectFailed { agent: a }
            | Delivery::ToAgent { agent: a, .. }
            | Delivery::AgentLost { agent: a, .. } => *a != agent,
            _ => true,
        });
    }

    fn drop_frames_of(&mut self, conn: ConnId) {
        self.queue.retain(|_, d| match d {
            Delivery::ToCollector { conn: c, .. } | Delivery::ToAgent { conn: c, .. } => *c != conn,
            _ => true,
        });
    }

    /// The next delivery due at or before `now_ms`, in order.
    pub fn poll(&mut self, now_ms: i64) -> Option<Delivery> {
        let (&key, _) = self.queue.iter().next()?;
        if key.0 > now_ms {
            return None;
        }
        self.queue.remove(&key)
    }

    /// Frames and notices still in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
