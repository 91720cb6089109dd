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

/// The benches' shared driver: reads `{prefix}_MIB` (default
/// `default_mib`), `{prefix}_ROUNDS` (default 5) and `{prefix}_RATE_MBPS`
/// (default 300), then runs `table(mib, rounds, None)` over bare loopback
/// and, unless the rate is 0, `table(mib / 4, rounds, Some(bytes per
/// second))` with every sending socket paced at that rate.
pub fn bare_then_paced(
    prefix: &str,
    default_mib: usize,
    table: impl Fn(usize, usize, Option<u64>),
) {
    let mib = env_or(&format!("{prefix}_MIB"), default_mib);
    let rounds = env_or(&format!("{prefix}_ROUNDS"), 5).max(1);
    let rate = env_or(&format!("{prefix}_RATE_MBPS"), 300) as u64 * 1_000_000;
    println!("load before: {}", loadavg());
    table(mib, rounds, None);
    if rate > 0 {
        table((mib / 4).max(1), rounds, Some(rate));
    }
    println!("load after: {}", loadavg());
}

/// How a table's sockets send: "bare loopback" or "loopback paced at …".
pub fn setting(rate: Option<u64>) -> String {
    match rate {
        None => "bare loopback".into(),
        Some(r) => format!("loopback paced at {} MB/s per sender", r / 1_000_000),
    }
}
