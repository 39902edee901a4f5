//! One agent in the simulation: the real sans-IO cores (`tally_agent::sealer::SealerCore` and
//! `tally_agent::session::Session`) in a shell that does what the agent's threads do — keep
//! `record` usage in memory, append `record_durable` / `record_event` to the durable log and
//! fsync before answering, seal every flush interval (batches and the log rows they fold in, in
//! one write, then fsync, then tell the session), carry out the session's actions on the
//! simulated network and disk — and that can crash at any step.
//!
//! The shell also keeps the observer's record the auditor needs ([`AgentModel`]): what was
//! durably accepted, what `record` usage was sealed or lost (and when), and every batch that
//! reached the disk, by seq (a seq that reached the disk never changes: checked here).
//!
//! The in-memory aggregation is a plain list merged by the sealer (`merge_deltas`), not
//! `tally_agent::aggregate`, whose per-thread shards are built for real threads.

use super::disk::{Disk, Full};
use super::net::{ConnId, Net};
use super::rng::Rng;
use super::workload::Usage;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tally_agent::Overflow;
use tally_agent::sealer::{SealerCore, delta_of, sign_all};
use tally_agent::session::{Action, Session, SessionConfig, SessionError, StoreAction};
use tally_agent::store::LoggedEvent;
use tally_protocol::batch::{AgentId, Delta};
use tally_protocol::ed25519_dalek::SigningKey;
use tally_protocol::frame::Frame;

/// The enrolment token every simulated agent presents.
pub const ENROLL_TOKEN: &str = "sim-enroll-token";
/// Deltas per sealed batch (small, so one seal makes several batches and windows fill).
pub const DELTAS_PER_BATCH: usize = 6;
/// Callers waiting for room under `Overflow::Block`, per agent.
pub const MAX_BLOCKED: usize = 1_024;

/// Per (customer, meter): a quantity.
pub type Totals = BTreeMap<(String, String), Decimal>;

fn add(t: &mut Totals, customer: &str, meter: &str, q: Decimal) {
    *t.entry((customer.to_owned(), meter.to_owned()))
        .or_default() += q;
}

/// `record` usage lost in a crash.
#[derive(Debug, Clone)]
pub struct Lost {
    /// When it was recorded, ms.
    pub at_ms: i64,
    /// When the agent crashed, ms.
    pub crash_ms: i64,
    /// The last seal that reached the disk before the crash, ms.
    pub last_seal_ms: i64,
    /// Whether a seal failed (full disk) between that one and the crash.
    pub seal_failed: bool,
    /// How much.
    pub quantity: Decimal,
}

/// What the observer knows about one agent (the auditor's input).
#[derive(Debug, Clone, Default)]
pub struct AgentModel {
    /// `record_durable` and first-time `record_event` usage whose fsync completed.
    pub durable: Totals,
    /// `record` usage that reached the disk in a sealed batch.
    pub sealed_record: Totals,
    /// `record` usage lost in crashes.
    pub lost: Vec<Lost>,
    /// Every batch that reached the disk: (epoch, seq) → its deltas.
    pub batches: BTreeMap<(u64, u64), Vec<Delta>>,
    /// Calls refused (`Overflow::Reject` on a full disk, or the agent was down).
    pub refused: u64,
    /// Crashes.
    pub crashes: u64,
    /// A batch seq reached the disk twice with different contents (a broken rule).
    pub violations: Vec<String>,
}

/// A caller waiting for room (`Overflow::Block`).
#[derive(Debug, Clone)]
struct Waiting {
    id: Option<String>,
    usage: Usage,
    at_ms: i64,
}

struct Running {
    sealer: SealerCore,
    session: Session,
    conn: Option<ConnId>,
    memory: Vec<(Delta, i64)>,
    blocked: VecDeque<Waiting>,
    next_seal_ms: i64,
    last_seal_ms: i64,
    seal_failed: bool,
}

/// The process died (the shell drops its memory).
#[derive(Debug)]
pub struct Crashed;

/// A simulated agent.
pub struct SimAgent {
    /// Its index in the run.
    pub index: usize,
    key: SigningKey,
    /// Its id.
    pub id: AgentId,
    /// Its disk (survives crashes).
    pub disk: Disk,
    /// Its overflow policy.
    pub overflow: Overflow,
    run: Option<Running>,
    /// When a crashed agent restarts.
    pub restart_at_ms: Option<i64>,
    /// When a full disk gets its budget back.
    pub budget_back_at_ms: Option<i64>,
    /// The observer's record.
    pub model: AgentModel,
    /// The flush interval, ms.
    pub flush_ms: i64,
    rng: Rng,
    /// The fault schedule may crash the agent at an fsync (ppm).
    pub crash_at_sync_ppm: u32,
}

