//! A scenario's results, written as `NAME.json`, `NAME.md` and, for the
//! latency scenarios, `NAME.svg` (what `bench/summarize.py` reads).

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// What one scenario measured. A `failed` string in `json` marks a result
/// that is not a valid measurement (e.g. the load asked was not reached):
/// it is written all the same, and the run exits with status 2.
pub struct Outcome {
    /// The file name, without extension (`latency-100x1000`).
    pub name: String,
    pub json: Value,
    pub markdown: String,
    pub svg: Option<String>,
}

/// Writes the outcome's files into `dir`.
pub fn write(dir: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{}.json", outcome.name)),
        serde_json::to_string_pretty(&outcome.json)? + "\n",
    )?;
    std::fs::write(dir.join(format!("{}.md", outcome.name)), &outcome.markdown)?;
    if let Some(svg) = &outcome.svg {
        std::fs::write(dir.join(format!("{}.svg", outcome.name)), svg)?;
    }
    Ok(())
}

/// The machine and command a result was measured with.
pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "pgrelay": env!("CARGO_PKG_VERSION"),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

/// A latency percentile plot (x: percentile on a log scale of 1/(1-q),
/// y: milliseconds), one line per series.
pub fn latency_svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let (w, h, left, bottom) = (720.0, 420.0, 60.0, 40.0);
    let quantiles = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999];
    let max_ms = series
        .iter()
        .map(|(_, hist)| hist.value_at_quantile(0.9999) as f64 / 1000.0)
        .fold(0.1_f64, f64::max)
        * 1.1;
    let x = |i: usize| left + (w - left - 20.0) * i as f64 / (quantiles.len() - 1) as f64;
    let y = |ms: f64| h - bottom - (h - bottom - 30.0) * (ms / max_ms);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="18" font-size="14">{title}: latency by percentile (ms)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="30" x2="{left}" y2="{}" stroke="black"/>
"#,
        h - bottom,
        w - 20.0,
        h - bottom,
        h - bottom
    );
    for (i, q) in quantiles.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">p{}</text>"#,
            x(i),
            h - bottom + 16.0,
            q * 100.0
        );
    }
    for k in 0..=4 {
        let ms = max_ms * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{ms:.2}</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            left - 6.0,
            y(ms) + 4.0,
            y(ms),
            w - 20.0,
            y(ms)
        );
    }
    let colors = ["#d62728", "#1f77b4", "#2ca02c"];
    for (s, (name, hist)) in series.iter().enumerate() {
        let points: Vec<String> = quantiles
            .iter()
            .enumerate()
            .map(|(i, q)| {
                format!(
                    "{:.1},{:.1}",
                    x(i),
                    y(hist.value_at_quantile(*q) as f64 / 1000.0)
                )
            })
            .collect();
        let color = colors[s % colors.len()];
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{color}">{name}</text>"#,
            points.join(" "),
            left + 10.0,
            45.0 + 16.0 * s as f64
        );
    }
    svg.push_str("</svg>\n");
    svg
}
