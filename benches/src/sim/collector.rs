//! The collector in the simulation: the real sans-IO session machine
//! (`tally_collector::core::session`), the admission rule (`core::registry::admit`), the real
//! embedded store (`store::redb::RedbStore`, which runs `core::ingest::ingest_group` — dedup,
//! ledger posting, quarantine, outbox rows — in one durable transaction) and the real Stripe
//! dispatch machine (`tally_forward::stripe::dispatch::Dispatcher`) over that store's outbox, in a shell
//! that does what `net::quic`, the committer thread and the forwarder do, on the simulated
//! clock and network.
//!
//! A crash drops every session, the committer's queue and the forwarder's jobs; the store is
//! closed as it stands (a redb commit is durable once `ingest` returns) and reopened on restart.

use super::agent::ENROLL_TOKEN;
use super::net::{ConnId, Net};
use super::rng::Rng;
use super::stripe::{Reply, Stripe};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use tally_collector::core::ingest::IngestBatch;
use tally_collector::core::ledger::Adjustment;
use tally_collector::core::registry::{Admission, AgentRecord, EnrollToken, admit, token_hash};
use tally_collector::core::session::{Action, Session, SessionConfig};
use tally_collector::store::redb::RedbStore;
use tally_collector::store::{AdjustOutcome, EnrolmentStore, Store};
use tally_forward::retry::Backoff;
use tally_forward::stripe::OutboxStore;
use tally_forward::stripe::dispatch::{
    self, Api, CheckReading, DispatchConfig, Dispatcher, Request, ScannedRows, StoreOp,
};
use tally_forward::stripe::outbox::resolve_customer;
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::MeterDef;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::Frame;

/// Batches per group commit (the committer's limit).
pub const GROUP_MAX: usize = 2_048;
/// The forwarder's request timeout, ms.
pub const REQUEST_TIMEOUT_MS: i64 = 2_000;

/// A failure of the simulated collector's machinery (not a finding of the auditor).
pub type Res<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

struct Running {
    store: RedbStore,
    sessions: BTreeMap<ConnId, Session>,
    committer: Vec<(ConnId, u64, IngestBatch)>,
    dispatcher: Dispatcher,
    appended: u64,
    /// An answer or new outbox rows arrived: the forwarder's loop runs before its timer.
    forward_now: bool,
}

/// Counts for the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct CollectorStats {
    /// Crashes.
    pub crashes: u64,
    /// Group commits.
    pub commits: u64,
    /// Batches committed or acked duplicate.
    pub batches: u64,
    /// Duplicates acked.
    pub duplicates: u64,
    /// Unknown-outcome checks asked for (none expected: runs are shorter than 23 h).
    pub checks: u64,
}

/// The simulated collector.
pub struct SimCollector {
    _dir: tempfile::TempDir,
    path: PathBuf,
    run: Option<Running>,
    /// The forwarder's incarnation (answers to an older one are dropped).
    pub incarnation: u64,
    /// When a crashed collector restarts.
    pub restart_at_ms: Option<i64>,
    rng: Rng,
    meters: Vec<MeterDef>,
    /// Counts.
    pub stats: CollectorStats,
    revoked: BTreeSet<AgentId>,
}

impl SimCollector {
    /// A collector with an empty store and these meters, started at `now_ms`.
    pub fn new(rng: Rng, meters: Vec<MeterDef>, now_ms: i64) -> Res<Self> {
        // tmpfs when there is one: fsync there costs nothing, so seeds run fast.
        let dir = match std::fs::metadata("/dev/shm") {
            Ok(m) if m.is_dir() => tempfile::Builder::new()
                .prefix("tally-sim")
                .tempdir_in("/dev/shm"),
            _ => tempfile::Builder::new().prefix("tally-sim").tempdir(),
        }
        .map_err(e("temp dir"))?;
        let path = dir.path().join("collector.redb");
        let mut c = SimCollector {
            _dir: dir,
            path,
            run: None,
            incarnation: 0,
            restart_at_ms: None,
            rng,
            meters,
            stats: CollectorStats::default(),
            revoked: BTreeSet::new(),
        };
        c.start(now_ms)?;
        let run = c.run.as_ref().expect("started");
        for m in &c.meters {
            run.store.put_meter(m).map_err(e("put meter"))?;
        }
        Ok(c)
    }

    /// Whether the process runs (and accepts connections).
    pub fn is_up(&self) -> bool {
        self.run.is_some()
    }

    /// The store, when up (the auditor reads it after the run).
    pub fn store(&self) -> Option<&RedbStore> {
        self.run.as_ref().map(|r| &r.store)
    }

