//! Orb's late path (decision 0122): groups past the grace period move into a backfill, one at a
//! time (Orb refuses overlapping pending backfills), which the destination's runner drives:
//! create (our key as `Idempotency-Key`), ingest with `?backfill_id=`, close, wait for
//! `reflected`. A group that may have arrived before it went late is looked up with event
//! search first: found means sent.

use std::time::Duration;

use crate::ledger_feed::runner::{Runner, blocking};
use crate::ledger_feed::store::{BackfillPhase, BackfillRecord};
use crate::ledger_feed::wire;
use crate::ledger_feed::{FwdEvent, FwdGroup};
use crate::time::rfc3339;

impl Runner {
    /// Starts a backfill for `old` (Orb) if none is in progress. A group that may have been
    /// delivered before (attempted) is first looked up with event search: found means sent.
    pub(crate) async fn start_backfill(&mut self, old: Vec<FwdGroup>) -> Result<(), String> {
        let d = self.cfg.destination;
        if blocking(&self.store, move |s| s.backfill(d))
            .await?
            .is_some()
        {
            return Ok(());
        }
        let attempted: Vec<String> = old
            .iter()
            .filter(|g| g.attempts > 0)
            .map(|g| g.event.key.clone())
            .collect();
        let mut found = std::collections::HashSet::new();
        if !attempted.is_empty() {
            let Some(f) = super::search(&self.client, &attempted).await else {
                return Err(String::from("orb event search failed; backfill waits"));
            };
            found = f.into_iter().map(|e| e.id).collect();
        }
        let (delivered, todo): (Vec<_>, Vec<_>) =
            old.into_iter().partition(|g| found.contains(&g.event.key));
        if !delivered.is_empty() {
            let ids: Vec<u64> = delivered.iter().map(|g| g.id).collect();
            blocking(&self.store, move |s| s.apply(d, &ids, FwdEvent::Delivered)).await?;
        }
        let Some(start) = todo.iter().map(|g| g.event.timestamp_s).min() else {
            return Ok(());
        };
        // Orb: a backfill spans at most 31 days.
        let limit_end = start + 31 * 86_400;
        let members: Vec<&FwdGroup> = todo
            .iter()
            .filter(|g| g.event.timestamp_s < limit_end)
            .collect();
        let end = members
            .iter()
            .map(|g| g.event.timestamp_s + 60)
            .max()
            .unwrap_or(start + 60)
            .min(limit_end);
        let ns = blocking(&self.store, |s| s.namespace()).await?;
        let first = members.first().map_or(0, |g| g.id);
        let rec = BackfillRecord {
            key: format!("tly-{ns}-bf-{first}-{start}"),
            start_s: start,
            end_s: end,
            orb_id: None,
            phase: BackfillPhase::Create,
            next_attempt_ms: 0,
            attempts: 0,
        };
        let ids: Vec<u64> = members.iter().map(|g| g.id).collect();
        tracing::info!(groups = ids.len(), start = %rfc3339(start), end = %rfc3339(end), "orb backfill starts");
        blocking(&self.store, move |s| s.start_backfill(d, &rec, &ids)).await
    }

