#!/usr/bin/env bash
# Runs every benchmark scenario RUNS times (default 3) with the figures of
# the benchmark issue, then writes the medians to bench/results/summary.md
# and summary.json. Each run's JSON, Markdown and SVG stay in
# bench/results/runs/N/. About twenty minutes for three runs on the 2-core
# machine; only 127.0.0.1 is used and every loop is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
cargo build --release --bin pgrelay-bench
bench=target/release/pgrelay-bench
for i in $(seq 1 "$runs"); do
    out=bench/results/runs/$i
    $bench --out "$out" latency --subscribers 100 --projects 1 --rate 1000 --seconds 10
    $bench --out "$out" latency --subscribers 100 --projects 1 --rate 200 --seconds 10
    $bench --out "$out" latency --subscribers 1000 --projects 10 --rate 1000 --seconds 10
    $bench --out "$out" saturation --subscribers 100 --projects 1 --writers 4 --seconds 10
    # Throughput against subscribers, for bench/results/throughput.svg.
    for n in 1 10 1000; do
        $bench --out "$out" saturation --subscribers "$n" --projects 1 --writers 4 --seconds 5
    done
    $bench --out "$out" connections --count 10000
    $bench --out "$out" write-cost --seconds 5
done
python3 bench/summarize.py bench/results