    /// Starts: opens the store as the last process left it.
    pub fn start(&mut self, now_ms: i64) -> Res<()> {
        let store = RedbStore::open(&self.path).map_err(e("open store"))?;
        // The agents' enrolment token, as `init` leaves it: no expiry, no use limit.
        let token = EnrollToken {
            id: String::from("et_sim"),
            hash: token_hash(ENROLL_TOKEN.as_bytes()),
            created_at_ms: 0,
            expires_at_ms: None,
            max_uses: None,
            uses: 0,
            labels: BTreeMap::new(),
            revoked_at_ms: None,
        };
        store
            .create_enroll_token(&token, 0)
            .map_err(e("enroll token"))?;
        self.incarnation += 1;
        let cfg = DispatchConfig {
            api: Api::V1,
            live: true,
            rate_per_s: 1_000,
            max_in_flight: 8,
            poll_interval_ms: 200,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_millis(2_000),
            },
            unknown_check_after_ms: 23 * 3_600_000,
            session_renew_before_ms: 60_000,
            rows_per_pass: 1_000,
        };
        let appended = store.outbox_appended();
        self.run = Some(Running {
            store,
            sessions: BTreeMap::new(),
            committer: Vec::new(),
            dispatcher: Dispatcher::new(cfg, now_ms, self.rng.next_u64()),
            appended,
            forward_now: true,
        });
        self.restart_at_ms = None;
        Ok(())
    }

    /// The process dies now.
    pub fn crash(&mut self, now_ms: i64, net: &mut Net) {
        if self.run.take().is_some() {
            self.stats.crashes += 1;
            net.collector_died(now_ms);
        }
    }

    /// A connection arrived.
    pub fn accept(
        &mut self,
        conn: ConnId,
        binding: [u8; 32],
        now_ms: i64,
        net: &mut Net,
    ) -> Res<()> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        let mut nonce = [0u8; 32];
        for c in nonce.chunks_mut(8) {
            c.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let cfg = SessionConfig {
            max_in_flight: 16,
            handshake_timeout_ms: 3_000,
        };
        let mut s = Session::new(cfg, binding, nonce, now_ms);
        s.on_catalog(run.store.catalog().map_err(e("catalog"))?);
        run.sessions.insert(conn, s);
        self.pump(conn, now_ms, net)
    }

    /// A frame arrived on `conn`.
    pub fn frame(&mut self, conn: ConnId, frame: Frame, now_ms: i64, net: &mut Net) -> Res<()> {
        let Some(s) = self.run.as_mut().and_then(|r| r.sessions.get_mut(&conn)) else {
            return Ok(());
        };
        s.handle_frame(now_ms, frame);
        self.pump(conn, now_ms, net)
    }

    /// The connection is gone.
    pub fn lost(&mut self, conn: ConnId, now_ms: i64, net: &mut Net) -> Res<()> {
        let Some(s) = self.run.as_mut().and_then(|r| r.sessions.get_mut(&conn)) else {
            return Ok(());
        };
        s.handle_peer_finished();
        self.pump(conn, now_ms, net)?;
        if let Some(r) = &mut self.run {
            r.sessions.remove(&conn);
        }
        Ok(())
    }

    /// Timers of the sessions.
    pub fn tick(&mut self, now_ms: i64, net: &mut Net) -> Res<()> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        let due: Vec<ConnId> = run
            .sessions
            .iter()
            .filter(|(_, s)| s.poll_timeout().is_some_and(|t| now_ms >= t))
            .map(|(c, _)| *c)
            .collect();
        for conn in due {
            if let Some(s) = self.run.as_mut().and_then(|r| r.sessions.get_mut(&conn)) {
                s.handle_timeout(now_ms);
            }
            self.pump(conn, now_ms, net)?;
        }
        Ok(())
    }

    fn pump(&mut self, conn: ConnId, now_ms: i64, net: &mut Net) -> Res<()> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        loop {
            let Some(s) = run.sessions.get_mut(&conn) else {
                return Ok(());
            };
            let Some(action) = s.poll_action() else { break };
            match action {
                Action::Send(f) => net.send(conn, false, f, now_ms),
                Action::Admit(auth) => {
                    let rec = run.store.agent(auth.agent_id).map_err(e("agent"))?;
                    let presented = auth.enroll_token.as_deref();
                    let hash = presented.map(token_hash);
                    let token = match (&rec, &hash) {
                        (None, Some(h)) => run.store.enroll_token_by_hash(h).map_err(e("token"))?,
                        _ => None,
                    };
                    let mut admission = admit(rec.as_ref(), presented, token.as_ref(), now_ms);
                    if let (Admission::Enrol(_), Some(hash)) = (&admission, hash) {
                        let rec = AgentRecord {
                            id: auth.agent_id,
                            public_key: auth.public_key.to_bytes(),
                            registered_at_ms: now_ms,
                            revoked_at_ms: None,
                            last_seen_ms: now_ms,
                        };
                        if let Err(code) =
                            run.store.enrol(&rec, &hash, now_ms).map_err(e("enrol"))?
                        {
                            admission = Admission::Refuse(code);
                        }
                    }
                    s.on_admitted(now_ms, admission);
                }
                Action::Ingest { ticket, batch } => run.committer.push((conn, ticket, *batch)),
                Action::Close { .. } => {
                    net.close(conn, false, now_ms);
                }
                Action::Acked { .. } | Action::SetFrameLimit(_) | Action::Note(_) => {}
                // Entitlements are not simulated yet: the simulated agents never ask for
                // snapshots or leases (their workload has no entitlement operations).
                Action::Watch(_) | Action::Lease(_) | Action::LeaseRelease(_) => {}
            }
        }
        if run.sessions.get(&conn).is_some_and(Session::is_closed) {
            run.sessions.remove(&conn);
        }
        Ok(())
    }

    /// One group commit of everything the committer holds, then the acks.
    pub fn commit(&mut self, now_ms: i64, net: &mut Net) -> Res<()> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        if run.committer.is_empty() {
            return Ok(());
        }
        let n = run.committer.len().min(GROUP_MAX);
        let group: Vec<(ConnId, u64, IngestBatch)> = run.committer.drain(..n).collect();
        let batches: Vec<IngestBatch> = group.iter().map(|(_, _, b)| b.clone()).collect();
        self.stats.commits += 1;
        let replies: Vec<Result<_, ErrorCode>> = match run.store.ingest(&batches, now_ms) {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(err) => {
                return Err(format!("ingest failed: {err}"));
            }
        };
        let mut conns = BTreeSet::new();
        for ((conn, ticket, _), reply) in group.into_iter().zip(replies) {
            self.stats.batches += 1;
            if matches!(
                reply,
                Ok(tally_collector::core::ingest::IngestOutcome::Ack(
                    tally_protocol::frame::AckOutcome::Duplicate
                ))
            ) {
                self.stats.duplicates += 1;
            }
            if let Some(s) = run.sessions.get_mut(&conn) {
                s.on_ingest_reply(ticket, reply);
                conns.insert(conn);
            }
        }
        let appended = run.store.outbox_appended();
        if appended != run.appended {
            run.appended = appended;
            run.dispatcher.wake(now_ms);
            run.forward_now = true;
        }
        for conn in conns {
            self.pump(conn, now_ms, net)?;
        }
        Ok(())
    }

    /// Revokes an agent: recorded in the store, its live sessions told.
    pub fn revoke(&mut self, agent: AgentId, now_ms: i64, net: &mut Net) -> Res<bool> {
        let Some(run) = &mut self.run else {
            return Ok(false);
        };
        let Some(mut rec) = run.store.agent(agent).map_err(e("agent"))? else {
            return Ok(false);
        };
        rec.revoked_at_ms = Some(now_ms);
        run.store.put_agent(&rec).map_err(e("put agent"))?;
        self.revoked.insert(agent);
        let conns: Vec<ConnId> = run
            .sessions
            .iter()
            .filter(|(_, s)| s.agent() == Some(agent))
            .map(|(c, _)| *c)
            .collect();
        for conn in conns {
            if let Some(s) = self.run.as_mut().and_then(|r| r.sessions.get_mut(&conn)) {
                s.on_revoked();
            }
            self.pump(conn, now_ms, net)?;
        }
        Ok(true)
    }

    /// Posts an adjustment; `None` when the collector is down (the client retries).
    pub fn adjust(&mut self, adj: &Adjustment, now_ms: i64) -> Res<Option<AdjustOutcome>> {
        let Some(run) = &mut self.run else {
            return Ok(None);
        };
        let out = run.store.adjust(adj, now_ms).map_err(e("adjust"))?;
        let appended = run.store.outbox_appended();
        if appended != run.appended {
            run.appended = appended;
            run.dispatcher.wake(now_ms);
            run.forward_now = true;
        }
        Ok(Some(out))
    }

    /// What the forwarder's shell does each turn (when its timer is due, an answer came or
    /// rows were appended, as `tally_forward::stripe::forwarder` wakes): plan, start ready jobs, timers.
    pub fn forward(&mut self, now_ms: i64, stripe: &mut Stripe) -> Res<()> {
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        if !run.forward_now && now_ms < run.dispatcher.poll_timeout() {
            return Ok(());
        }
        run.forward_now = false;
        if run.dispatcher.gauges_due(now_ms) {
            run.dispatcher.gauges_refreshed(now_ms);
        }
        let mut actions = Vec::new();
        if let Some(scan) = run.dispatcher.plan_due(now_ms) {
            run.store.seal_open(scan.limit).map_err(e("seal open"))?;
            let rows = run
                .store
                .pending_rows(scan.after, scan.limit)
                .map_err(e("pending rows"))?;
            let mut mapping = BTreeMap::new();
            for r in &rows {
                let m = resolve_customer(&run.store, &r.customer).map_err(e("customer"))?;
                mapping.insert(r.customer.clone(), m);
            }
            let scanned = ScannedRows {
                namespace: run.store.namespace().map_err(e("namespace"))?,
                reached_end: rows.len() < scan.limit,
                rows,
                mapping,
            };
            let (create, _) = run.dispatcher.on_rows(now_ms, scanned);
            actions.extend(create);
        }
        self.perform(actions, now_ms, stripe)?;
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        if let Some(limit) = run.dispatcher.ready_limit() {
            let ready = run.store.ready_groups(now_ms, limit).map_err(e("ready"))?;
            let a = run.dispatcher.on_ready(now_ms, ready);
            self.perform(a, now_ms, stripe)?;
        }
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        let a = run.dispatcher.on_timeout(now_ms);
        self.perform(a, now_ms, stripe)
    }

    /// Stripe's answer to one of our requests.
    pub fn stripe_reply(&mut self, reply: Reply, now_ms: i64, stripe: &mut Stripe) -> Res<()> {
        if reply.incarnation != self.incarnation {
            return Ok(());
        }
        let Some(run) = &mut self.run else {
            return Ok(());
        };
        run.forward_now = true;
        let a = run.dispatcher.on_answer(now_ms, reply.job, reply.answer);
        self.perform(a, now_ms, stripe)
    }

    fn perform(
        &mut self,
        actions: Vec<dispatch::Action>,
        now_ms: i64,
        stripe: &mut Stripe,
    ) -> Res<()> {
        let mut failed_jobs = BTreeSet::new();
        let mut queue: std::collections::VecDeque<dispatch::Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let Some(run) = &mut self.run else {
                return Ok(());
            };
            match a {
                dispatch::Action::Store { job, op } => {
                    if job.is_some_and(|j| failed_jobs.contains(&j)) {
                        continue;
                    }
                    let s = &run.store;
                    let r = match op {
                        StoreOp::CreateGroups(g) => s.create_groups(g).map(|_| ()),
                        StoreOp::RecordAttempt {
                            ids,
                            now_ms,
                            lease_until_ms,
                        } => s.record_attempt(&ids, now_ms, lease_until_ms),
                        StoreOp::MarkSent(ids) => s.mark_sent(&ids),
                        StoreOp::MarkRetry {
                            id,
                            at_ms,
                            unknown,
                            error,
                        } => s.mark_retry(id, at_ms, unknown, error),
                        StoreOp::MarkDead { id, error } => s.mark_dead(id, error),
                    };
                    if let Err(err) = r {
                        match job {
                            Some(j) => {
                                failed_jobs.insert(j);
                                run.dispatcher.on_store_failed(j);
                            }
                            None => return Err(format!("outbox store: {err}")),
                        }
                    }
                }
                dispatch::Action::Send { job, request } => {
                    if job.is_some_and(|j| failed_jobs.contains(&j)) {
                        continue;
                    }
                    match (job, request) {
                        (Some(job), Request::V1 { event, .. }) => {
                            stripe.send(self.incarnation, job, event, now_ms);
                        }
                        (_, other) => return Err(format!("a v1 forwarder sent {other:?}")),
                    }
                }
                dispatch::Action::Check { job, group } => {
                    self.stats.checks += 1;
                    let reading = CheckReading::Failed(String::from("not simulated"));
                    let more = run.dispatcher.on_check(now_ms, job, group.id, reading);
                    queue.extend(more);
                }
                dispatch::Action::Log(_) => {}
            }
        }
        Ok(())
    }

    /// Nothing in the committer's queue, no forwarder job, no pending or unsent outbox row.
    pub fn quiet(&self) -> Res<bool> {
        let Some(run) = &self.run else {
            return Ok(false);
        };
        if !run.committer.is_empty() || run.dispatcher.jobs_in_flight() > 0 {
            return Ok(false);
        }
        let st = run.store.stats().map_err(e("outbox stats"))?;
        Ok(st.pending_rows == 0 && st.dead_rows == 0)
    }
}
