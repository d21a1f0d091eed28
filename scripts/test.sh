#!/usr/bin/env bash
# The test command (README "Tests"): on a machine with the system packages
# below, it sets up everything else inside the build folder and runs
# `cargo test` (arguments are passed on, e.g. `scripts/test.sh ws::`).
#
# - System packages: checked first; what is missing is named in one line
#   with the command that installs it, and nothing runs.
# - npm packages of the JavaScript client's tests, the browser test and the
#   Node example: `npm ci` into <build>/test-env/js/<package>/ (the tests
#   run from there), never into the source tree.
# - Python packages of the Python examples: a virtual environment in
#   <build>/test-env/venv, never the system interpreter.
# - PostgreSQL: the server HERALD_TEST_POSTGRES names; when it is not set,
#   a private one started from the installed server binaries on a free port
#   in a temporary folder, and removed on exit.
#
# Redis: tests start their own redis-server processes on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- system packages ----------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need node nodejs
need npm npm
need redis-server redis-server
need redis-cli redis-tools
need haproxy haproxy
need python3 python3
need prlimit util-linux
need openssl openssl
[[ -x "${CHROMIUM:-/usr/bin/chromium}" ]] || missing+=(chromium)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
pg_bin=
if [[ -z "${HERALD_TEST_POSTGRES:-}" ]]; then
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -x "$pg_bin/initdb" && -x "$pg_bin/pg_ctl" ]] || missing+=(postgresql)
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    # Deduplicated, in order.
    read -r -a missing <<<"$(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++' | tr '\n' ' ')"
    echo "scripts/test.sh: missing system packages: ${missing[*]}; install them with: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "scripts/test.sh: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
node_major=$(node -p 'process.versions.node.split(".")[0]')
[[ "$node_major" -ge 20 ]] || { echo "scripts/test.sh: Node.js 20 or later is needed (found $(node --version))" >&2; exit 1; }

# ---- the build folder's test environment ---------------------------------
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
env_dir="$target/test-env"
mkdir -p "$env_dir"

# npm: each package's manifest and lock, installed where its tests run.
for package in clients/js tests/browser examples/node; do
    mirror="$env_dir/js/$package"
    mkdir -p "$mirror"
    if ! cmp -s "$package/package-lock.json" "$mirror/package-lock.json" || [[ ! -d "$mirror/node_modules" ]]; then
        cp "$package/package.json" "$package/package-lock.json" "$mirror/"
        (cd "$mirror" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
done

# Python: one virtual environment for the examples.
venv="$env_dir/venv"
if ! cmp -s examples/python/requirements.txt "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r examples/python/requirements.txt
    cp examples/python/requirements.txt "$venv/requirements.txt"
fi
export HERALD_TEST_PYTHON="$venv/bin/python"

# PostgreSQL: a private server unless one is named.
if [[ -z "${HERALD_TEST_POSTGRES:-}" ]]; then
    pg_dir=$(mktemp -d "${TMPDIR:-/tmp}/herald-test-pg.XXXXXX")
    pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg=()
    if [[ $(id -u) -eq 0 ]]; then
        # initdb refuses to run as root: the server runs as `postgres`.
        chown postgres "$pg_dir"
        as_pg=(runuser -u postgres --)
    fi
    stop_pg() {
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$pg_dir"
    }
    trap stop_pg EXIT
    "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres --no-sync >"$pg_dir/initdb.log" 2>&1 ||
        { cat "$pg_dir/initdb.log" >&2; exit 1; }
    # Tests create many databases and pools at once; durability is not
    # what they test of the server.
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -s \
        -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off" \
        start || { cat "$pg_dir/server.log" >&2; exit 1; }
    export HERALD_TEST_POSTGRES="postgres://postgres@127.0.0.1:$pg_port"
fi

cargo test --locked "$@"
