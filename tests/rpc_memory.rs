//! The shared RPC scenarios on the in-process transport (`memory://`).

mod common;

scenario_tests!(common::memory_url());
