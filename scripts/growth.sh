#!/usr/bin/env bash
# How cost grows: the benchmark run over key counts, concurrency and value
# sizes (each run on fresh throwaway servers, through scripts/bench.sh),
# the tables kept in target/growth/*.md, and the plots drawn into
# docs/growth/*.png by scripts/plot_growth.py (needs matplotlib:
# `pip install matplotlib`).
#
#   scripts/growth.sh            # about 30 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/growth
mkdir -p "$out"
run() { local name=$1; shift; WT_BENCH_OUT="$out/$name.md" scripts/bench.sh "$@"; }

# Concurrency 1 -> 256: read hit and write, the quickstart pair and the service pair.
WT_BENCH_PAIRS=moka+sqlite,redis+postgres run concurrency \
    --sizes 256 --concurrency 1,4,16,64,256 --scenarios read_hit,write --duration-ms 500 --rounds 2

# Value size 64 B -> 1 MiB (100 keys, so that 1 MiB values fit in memory).
WT_BENCH_PAIRS=moka+sqlite,redis+postgres run sizes \
    --keys 100 --sizes 64,1024,16384,262144,1048576 --concurrency 1 \
    --scenarios read_hit,write --duration-ms 500 --rounds 2

# Keys 10^3 -> 10^6: hit latency and cache memory per entry (Moka by RSS,
# with PostgreSQL out of process so that only cache entries count; Redis by
# used_memory). Moka gets 2 GiB, ours and raw alike, so that a million
# entries fit.
for k in 1000 10000 100000 1000000; do
    WT_BENCH_PAIRS=moka+postgres,redis+postgres run "keys-$k" \
        --cache "moka://?max_bytes=2147483648" --keys "$k" --sizes 256 --concurrency 1,16 --scenarios read_hit --duration-ms 500 --rounds 2
done

# Warming 1,000,000 rows: Handle::warm against a raw scan plus pipelined SETs.
WT_BENCH_PAIRS=moka+postgres,redis+postgres run warm \
    --cache "moka://?max_bytes=2147483648" --keys 1000000 --sizes 256 --concurrency 1 \
    --scenarios warm --rounds 1

python3 scripts/plot_growth.py "$out" docs/growth
