//! Every log record of the test process, captured at `trace` (from warren and amiquip), for
//! tests that assert what is never logged. Install it once per test binary.

use std::sync::{Mutex, OnceLock};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (the process's only one) at `trace`.
pub fn capture_logs() {
    capture_logs_at(log::LevelFilter::Trace);
}

/// Installs the capturing logger (the process's only one) if it is not yet, keeping records
/// up to `level` (or the more verbose level an earlier call asked for): for tests that wait
/// for a log line without paying for `trace` in every other test of the binary.
pub fn capture_logs_at(level: log::LevelFilter) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        log::set_logger(&Capture).expect("the only logger");
    });
    static LEVEL: Mutex<log::LevelFilter> = Mutex::new(log::LevelFilter::Off);
    let mut current = LEVEL.lock().unwrap_or_else(|e| e.into_inner());
    if level > *current {
        *current = level;
        log::set_max_level(level);
    }
}

/// Every line captured so far.
pub fn captured() -> String {
    LINES.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
}
