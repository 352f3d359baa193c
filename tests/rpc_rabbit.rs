//! The shared RPC scenarios against the real broker (`WARREN_TEST_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/`), plus what only a broker can show.

mod common;

scenario_tests!(common::broker_url());
