//! A message on the reply queue as the client reads it, failure string included. First byte: content type.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::reply(data));
