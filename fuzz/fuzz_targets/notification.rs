//! A message on a notification queue as the listener handles it. First byte: content type.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::notification(data));
