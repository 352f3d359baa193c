//! A JSON body (application/json): oslo's envelope removed, the message decoded every way warren reads one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::oslo_envelope(data));
