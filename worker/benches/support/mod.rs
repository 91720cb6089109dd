//! Measuring helpers shared by the link and all-reduce benchmarks.

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// The value of environment variable `name` as a number, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median of `values` (NaN when there are none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Smallest and largest of `values`.
pub fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// Runs `f`, which returns the duration of the part it times, and returns
/// that duration together with the CPU cores the whole process used during
/// the call (user plus system time over wall time).
pub fn with_cpu(f: impl FnOnce() -> Duration) -> (Duration, f64) {
    let cpu = cpu_seconds();
    let start = Instant::now();
    let timed = f();
    let wall = start.elapsed().as_secs_f64();
    (timed, (cpu_seconds() - cpu) / wall)
}

/// User plus system CPU time of this process so far, exited threads
/// included (from `/proc/self/stat`, in clock ticks of 10 ms).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name is in parentheses and may contain spaces; utime and
    // stime are the 12th and 13th fields after it.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}

/// The machine's load averages, for the record.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
