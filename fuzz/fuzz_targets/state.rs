//! The state framing, through the decoder, the stream reader, the stored-state verifier and the
//! writer (`shellflip::fuzzing::state`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shellflip::fuzzing::state(data));
