#!/usr/bin/env bash
# The docker-compose topology as local processes, for machines without
# Docker: a private redis-server on a spare port and three Herald nodes on
# loopback ports, all in cluster mode, with deploy/herald.toml (the console
# on every node, presence on `room.>`). A node that dies (kill -9 its pid,
# printed below) leaves the others running; Ctrl-C (or SIGTERM) stops every
# process this script started.
#
#   scripts/cluster.sh
#
# Environment:
#   HERALD_BIN            herald binary to run (default: builds target/release/herald)
#   HERALD_CLUSTER_PORTS  three node ports (default: "8081 8082 8083")
#   HERALD_CLUSTER_REDIS_PORT  Redis port (default: a spare port from 6400 up)
#   HERALD_JWT_SECRET     HS256 secret shared by the nodes (32+ bytes; default:
#                         a random one drawn for this run, printed at the end)
#   HERALD_CLUSTER_STORE_URL  the shared event store (default:
#                         postgres://postgres@127.0.0.1:5432/herald_cluster, created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

# No fixed default: a secret written in this file would be everyone's.
secret=${HERALD_JWT_SECRET:-$(head -c 32 /dev/urandom | base64 | tr -d '\n')}
store_url=${HERALD_CLUSTER_STORE_URL:-postgres://postgres@127.0.0.1:5432/herald_cluster}
read -r -a ports <<<"${HERALD_CLUSTER_PORTS:-8081 8082 8083}"
logs=.herald/cluster
mkdir -p "$logs"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ -z "${HERALD_BIN:-}" ]]; then
    cargo build --release --quiet
    # Where cargo put it: CARGO_TARGET_DIR or build.target-dir move it.
    target_dir=$(cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    HERALD_BIN=${target_dir:-target}/release/herald
fi
[[ -x "$HERALD_BIN" ]] || { echo "no herald binary at $HERALD_BIN (set HERALD_BIN)" >&2; exit 1; }

redis_port=${HERALD_CLUSTER_REDIS_PORT:-}
if [[ -z "$redis_port" ]]; then
    for candidate in $(seq 6400 6499); do
        if ! port_in_use "$candidate"; then redis_port=$candidate; break; fi
    done
fi
[[ -n "$redis_port" ]] || { echo "no spare port for Redis" >&2; exit 1; }
for port in "${ports[@]}"; do
    if port_in_use "$port"; then echo "port $port is in use" >&2; exit 1; fi
done

node_pids=()
redis_pid=
stop() {
    trap - EXIT INT TERM
    echo "stopping cluster"
    # Nodes first (they close WebSockets with 1001), then Redis.
    for pid in "${node_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${node_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n "$redis_pid" ]]; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
}
# Whatever ends the script (Ctrl-C, SIGTERM, a closed terminal or stdout),
# the EXIT trap stops what it started.
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap '' PIPE

redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    >"$logs/redis.log" 2>&1 &
redis_pid=$!

i=0
for port in "${ports[@]}"; do
    i=$((i + 1))
    HERALD__SERVER__BIND="127.0.0.1:$port" \
    HERALD__REDIS__URL="redis://127.0.0.1:$redis_port" \
    HERALD__STORE__URL="$store_url" \
    HERALD__AUTH__JWT_SECRET="$secret" \
        "$HERALD_BIN" serve --config deploy/herald.toml >"$logs/node$i.log" 2>&1 &
    node_pids+=($!)
done

# Wait (at most 30 s) until every node reports ready; a node that exits or
# stays unready has its log's last lines shown.
i=0
for port in "${ports[@]}"; do
    i=$((i + 1))
    for _ in $(seq 300); do
        if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then continue 2; fi
        if ! kill -0 "${node_pids[$((i - 1))]}" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "node $i (port $port) did not become ready; the end of $logs/node$i.log:" >&2
    tail -n 20 "$logs/node$i.log" >&2
    exit 1
done

echo "Herald cluster ready: redis 127.0.0.1:$redis_port, logs in $logs/"
i=0
for port in "${ports[@]}"; do
    echo "  node http://127.0.0.1:$port  ws://127.0.0.1:$port/ws  (console at /, pid ${node_pids[$i]})"
    i=$((i + 1))
done
echo "Tokens: HERALD__AUTH__JWT_SECRET='$secret' $HERALD_BIN token --sub alice --topics alerts --publish alerts"
echo "Press Ctrl-C to stop."
# A node that dies leaves the others serving (its users leave within
# presence.node_ttl); the cluster stops when Redis or every node is gone.
while true; do
    alive=()
    for pid in "${node_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
    done
    if ! kill -0 "$redis_pid" 2>/dev/null; then
        echo "redis exited; see $logs/redis.log" >&2
        exit 1
    fi
    if [[ ${#alive[@]} -eq 0 ]]; then
        echo "every node exited; see $logs/" >&2
        exit 1
    fi
    wait -n "${alive[@]}" "$redis_pid" || true
    echo "a cluster process exited; see $logs/ (the others go on)" >&2
done
