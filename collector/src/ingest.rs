//! The group committer: the one writer between connections and the [`Store`].
//!
//! Owns a dedicated thread that takes verified batches from a bounded queue, gathers as many as
//! are waiting (up to [`GroupLimits`]) and commits them in one durable store transaction, then
//! answers each batch's reply channel in queue order. Group commit is how the fsync per
//! transaction is shared by many batches.
//!
//! Guarantees: a reply is sent only after the transaction holding the batch committed; if the
//! transaction fails, every batch of the group gets `Err(ErrorCode::Internal)` and nothing of it
//! was written. The thread ends once every sender is dropped and the queue is drained, so
//! dropping the senders and joining the thread commits everything in flight.

use crate::metrics::Metrics;
use crate::store::{IngestBatch, IngestOutcome, Store};
use std::sync::Arc;
use std::time::Instant;
use tally_clock::{Clock, SharedClock};
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::AckOutcome;
use tokio::sync::{mpsc, oneshot};

pub use crate::core::ingest::IngestReply;

/// One verified batch waiting to be committed.
pub struct IngestRequest {
    /// The batch.
    pub batch: IngestBatch,
    /// Where the outcome goes once durable.
    pub reply: oneshot::Sender<IngestReply>,
}

/// The ingest handle: the connections' end of the committer's queue.
///
/// The queue holds at most [`GroupLimits::queue`] batches; when it is full, [`IngestHandle::submit`]
/// waits (back-pressure reaches the agents through their in-flight window).
#[derive(Clone)]
pub struct IngestHandle {
    tx: mpsc::Sender<IngestRequest>,
}

/// The committer stopped (the collector is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the committer stopped")]
pub struct CommitterGone;

impl IngestHandle {
    /// Queues a verified batch; the receiver gets its outcome once it is durable.
    pub async fn submit(
        &self,
        batch: IngestBatch,
    ) -> Result<oneshot::Receiver<IngestReply>, CommitterGone> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(IngestRequest { batch, reply })
            .await
            .map_err(|_| CommitterGone)?;
        Ok(rx)
    }

    /// The raw queue sender (benchmarks drive the committer directly).
    pub fn sender(&self) -> &mpsc::Sender<IngestRequest> {
        &self.tx
    }
}

impl From<mpsc::Sender<IngestRequest>> for IngestHandle {
    fn from(tx: mpsc::Sender<IngestRequest>) -> Self {
        IngestHandle { tx }
    }
}

/// How large one group commit may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most batches per transaction.
    pub max_batches: usize,
    /// Most deltas per transaction (a group always takes at least one batch).
    pub max_deltas: usize,
    /// Capacity of the queue in front of the committer.
    pub queue: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            max_batches: 2048,
            max_deltas: 100_000,
            queue: 4096,
        }
    }
}

/// Starts the committer thread; returns the queue's sender and the thread.
pub fn spawn(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    limits: GroupLimits,
    clock: SharedClock,
) -> std::io::Result<(mpsc::Sender<IngestRequest>, std::thread::JoinHandle<()>)> {
    spawn_with_wake(store, metrics, limits, None, clock)
}

/// [`spawn`], and `outbox_wake` is notified after each commit that wrote Stripe outbox rows.
pub fn spawn_with_wake(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    limits: GroupLimits,
    outbox_wake: Option<Arc<tokio::sync::Notify>>,
    clock: SharedClock,
) -> std::io::Result<(mpsc::Sender<IngestRequest>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(limits.queue.max(1));
    let thread = std::thread::Builder::new()
        .name(String::from("tally-committer"))
        .spawn(move || {
            run(
                rx,
                store.as_ref(),
                &metrics,
                limits,
                outbox_wake.as_deref(),
                clock.as_ref(),
            )
        })?;
    Ok((tx, thread))
}

fn run(
    mut rx: mpsc::Receiver<IngestRequest>,
    store: &dyn Store,
    metrics: &Metrics,
    limits: GroupLimits,
    outbox_wake: Option<&tokio::sync::Notify>,
    clock: &dyn Clock,
) {
    let mut appended = store.outbox_appended();
    while let Some(first) = rx.blocking_recv() {
        let mut deltas = first.batch.body.deltas.len();
        let mut group = vec![first];
        while group.len() < limits.max_batches && deltas < limits.max_deltas {
            match rx.try_recv() {
                Ok(r) => {
                    deltas += r.batch.body.deltas.len();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        commit_group(store, metrics, group, clock.now_ms());
        let now = store.outbox_appended();
        if now != appended {
            appended = now;
            if let Some(w) = outbox_wake {
                w.notify_one();
            }
        }
    }
}

fn commit_group(store: &dyn Store, metrics: &Metrics, group: Vec<IngestRequest>, now: i64) {
    let (batches, replies): (Vec<IngestBatch>, Vec<_>) =
        group.into_iter().map(|r| (r.batch, r.reply)).unzip();
    let started = Instant::now();
    let result = store.ingest(&batches, now);
    metrics
        .commit_latency
        .observe(started.elapsed().as_secs_f64());
    metrics.group_size.observe(batches.len() as f64);
    match result {
        Ok(outcomes) if outcomes.len() == batches.len() => {
            for ((b, reply), outcome) in batches.iter().zip(replies).zip(outcomes) {
                count(metrics, b, outcome, now);
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(_) | Err(_) => {
            if let Err(e) = &result {
                tracing::error!(error = %e, batches = batches.len(), "group commit failed");
            }
            for reply in replies {
                let _ = reply.send(Err(ErrorCode::Internal));
            }
        }
    }
}

fn count(metrics: &Metrics, b: &IngestBatch, outcome: IngestOutcome, now: i64) {
    match outcome {
        IngestOutcome::Ack(AckOutcome::Committed) => {
            metrics.batch("committed");
            metrics.deltas.inc_by(b.body.deltas.len() as u64);
            if let Some(newest) = b.body.deltas.iter().map(|d| d.last_at_ms).max() {
                metrics
                    .metering_lag
                    .observe(now.saturating_sub(newest).max(0) as f64 / 1000.0);
            }
        }
        IngestOutcome::Ack(AckOutcome::Duplicate) => {
            metrics.batch("duplicate");
            metrics.duplicates.inc();
        }
        IngestOutcome::Ack(AckOutcome::Quarantined { .. }) => metrics.batch("quarantined"),
        IngestOutcome::Refused(_) => metrics.batch("refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_protocol::batch::{AgentId, BatchBody, SignedBatch};
    use tally_protocol::ed25519_dalek::SigningKey;

    fn batch(seq: u64) -> IngestBatch {
        let key = SigningKey::from_bytes(&[4; 32]);
        let body = BatchBody::new(
            AgentId::from_public_key(&key.verifying_key()),
            1,
            seq,
            0,
            vec![],
        )
        .unwrap();
        let signed = SignedBatch::seal(&body, &key).unwrap();
        IngestBatch { body, signed }
    }

    /// At the queue's limit a submission waits (back-pressure) until the committer takes one.
    #[tokio::test]
    async fn a_full_queue_makes_submit_wait() {
        let (tx, mut rx) = mpsc::channel(1);
        let handle = IngestHandle::from(tx);
        let _first = handle.submit(batch(1)).await.unwrap();
        let second = handle.submit(batch(2));
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "the queue is full: submit waits"
        );
        let taken = rx.recv().await.unwrap();
        assert_eq!(taken.batch.body.seq, 1);
        let _second = second.await.unwrap();
        drop(rx);
        assert_eq!(handle.submit(batch(3)).await.err(), Some(CommitterGone));
    }
}
