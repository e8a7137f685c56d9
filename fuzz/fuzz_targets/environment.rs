//! The inherited-descriptor environment (`SHELLFLIP_*`, `LISTEN_*`) and the readiness line
//! (`shellflip::fuzzing::environment`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shellflip::fuzzing::environment(data));
