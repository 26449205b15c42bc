#!/usr/bin/env bash
# Runs the benchmark over all six backend pairs against throwaway servers,
# the way BENCHMARKS.md's figures were produced:
#
#   scripts/bench.sh [extra writethrough-bench options]     # e.g. --duration-ms 300
#
# Starts redis-server, a Redis Cluster of three primaries (for the
# redis-cluster+sqlite and redis-cluster+postgres pairs, which `all` does not
# include: name them in WT_BENCH_PAIRS), memcached and a PostgreSQL cluster on free loopback
# ports in a temporary directory (configured as the testkit starts them,
# memcached with 1 GiB so the 16 KiB tables fit; PostgreSQL with its shipped
# durability, fsync and synchronous_commit on, as users run it; set
# WT_BENCH_FSYNC=off for the second view without WAL flushes), runs
# `writethrough-bench --pairs all` (WT_BENCH_PAIRS to choose), writes the
# Markdown tables to target/bench.md (WT_BENCH_OUT to choose), and stops
# the servers.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-servers.sh
pgbin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")

dir=$(mktemp -d /tmp/wt-bench.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port); mport=$(free_port); pport=$(free_port)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -n "${pg_started:-}" ]] && run_pg "$pgbin/pg_ctl" -D "$dir/pg" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    >"$dir/redis.log" 2>&1 &
pids+=($!)
# A Redis Cluster of three primaries (no replicas: on two cores they would
# only take CPU from the nodes measured), for the redis-cluster pairs.
cports=()
for i in 1 2 3; do
    p=$(free_port); cports+=("$p"); mkdir -p "$dir/cluster-$p"
    redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
        --cluster-enabled yes --cluster-config-file "$dir/cluster-$p/nodes.conf" \
        --dir "$dir/cluster-$p" >"$dir/cluster-$p/redis.log" 2>&1 &
    pids+=($!)
done
for p in "${cports[@]}"; do
    until redis-cli -p "$p" PING >/dev/null 2>&1; do sleep 0.1; done
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${cports[@]}") --cluster-yes >"$dir/cluster-create.log"
for p in "${cports[@]}"; do
    until redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.1; done
done
cluster_url="redis+cluster://$(printf '127.0.0.1:%s,' "${cports[@]}" | sed 's/,$//')"
user=()
[[ $(id -u) -eq 0 ]] && user=(-u root)
memcached -l 127.0.0.1 -p "$mport" -U 0 -m 1024 "${user[@]}" >"$dir/memcached.log" 2>&1 &
pids+=($!)

# PostgreSQL refuses to run as root: run it as the postgres user then.
run_pg() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
mkdir -p "$dir/pg"
[[ $(id -u) -eq 0 ]] && chown -R postgres "$dir"
run_pg "$pgbin/initdb" -D "$dir/pg" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
pgopts="-p $pport -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200"
if [[ "${WT_BENCH_FSYNC:-on}" == off ]]; then
    pgopts+=" -c fsync=off -c full_page_writes=off"
fi
run_pg "$pgbin/pg_ctl" -D "$dir/pg" -l "$dir/postgres.log" -w -o "$pgopts" start >/dev/null
echo "PostgreSQL fsync=${WT_BENCH_FSYNC:-on}" >&2
pg_started=1

cargo build --release -p writethrough-bench
out=${WT_BENCH_OUT:-target/bench.md}
mkdir -p "$(dirname "$out")"
target/release/writethrough-bench --pairs "${WT_BENCH_PAIRS:-all}" \
    --redis "redis://127.0.0.1:$rport" \
    --redis-cluster "$cluster_url" \
    --memcached "memcached://127.0.0.1:$mport" \
    --postgres "postgres://postgres@127.0.0.1:$pport/postgres" \
    --markdown "$out" "$@"
echo "tables written to $out"
