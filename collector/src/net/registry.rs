//! The registry handle: who is enrolled, who is revoked, and which connections are live.
//!
//! Owns the live-connection map and the in-memory facts shown by `GET /v1/agents`; the records
//! themselves live in the [`Store`] and the admission rule in [`crate::core::registry`]. The QUIC
//! server admits and registers connections through it; the admin API revokes through it, which
//! closes the agent's live connections.
//!
//! Limits: at most [`MAX_LIVE_PER_AGENT`] live connections are remembered per agent (registering
//! one more closes the oldest, so revocation can still reach every connection that is left open;
//! an ended connection is forgotten, and an agent with none is dropped from the map)
//! and facts of at most [`MAX_INFO_AGENTS`] agents are kept (one more evicts the agent seen
//! longest ago; its facts read as empty until it is seen again).

use crate::core::registry::{Admission, AgentRecord, EnrollToken, admit, token_hash};
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tally_clock::SharedClock;
use tally_protocol::batch::AgentId;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::AckOutcome;

/// Most live connections remembered per agent.
pub const MAX_LIVE_PER_AGENT: usize = 16;
/// Most agents whose live facts are kept in memory.
pub const MAX_INFO_AGENTS: usize = 100_000;

/// In-memory facts about an agent, for `GET /v1/agents`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveInfo {
    /// Last handshake or ack, ms.
    pub last_seen_ms: i64,
    /// Epoch of the last acked batch.
    pub epoch: u64,
    /// Seq of the last acked batch.
    pub last_acked_seq: u64,
    /// Time from sealing to ack of the last batch, ms.
    pub last_lag_ms: i64,
}

/// The registry handle.
pub struct Registry {
    store: Arc<dyn Store>,
    enroll_token: String,
    clock: SharedClock,
    live: Mutex<HashMap<AgentId, Vec<quinn::Connection>>>,
    info: Mutex<HashMap<AgentId, LiveInfo>>,
}

impl Registry {
    /// A registry over `store`. `enroll_token` (the `enroll-token` file `init` writes) is kept
    /// as a token object the first time it is seen — no expiry, no use limit, label
    /// `source=init` — so the quickstart needs nothing else; revoked through the API, it stays
    /// revoked. Tokens made through the API are single-use and expire by default.
    pub fn new(
        store: Arc<dyn Store>,
        enroll_token: String,
        clock: SharedClock,
    ) -> Result<Self, StoreError> {
        let secret = enroll_token.trim();
        if !secret.is_empty() {
            let hash = token_hash(secret.as_bytes());
            if store.enroll_token_by_hash(&hash)?.is_none() {
                let token = EnrollToken {
                    id: format!("et_{}", hex::encode(&hash[..6])),
                    hash,
                    created_at_ms: clock.now_ms(),
                    expires_at_ms: None,
                    max_uses: None,
                    uses: 0,
                    labels: [(String::from("source"), String::from("init"))].into(),
                    revoked_at_ms: None,
                };
                store.create_enroll_token(&token, clock.now_ms())?;
            }
        }
        Ok(Registry {
            store,
            enroll_token,
            clock,
            live: Mutex::new(HashMap::new()),
            info: Mutex::new(HashMap::new()),
        })
    }

    /// The enrolment token (a secret: do not log it).
    pub fn enroll_token(&self) -> &str {
        &self.enroll_token
    }

    /// Applies the admission rule to an authenticated agent and records it (enrols it, or
    /// notes it was seen). Blocking: call it off the async workers.
    pub fn admit(
        &self,
        id: AgentId,
        public_key: [u8; 32],
        presented: Option<&[u8]>,
    ) -> Result<Admission, StoreError> {
        let existing = self.store.agent(id)?;
        let now = self.clock.now_ms();
        let hash = presented.map(token_hash);
        let token = match (&existing, &hash) {
            (None, Some(h)) => self.store.enroll_token_by_hash(h)?,
            _ => None,
        };
        let admission = admit(existing.as_ref(), presented, token.as_ref(), now);
        match (&admission, existing, hash) {
            (Admission::Refuse(_), _, _) => return Ok(admission),
            (Admission::Known, Some(mut rec), _) => {
                rec.last_seen_ms = now;
                self.store.put_agent(&rec)?;
            }
            (Admission::Enrol(_), None, Some(hash)) => {
                let rec = AgentRecord {
                    id,
                    public_key,
                    registered_at_ms: now,
                    revoked_at_ms: None,
                    last_seen_ms: now,
                };
                // Checked again and counted in the store's transaction: a single-use token
                // raced by two agents enrols one.
                if let Err(code) = self.store.enrol(&rec, &hash, now)? {
                    return Ok(Admission::Refuse(code));
                }
            }
            _ => return Ok(Admission::Refuse(ErrorCode::Internal)),
        }
        self.touch(id, now);
        Ok(admission)
    }

