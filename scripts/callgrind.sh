#!/usr/bin/env bash
# Instructions per operation, ours against raw, counted by callgrind (exact
# and repeatable where timings on this machine are not): a Moka hit and a
# Redis hit (the client's instructions; the server is another process).
# Each side runs twice, N1 and N2 operations, and the difference of the
# totals over N2 - N1 leaves out the setup.
#
#   scripts/callgrind.sh          # a few minutes; prints a Markdown table
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "missing valgrind: sudo apt-get install -y valgrind" >&2; exit 1; }
scripts/install-servers.sh
cargo build --release -p writethrough-bench >&2
dir=$(mktemp -d /tmp/wt-callgrind.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >"$dir/redis.log" 2>&1 &
rpid=$!
trap 'kill $rpid 2>/dev/null || true; rm -rf "$dir"' EXIT
sleep 0.5
n1=${WT_CG_N1:-2000}
n2=${WT_CG_N2:-12000}
irs() {  # cache side n -> total instructions
    valgrind --tool=callgrind --callgrind-out-file="$dir/out" \
        target/release/writethrough-bench --cache "$1" --db sqlite::temp: \
        --scenarios read_hit --sizes 256 --count "$3" --side "$2" >/dev/null 2>"$dir/err" \
        || { cat "$dir/err" >&2; exit 1; }
    awk '/^(summary|totals):/ {print $2; exit}' "$dir/out"
}
echo "| read hit, 256 B | ours Ir/op | raw Ir/op | ours / raw |"
echo "|---|---:|---:|---:|"
for cache in moka:// "redis://127.0.0.1:$port"; do
    declare -A per
    for side in ours raw; do
        a=$(irs "$cache" $side "$n1"); b=$(irs "$cache" $side "$n2")
        per[$side]=$(( (b - a) / (n2 - n1) ))
    done
    name=${cache%%://*}
    awk -v n="$name" -v o="${per[ours]}" -v r="${per[raw]}" \
        'BEGIN { printf "| %s | %d | %d | %.2f |\n", n, o, r, o / r }'
done
