#!/usr/bin/env bash
# The docker-compose topology as local processes, for machines without
# Docker: a private redis-server on a spare port and three Herald nodes on
# loopback ports, all in cluster mode, with deploy/herald.toml (the console
# on every node, presence on `room.>`). A node that dies (kill -9 its pid,
# printed below) leaves the others running; Ctrl-C (or SIGTERM) stops every
# process this script started.
#
#   scripts/cluster.sh                  # one Redis
#   scripts/cluster.sh --redis-cluster  # a Redis Cluster instead
#
# With --redis-cluster, six redis-server processes with cluster-enabled
# (three masters, three replicas) on spare ports form a Redis Cluster
# (redis-cli --cluster create), and the nodes run with
# deploy/herald-redis-cluster.toml (redis.mode = "cluster", the console;
# presence is not available with a Redis Cluster yet). Kill a master's
# pid (printed) and its replica takes over within a few seconds.
#
# Environment:
#   HERALD_BIN            herald binary to run (default: builds target/release/herald)
#   HERALD_CLUSTER_PORTS  three node ports (default: "8081 8082 8083")
#   HERALD_CLUSTER_REDIS_PORT  Redis port (default: a spare port from 6400 up;
#                         with --redis-cluster, the first of six)
#   HERALD_JWT_SECRET     HS256 secret shared by the nodes (32+ bytes; default:
#                         a random one drawn for this run, printed at the end)
#   HERALD_CLUSTER_STORE_URL  the shared event store (default:
#                         postgres://postgres@127.0.0.1:5432/herald_cluster, created if missing)
#   HERALD_CLUSTER_DIR    where the logs and Redis's files go (default: .herald/cluster)
set -euo pipefail
cd "$(dirname "$0")/.."

redis_cluster=false
for arg in "$@"; do
    case "$arg" in
        --redis-cluster) redis_cluster=true ;;
        *) echo "usage: scripts/cluster.sh [--redis-cluster]" >&2; exit 2 ;;
    esac
done

