//! Measurements of a benchmark run, shared by `warren bench` and the bare-amiquip baseline
//! (`examples/bare_amiquip.rs` includes this file), so both report the same numbers the same
//! way (see `../shared/reference/bench-contract.md`):
//!
//! * `ok` counts completed operations; `per_second[i]` those completed during second `i`;
//! * latencies (µs, per call, from just before publish to the result in hand) go into a
//!   log-linear histogram (≤ 1/32 relative error) that many threads fill without locking;
//! * errors are counted by kind, never abort the run;
//! * `rss_kib` is the process's peak resident set.
//!
//! [`Limit`] decides when a run is over (a deadline, a number of operations, a stop flag).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Sub-buckets per power of two: 32 → at most ~3% error on a percentile.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

/// A lock-free latency histogram in microseconds.
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..64 * SUB).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros() - SUB_BITS;
    let sub = (v >> exp) - SUB;
    ((u64::from(exp) + 1) * SUB + sub) as usize
}

fn lowest_of(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let exp = bucket / SUB - 1;
    (SUB + bucket % SUB) << exp
}

impl Histogram {
    pub fn record(&self, micros: u64) {
        self.buckets[bucket_of(micros).min(self.buckets.len() - 1)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    /// The value at quantile `q` (0..=1), 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return lowest_of(bucket).min(self.max());
            }
        }
        self.max()
    }

    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

/// Error counts by kind.
#[derive(Default)]
pub struct Errors {
    pub timeout: AtomicU64,
    pub remote: AtomicU64,
    pub delivery: AtomicU64,
    pub other: AtomicU64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        [&self.timeout, &self.remote, &self.delivery, &self.other]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn json(&self) -> Value {
        json!({
            "timeout": self.timeout.load(Ordering::Relaxed),
            "remote": self.remote.load(Ordering::Relaxed),
            "delivery": self.delivery.load(Ordering::Relaxed),
            "other": self.other.load(Ordering::Relaxed),
        })
    }
}

