//! A transport URL as Transport::builder(url).build() reads it before connecting.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::url(data));
