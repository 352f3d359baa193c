//! A MessagePack body (application/msgpack), decoded every way warren reads a message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren::fuzzing::msgpack_message(data));
