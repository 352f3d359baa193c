//! decode(encode(value)) == value for the Python-exact JSON writer and both codecs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::json_roundtrip(data));
