//! Changes made through other collectors: one `LISTEN` connection per collector.
//!
//! Writers notify in their transaction (delivered at commit): `tally_catalog` (a meter was put),
//! `tally_entitlements` (payload: a customer, or empty for a plan: every customer) and
//! `tally_registry` (payload: a revoked agent's id in hex). The listener turns them into
//! [`PgChange`]s on a bounded broadcast channel; after (re)connecting it sends
//! [`PgChange::Resync`], since notifications sent while it was away are lost.
//!
//! Chosen over polling (docs/decisions/0092): a notification reaches the other collectors within
//! milliseconds of the commit and costs nothing while idle; the 1 s bound holds as long as the
//! listener is connected, and a reconnect resyncs everything.
//!
//! Behind a transaction-mode pooler (pgBouncer) `LISTEN` does not work; the listener then
//! either connects directly (`--ledger-listen-url`) or polls the change log every writer also
//! fills (`--ledger-listen-url poll`, decision 0097).

use postgres::fallible_iterator::FallibleIterator;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::broadcast;

/// Changes buffered per subscriber (past it a slow one gets `Lagged` and should resync).
pub const CHANGES_MAX: usize = 1024;

/// A change made through some collector (this one included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgChange {
    /// The catalog moved on.
    Catalog,
    /// Entitlements of one customer (`Some`) or of every customer (`None`) changed.
    Entitlements(Option<String>),
    /// This agent (hex id) was revoked.
    Revoked(String),
    /// Notifications may have been missed: refresh everything.
    Resync,
}

/// Where changes are heard from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `LISTEN` on a session connection to this configuration.
    Listen(postgres::Config, super::tls::PgTls),
    /// Poll the change log (`tally_changes`) through this configuration.
    Poll(postgres::Config, super::tls::PgTls),
}

/// How often the change log is polled; changes reach this collector within about this long.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// The change log rows each poll reads: the last seconds of changes, so a transaction that
/// commits up to this long after writing its row is still seen.
const POLL_WINDOW_S: i32 = 10;
/// A full resync this often while polling (a commit later than the window is caught here),
/// and the change log pruned of rows older than an hour.
const POLL_RESYNC: Duration = Duration::from_secs(60);

/// Notifies `channel` with `payload` in the transaction (delivered at commit) and records it
/// in the change log for collectors that poll.
pub(crate) fn notify(
    tx: &mut super::pool::Tx<'_>,
    channel: &'static str,
    payload: &str,
) -> Result<(), crate::store::StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])?;
    tx.execute(
        "INSERT INTO tally_changes (channel, payload) VALUES ($1, $2)",
        &[&channel, &payload],
    )?;
    Ok(())
}

fn change_of(channel: &str, payload: &str) -> Option<PgChange> {
    Some(match channel {
        "tally_catalog" => PgChange::Catalog,
        "tally_entitlements" if payload.is_empty() => PgChange::Entitlements(None),
        "tally_entitlements" => PgChange::Entitlements(Some(payload.to_owned())),
        "tally_registry" => PgChange::Revoked(payload.to_owned()),
        _ => return None,
    })
}

/// Runs the listener (or poller) on its own thread until `stop` is set.
pub fn spawn(
    source: Source,
    tx: broadcast::Sender<PgChange>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(String::from("tally-pg-listen"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = match &source {
                    Source::Listen(config, tls) => listen_once(config, tls, &tx, &stop),
                    Source::Poll(config, tls) => poll_once(config, tls, &tx, &stop),
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "postgres listener reconnecting");
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        })
}

/// Polls the change log until the connection fails or `stop` is set.
fn poll_once(
    config: &postgres::Config,
    tls: &super::tls::PgTls,
    tx: &broadcast::Sender<PgChange>,
    stop: &AtomicBool,
) -> Result<(), postgres::Error> {
    let mut client = tls.connect(config)?;
    let _ = tx.send(PgChange::Resync);
    let mut seen: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let mut last_resync = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let rows = client.query(
            "SELECT id, channel, payload FROM tally_changes \
             WHERE at > now() - make_interval(secs => $1) ORDER BY id",
            &[&f64::from(POLL_WINDOW_S)],
        )?;
        // Only the window's ids need remembering: older rows are never read again.
        let mut now_seen = std::collections::HashSet::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.get(0);
            now_seen.insert(id);
            if !seen.contains(&id)
                && let Some(c) = change_of(r.get(1), r.get(2))
            {
                let _ = tx.send(c);
            }
        }
        seen = now_seen;
        if last_resync.elapsed() >= POLL_RESYNC {
            last_resync = std::time::Instant::now();
            let _ = tx.send(PgChange::Resync);
            client.execute(
                "DELETE FROM tally_changes WHERE at < now() - interval '1 hour'",
                &[],
            )?;
        }
        std::thread::sleep(POLL_EVERY);
    }
    Ok(())
}

fn listen_once(
    config: &postgres::Config,
    tls: &super::tls::PgTls,
    tx: &broadcast::Sender<PgChange>,
    stop: &AtomicBool,
) -> Result<(), postgres::Error> {
    let mut client = tls.connect(config)?;
    client
        .batch_execute("LISTEN tally_catalog; LISTEN tally_entitlements; LISTEN tally_registry")?;
    let _ = tx.send(PgChange::Resync);
    while !stop.load(Ordering::Relaxed) {
        let mut n = client.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        // `None` after 200 ms of silence: look at `stop` and the connection, then wait again.
        while let Some(note) = it.next()? {
            if let Some(change) = change_of(note.channel(), note.payload()) {
                let _ = tx.send(change);
            }
        }
        drop(it);
        drop(n);
        if client.is_closed() {
            break;
        }
    }
    Ok(())
}
