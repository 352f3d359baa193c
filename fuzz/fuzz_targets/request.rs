//! A request as the RPC server's worker handles it, up to the reply it writes. First byte: content type.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::request(data));
