#!/usr/bin/env bash
# Install redis-server for the state-store tests (tests/test_state_store.py run a
# real server on 127.0.0.1). Idempotent: does nothing when the binary is already
# on PATH, so `make setup` can call it every time.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-redis.sh: redis-server not found and apt-get is unavailable;" \
         "install redis-server (>= 6) with your package manager" >&2
    exit 1
fi

# Root in containers/CI; sudo on a developer machine.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends redis-server

# Debian's package may start a system service on :6379; the tests never use it
# (they start their own server on a free port), so it is left as the package set it up.
command -v redis-server >/dev/null
redis-server --version
