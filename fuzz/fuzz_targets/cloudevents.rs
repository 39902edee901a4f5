//! Any bytes as the body of the sidecar's CloudEvents ingest (structured, batch and plain
//! JSON): no panic, and whatever is accepted is well formed (see `tally_sidecar::fuzz::cloudevents`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use tally_sidecar::mapping::IngestCatalog;

static CATALOG: LazyLock<IngestCatalog> = LazyLock::new(tally_sidecar::fuzz::catalog);

fuzz_target!(|data: &[u8]| tally_sidecar::fuzz::cloudevents(&CATALOG, data));
