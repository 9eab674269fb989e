#!/usr/bin/env bash
# Primary CPU per delivered event, without and with a hot standby taking
# the relays' log reads, in alternation (this shared machine's speed drifts
# over minutes; a pair taken back to back is comparable). Each run is
# `pgrelay-bench replicas`: the saturation scenario with several relays,
# 3 relays, 300 subscribers over 10 projects, 4 writers as fast as they
# can, 10 s measured. About 40 s per run. Each run's JSON and Markdown are
# kept in a temporary directory, named at the end.
# Usage: bench/replicas.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
cargo build --release --bin pgrelay-bench
bench=target/release/pgrelay-bench
out=$(mktemp -d -t pgrelay-replicas-XXXX)
echo "| round | standby | events/s | deliveries/s | primary cores | standby cores | primary µs per delivery | primary µs per event | log reads (of which standby) | primary fallbacks |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq 1 "$rounds"); do
    for standby in no yes; do
        flag=()
        name=replicas-primary
        if [ "$standby" = yes ]; then
            flag=(--standby)
            name=replicas-standby
        fi
        "$bench" --out "$out/$round" replicas "${flag[@]}" >/dev/null 2>"$out/$round-$standby.log"
        python3 -c "import json, sys
d = json.load(open(sys.argv[1]))
print(f\"| $round | $standby | {d['events_per_s']:.0f} | {d['deliveries_per_s']:.0f} | {d['primary_cpu_cores']} | {d['standby_cpu_cores']} | {d['primary_cpu_us_per_delivery']} | {d['primary_cpu_us_per_event']} | {d['log_reads']:.0f} ({d['replica_reads']:.0f}) | {d['replica_fallbacks']:.0f} |\")" "$out/$round/$name.json"
    done
done
echo
echo "Each run's files: $out"
