//! Any byte string as a batch frame: decoding and signature verification never panic, and only
//! the exact signed bytes verify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tally_protocol::fuzz::verify_batch(data));
