//! Shared by the benchmarks: total time and iterations per key, recorded inside criterion's
//! `iter_custom`, so that a benchmark can print its ratio to a baseline timed in the same
//! process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static TIMES: Mutex<Option<HashMap<String, (Duration, u64)>>> = Mutex::new(None);

/// Adds `iters` iterations taking `elapsed` to `key`.
pub fn record(key: &str, elapsed: Duration, iters: u64) {
    let mut map = TIMES.lock().unwrap();
    let entry = map
        .get_or_insert_with(HashMap::new)
        .entry(key.to_string())
        .or_default();
    entry.0 += elapsed;
    entry.1 += iters;
}

/// Runs `f` `iters` times, records the time under `key` and returns it (for `iter_custom`).
#[allow(dead_code)]
pub fn timed(key: &str, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let elapsed = start.elapsed();
    record(key, elapsed, iters);
    elapsed
}

/// Mean seconds per iteration recorded under `key`.
pub fn mean(key: &str) -> Option<f64> {
    let map = TIMES.lock().unwrap();
    map.as_ref()?
        .get(key)
        .map(|(d, n)| d.as_secs_f64() / *n as f64)
}
