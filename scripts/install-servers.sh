#!/usr/bin/env bash
# Installs the server binaries the tests and the benchmark start
# (redis-server and redis-cli, memcached, PostgreSQL, and the psql and sqlite3 clients) from Debian's packages when they
# are missing and we are root; otherwise prints the exact command and fails.
# Used by scripts/test.sh and scripts/bench.sh.
set -euo pipefail

step() { printf '\n==> %s\n' "$*"; }
missing=()
have_pg() {
    command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The Redis Cluster of the tests is formed and resharded with redis-cli.
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v memcached >/dev/null 2>&1 || missing+=(memcached)
have_pg || missing+=(postgresql)
# The external-writer tests write with the stock clients, as an operator would.
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        step "installing ${missing[*]} (Debian packages)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "error: the tests need ${missing[*]}; install with:" >&2
        echo "    sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

