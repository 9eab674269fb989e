//! Latency histograms and the figures read from them.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A histogram of latencies in microseconds, from 1 µs to a minute, at
/// three significant figures.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// The percentiles every result reports, in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
        "max_ms": (h.max() as f64 / 1000.0 * 1000.0).round() / 1000.0,
    })
}

/// `a / b` to two decimals; 0 when `b` is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        return 0.0;
    }
    round2(a as f64 / b as f64)
}

/// `v` to two decimals, as the results report seconds, cores and KiB.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// A quantile in milliseconds, for a Markdown table cell.
pub fn ms_cell(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.2}", h.value_at_quantile(q) as f64 / 1000.0)
}

/// The maximum in milliseconds, for a Markdown table cell.
pub fn ms_max(h: &Histogram<u64>) -> String {
    format!("{:.2}", h.max() as f64 / 1000.0)
}
