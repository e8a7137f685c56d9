//! The control socket's frames (4-byte big-endian length, JSON), as a client wrote them: the
//! reader and the server's handling of a request (`shellflip::fuzzing::control_frames`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shellflip::fuzzing::control_frames(data));
