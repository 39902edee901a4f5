//! The meter catalog as the collector keeps it: the sample meters of the quickstart (SPEC §8)
//! and the checks applied before a meter is stored.
//!
//! The catalog itself lives in the [`crate::store::Store`] (versioned: every change bumps the
//! version and is kept); [`Catalogs::put_meter`] stores it and pushes it to every
//! connected agent.
//!
//! Owns [`Catalogs`], the catalog handle: the one writer of the catalog and the one sender of
//! its changes (connections subscribe; the admin API writes).

/// The quickstart's meters (SPEC §8); defined beside the catalog types so agents' tests and the
/// collector share one definition.
pub use tally_protocol::catalog::sample_meters;

use crate::store::{Store, StoreError};
use std::sync::Arc;
use tally_protocol::catalog::{Catalog, MeterDef};
use tokio::sync::watch;

/// The catalog handle: writes meters to the store and tells every subscriber.
pub struct Catalogs {
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<Catalog>>,
}

impl Catalogs {
    /// Reads the stored catalog and publishes it when it is newer (a meter put through another
    /// collector on the same PostgreSQL). Blocking.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let catalog = self.store.catalog()?;
        if catalog.version > self.tx.borrow().version {
            self.tx.send_replace(Arc::new(catalog));
        }
        Ok(())
    }

    /// A handle starting from the store's current catalog.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let (tx, _) = watch::channel(Arc::new(store.catalog()?));
        Ok(Catalogs { store, tx })
    }

    /// Adds or replaces a meter and pushes the new catalog to every subscriber.
    pub fn put_meter(&self, def: &MeterDef) -> Result<Catalog, StoreError> {
        let catalog = self.store.put_meter(def)?;
        if catalog.version != self.tx.borrow().version {
            self.tx.send_replace(Arc::new(catalog.clone()));
        }
        Ok(catalog)
    }

    /// A receiver that sees every later change (a connection's catalog pushes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_valid() {
        let m = sample_meters().unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|d| d.validate().is_ok()));
        assert_eq!(m[1].group_by.len(), 1);
    }
}
