#!/usr/bin/env python3
"""Checks docker-compose.redis-cluster.yml, the Redis Cluster option of the
local cluster, without a container engine:

- six Redis nodes with cluster-enabled, on fixed addresses of the compose
  subnet that dynamic addresses (ip_range) cannot take;
- every Herald node of docker-compose.yml overridden to redis.mode =
  "cluster" with exactly those nodes as seeds, mounting
  deploy/herald-redis-cluster.toml, and starting only after the one-shot
  redis-cluster service succeeded;
- that service's script, run for real: six local redis-server processes
  on free ports stand in for the six addresses, the script makes them one
  cluster (three masters, three replicas), and a second run leaves the
  formed cluster alone.

    scripts/check_compose_redis_cluster.py docker-compose.yml docker-compose.redis-cluster.yml
"""
import ipaddress
import re
import socket
import subprocess
import sys
import tempfile
import time

import yaml


def fail(message):
    sys.exit(f"docker-compose.redis-cluster.yml: {message}")


def free_port():
    """A port free now whose cluster bus port (port + 10000) is free too."""
    import random
    while True:
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def redis_cli(port, *args):
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10
    ).stdout


def run_init(script, addresses):
    """Runs the init script with `addresses` mapped to local servers."""
    ports = [free_port() for _ in addresses]
    local = " ".join(f"127.0.0.1:{p}" for p in ports)
    script = script.replace("$$", "$")
    line = re.search(r'^nodes="[^"]*"$', script, re.M)
    if not line:
        fail("redis-cluster: its script must name the nodes in one nodes=\"…\" line")
    script = script.replace(line.group(0), f'nodes="{local}"')
    with tempfile.TemporaryDirectory() as work:
        servers = [
            subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(p), "--dir", work,
                 "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf",
                 "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
            for p in ports
        ]
        try:
            for attempt in (1, 2):
                try:
                    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
                except subprocess.TimeoutExpired:
                    fail(f"redis-cluster: its script did not finish within 60 s (run {attempt})")
                if done.returncode != 0:
                    fail(f"redis-cluster: its script failed (run {attempt}): {done.stderr[-500:]}")
            roles = [redis_cli(p, "role").split("\n")[0] for p in ports]
            if sorted(roles) != ["master"] * 3 + ["slave"] * 3:
                fail(f"redis-cluster: the script made roles {roles}, not three masters and three replicas")
            if "cluster_state:ok" not in redis_cli(ports[0], "cluster", "info"):
                fail("redis-cluster: the cluster is not ok after the script")
        finally:
            for server in servers:
                server.kill()
                server.wait()


def main(base_path, override_path):
    base = yaml.safe_load(open(base_path, encoding="utf-8"))
    override = yaml.safe_load(open(override_path, encoding="utf-8"))
    services = override.get("services", {})
    subnet = override["networks"]["default"]["ipam"]["config"][0]
    network = ipaddress.ip_network(subnet["subnet"])
    dynamic = ipaddress.ip_network(subnet["ip_range"])

    redis_nodes = sorted(n for n in services if re.fullmatch(r"redis-node-\d+", n))
    if len(redis_nodes) != 6:
        fail(f"expected six redis-node-N services, got {redis_nodes}")
    addresses = []
    for name in redis_nodes:
        node = services[name]
        command = " ".join(str(a) for a in node.get("command", []))
        if "--cluster-enabled yes" not in command:
            fail(f"{name}: must run with --cluster-enabled yes")
        address = ipaddress.ip_address(node["networks"]["default"]["ipv4_address"])
        if address not in network or address in dynamic:
            fail(f"{name}: {address} must be in {network} and outside the dynamic range {dynamic}")
        addresses.append(f"{address}:6379")

    init = services.get("redis-cluster")
    if not init:
        fail("a one-shot redis-cluster service must create the cluster")
    script = init["entrypoint"][-1]
    named = re.search(r'^nodes="([^"]*)"$', script, re.M)
    if not named or sorted(named.group(1).split()) != sorted(addresses):
        fail(f"redis-cluster: its nodes must be exactly {addresses}")

    herald_nodes = sorted(n for n in base["services"] if re.fullmatch(r"herald\d+", n))
    seeds = sorted(f"redis://{a}" for a in addresses)
    for name in herald_nodes:
        node = services.get(name)
        if not node:
            fail(f"{name}: must be overridden to relay through the Redis Cluster")
        env = node.get("environment", {})
        if env.get("HERALD__REDIS__MODE") != "cluster":
            fail(f"{name}: HERALD__REDIS__MODE must be cluster")
        if sorted(str(env.get("HERALD__REDIS__URL", "")).split(",")) != seeds:
            fail(f"{name}: HERALD__REDIS__URL must list the six nodes {seeds}")
        mount = "./deploy/herald-redis-cluster.toml:/var/lib/herald/config/default.toml:ro"
        if mount not in node.get("volumes", []):
            fail(f"{name}: must mount {mount}")
        after = node.get("depends_on", {}).get("redis-cluster", {})
        if after.get("condition") != "service_completed_successfully":
            fail(f"{name}: must start after redis-cluster completed successfully")

    run_init(script, addresses)
    print(f"{override_path}: six Redis Cluster nodes, {len(herald_nodes)} Herald nodes on them; "
          "its cluster script forms a cluster of three masters and three replicas")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
