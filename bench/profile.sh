#!/usr/bin/env bash
# CPU profile of the sidecar under the bench/run.sh load (see docs/benchmarks.md).
#
# Builds a release binary that keeps its symbols (the release profile strips them) into
# target/bench-profile, starts the same upstream and `token-sidecar dev` as bench/run.sh, drives
# it with wrk for PROFILE_SECONDS, and records it with `perf record` (installs linux-perf when
# missing; falls back to `valgrind --tool=callgrind` on a short run when perf cannot record).
# First counts context switches and system calls per request for nginx (as in bench/run.sh) and
# the sidecar under the same load (`perf stat`). Writes the flat profile (self time by symbol),
# the inclusive one (children) and the split by DSO to target/bench/profile-<timestamp>/.
#
# The per-request figures here are CPU time under perf, so they move with the machine's load;
# bench/counts.sh gives load-independent ones (instructions, allocations, system calls per
# request from a fixed request count) and is the one to compare commits with on a busy machine.
#
# Environment (defaults): PROFILE_SECONDS=8 CONNS=64 LOADGEN_CPU=0 SERVER_CPU=1
#   UPSTREAM_PORT=18090 TS_PORT=18080 TS_ADMIN_PORT=18081 NGINX_PORT=18082 TS_BIN= (a symbolized binary to use
#   instead of building) OUT=target/bench/profile-<timestamp>
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=profile.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

PROFILE_SECONDS=${PROFILE_SECONDS:-8}
CONNS=${CONNS:-64}
TS_PORT=${TS_PORT:-18080}
TS_ADMIN_PORT=${TS_ADMIN_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
REQ_PATH=${REQ_PATH:-/v1/orders/42?expand=items}
OUT=${OUT:-$(pwd)/target/bench/profile-$(date +%Y%m%d-%H%M%S)}

ensure_tools
require_free_ports "$UPSTREAM_PORT" "$TS_PORT" "$TS_ADMIN_PORT" "$NGINX_PORT"
if ! command -v perf >/dev/null; then
    apt-get install -y linux-perf >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y linux-perf >/dev/null; } || true
fi
if [ -z "${TS_BIN:-}" ]; then
    log "building a symbolized release binary into target/bench-profile"
    CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
        cargo build --release --locked --target-dir target/bench-profile >&2
    TS_BIN=$(pwd)/target/bench-profile/release/token-sidecar
fi
mkdir -p "$OUT"

start_upstream
sed "s#http://127.0.0.1:18090#http://127.0.0.1:$UPSTREAM_PORT#" bench/sidecar.toml >"$WORK/sidecar.toml"

start_dev() { # prefix-command...: the sidecar in dev mode on the server CPU
    taskset -c "$SERVER_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG=info "$@" "$TS_BIN" dev \
        --config "$WORK/sidecar.toml" \
        --listen "127.0.0.1:$TS_PORT" --admin-listen "127.0.0.1:$TS_ADMIN_PORT" \
        >"$OUT/sidecar.stdout" 2>"$OUT/sidecar.stderr" &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    wait_ready "$TS_ADMIN_PORT" "$SIDECAR_PID" 60 ||
        { cat "$OUT/sidecar.stderr" >&2; die "the sidecar did not become ready"; }
}
load() { # seconds port
    taskset -c "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d"${1}s" --latency -s bench/report.lua \
        "http://127.0.0.1:$2$REQ_PATH" >"$OUT/wrk.txt" 2>&1 || true
    grep '^RESULT' "$OUT/wrk.txt" >&2 || true
}
# perf pads the symbol column to the longest (very long) Rust name: trim it.
trim() { sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | grep -v '^$'; }
# Context switches and system calls per request, sidecar vs nginx (same load).
stat_run() { # name port pids...
    local name=$1 port=$2 requests
    shift 2
    load 1 "$port"
    local pids
    pids=$(echo "$@" | tr ' ' ,)
    perf stat -x, -e context-switches,raw_syscalls:sys_enter,task-clock -p "$pids" \
        -o "$OUT/stat-$name.csv" >/dev/null 2>&1 &
    local stat_pid=$!
    PIDS+=("$stat_pid")
    # Without call graphs: only the split between kernel, libc and the program.
    perf record -F 999 -p "$pids" -o "$OUT/split-$name.data" >/dev/null 2>&1 &
    local rec_pid=$!
    PIDS+=("$rec_pid")
    sleep 0.3
    load "$PROFILE_SECONDS" "$port"
    kill -INT "$stat_pid" "$rec_pid" 2>/dev/null || true
    wait "$stat_pid" "$rec_pid" 2>/dev/null || true
    requests=$(sed -n 's/^RESULT requests=\([0-9]*\).*/\1/p' "$OUT/wrk.txt")
    awk -F, -v n="$name" -v r="$requests" '
        $3 == "context-switches" { cs = $1 }
        $3 ~ /sys_enter/ { sc = $1 }
        $3 == "task-clock" { ms = $1 }
        END { printf "%-8s %d requests: %.2f µs of CPU, %.2f context switches, %.2f system calls per request\n",
              n, r, ms * 1000 / r, cs / r, sc / r }' "$OUT/stat-$name.csv" | tee -a "$OUT/per-request.txt" >&2
    # (|| true: `head` closing the pipe early is not a failure)
    perf report -i "$OUT/split-$name.data" --sort dso --stdio 2>/dev/null | grep '%' | trim |
        head -5 | sed "s/^/    $name: /" | tee -a "$OUT/per-request.txt" >&2 || true
    perf report -i "$OUT/split-$name.data" --sort symbol --stdio 2>/dev/null | grep '%' | trim |
        head -40 >"$OUT/flat-$name.txt" || true
}

if command -v perf >/dev/null && perf record -o /dev/null -- true >/dev/null 2>&1; then
    start_dev
    start_nginx_proxy "$NGINX_PORT" 800
    # shellcheck disable=SC2046
    stat_run nginx "$NGINX_PORT" "$proxy_PID" $(pgrep -P "$proxy_PID")
    stat_run sidecar "$TS_PORT" "$SIDECAR_PID"
    stop_pid "$proxy_PID"
    load 2 "$TS_PORT" # warm-up
    log "perf record for ${PROFILE_SECONDS}s under load"
    perf record -F 1999 -g --call-graph dwarf,16384 -p "$SIDECAR_PID" -o "$OUT/perf.data" \
        >"$OUT/perf-record.log" 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
    load "$PROFILE_SECONDS" "$TS_PORT"
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio --percent-limit 0.5 \
        -g none 2>/dev/null | trim >"$OUT/flat.txt" || true
    perf report -i "$OUT/perf.data" --children --sort symbol --stdio --percent-limit 2 \
        -g none 2>/dev/null | trim >"$OUT/children.txt" || true
    perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none \
        2>/dev/null | trim >"$OUT/dso.txt" || true
    log "flat profile (self time):"
    grep -v '^#' "$OUT/flat.txt" | head -45 || true
    log "inclusive (children) ≥ 3%: $OUT/children.txt; by DSO: $OUT/dso.txt"
else
    command -v valgrind >/dev/null || apt-get install -y valgrind >/dev/null
    log "perf unavailable: callgrind on a short run (slow)"
    start_dev valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out"
    load "$PROFILE_SECONDS" "$TS_PORT"
    stop_pid "$SIDECAR_PID"
    callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | head -60 | tee "$OUT/flat.txt" || true
fi
log "profile in $OUT"