/// Everything a run measures.
pub struct Stats {
    pub ok: AtomicU64,
    pub errors: Errors,
    pub latency: Histogram,
    started: Instant,
    /// When the first operation started and the last one completed (µs since `started`).
    first_start: AtomicU64,
    last_done: AtomicU64,
    per_second: Mutex<Vec<u64>>,
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats {
            ok: AtomicU64::new(0),
            errors: Errors::default(),
            latency: Histogram::default(),
            started: Instant::now(),
            first_start: AtomicU64::new(u64::MAX),
            last_done: AtomicU64::new(0),
            per_second: Mutex::new(Vec::new()),
        })
    }

    fn micros_now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// An operation is about to start (its first one marks the start of the run).
    pub fn starting(&self) {
        if self.first_start.load(Ordering::Relaxed) == u64::MAX {
            self.first_start
                .fetch_min(self.micros_now(), Ordering::Relaxed);
        }
    }

    /// An operation completed.
    pub fn done(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.last_done
            .fetch_max(self.micros_now(), Ordering::Relaxed);
    }

    /// A server handled a message (counted as both the start and the end of an operation).
    pub fn handled(&self) {
        self.starting();
        self.done();
    }

    /// Waits until `expected` operations completed, the limit's deadline passed (or, without
    /// one, a minute) or the run was stopped: how `--role both` casts end, once the last sent
    /// cast was handled.
    pub fn wait_for(&self, expected: u64, limit: &Limit) {
        let until = limit
            .end
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        while self.ok.load(Ordering::Relaxed) < expected
            && Instant::now() < until
            && !limit.stop.load(Ordering::Relaxed)
        {
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// A call completed after `latency`.
    pub fn call_done(&self, latency: Duration) {
        self.latency.record(latency.as_micros() as u64);
        self.done();
    }

    /// Seconds from the first operation's start to the last one's completion.
    pub fn active_seconds(&self) -> f64 {
        let first = self.first_start.load(Ordering::Relaxed);
        let last = self.last_done.load(Ordering::Relaxed);
        if first == u64::MAX || last <= first {
            0.0
        } else {
            (last - first) as f64 / 1e6
        }
    }

    /// Starts the once-a-second ticker: records `per_second` and, unless `quiet`, prints a
    /// progress line on stderr. Stops when `stop` is set.
    pub fn ticker(self: &Arc<Self>, stop: Arc<AtomicBool>, quiet: bool) -> JoinHandle<()> {
        let stats = self.clone();
        thread::spawn(move || {
            let mut last = 0;
            let mut second = 0;
            let tick = stats.started;
            while !stop.load(Ordering::Acquire) {
                second += 1;
                let due = tick + Duration::from_secs(second);
                while Instant::now() < due {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    thread::sleep((due - Instant::now()).min(Duration::from_millis(50)));
                }
                let ok = stats.ok.load(Ordering::Relaxed);
                if let Ok(mut per_second) = stats.per_second.lock() {
                    per_second.push(ok - last);
                }
                if !quiet {
                    eprintln!(
                        "[{second:>3}s] {:>8}/s  p50 {:>6} µs  p99 {:>6} µs  errors {}",
                        ok - last,
                        stats.latency.quantile(0.5),
                        stats.latency.quantile(0.99),
                        stats.errors.total()
                    );
                }
                last = ok;
            }
        })
    }

    /// The contract's JSON object; `fields` adds the run's parameters (`mode`, `clients`...).
    pub fn report(&self, fields: Value, duration_s: f64) -> Value {
        let ok = self.ok.load(Ordering::Relaxed);
        let active = self.active_seconds();
        let throughput = if active > 0.0 {
            ok as f64 / active
        } else {
            0.0
        };
        let mut report = fields;
        let extra = json!({
            "duration_s": (duration_s * 1000.0).round() / 1000.0,
            "ok": ok,
            "errors": self.errors.json(),
            "throughput_per_s": (throughput * 10.0).round() / 10.0,
            "latency_us": {
                "p50": self.latency.quantile(0.5),
                "p90": self.latency.quantile(0.9),
                "p99": self.latency.quantile(0.99),
                "max": self.latency.max(),
            },
            "rss_kib": peak_rss_kib(),
            "per_second": self.per_second.lock().map(|p| p.clone()).unwrap_or_default(),
        });
        if let (Some(report), Some(extra)) = (report.as_object_mut(), extra.as_object()) {
            report.extend(extra.clone());
        }
        report
    }
}

/// When a run ends: at a deadline, after a number of operations, or when stopped.
pub struct Limit {
    pub end: Option<Instant>,
    remaining: Option<AtomicU64>,
    pub stop: Arc<AtomicBool>,
}

impl Limit {
    /// A run of `duration` (if any) or `count` operations (if any), ended early by `stop`.
    pub fn new(duration: Option<Duration>, count: Option<u64>, stop: Arc<AtomicBool>) -> Limit {
        Limit {
            end: duration.map(|d| Instant::now() + d),
            remaining: count.map(AtomicU64::new),
            stop,
        }
    }

    /// The deadline passed or the run was stopped.
    pub fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.end.is_some_and(|end| Instant::now() >= end)
    }

    /// Claims the next operation; `false` when the run is over.
    pub fn claim(&self) -> bool {
        !self.over()
            && self.remaining.as_ref().is_none_or(|remaining| {
                remaining
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
            })
    }
}

/// Peak resident set of this process (`VmHWM`), KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// The human summary printed before the JSON line.
pub fn summary(report: &Value) -> String {
    format!(
        "{} {} clients={} payload={}B codec={} confirm={}: {} ok in {:.2}s = {:.1}/s; latency p50 {} µs p90 {} µs p99 {} µs max {} µs; errors {}; peak RSS {} KiB",
        report["tool"].as_str().unwrap_or("warren"),
        report["mode"].as_str().unwrap_or("?"),
        report["clients"],
        report["payload"],
        report["codec"].as_str().unwrap_or("?"),
        report["confirm"].as_str().unwrap_or("?"),
        report["ok"],
        report["duration_s"].as_f64().unwrap_or(0.0),
        report["throughput_per_s"].as_f64().unwrap_or(0.0),
        report["latency_us"]["p50"],
        report["latency_us"]["p90"],
        report["latency_us"]["p99"],
        report["latency_us"]["max"],
        report["errors"],
        report["rss_kib"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_a_few_percent() {
        let h = Histogram::default();
        for v in 1..=10_000 {
            h.record(v);
        }
        for (q, expected) in [(0.5, 5000.0), (0.9, 9000.0), (0.99, 9900.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - expected).abs() / expected < 0.04, "q{q}: {got}");
        }
        assert_eq!(h.max(), 10_000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
        for v in [0, 1, 31, 32, 33, 1000, 123_456_789] {
            assert!(lowest_of(bucket_of(v)) <= v, "{v}");
        }
    }
}
