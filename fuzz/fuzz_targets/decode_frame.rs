//! Any byte string fed to the frame decoder: no panic, no unbounded allocation, and whatever
//! decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tally_protocol::fuzz::decode_frames(data));
