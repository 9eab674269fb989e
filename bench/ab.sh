#!/usr/bin/env bash
# Compares two builds of pgrelay-bench in alternation (A, B, A, B, ...),
# because this shared machine's speed drifts over minutes: figures from
# runs taken at different times are not comparable, a pair taken back to
# back is. Each round runs `latency` at 1,000 and 200 events/s with 100
# subscribers (6 s each) on both builds. About a minute per round and build.
# Build a past commit with, for example:
#   git worktree add /tmp/a <commit> && (cd /tmp/a && cargo build --release --bin pgrelay-bench)
# Usage: bench/ab.sh A_BINARY B_BINARY [rounds]
set -euo pipefail
a=$1 b=$2 rounds=${3:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "| round | build | rate | relay p50 ms | relay p99 ms | LISTEN p50 ms | p50 gap ms | relay cores | Postgres cores |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq 1 "$rounds"); do
    for build in A B; do
        bin=$a
        [ "$build" = B ] && bin=$b
        for rate in 1000 200; do
            "$bin" --out "$out" latency --subscribers 100 --projects 1 --rate "$rate" --seconds 6 2>/dev/null |
                python3 -c "import json, sys
d = json.load(sys.stdin)
r, l = d['relay'], d['baseline_listen']
print(f\"| $round | $build | $rate | {r['p50_ms']} | {r['p99_ms']} | {l['p50_ms']} | {r['p50_ms'] - l['p50_ms']:.2f} | {d['relay_cpu_cores']} | {d['postgres_cpu_cores']} |\")"
        done
    done
done