    /// Drives the backfill in progress one step.
    pub(crate) async fn drive_backfill(&mut self) -> Result<(), String> {
        let d = self.cfg.destination;
        let Some(mut rec) = blocking(&self.store, move |s| s.backfill(d)).await? else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        if rec.next_attempt_ms > now {
            return Ok(());
        }
        let backoff = self.cfg.backoff;
        let retry = |rec: &mut BackfillRecord, rng: u64, after: Option<Duration>| {
            rec.attempts = rec.attempts.saturating_add(1);
            let delay = backoff.delay(rec.attempts.min(10), rng);
            let delay = after.map_or(delay, |a| a.max(delay));
            rec.next_attempt_ms = now + i64::try_from(delay.as_millis()).unwrap_or(60_000);
        };
        match rec.phase {
            BackfillPhase::Create => {
                let body = serde_json::json!({
                    "timeframe_start": rfc3339(rec.start_s),
                    "timeframe_end": rfc3339(rec.end_s),
                })
                .to_string();
                let key = rec.key.clone();
                let r = self
                    .request(
                        reqwest::Method::POST,
                        "/v1/events/backfills",
                        Some(body),
                        Some(&key),
                        0,
                    )
                    .await?;
                let id = r
                    .as_ref()
                    .filter(|r| (200..300).contains(&r.status))
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
                    .and_then(|v| v.get("id").and_then(|x| x.as_str()).map(str::to_owned));
                match id {
                    Some(id) => {
                        rec.orb_id = Some(id);
                        rec.phase = BackfillPhase::Ingest;
                        rec.attempts = 0;
                    }
                    None => {
                        if let Some(r) = &r {
                            self.error(format!(
                                "orb backfill create: {}",
                                wire::error_text(r.status, &r.body)
                            ));
                        }
                        let rng = self.random();
                        retry(
                            &mut rec,
                            rng,
                            r.and_then(|r| r.retry_after_s).map(Duration::from_secs),
                        );
                    }
                }
            }
            BackfillPhase::Ingest => {
                let key = rec.key.clone();
                let groups =
                    blocking(&self.store, move |s| s.backfill_groups(d, &key, usize::MAX)).await?;
                let todo: Vec<FwdGroup> = groups.into_iter().filter(|g| !g.ingested).collect();
                if todo.is_empty() {
                    rec.phase = BackfillPhase::Close;
                } else {
                    let path = format!(
                        "/v1/ingest?backfill_id={}",
                        rec.orb_id.as_deref().unwrap_or_default()
                    );
                    for chunk in todo.chunks(d.batch_max()) {
                        self.send_batch(chunk.to_vec(), &path, true).await?;
                        if self.stopping() {
                            break;
                        }
                    }
                    // Phase moves on the next pass, once every group is ingested.
                }
            }
            BackfillPhase::Close | BackfillPhase::Wait => {
                let id = rec.orb_id.clone().unwrap_or_default();
                let (method, path) = if rec.phase == BackfillPhase::Close {
                    (
                        reqwest::Method::POST,
                        format!("/v1/events/backfills/{id}/close"),
                    )
                } else {
                    (reqwest::Method::GET, format!("/v1/events/backfills/{id}"))
                };
                let r = self.request(method, &path, None, None, 0).await?;
                let closing = rec.phase == BackfillPhase::Close;
                // A close that was processed but whose answer was lost may be refused when resent
                // (already closed): the status read tells.
                if closing
                    && r.as_ref()
                        .is_some_and(|r| (400..500).contains(&r.status) && r.status != 429)
                {
                    rec.phase = BackfillPhase::Wait;
                    rec.next_attempt_ms = now + 500;
                    return blocking(&self.store, move |s| s.put_backfill(d, Some(&rec))).await;
                }
                let status = r
                    .as_ref()
                    .filter(|r| (200..300).contains(&r.status))
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
                    .and_then(|v| v.get("status").and_then(|x| x.as_str()).map(str::to_owned));
                match status.as_deref() {
                    Some("reflected") => {
                        let key = rec.key.clone();
                        let groups =
                            blocking(&self.store, move |s| s.backfill_groups(d, &key, usize::MAX))
                                .await?;
                        let ids: Vec<u64> = groups.iter().map(|g| g.id).collect();
                        let n = ids.len() as u64;
                        blocking(&self.store, move |s| {
                            s.apply(d, &ids, FwdEvent::Delivered)?;
                            s.put_backfill(d, None)
                        })
                        .await?;
                        self.sent(n);
                        tracing::info!(events = n, "orb backfill reflected");
                        return Ok(());
                    }
                    Some("reverted") | Some("pending_revert") => {
                        // Someone reverted it in Orb: the events are not there. Dead-letter them
                        // for an operator rather than resend on our own.
                        let key = rec.key.clone();
                        let groups =
                            blocking(&self.store, move |s| s.backfill_groups(d, &key, usize::MAX))
                                .await?;
                        let ids: Vec<u64> = groups.iter().map(|g| g.id).collect();
                        blocking(&self.store, move |s| {
                            s.apply(
                                d,
                                &ids,
                                FwdEvent::Rejected(String::from("orb backfill was reverted")),
                            )?;
                            s.put_backfill(d, None)
                        })
                        .await?;
                        return Ok(());
                    }
                    Some(_) => {
                        rec.phase = BackfillPhase::Wait;
                        rec.next_attempt_ms = now + 500;
                    }
                    None => {
                        let rng = self.random();
                        retry(&mut rec, rng, None);
                    }
                }
            }
        }
        blocking(&self.store, move |s| s.put_backfill(d, Some(&rec))).await
    }
}
