#!/usr/bin/env bash
# The load-test matrix of the README: for each (clients, mode), a fresh copy of an index, a fresh
# `blendrag serve` on loopback, one bounded `python -m bench.load` run, then the server is stopped.
#   scripts/load_matrix.sh INDEX_DIR OUT_DIR [DURATION_S] ["8 32"]
# Hold the CPU lock around it when its timings are reported: flock /tmp/blendrag-cpu.lock ...
set -euo pipefail
index=$1 out=$2 duration=${3:-60} clients=${4:-8 32}
cd "$(dirname "$0")/.."
mkdir -p "$out"
port=18431
for n in $clients; do
    for mode in blend full; do
        work=$(mktemp -d)
        cp -r "$index" "$work/index"
        .venv/bin/blendrag serve --index-dir "$work/index" --port "$port" > "$out/serve-$mode-$n.log" 2>&1 &
        server=$!
        until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
            kill -0 "$server" || { echo "server did not start: see $out/serve-$mode-$n.log"; exit 1; }
            sleep 1
        done
        .venv/bin/python -m bench.load --url "http://127.0.0.1:$port" --clients "$n" --mode "$mode" \
            --duration "$duration" --server-pid "$server" --out "$out/load-$mode-$n.json" > "$out/load-$mode-$n.txt"
        kill "$server"
        wait "$server" || true
        rm -rf "$work"
    done
done
