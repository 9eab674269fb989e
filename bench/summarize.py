#!/usr/bin/env python3
"""Medians of the benchmark runs in RESULTS/runs/*/, against the targets.

Writes RESULTS/summary.json and RESULTS/summary.md. Usage:
    python3 bench/summarize.py bench/results
"""
import json
import math
import statistics
import sys
from pathlib import Path

results = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
runs = sorted(p for p in (results / "runs").iterdir() if p.is_dir())


def values(name, *path):
    """Every run's value of one figure."""
    out = []
    for run in runs:
        f = run / f"{name}.json"
        if not f.exists():
            continue
        v = json.loads(f.read_text())
        for key in path:
            v = v[key]
        out.append(v)
    return out


def median(name, *path):
    vs = values(name, *path)
    return statistics.median(vs) if vs else None


def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:,.{digits}f}"


rows = []


def target(text, measured, met):
    rows.append({"target": text, "measured": measured, "met": met})


d = median("latency-100x1000", "deliveries_per_s")
p99 = median("latency-100x1000", "relay", "p99_ms")
b99 = median("latency-100x1000", "baseline_listen", "p99_ms")
lost = max(values("latency-100x1000", "lost") or [0])
target("100 subscribers x 1,000 events/s keeps up, p99 <= 10 ms",
       f"{fmt(d, 0)} deliveries/s, p99 {fmt(p99)} ms (direct LISTEN {fmt(b99)} ms), lost at most {lost}",
       p99 is not None and p99 <= 10 and lost == 0)
sat = median("saturation-100x4w", "deliveries_per_s")
target(">= 400,000 deliveries/s with ~300-byte rows", f"{fmt(sat, 0)} deliveries/s",
       sat is not None and sat >= 400_000)
p50 = median("latency-100x200", "relay", "p50_ms")
b50 = median("latency-100x200", "baseline_listen", "p50_ms")
gap = None if p50 is None or b50 is None else p50 - b50
target("100 x 200 events/s: p50 within 0.5 ms of direct LISTEN",
       f"relay p50 {fmt(p50)} ms, direct LISTEN {fmt(b50)} ms (+{fmt(gap)} ms)",
       gap is not None and gap <= 0.5)
kib = median("connections-10000", "kib_per_connection")
target("10,000 idle connections at <= 16 KiB each", f"{fmt(kib, 1)} KiB per connection",
       kib is not None and kib <= 16)


def crowded(name, text, p99_target):
    """A crowded scenario's target: p99 and nothing lost, over the runs
    whose writers reached the rate asked (a run flagged `failed` did not
    load the relay as it claims, and is only counted)."""
    all_runs = values(name)
    valid = [r for r in all_runs if r.get("rate_reached")]

    def med(*path):
        vs = []
        for r in valid:
            for key in path:
                r = r[key]
            vs.append(r)
        return statistics.median(vs) if vs else None

    p99 = med("relay", "p99_ms")
    lost = max((r["lost"] for r in valid), default=None)
    invalid = len(all_runs) - len(valid)
    target(text,
           f"{fmt(med('achieved_events_per_s'), 0)} events/s reached, {fmt(med('deliveries_per_s'), 0)} deliveries/s; "
           f"p50 {fmt(med('relay', 'p50_ms'))} ms, p99 {fmt(p99)} ms (direct LISTEN "
           f"{fmt(med('baseline_listen', 'p50_ms'))} / {fmt(med('baseline_listen', 'p99_ms'))} ms); "
           f"lost at most {lost}; relay {fmt(med('relay_cpu_us_per_delivery'), 3)} us CPU per delivery"
           + (f"; {invalid} run(s) below the rate asked left out" if invalid else ""),
           p99 is not None and p99 <= p99_target and lost == 0)


crowded("crowded-1000x1p-1000",
        "crowded project: 1,000 subscribers of 1 project x 1,000 events/s, nothing lost, p99 <= 20 ms", 20)