    /// Remembers a live connection of `agent` (so a revocation can close it). Past
    /// [`MAX_LIVE_PER_AGENT`] the oldest is closed.
    pub fn register_live(&self, agent: AgentId, conn: quinn::Connection) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let v = live.entry(agent).or_default();
        v.retain(|c| c.close_reason().is_none());
        while v.len() >= MAX_LIVE_PER_AGENT {
            let oldest = v.remove(0);
            oldest.close(
                quinn::VarInt::from_u32(u32::from(ErrorCode::Overloaded.number())),
                b"too many connections",
            );
        }
        v.push(conn);
    }

    /// Forgets a connection of `agent` once it has ended; an agent with none left is dropped
    /// from the map, and the map gives its memory back once it is mostly empty.
    pub fn unregister_live(&self, agent: AgentId, stable_id: usize) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = live.get_mut(&agent) {
            v.retain(|c| c.stable_id() != stable_id && c.close_reason().is_none());
            if v.is_empty() {
                live.remove(&agent);
            }
        }
        if live.capacity() > 64 && live.len() < live.capacity() / 4 {
            live.shrink_to_fit();
        }
    }

    /// Agents with a remembered live connection.
    pub fn live_agents(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Live connections of `agent` (remembered and not closed).
    pub fn live_connections(&self, agent: AgentId) -> usize {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.get(&agent).map_or(0, |v| {
            v.iter().filter(|c| c.close_reason().is_none()).count()
        })
    }

    /// Notes that `agent` was seen at `now`.
    pub fn touch(&self, agent: AgentId, now: i64) {
        self.with_info(agent, |i| i.last_seen_ms = now);
    }

    /// Notes an ack sent to `agent`.
    pub fn acked(&self, agent: AgentId, epoch: u64, seq: u64, _outcome: AckOutcome) {
        let now = self.clock.now_ms();
        self.with_info(agent, |i| {
            i.last_seen_ms = now;
            if (epoch, seq) >= (i.epoch, i.last_acked_seq) {
                i.epoch = epoch;
                i.last_acked_seq = seq;
            }
        });
    }

    fn with_info(&self, agent: AgentId, f: impl FnOnce(&mut LiveInfo)) {
        let mut info = self.info.lock().unwrap_or_else(PoisonError::into_inner);
        if !info.contains_key(&agent) && info.len() >= MAX_INFO_AGENTS {
            let stalest = info
                .iter()
                .min_by_key(|(_, i)| i.last_seen_ms)
                .map(|(id, _)| *id);
            if let Some(id) = stalest {
                info.remove(&id);
            }
        }
        f(info.entry(agent).or_default());
    }

    /// Live facts about an agent.
    pub fn live_info(&self, agent: AgentId) -> LiveInfo {
        let info = self.info.lock().unwrap_or_else(PoisonError::into_inner);
        info.get(&agent).cloned().unwrap_or_default()
    }

    /// Closes the live connections of `agent` when its stored record is revoked (a revocation
    /// through another collector on the same PostgreSQL). Blocking.
    pub fn close_if_revoked(&self, agent: AgentId) -> Result<(), StoreError> {
        if self
            .store
            .agent(agent)?
            .is_some_and(|r| r.revoked_at_ms.is_some())
        {
            self.revoke(agent, false)?;
        }
        Ok(())
    }

    /// Revokes an agent and closes its live connections. `Ok(false)` if it is unknown.
    pub fn revoke(&self, agent: AgentId, revoke_token: bool) -> Result<bool, StoreError> {
        let Some(mut rec) = self.store.agent(agent)? else {
            return Ok(false);
        };
        if revoke_token && let Some(e) = self.store.enrolment(agent)? {
            self.store
                .revoke_enroll_token(&e.token_id, self.clock.now_ms())?;
        }
        if rec.revoked_at_ms.is_none() {
            rec.revoked_at_ms = Some(self.clock.now_ms());
            self.store.put_agent(&rec)?;
        }
        let conns = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&agent);
        for c in conns.into_iter().flatten() {
            c.close(
                quinn::VarInt::from_u32(u32::from(ErrorCode::RevokedAgent.number())),
                b"revoked",
            );
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_clock::ManualClock;

    /// Past the limit, the agent seen longest ago is forgotten; the others keep their facts.
    #[test]
    fn live_facts_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::redb::RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let r = Registry::new(
            Arc::new(store),
            String::from("t"),
            Arc::new(ManualClock::new(0)),
        )
        .unwrap();
        let id = |n: u128| AgentId(n.to_be_bytes());
        for n in 0..MAX_INFO_AGENTS as u128 {
            r.touch(id(n), 1_000 + n as i64);
        }
        r.touch(id(u128::MAX), 5);
        let info = r.info.lock().unwrap();
        assert_eq!(info.len(), MAX_INFO_AGENTS);
        assert!(!info.contains_key(&id(0)), "the stalest is evicted");
        assert!(info.contains_key(&id(1)));
        assert!(info.contains_key(&id(u128::MAX)));
    }
}