impl SimAgent {
    /// Agent `index`, with its key from `rng`, started at `now_ms`.
    pub fn new(index: usize, mut rng: Rng, overflow: Overflow, flush_ms: i64, now_ms: i64) -> Self {
        let mut seed = [0u8; 32];
        for c in seed.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let key = SigningKey::from_bytes(&seed);
        let id = AgentId::from_public_key(&key.verifying_key());
        let epoch = 1 + rng.below(1 << 40);
        let mut a = SimAgent {
            index,
            key,
            id,
            disk: Disk::new(epoch),
            overflow,
            run: None,
            restart_at_ms: None,
            budget_back_at_ms: None,
            model: AgentModel::default(),
            flush_ms,
            rng,
            crash_at_sync_ppm: 0,
        };
        a.start(now_ms);
        a
    }

    /// Whether the process runs.
    pub fn is_up(&self) -> bool {
        self.run.is_some()
    }

    /// Starts the process over what its disk kept.
    pub fn start(&mut self, now_ms: i64) {
        let c = self.disk.read();
        let cfg = SessionConfig {
            collectors: vec![String::from("collector:7443")],
            epoch: c.epoch,
            enroll_token: Some(ENROLL_TOKEN.to_owned()),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(2_000),
            connect_timeout: Duration::from_millis(3_000),
        };
        let mut session = Session::new(
            cfg,
            self.key.clone(),
            c.batches.keys().copied(),
            c.next_seq - 1,
            None,
            self.rng.next_u64(),
        );
        session.start(now_ms);
        self.run = Some(Running {
            sealer: SealerCore::new(self.id, c.epoch, c.next_seq).with_max_deltas(DELTAS_PER_BATCH),
            session,
            conn: None,
            memory: Vec::new(),
            blocked: VecDeque::new(),
            next_seal_ms: now_ms + self.flush_ms,
            last_seal_ms: now_ms,
            seal_failed: false,
        });
        self.restart_at_ms = None;
    }

    /// The process dies now: memory is gone, unsynced writes are lost, callers get nothing.
    pub fn crash(&mut self, now_ms: i64, net: &mut Net) {
        let Some(run) = self.run.take() else { return };
        self.model.crashes += 1;
        for (d, at_ms) in run.memory {
            self.model.lost.push(Lost {
                at_ms,
                crash_ms: now_ms,
                last_seal_ms: run.last_seal_ms,
                seal_failed: run.seal_failed,
                quantity: d.sum,
            });
        }
        self.model.refused += run.blocked.len() as u64;
        self.disk.crash();
        net.agent_died(self.index, now_ms);
    }

    fn sync(&mut self) -> Result<(), Crashed> {
        if self.rng.chance_ppm(self.crash_at_sync_ppm) {
            return Err(Crashed);
        }
        self.disk.sync();
        Ok(())
    }

    /// `record`: kept in memory until the next seal.
    pub fn record(&mut self, usage: &Usage, now_ms: i64) {
        let full = !self.disk.fits(1);
        let Some(run) = &mut self.run else {
            self.model.refused += 1;
            return;
        };
        if full && self.overflow == Overflow::Reject {
            self.model.refused += 1;
            return;
        }
        let d = Delta::single(
            usage.customer.clone(),
            usage.meter.clone(),
            usage.dimensions.clone(),
            now_ms,
            usage.quantity,
        );
        run.memory.push((d, now_ms));
    }

    /// `record_durable` (`id: None`) or `record_event` (`id: Some`): on the disk when it
    /// returns, an id counted once.
    pub fn record_durable(
        &mut self,
        id: Option<String>,
        usage: Usage,
        now_ms: i64,
    ) -> Result<(), Crashed> {
        let Some(run) = &mut self.run else {
            self.model.refused += 1;
            return Ok(());
        };
        let w = Waiting {
            id,
            usage,
            at_ms: now_ms,
        };
        if !run.blocked.is_empty() {
            // Callers are served in order: wait behind the ones already waiting.
            if run.blocked.len() >= MAX_BLOCKED {
                self.model.refused += 1;
            } else {
                run.blocked.push_back(w);
            }
            return Ok(());
        }
        match self.append(&w)? {
            Ok(()) => Ok(()),
            Err(Full) => {
                let run = self.run.as_mut().expect("up");
                if self.overflow == Overflow::Block && run.blocked.len() < MAX_BLOCKED {
                    run.blocked.push_back(w);
                } else {
                    self.model.refused += 1;
                }
                Ok(())
            }
        }
    }