crowded("crowded-19000x1000p-1000",
        "spread: 19,000 connections (100,000 asked; RLIMIT_NOFILE 20,000 here) over 1,000 projects "
        "x 1,000 events/s, p99 <= 50 ms", 50)
us100 = statistics.median(
    [r["relay_cpu_us_per_delivery"] for r in values("crowded-100x1p-1000") if r.get("rate_reached")]
    or [math.nan])
us100 = None if math.isnan(us100) else us100
target("relay CPU per delivery at 100 subscribers x 1,000 events/s <= 3 us",
       f"{fmt(us100, 3)} us", us100 is not None and us100 <= 3)
r1 = median("write-cost", "captured_over_plain_1_writer")
r8 = median("write-cost", "captured_over_plain_8_writers")
n1 = median("write-cost", "captured_over_notify_only_1_writer")
n8 = median("write-cost", "captured_over_notify_only_8_writers")
target("captured inserts >= 70% of uncaptured, 1 and 8 writers",
       f"{fmt(r1)} (1 writer), {fmt(r8)} (8 writers); against NOTIFY alone {fmt(n1)} and {fmt(n8)}",
       r1 is not None and r8 is not None and r1 >= 0.7 and r8 >= 0.7)

# Throughput against subscribers: median deliveries/s and events/s of the
# saturation runs (4 writers, 1 project), drawn as an SVG line chart.
sweep = []
for n in (1, 10, 100, 1000):
    d = median(f"saturation-{n}x4w", "deliveries_per_s")
    e = median(f"saturation-{n}x4w", "events_per_s")
    if d is not None:
        sweep.append({"subscribers": n, "deliveries_per_s": d, "events_per_s": e})


def throughput_svg(points):
    """Deliveries/s against subscribers (log scale), one labelled point each."""
    w, h, left, right, top, bottom = 660, 360, 80, 50, 40, 50
    xs = [math.log10(p["subscribers"]) for p in points]
    ymax = max(p["deliveries_per_s"] for p in points) * 1.15
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)

    def px(x):
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y):
        return top + (1 - y / ymax) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">'
           'Saturation: deliveries/s against subscribers (4 writers, 1 project, '
           f'median of {len(runs)} runs)</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y / 1000:,.0f}k</text>')
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{w - right}" y2="{py(y):.1f}" stroke="#ddd"/>')
    path = " ".join(f"{px(x):.1f},{py(p['deliveries_per_s']):.1f}" for x, p in zip(xs, points))
    out.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for x, p in zip(xs, points):
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(p["deliveries_per_s"]):.1f}" r="4" fill="#1f77b4"/>')
        out.append(f'<text x="{px(x):.1f}" y="{py(p["deliveries_per_s"]) - 10:.1f}" text-anchor="middle">'
                   f'{p["deliveries_per_s"]:,.0f}</text>')
        out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 18}" text-anchor="middle">{p["subscribers"]:,}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 10}" text-anchor="middle">subscribers (log scale)</text>')
    out.append(f'<text x="18" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {(top + h - bottom) / 2})">deliveries/s</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if len(sweep) >= 2:
    (results / "throughput.svg").write_text(throughput_svg(sweep))

summary = {"runs": len(runs), "targets": rows, "throughput_by_subscribers": sweep}
(results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"### Targets against medians of {len(runs)} runs\n",
         "| target | median measured | met |", "| --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r['target']} | {r['measured']} | {'yes' if r['met'] else 'no'} |")
if sweep:
    lines += ["", "### Saturation throughput against subscribers (4 writers, 1 project)", "",
              "| subscribers | deliveries/s | events/s |", "| --- | --- | --- |"]
    for p in sweep:
        lines.append(f"| {p['subscribers']:,} | {fmt(p['deliveries_per_s'], 0)} | {fmt(p['events_per_s'], 0)} |")
(results / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