# No fixed default: a secret written in this file would be everyone's.
secret=${HERALD_JWT_SECRET:-$(head -c 32 /dev/urandom | base64 | tr -d '\n')}
store_url=${HERALD_CLUSTER_STORE_URL:-postgres://postgres@127.0.0.1:5432/herald_cluster}
read -r -a ports <<<"${HERALD_CLUSTER_PORTS:-8081 8082 8083}"
logs=${HERALD_CLUSTER_DIR:-.herald/cluster}
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

# The Redis ports: one, or six in a row for a Redis Cluster (each also
# uses its port + 10000 for the cluster bus).
redis_count=1
config=deploy/herald.toml
if $redis_cluster; then
    redis_count=6
    config=deploy/herald-redis-cluster.toml
fi
redis_ports=()
if [[ -n "${HERALD_CLUSTER_REDIS_PORT:-}" ]]; then
    for k in $(seq 0 $((redis_count - 1))); do redis_ports+=($((HERALD_CLUSTER_REDIS_PORT + k))); done
else
    for candidate in $(seq 6400 6499); do
        free=true
        for k in $(seq 0 $((redis_count - 1))); do
            if port_in_use $((candidate + k)) || port_in_use $((candidate + k + 10000)); then free=false; break; fi
        done
        if $free; then
            for k in $(seq 0 $((redis_count - 1))); do redis_ports+=($((candidate + k))); done
            break
        fi
    done
fi
[[ ${#redis_ports[@]} -eq $redis_count ]] || { echo "no spare ports for Redis" >&2; exit 1; }
for port in "${ports[@]}"; do
    if port_in_use "$port"; then echo "port $port is in use" >&2; exit 1; fi
done

node_pids=()
redis_pids=()
stop() {
    trap - EXIT INT TERM
    echo "stopping cluster"
    # Nodes first (they close WebSockets with 1001), then Redis.
    for pid in "${node_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${node_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for pid in "${redis_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${redis_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
# Whatever ends the script (Ctrl-C, SIGTERM, a closed terminal or stdout),
# the EXIT trap stops what it started.
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap '' PIPE

if $redis_cluster; then
    seeds=()
    for port in "${redis_ports[@]}"; do
        mkdir -p "$logs/redis-$port"
        rm -f "$logs/redis-$port/nodes.conf"
        redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
            --cluster-enabled yes --cluster-config-file nodes.conf \
            --cluster-node-timeout 5000 --dir "$logs/redis-$port" \
            >"$logs/redis-$port.log" 2>&1 &
        redis_pids+=($!)
        seeds+=("127.0.0.1:$port")
    done
    for port in "${redis_ports[@]}"; do
        for _ in $(seq 100); do
            if redis-cli -p "$port" ping >/dev/null 2>&1; then continue 2; fi
            sleep 0.1
        done
        echo "redis-server on port $port did not start; see $logs/redis-$port.log" >&2
        exit 1
    done
    redis-cli --cluster create "${seeds[@]}" --cluster-replicas 1 --cluster-yes \
        >"$logs/redis-cluster-create.log" 2>&1 ||
        { echo "redis-cli --cluster create failed; see $logs/redis-cluster-create.log" >&2; exit 1; }
    # Ready once the cluster is ok and every replica has its master's
    # data: a replica that never synced cannot take over.
    in_sync() {
        redis-cli -p "${redis_ports[0]}" cluster info | grep -q cluster_state:ok || return 1
        for port in "${redis_ports[@]}"; do
            local info
            info=$(redis-cli -p "$port" info replication)
            if grep -q role:slave <<<"$info" && ! grep -q master_link_status:up <<<"$info"; then
                return 1
            fi
        done
    }
    for _ in $(seq 300); do
        if in_sync; then break; fi
        sleep 0.1
    done
    redis_url=$(printf 'redis://%s,' "${seeds[@]}")
    redis_url=${redis_url%,}
else
    redis-server --bind 127.0.0.1 --port "${redis_ports[0]}" --save "" --appendonly no \
        >"$logs/redis.log" 2>&1 &
    redis_pids+=($!)
    redis_url="redis://127.0.0.1:${redis_ports[0]}"
fi

i=0
for port in "${ports[@]}"; do
    i=$((i + 1))
    HERALD__SERVER__BIND="127.0.0.1:$port" \
    HERALD__REDIS__URL="$redis_url" \
    HERALD__STORE__URL="$store_url" \
    HERALD__AUTH__JWT_SECRET="$secret" \
        "$HERALD_BIN" serve --config "$config" >"$logs/node$i.log" 2>&1 &
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

if $redis_cluster; then
    echo "Herald cluster ready on a Redis Cluster, logs in $logs/"
    i=0
    for port in "${redis_ports[@]}"; do
        role=$(redis-cli -p "$port" role | head -n 1)
        echo "  redis 127.0.0.1:$port  $role  (pid ${redis_pids[$i]})"
        i=$((i + 1))
    done
else
    echo "Herald cluster ready: redis 127.0.0.1:${redis_ports[0]}, logs in $logs/"
fi
i=0
for port in "${ports[@]}"; do
    echo "  node http://127.0.0.1:$port  ws://127.0.0.1:$port/ws  (console at /, pid ${node_pids[$i]})"
    i=$((i + 1))
done
echo "Tokens: HERALD__AUTH__JWT_SECRET='$secret' $HERALD_BIN token --sub alice --topics alerts --publish alerts"
echo "Press Ctrl-C to stop."
# A node that dies leaves the others serving (its users leave within
# presence.node_ttl); the cluster stops when every node is gone, or when
# the one Redis is (a Redis Cluster's replicas take over from a master).
while true; do
    alive=()
    for pid in "${node_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
    done
    if ! $redis_cluster && ! kill -0 "${redis_pids[0]}" 2>/dev/null; then
        echo "redis exited; see $logs/redis.log" >&2
        exit 1
    fi
    if [[ ${#alive[@]} -eq 0 ]]; then
        echo "every node exited; see $logs/" >&2
        exit 1
    fi
    redis_alive=()
    for pid in "${redis_pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then redis_alive+=("$pid"); fi
    done
    wait -n "${alive[@]}" "${redis_alive[@]}" || true
    echo "a cluster process exited; see $logs/ (the others go on)" >&2
done
