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

/// Panels stacked one above the other, sharing the x axis, each a line of
/// (x, y) points with its own y scale from 0.
pub fn curve_svg(title: &str, x_label: &str, panels: &[(&str, &[(f64, f64)])]) -> String {
    let (w, panel_h, left, top) = (720.0, 200.0, 70.0, 30.0);
    let h = top + panel_h * panels.len() as f64 + 30.0;
    let max_x = panels
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let x = |v: f64| left + (w - left - 20.0) * v / max_x;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="18" font-size="14">{title}</text>"#
    );
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    for (i, (name, pts)) in panels.iter().enumerate() {
        let y0 = top + panel_h * (i as f64 + 1.0) - 25.0;
        let span = panel_h - 45.0;
        let max_y = pts.iter().map(|p| p.1).fold(0.0_f64, f64::max).max(1e-9) * 1.1;
        let y = |v: f64| y0 - span * v / max_y;
        let color = colors[i % colors.len()];
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y0}" x2="{}" y2="{y0}" stroke="black"/><line x1="{left}" y1="{}" x2="{left}" y2="{y0}" stroke="black"/><text x="{}" y="{}" fill="{color}">{name}</text>"##,
            w - 20.0,
            y0 - span,
            left + 10.0,
            y0 - span + 4.0
        );
        for k in 0..=2 {
            let v = max_y * k as f64 / 2.0;
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{}" text-anchor="end">{}</text>"##,
                left - 6.0,
                y(v) + 4.0,
                tick(v)
            );
        }
        for k in 0..=4 {
            let v = max_x * k as f64 / 4.0;
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{}" text-anchor="middle">{v:.0}</text>"##,
                x(v),
                y0 + 14.0
            );
        }
        let line: Vec<String> = pts
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            line.join(" ")
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        left + (w - left - 20.0) / 2.0,
        h - 6.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// An axis label with as many decimals as its size needs.
fn tick(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
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
