#!/usr/bin/env bash
# The relay's RSS against the number of stalled resumers (G7): clients that
# subscribe with since_seq=0 to a project of 20,000 events of ~8 KiB and
# never read. For each crowd size (50, 100, 200, 300) a fresh `pgrelay
# serve` process is measured with the crowd connected, and 3 s after it
# left. Runs the same clients against each `pgrelay` binary given, e.g. a
# build of main and one of this branch:
#   git archive main | tar -x -C /tmp/main-src && (cd /tmp/main-src && cargo build --release --bin pgrelay)
#   bench/stalled.sh /tmp/main-src/target/release/pgrelay target/release/pgrelay
# About a minute per binary on the 2-core machine; only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
(($#)) || set -- target/release/pgrelay
for bin in "$@"; do
    target/release/pgrelay-bench --out bench/results stalled --relay-bin "$bin" >/dev/null
    cat bench/results/stalled.md
    echo
done
