#!/usr/bin/env bash
# Where the relay's CPU goes per delivered event (issue 20, target 3):
# runs `pgrelay-bench latency` at 100 subscribers x 1,000 events/s, samples
# the relay process with `perf record -g` for 10 s of the measured window,
# and splits its CPU into
#   - the relay's own code (user space: the session, the hub, tungstenite,
#     tokio, the allocator),
#   - the kernel's send path (sendto down to the loopback device),
#   - the receiving end's TCP work, which on loopback runs in the sender's
#     context (net_rx_action under sendto: on a real network it is the
#     client machine's),
#   - the rest of the kernel (epoll, futex and scheduler wake-ups, reads,
#     timers).
# CPU per delivery is the relay's CPU over the window divided by the
# deliveries the bench counted. Sampling adds a few percent of its own.
#
# Needs `perf` (Debian: linux-perf) and permission to profile another
# process (root, or kernel.perf_event_paranoid <= 1). About a minute.
# Usage: bench/delivery-profile.sh [pgrelay-bench binary] [output.md]
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${1:-target/release/pgrelay-bench}
out=${2:-bench/results/delivery-profile.md}
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
[ -x "$bench" ] || { echo "no $bench: cargo build --release --bin pgrelay-bench" >&2; exit 1; }

work=$(mktemp -d /tmp/pgrelay-delivery-profile.XXXXXX)
trap 'kill "$run" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
"$bench" --out "$work/results" latency --subscribers 100 --projects 1 --rate 1000 --seconds 20 \
    >"$work/bench.json" 2>"$work/bench.log" &
run=$!
# The relay is the bench's child in `relay` mode; the window starts after
# 2 s of warm-up once every subscriber is subscribed.
relay=
for _ in $(seq 1 300); do
    relay=$(pgrep -P "$run" -f "relay --database-url" | head -1 || true)
    [ -n "$relay" ] && break
    sleep 0.2
done
[ -n "$relay" ] || { echo "the relay process did not start" >&2; cat "$work/bench.log" >&2; exit 1; }
# Subscribing 100 clients and the warm-up take a few seconds.
sleep 8
perf record -F 999 -g -p "$relay" -o "$work/perf.data" -- sleep 10 >/dev/null 2>&1
wait "$run"
run=

perf report -i "$work/perf.data" --children --sort symbol -g none --stdio 2>/dev/null \
    >"$work/children.txt"
perf report -i "$work/perf.data" --no-children --sort dso -g none --stdio 2>/dev/null \
    >"$work/dso.txt"
perf report -i "$work/perf.data" --no-children --sort dso,symbol -g none --stdio 2>/dev/null \
    >"$work/self.txt"
grep -v '^#' "$work/self.txt" | grep '%' | sed -n 1,25p >"$work/top.txt"

python3 - "$work" "$out" "$bench" <<'EOF'
import json, re, sys
work, out, bench = sys.argv[1:4]
d = json.load(open(f"{work}/bench.json"))
deliveries = d["deliveries_per_s"]
cores = d["relay_cpu_cores"]
us_per = cores / deliveries * 1e6 if deliveries else float("nan")

def shares(path, pattern):
    rows = {}
    for line in open(path):
        m = re.match(pattern, line)
        if m:
            rows.setdefault(m.group(3).strip(), (float(m.group(1)), float(m.group(2))))
    return rows

children = shares(f"{work}/children.txt", r"\s+([\d.]+)%\s+([\d.]+)%\s+\[[k.]\]\s+(\S+)")
dso = {}
for line in open(f"{work}/dso.txt"):
    m = re.match(r"\s+([\d.]+)%\s+(\S.*)", line)
    if m:
        dso[m.group(2).strip()] = float(m.group(1))
kernel = sum(v for k, v in dso.items() if "kernel" in k)
user = 100.0 - kernel
send = children.get("__sys_sendto", (0.0, 0.0))[0]
rx = children.get("net_rx_action", (0.0, 0.0))[0]
parts = [
    ("the relay's own code (user space)", user),
    ("the kernel's send path (sendto to the loopback device)", send - rx),
    ("the receiving end's TCP work (loopback only)", rx),
    ("the rest of the kernel (epoll, wake-ups, reads, timers)", kernel - send),
]
lines = [
    "# Where the relay's CPU goes per delivered event",
    "",
    f"`bench/delivery-profile.sh` (`{bench}`): `pgrelay-bench latency --subscribers 100 "
    "--projects 1 --rate 1000 --seconds 20`, with `perf record -g` on the relay for 10 s "
    "of the window.",
    "",
    f"Relay CPU {cores} cores at {deliveries:,.0f} deliveries/s: **{us_per:.2f} µs per delivery** "
    f"(relay p50 {d['relay']['p50_ms']} ms, p99 {d['relay']['p99_ms']} ms; direct LISTEN p50 "
    f"{d['baseline_listen']['p50_ms']} ms).",
    "",
    "| share of the relay's CPU | % | µs per delivery |",
    "| --- | --- | --- |",
]
for name, pct in parts:
    lines.append(f"| {name} | {pct:.1f} | {us_per * pct / 100:.2f} |")
lines += ["", "Top symbols (self time):", "", "```"]
lines += [re.sub(r"\s+", " ", l).strip()[:140] for l in open(f"{work}/top.txt")]
lines += ["```", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
EOF
