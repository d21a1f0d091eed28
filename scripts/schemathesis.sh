#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a live dev node with a valid publisher
# token (all topics, admin): it must find no server error and no response
# that violates the OpenAPI document. Bounded in examples and time; the
# node is stopped on exit. Used by .ci/run.
#
#   HERALD_BIN=target/debug/herald scripts/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${HERALD_BIN:-target/debug/herald}
bin=$(realpath "$bin")
examples=${SCHEMATHESIS_MAX_EXAMPLES:-50}
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# exec: $! is then the node itself, so the trap stops it (not just a subshell).
(cd "$dir" && HERALD__SERVER__BIND="127.0.0.1:$port" RUST_LOG=warn exec "$bin" serve --dev >/dev/null 2>"$dir/node.log") &
node=$!
trap 'kill "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; rm -rf "$dir"' EXIT

for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
token=$(cd "$dir" && "$bin" token --sub schemathesis --topics '>' --publish '>' --admin --ttl 1h)

# From the node's folder: schemathesis keeps its database (.hypothesis/)
# where it runs, which must not be the source tree.
cd "$dir"
timeout 600 schemathesis run "http://127.0.0.1:$port/api/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$examples" \
    --seed "${SCHEMATHESIS_SEED:-1}" \
    --no-color
