#!/usr/bin/env bash
# Per-request costs that do not depend on how loaded the machine is (docs/benchmarks.md,
# "Counts"): for the sidecar and for nginx doing the same job,
#
# * instructions per request: `valgrind --tool=callgrind` over the whole process, run twice
#   with N1 and N2 requests (bench/fixed_requests.py: exactly N keep-alive requests over CONNS
#   connections); (I(N2) − I(N1)) / (N2 − N1) removes start-up and the first token;
# * system calls and context switches per request: `perf stat -e raw_syscalls:sys_enter,
#   context-switches` attached to the proxy while it serves N2 requests (falls back to
#   `strace -c -f`); these depend on batching, so CONNS matters;
# * heap allocations per request (`valgrind --tool=dhat`, same two-run difference) for the
#   sidecar.
#
# Environment (defaults): N1=2000 N2=6000 CONNS=16 UPSTREAM_PORT=18090 TS_PORT=18080
#   TS_ADMIN_PORT=18081 NGINX_PORT=18082 TS_BIN= (skip the build) SKIP_NGINX= SKIP_DHAT=
#   OUT=target/bench/counts-<timestamp>
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=counts.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

N1=${N1:-2000}
N2=${N2:-6000}
CONNS=${CONNS:-16}
TS_PORT=${TS_PORT:-18080}
TS_ADMIN_PORT=${TS_ADMIN_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
OUT=${OUT:-$(pwd)/target/bench/counts-$(date +%Y%m%d-%H%M%S)}

ensure_tools
command -v valgrind >/dev/null || apt-get install -y valgrind >/dev/null
ensure_binary
require_free_ports "$UPSTREAM_PORT" "$TS_PORT" "$TS_ADMIN_PORT" "$NGINX_PORT"
mkdir -p "$OUT"
start_upstream
sed -e "s#http://127.0.0.1:18090#http://127.0.0.1:$UPSTREAM_PORT#" \
    -e "s#^access_log = .*#access_log = false#" bench/sidecar.toml >"$WORK/sidecar.toml"

requests() { python3 bench/fixed_requests.py "$1" "$2" "$CONNS" >/dev/null; }

# The sidecar under a valgrind tool, N requests, stopped; prints the tool's total.
sidecar_under() { # tool n
    local out="$OUT/$1-sidecar-$2.out"
    taskset -c "$SERVER_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG=warn valgrind --tool="$1" \
        "--$1-out-file=$out" "$TS_BIN" dev --config "$WORK/sidecar.toml" \
        --listen "127.0.0.1:$TS_PORT" --admin-listen "127.0.0.1:$TS_ADMIN_PORT" \
        >"$OUT/$1-$2.stdout" 2>"$OUT/$1-$2.stderr" &
    local pid=$!
    PIDS+=("$pid")
    wait_ready "$TS_ADMIN_PORT" "$pid" 120 || { tail "$OUT/$1-$2.stderr" >&2; die "sidecar not ready"; }
    requests "$TS_PORT" "$2"
    stop_pid "$pid"
    total "$1" "$out"
}
total() { # tool file → instructions (callgrind) or allocations (dhat)
    case $1 in
        callgrind) sed -n 's/^summary: //p; s/^totals: //p' "$2" | head -1 | awk '{print $1}' ;;
        dhat) python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(p["tbk"] for p in d["pps"]))' "$2" ;;
    esac
}
per_request() { awk -v a="$1" -v b="$2" -v n="$(( N2 - N1 ))" 'BEGIN { printf "%.0f", (b - a) / n }'; }

# nginx (the proxy of bench/lib.sh) under callgrind.
nginx_instructions() { # n
    # Writes $WORK/proxy.conf; that instance is stopped and the same config run under valgrind.
    start_nginx_proxy "$NGINX_PORT" 800 >/dev/null 2>&1 || true
    stop_pid "$proxy_PID"
    # One process (no master/worker split), so that one callgrind file holds the whole work.
    taskset -c "$SERVER_CPU" valgrind --tool=callgrind \
        "--callgrind-out-file=$OUT/callgrind-nginx-$1.%p" "$NGINX" -e "$WORK/logs/vg-nginx.log" \
        -p "$WORK" -c "$WORK/proxy.conf" -g "master_process off;" >"$OUT/nginx-vg-$1.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$NGINX_PORT" 60 || die "nginx under valgrind did not start"
    requests "$NGINX_PORT" "$1"
    stop_pid "$pid"
    local sum=0 f
    for f in "$OUT"/callgrind-nginx-"$1".*; do sum=$(( sum + $(total callgrind "$f") )); done
    echo "$sum"
}

: >"$OUT/counts.txt"
note() { echo "$*" | tee -a "$OUT/counts.txt"; }
note "binary: $TS_BIN ($(stat -c %s "$TS_BIN") bytes); N1=$N1 N2=$N2 CONNS=$CONNS"

log "callgrind: sidecar, $N1 then $N2 requests"
i1=$(sidecar_under callgrind "$N1")
i2=$(sidecar_under callgrind "$N2")
note "sidecar instructions per request: $(per_request "$i1" "$i2") (totals $i1 / $i2)"
if [ -z "${SKIP_NGINX:-}" ]; then
    log "callgrind: nginx, $N1 then $N2 requests"
    n1=$(nginx_instructions "$N1")
    n2=$(nginx_instructions "$N2")
    note "nginx instructions per request: $(per_request "$n1" "$n2") (totals $n1 / $n2)"
fi
if [ -z "${SKIP_DHAT:-}" ]; then
    log "dhat: sidecar allocations, $N1 then $N2 requests"
    a1=$(sidecar_under dhat "$N1")
    a2=$(sidecar_under dhat "$N2")
    note "sidecar heap allocations per request: $(per_request "$a1" "$a2") (totals $a1 / $a2)"
fi

# System calls and context switches: the real binaries, perf attached while N2 requests run.
syscalls() { # name port pids...
    local name=$1 port=$2
    shift 2
    requests "$port" 500 # warm: upstream connections open, caches filled
    local pids
    pids=$(echo "$@" | tr ' ' ,)
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pids" -o "$OUT/stat-$name.csv" \
        >/dev/null 2>&1 &
    local stat_pid=$!
    PIDS+=("$stat_pid")
    sleep 0.3
    requests "$port" "$N2"
    kill -INT "$stat_pid" 2>/dev/null || true
    wait "$stat_pid" 2>/dev/null || true
    awk -F, -v n="$name" -v r="$N2" '
        $3 ~ /sys_enter/ { sc = $1 } $3 == "context-switches" { cs = $1 }
        END { printf "%s system calls per request: %.2f, context switches per request: %.2f\n", n, sc / r, cs / r }' \
        "$OUT/stat-$name.csv"
}
if perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
    taskset -c "$SERVER_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG=warn "$TS_BIN" dev \
        --config "$WORK/sidecar.toml" --listen "127.0.0.1:$TS_PORT" \
        --admin-listen "127.0.0.1:$TS_ADMIN_PORT" >"$OUT/sidecar.stdout" 2>"$OUT/sidecar.stderr" &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
    wait_ready "$TS_ADMIN_PORT" "$SIDECAR_PID" 20 || die "sidecar not ready"
    note "$(syscalls sidecar "$TS_PORT" "$SIDECAR_PID")"
    start_nginx_proxy "$NGINX_PORT" 800
    # shellcheck disable=SC2046
    note "$(syscalls nginx "$NGINX_PORT" "$proxy_PID" $(pgrep -P "$proxy_PID"))"
else
    log "perf cannot count system calls here; skipped"
fi
log "counts in $OUT/counts.txt"
