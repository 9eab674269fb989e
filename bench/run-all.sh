#!/usr/bin/env bash
# Runs every benchmark scenario once with the figures of issue #6 and writes
# JSON, Markdown and SVG into bench/results/. About three minutes on the
# 2-core machine; only 127.0.0.1 is used, every loop is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pgrelay-bench
bench=target/release/pgrelay-bench
out=bench/results
$bench --out $out latency --subscribers 100 --projects 1 --rate 1000 --seconds 10
$bench --out $out latency --subscribers 100 --projects 1 --rate 200 --seconds 10
$bench --out $out latency --subscribers 1000 --projects 10 --rate 1000 --seconds 10
$bench --out $out saturation --subscribers 100 --projects 1 --writers 4 --seconds 10
$bench --out $out connections --count 10000
$bench --out $out write-cost --seconds 5
