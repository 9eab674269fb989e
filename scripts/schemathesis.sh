#!/usr/bin/env bash
# Fuzzes the chat API against its OpenAPI description (openapi.yaml) with
# schemathesis: a relay with a private Postgres is started from the debug
# build, a token for the demo user alice is minted, and every operation is
# called with generated input. Fails on any 5xx or a response that does not
# match the description. Bounded: a fixed number of examples per operation.
#
# Usage: scripts/schemathesis.sh [max-examples]   (needs `pip install schemathesis`)
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-60}
bin=target/debug/pgrelay
[ -x "$bin" ] || cargo build --bin pgrelay
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export PGRELAY_JWT_SECRET="schemathesis-secret-0123456789"
export PGRELAY_API_REQUESTS_PER_SECOND=100000
log=$(mktemp)
"$bin" serve --listen "127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 200); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 $pid 2>/dev/null; then cat "$log"; echo "relay exited" >&2; exit 1; fi
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || { cat "$log"; exit 1; }
token=$("$bin" token --user alice --ttl 1h)
# Through python3 so that the pip-installed package is found whatever PATH
# the CI environment has.
python3 -c 'import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())' \
    run openapi.yaml \
    --url "http://127.0.0.1:$port" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$examples" \
    --generation-deterministic \
    --generation-allow-x00 false \
    --request-timeout 10
