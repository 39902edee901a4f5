//! Replays the sidecar's fuzz corpora in `fuzz/corpus/` through the fuzz targets' entry points,
//! so they run on every `cargo test` and cannot rot; findings once fixed stay here as files.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/corpus.rs"]
mod corpus;
use corpus::corpus;

#[test]
fn cloudevents_corpus() {
    let catalog = tally_sidecar::fuzz::catalog();
    let files = corpus("cloudevents");
    assert!(files.len() >= 5, "seed corpus too small");
    for (path, data) in files {
        eprintln!("{}", path.display());
        tally_sidecar::fuzz::cloudevents(&catalog, &data);
    }
}

#[test]
fn stripe_form_corpus() {
    let catalog = tally_sidecar::fuzz::catalog();
    let files = corpus("stripe_form");
    assert!(files.len() >= 5, "seed corpus too small");
    for (path, data) in files {
        eprintln!("{}", path.display());
        tally_sidecar::fuzz::stripe_form(&catalog, &data);
    }
}
