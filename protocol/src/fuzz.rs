//! Entry points shared by the fuzz targets in `fuzz/` and the test that replays their corpora,
//! so the corpora are exercised on every test run and cannot rot.

use crate::batch::SignedBatch;
use crate::frame::{self, Frame};
use ed25519_dalek::SigningKey;

/// The key that signs the `verify_batch` seed corpus.
pub fn corpus_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// Decodes `data` as a stream of frames; whatever decodes must re-encode to the same bytes.
pub fn decode_frames(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = frame::decode_frame(rest) {
        // Canonical encoding: a decoded frame encodes back to exactly the bytes it came from.
        assert_eq!(
            frame::encode_frame(&frame).ok().as_deref(),
            Some(&rest[..used])
        );
        rest = &rest[used..];
    }
}

/// Decodes `data` as a batch frame and verifies it with [`corpus_key`]; a batch that verifies
/// must hold deltas that either validate or are refused with a typed error.
pub fn verify_batch(data: &[u8]) {
    let Ok(Some((Frame::Batch(batch), _))) = frame::decode_frame(data) else {
        return;
    };
    verify_signed(&batch);
}

fn verify_signed(batch: &SignedBatch) {
    if let Ok(body) = batch.verify(&corpus_key().verifying_key()) {
        assert_eq!(
            body.canonical_bytes().ok().as_deref(),
            Some(&batch.body[..])
        );
        for d in body.deltas.iter() {
            let _ = d.validate();
        }
    }
}
