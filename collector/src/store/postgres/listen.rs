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

/// Runs the listener on its own thread until `stop` is set.
pub fn spawn(
    config: postgres::Config,
    tls: super::tls::PgTls,
    tx: broadcast::Sender<PgChange>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(String::from("tally-pg-listen"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = listen_once(&config, &tls, &tx, &stop) {
                    tracing::warn!(error = %e, "postgres listener reconnecting");
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        })
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
            let change = match note.channel() {
                "tally_catalog" => PgChange::Catalog,
                "tally_entitlements" if note.payload().is_empty() => PgChange::Entitlements(None),
                "tally_entitlements" => PgChange::Entitlements(Some(note.payload().to_owned())),
                "tally_registry" => PgChange::Revoked(note.payload().to_owned()),
                _ => continue,
            };
            let _ = tx.send(change);
        }
        drop(it);
        drop(n);
        if client.is_closed() {
            break;
        }
    }
    Ok(())
}
