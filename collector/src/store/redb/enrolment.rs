//! Enrolment tokens and how each agent was enrolled, in the collector's redb file.
//!
//! | table                 | key              | value                        |
//! |-----------------------|------------------|------------------------------|
//! | `enroll_tokens`       | token id         | `EnrollToken` (hash only)    |
//! | `enroll_token_hashes` | SHA-256 (32 B)   | token id                     |
//! | `agent_enrolment`     | agent id (u128)  | `Enrolment`                  |
//!
//! An enrolment reads the token, checks it is usable, counts the use and writes the agent in
//! one write transaction, so two agents racing for a single-use token cannot both get it.

use super::tables::AGENTS;
use super::{RedbStore, be, dec, enc};
use crate::core::registry::{AgentRecord, EnrollToken, Enrolment, MAX_ENROLL_TOKENS};
use crate::store::{EnrolmentStore, StoreError};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tally_protocol::batch::AgentId;
use tally_protocol::error::ErrorCode;

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("enroll_tokens");
const HASHES: TableDefinition<&[u8], &str> = TableDefinition::new("enroll_token_hashes");
const ENROLMENT: TableDefinition<u128, &[u8]> = TableDefinition::new("agent_enrolment");

/// Creates the tables that do not exist yet.
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(TOKENS)?;
    txn.open_table(HASHES)?;
    txn.open_table(ENROLMENT)?;
    Ok(())
}

impl EnrolmentStore for RedbStore {
    fn create_enroll_token(&self, t: &EnrollToken, now_ms: i64) -> Result<bool, StoreError> {
        let txn = self.db().begin_write()?;
        {
            let mut tokens = txn.open_table(TOKENS)?;
            let mut hashes = txn.open_table(HASHES)?;
            if tokens.get(t.id.as_str())?.is_some() || hashes.get(&t.hash[..])?.is_some() {
                return Ok(false);
            }
            if tokens.len()? as usize >= MAX_ENROLL_TOKENS {
                // Make room: drop spent tokens (revoked, expired or used up).
                let mut spent = Vec::new();
                for row in tokens.iter()? {
                    let (k, v) = row?;
                    let tok: EnrollToken = dec("enroll_tokens", v.value())?;
                    if tok.usable(now_ms).is_err() {
                        spent.push((k.value().to_string(), tok.hash));
                    }
                }
                for (id, hash) in spent {
                    tokens.remove(id.as_str())?;
                    hashes.remove(&hash[..])?;
                }
                if tokens.len()? as usize >= MAX_ENROLL_TOKENS {
                    return Err(StoreError::Invariant(format!(
                        "{MAX_ENROLL_TOKENS} usable enrolment tokens exist; revoke some first"
                    )));
                }
            }
            tokens.insert(t.id.as_str(), enc(t)?.as_slice())?;
            hashes.insert(&t.hash[..], t.id.as_str())?;
        }
        txn.commit().map_err(be)?;
        Ok(true)
    }

    fn enroll_tokens(&self) -> Result<Vec<EnrollToken>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(dec("enroll_tokens", row?.1.value())?);
        }
        Ok(out)
    }

    fn enroll_token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<EnrollToken>, StoreError> {
        let txn = self.db().begin_read()?;
        let Some(id) = txn
            .open_table(HASHES)?
            .get(&hash[..])?
            .map(|v| v.value().to_string())
        else {
            return Ok(None);
        };
        let t = txn.open_table(TOKENS)?;
        t.get(id.as_str())?
            .map(|v| dec("enroll_tokens", v.value()))
            .transpose()
    }

    fn revoke_enroll_token(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<EnrollToken>, StoreError> {
        let txn = self.db().begin_write()?;
        let tok = {
            let mut t = txn.open_table(TOKENS)?;
            let Some(mut tok): Option<EnrollToken> = t
                .get(id)?
                .map(|v| dec("enroll_tokens", v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            if tok.revoked_at_ms.is_none() {
                tok.revoked_at_ms = Some(now_ms);
                t.insert(id, enc(&tok)?.as_slice())?;
            }
            tok
        };
        txn.commit().map_err(be)?;
        Ok(Some(tok))
    }

    fn enrol(
        &self,
        rec: &AgentRecord,
        token_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<Result<EnrollToken, ErrorCode>, StoreError> {
        let txn = self.db().begin_write()?;
        let tok = {
            let hashes = txn.open_table(HASHES)?;
            let Some(id) = hashes.get(&token_hash[..])?.map(|v| v.value().to_string()) else {
                return Ok(Err(ErrorCode::InvalidEnrollToken));
            };
            let mut tokens = txn.open_table(TOKENS)?;
            let Some(mut tok): Option<EnrollToken> = tokens
                .get(id.as_str())?
                .map(|v| dec("enroll_tokens", v.value()))
                .transpose()?
            else {
                return Ok(Err(ErrorCode::InvalidEnrollToken));
            };
            if let Err(code) = tok.usable(now_ms) {
                return Ok(Err(code));
            }
            tok.uses += 1;
            tokens.insert(id.as_str(), enc(&tok)?.as_slice())?;
            txn.open_table(AGENTS)?
                .insert(rec.id.as_u128(), enc(rec)?.as_slice())?;
            let enrolment = Enrolment {
                token_id: tok.id.clone(),
                labels: tok.labels.clone(),
            };
            txn.open_table(ENROLMENT)?
                .insert(rec.id.as_u128(), enc(&enrolment)?.as_slice())?;
            tok
        };
        txn.commit().map_err(be)?;
        Ok(Ok(tok))
    }

    fn enrolment(&self, agent: AgentId) -> Result<Option<Enrolment>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(ENROLMENT)?;
        t.get(agent.as_u128())?
            .map(|v| dec("agent_enrolment", v.value()))
            .transpose()
    }
}