    fn append(&mut self, w: &Waiting) -> Result<Result<(), Full>, Crashed> {
        if let Some(id) = &w.id
            && self.disk.read().seen_ids.contains(id)
        {
            return Ok(Ok(()));
        }
        let ev = LoggedEvent {
            customer: w.usage.customer.clone(),
            meter: w.usage.meter.clone(),
            dimensions: w.usage.dimensions.clone(),
            at_ms: w.at_ms,
            quantity: w.usage.quantity,
            id: w.id.clone(),
            accepted_at_ms: w.at_ms,
        };
        let wrote = self.disk.write(1, |c| {
            c.log.insert(c.next_row, ev);
            c.next_row += 1;
            if let Some(id) = &w.id {
                c.seen_ids.insert(id.clone());
            }
        });
        if let Err(Full) = wrote {
            return Ok(Err(Full));
        }
        self.sync()?;
        add(
            &mut self.model.durable,
            w.usage.customer.as_str(),
            w.usage.meter.as_str(),
            w.usage.quantity,
        );
        Ok(Ok(()))
    }

    /// Timers: the session's, the seal, waiting callers.
    pub fn tick(
        &mut self,
        now_ms: i64,
        net: &mut Net,
        accept: &mut Vec<Accept>,
        listening: bool,
    ) -> Result<(), Crashed> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        if run.session.poll_timeout().is_some_and(|t| now_ms >= t) {
            run.session.handle_timeout(now_ms);
        }
        while let Some(w) = self.run.as_ref().and_then(|r| r.blocked.front().cloned()) {
            match self.append(&w)? {
                Ok(()) => {
                    self.run.as_mut().expect("up").blocked.pop_front();
                }
                Err(Full) => break,
            }
        }
        if self.run.as_ref().is_some_and(|r| now_ms >= r.next_seal_ms) {
            self.seal(now_ms)?;
        }
        self.pump(now_ms, net, accept, listening)
    }

    /// Seals memory and the durable log into batches: one write, one fsync, then the session
    /// hears.
    pub fn seal(&mut self, now_ms: i64) -> Result<(), Crashed> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        run.next_seal_ms = now_ms + self.flush_ms;
        let log: Vec<(u64, LoggedEvent)> = self
            .disk
            .read()
            .log
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut deltas: Vec<Delta> = run.memory.iter().map(|(d, _)| d.clone()).collect();
        deltas.extend(log.iter().map(|(_, e)| delta_of(e)));
        if deltas.is_empty() {
            run.last_seal_ms = now_ms;
            run.seal_failed = false;
            return Ok(());
        }
        let first = run.sealer.next_seq();
        let bodies = run
            .sealer
            .seal(deltas, now_ms)
            .expect("simulated usage always makes valid batches");
        let signed = sign_all(&bodies, &self.key).expect("valid bodies sign");
        let adds = signed.len().saturating_sub(log.len());
        let next_seq = run.sealer.next_seq();
        let wrote = self.disk.write(adds, |c| {
            for (seq, sb) in &signed {
                c.batches.insert(*seq, sb.batch.clone());
            }
            for (k, _) in &log {
                c.log.remove(k);
            }
            c.next_seq = next_seq;
        });
        if let Err(Full) = wrote {
            // Carried to the next seal, nothing lost (the sealer's rule).
            run.sealer.rollback_to(first);
            run.seal_failed = true;
            return Ok(());
        }
        self.sync()?;
        let run = self.run.as_mut().expect("up");
        let epoch = run.sealer.epoch();
        for b in &bodies {
            let deltas: Vec<Delta> = b.deltas.iter().cloned().collect();
            if let Some(old) = self.model.batches.insert((epoch, b.seq), deltas.clone())
                && old != deltas
            {
                self.model.violations.push(format!(
                    "agent {} seq {} reached the disk twice",
                    self.index, b.seq
                ));
            }
        }
        for (d, _) in run.memory.drain(..) {
            add(
                &mut self.model.sealed_record,
                d.customer.as_str(),
                d.meter.as_str(),
                d.sum,
            );
        }
        run.last_seal_ms = now_ms;
        run.seal_failed = false;
        run.session.batches_sealed(next_seq - 1, now_ms);
        Ok(())
    }

    /// Something the network delivered to this agent.
    pub fn deliver(&mut self, d: AgentDelivery, now_ms: i64) {
        let Some(run) = &mut self.run else { return };
        match d {
            AgentDelivery::Connected { conn, binding } if run.conn == Some(conn) => {
                run.session.connected(&binding, now_ms);
            }
            AgentDelivery::ConnectFailed if run.conn.is_none() => {
                run.session.connection_lost(
                    SessionError::Connect(String::from("connection refused")),
                    now_ms,
                );
            }
            AgentDelivery::Frame { conn, frame } if run.conn == Some(conn) => {
                run.session.frame_received(frame, now_ms);
            }
            AgentDelivery::Lost { conn } if run.conn == Some(conn) => {
                run.conn = None;
                run.session.connection_lost(
                    SessionError::Connection(String::from("connection lost")),
                    now_ms,
                );
            }
            _ => {}
        }
    }

    /// Carries out the session's actions.
    pub fn pump(
        &mut self,
        now_ms: i64,
        net: &mut Net,
        accept: &mut Vec<Accept>,
        listening: bool,
    ) -> Result<(), Crashed> {
        loop {
            let Some(run) = &mut self.run else {
                return Ok(());
            };
            let Some(action) = run.session.poll() else {
                return Ok(());
            };
            match action {
                Action::Connect { .. } => {
                    if let Some(c) = run.conn.take() {
                        net.close(c, true, now_ms);
                    }
                    let made = net.connect(self.index, listening, now_ms);
                    if let Some((conn, binding)) = made {
                        accept.push(Accept { conn, binding });
                    }
                    run.conn = made.map(|(c, _)| c);
                }
                Action::Send(frame) => {
                    if let Some(c) = run.conn {
                        net.send(c, true, frame, now_ms);
                    }
                }
                Action::SendBatch(seq) => match self.disk.read().batches.get(&seq) {
                    Some(b) => {
                        if let Some(c) = run.conn {
                            net.send(c, true, Frame::Batch(b.clone()), now_ms);
                        }
                    }
                    None => run.session.batch_missing(seq, now_ms),
                },
                Action::Close => {
                    if let Some(c) = run.conn.take() {
                        net.close(c, true, now_ms);
                    }
                }
                Action::Store(StoreAction::Ack(acked)) => {
                    self.disk
                        .write(0, |c| {
                            for a in &acked {
                                c.batches.remove(&a.seq);
                            }
                        })
                        .expect("a delete needs no room");
                    self.sync()?;
                }
                Action::Store(_) | Action::Event(_) => {}
            }
        }
    }

    /// Nothing left to ship or to seal (memory, durable log, batches, waiting callers).
    pub fn drained(&self) -> bool {
        let c = self.disk.read();
        c.batches.is_empty()
            && c.log.is_empty()
            && self
                .run
                .as_ref()
                .is_none_or(|r| r.memory.is_empty() && r.blocked.is_empty())
    }

    /// Everything accepted is sealed (batches may still wait for their ack): what a revoked
    /// agent, which can never ship, reaches.
    pub fn sealed_all(&self) -> bool {
        self.disk.read().log.is_empty()
            && self
                .run
                .as_ref()
                .is_none_or(|r| r.memory.is_empty() && r.blocked.is_empty())
    }

    /// Backlog for the report: (batches on disk, log rows, memory entries, waiting callers).
    pub fn backlog(&self) -> (usize, usize, usize, usize) {
        let c = self.disk.read();
        let (m, b) = self
            .run
            .as_ref()
            .map_or((0, 0), |r| (r.memory.len(), r.blocked.len()));
        (c.batches.len(), c.log.len(), m, b)
    }
}

/// A new connection the collector must accept.
#[derive(Debug, Clone, Copy)]
pub struct Accept {
    /// The connection.
    pub conn: ConnId,
    /// Its binding.
    pub binding: [u8; 32],
}

/// A delivery for an agent.
#[derive(Debug)]
pub enum AgentDelivery {
    /// Connected.
    Connected {
        /// The connection.
        conn: ConnId,
        /// Its binding.
        binding: [u8; 32],
    },
    /// Nobody listened.
    ConnectFailed,
    /// A frame.
    Frame {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: Frame,
    },
    /// The connection is gone.
    Lost {
        /// The connection.
        conn: ConnId,
    },
}
