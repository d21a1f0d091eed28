#!/usr/bin/env python3
"""Checks docker-compose.yml for the rules the local cluster relies on:
its topology (Redis, PostgreSQL, three Herald nodes, HAProxy), a signing
secret that must be given (no default), a load balancer published on
loopback unless told otherwise, /metrics off the balanced port, the
nodes' shared settings file (deploy/herald.toml) mounted where they read
it, and the balancer's configuration routing to exactly the nodes defined.

    scripts/check_compose.py docker-compose.yml deploy/haproxy.cfg
"""
import re
import sys

import yaml


def fail(message):
    sys.exit(f"docker-compose.yml: {message}")


def main(compose_path, haproxy_path):
    compose = yaml.safe_load(open(compose_path, encoding="utf-8"))
    services = compose.get("services", {})
    nodes = sorted(name for name in services if re.fullmatch(r"herald\d+", name))
    expected = {"redis", "postgres", "lb", *nodes}
    if set(services) != expected or len(nodes) != 3:
        fail(f"services {sorted(services)}: expected redis, postgres, herald1-3 and lb")
    for name in nodes:
        node = services[name]
        env = node.get("environment", {})
        secret = str(env.get("HERALD__AUTH__JWT_SECRET", ""))
        if not secret.startswith("${HERALD_JWT_SECRET:?"):
            fail(f"{name}: the signing secret must be required (${{HERALD_JWT_SECRET:?…}}), got {secret!r}")
        metrics = str(env.get("HERALD__METRICS__BIND", ""))
        if not metrics or metrics.endswith(":8080"):
            fail(f"{name}: /metrics must be on its own port (HERALD__METRICS__BIND), got {metrics!r}")
        if node.get("ports"):
            fail(f"{name}: nodes are reached through the load balancer only, not published")
        if "redis" not in str(env.get("HERALD__REDIS__URL", "")):
            fail(f"{name}: nodes relay through the compose Redis")
        if not str(env.get("HERALD__STORE__URL", "")).startswith("postgres://"):
            fail(f"{name}: a cluster needs the shared PostgreSQL store")
        # The settings scripts/cluster.sh passes with --config: read as the
        # image's config/default.toml (its WORKDIR is /var/lib/herald).
        mount = "./deploy/herald.toml:/var/lib/herald/config/default.toml:ro"
        if mount not in node.get("volumes", []):
            fail(f"{name}: must mount {mount}")
    for name in ("redis", "postgres"):
        if services[name].get("ports"):
            fail(f"{name}: must not be published")
    ports = services["lb"].get("ports", [])
    if len(ports) != 1 or not str(ports[0]).startswith("${HERALD_LB_BIND:-127.0.0.1}:"):
        fail(f"lb: must publish one port on 127.0.0.1 by default, got {ports}")
    haproxy = open(haproxy_path, encoding="utf-8").read()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+):(\d+)", haproxy, re.M)
    if sorted(host for _, host, _ in servers) != nodes or {p for _, _, p in servers} != {"8080"}:
        fail(f"{haproxy_path} routes to {servers}, not to {nodes} on port 8080")
    if "option httpchk GET /readyz" not in haproxy:
        fail(f"{haproxy_path}: the balancer must route on /readyz")
    print(f"docker-compose.yml: {len(services)} services, rules hold")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
