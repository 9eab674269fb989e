#!/usr/bin/env bash
# Primary CPU per delivered event, without and with a hot standby taking
# the relays' log reads, in alternation (this shared machine's speed drifts
# over minutes; a pair taken back to back is comparable). Each run is the
# saturation scenario with several relays: 3 relays, 300 subscribers over
# 10 projects, 4 writers as fast as they can, 10 s measured. About 40 s per
# run. Usage: bench/replicas.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
cargo build --release --bin pgrelay-bench-replicas
bin=target/release/pgrelay-bench-replicas
echo "| round | standby | events/s | deliveries/s | primary cores | standby cores | primary µs per delivery | primary µs per event | standby reads / log reads |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq 1 "$rounds"); do
    for standby in no yes; do
        flag=()
        [ "$standby" = yes ] && flag=(--standby)
        "$bin" "${flag[@]}" 2>/dev/null | python3 -c "import json, sys
d = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(f\"| $round | $standby | {d['events_per_s']:.0f} | {d['deliveries_per_s']:.0f} | {d['primary_cpu_cores']} | {d['standby_cpu_cores']} | {d['primary_cpu_us_per_delivery']} | {d['primary_cpu_us_per_event']} | {d['replica_reads']:.0f} / {d['log_reads']:.0f} |\")"
    done
done
