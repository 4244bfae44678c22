#!/usr/bin/env bash
# Loopback throughput and latency, side by side (issue 6; see docs/benchmarks.md):
#
#   direct   wrk → upstream
#   nginx    wrk → nginx (proxy_set_header Authorization "Bearer <~800-byte JWT>", upstream
#                 keep-alive) → upstream
#   sidecar  wrk → token-sidecar dev (release build, token already cached) → upstream
#
# The upstream is one nginx instance answering `200 ok` for all three. wrk runs on CPU
# $LOADGEN_CPU, every server (upstream, nginx proxy, sidecar) on CPU $SERVER_CPU. Each target is
# warmed up, then measured $RUNS times interleaved (A B C A B C …); the summary gives the median
# requests/s, p50 and p99 per target and the sidecar's ratios to nginx and direct.
#
# Manual only (CI never runs it). Root is needed only to install wrk/nginx when they are missing.
# Only 127.0.0.1 is ever targeted; every process it starts is stopped by PID on exit.
#
# Environment (defaults): CONNS=64 DURATION=10 (s per run) WARMUP=3 (s) RUNS=3 WRK_THREADS=1
#   LOADGEN_CPU=0 SERVER_CPU=1 UPSTREAM_PORT=18090 NGINX_PORT=18082 TS_PORT=18080
#   TS_ADMIN_PORT=18081 AUTH_BYTES=800 REQ_PATH=/v1/orders/42?expand=items
#   TARGETS="direct nginx sidecar" TS_BIN= (skip the build, use this binary)
#   TS_RUST_LOG=info OUT=target/bench/run-<timestamp>
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
RUNS=${RUNS:-3}
WRK_THREADS=${WRK_THREADS:-1}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
UPSTREAM_PORT=${UPSTREAM_PORT:-18090}
NGINX_PORT=${NGINX_PORT:-18082}
TS_PORT=${TS_PORT:-18080}
TS_ADMIN_PORT=${TS_ADMIN_PORT:-18081}
AUTH_BYTES=${AUTH_BYTES:-800}
REQ_PATH=${REQ_PATH:-/v1/orders/42?expand=items}
TARGETS=${TARGETS:-direct nginx sidecar}
TS_RUST_LOG=${TS_RUST_LOG:-info}
OUT=${OUT:-$ROOT/target/bench/run-$(date +%Y%m%d-%H%M%S)}
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools.
need_install=()
command -v wrk >/dev/null || need_install+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_install+=(nginx)
if [ ${#need_install[@]} -gt 0 ]; then
    log "installing ${need_install[*]}"
    apt-get install -y "${need_install[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y "${need_install[@]}" >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
command -v taskset >/dev/null || die "taskset (util-linux) is required"
command -v python3 >/dev/null || die "python3 is required"
command -v curl >/dev/null || die "curl is required"
[ "$(nproc)" -ge 2 ] || log "warning: fewer than 2 CPUs; pinning is meaningless"

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/token-sidecar-bench.XXXXXX)
mkdir -p "$WORK/tmp" "$WORK/logs"
chmod 1777 "$WORK/tmp"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: only what this script started, stopped by PID.
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { # port → 0 when something accepts on 127.0.0.1:port
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(0.2)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}
wait_port() { # port seconds
    local i
    for i in $(seq $(( $2 * 20 ))); do port_open "$1" && return 0; sleep 0.05; done
    return 1
}
for p in "$UPSTREAM_PORT" "$NGINX_PORT" "$TS_PORT" "$TS_ADMIN_PORT"; do
    port_open "$p" && die "127.0.0.1:$p is already in use; set the *_PORT variables"
done

# CPU ticks (user + system) of a process and its direct children (nginx workers).
cpu_ticks() {
    local total=0 pid f=()
    for pid in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
        [ -r "/proc/$pid/stat" ] || continue
        # Fields after the ")" that closes comm: state is [0], utime [11], stime [12].
        read -r -a f <<<"$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        [ "${#f[@]}" -gt 12 ] || continue
        total=$(( total + f[11] + f[12] ))
    done
    echo "$total"
}
busy_count() { # other compilations running now
    { pgrep -x rustc || true; pgrep -x cargo || true; } | wc -l
}

# ---------------------------------------------------------------------------------------------
# Build.
if [ -z "${TS_BIN:-}" ]; then
    log "cargo build --release --locked"
    cargo build --release --locked >&2
    TS_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/token-sidecar
fi
[ -x "$TS_BIN" ] || die "no binary at $TS_BIN"

# ---------------------------------------------------------------------------------------------
# Upstream: one nginx worker answering 200 "ok" (and echoing Authorization on /__auth, used once
# to check what each proxy injects).
common_http="
    access_log off;
    client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
    uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 75s;"
cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/logs/upstream-error.log warn;
events { worker_connections 8192; }
http {
    $common_http
    server {
        listen 127.0.0.1:$UPSTREAM_PORT reuseport backlog=4096;
        location = /__auth { return 200 \$http_authorization; }
        location / { return 200 "ok"; }
    }
}
EOF

JWT=$(python3 bench/fake_jwt.py "$AUTH_BYTES")
cat >"$WORK/proxy.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/proxy.pid;
error_log $WORK/logs/proxy-error.log warn;
events { worker_connections 8192; }
http {
    $common_http
    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT reuseport backlog=4096;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:$UPSTREAM_PORT;
            proxy_set_header Authorization "Bearer $JWT";
        }
    }
}
EOF

start_nginx() { # name conf port → sets the PID variable named by name
    taskset -c "$SERVER_CPU" "$NGINX" -e "$WORK/logs/$1-startup.log" -p "$WORK" -c "$2" \
        >"$WORK/logs/$1.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$3" 10 || { cat "$WORK/logs/$1"* >&2; die "$1 nginx did not start"; }
    printf -v "${1}_PID" '%s' "$pid"
}

log "starting upstream nginx on 127.0.0.1:$UPSTREAM_PORT (CPU $SERVER_CPU)"
start_nginx upstream "$WORK/upstream.conf" "$UPSTREAM_PORT"
log "starting proxy nginx on 127.0.0.1:$NGINX_PORT (CPU $SERVER_CPU)"
start_nginx proxy "$WORK/proxy.conf" "$NGINX_PORT"

# The sidecar, in dev mode (its embedded authorization server issues the token), started on the
# server CPU so that Tokio sizes its runtime for the one CPU it has.
sed "s#http://127.0.0.1:18090#http://127.0.0.1:$UPSTREAM_PORT#" bench/sidecar.toml >"$WORK/sidecar.toml"
log "starting token-sidecar dev on 127.0.0.1:$TS_PORT (CPU $SERVER_CPU): $TS_BIN"
# Any SIDECAR_* variable is a config override to the sidecar (an unknown one is fatal): pass none.
unset_sidecar_env=()
for v in $(compgen -e | grep '^SIDECAR_' || true); do unset_sidecar_env+=(-u "$v"); done
taskset -c "$SERVER_CPU" env "${unset_sidecar_env[@]}" RUST_LOG="$TS_RUST_LOG" "$TS_BIN" dev \
    --config "$WORK/sidecar.toml" \
    --listen "127.0.0.1:$TS_PORT" --admin-listen "127.0.0.1:$TS_ADMIN_PORT" \
    >"$OUT/sidecar.stdout" 2>"$OUT/sidecar.stderr" &
sidecar_PID=$!
PIDS+=("$sidecar_PID")
ready=""
for _ in $(seq 200); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$TS_ADMIN_PORT/readyz")" = 200 ]; then
        ready=1
        break
    fi
    kill -0 "$sidecar_PID" 2>/dev/null || break
    sleep 0.05
done
[ -n "$ready" ] || { cat "$OUT/sidecar.stderr" >&2; die "the sidecar did not become ready"; }

# What each proxy injects.
sidecar_auth=$(curl -s "http://127.0.0.1:$TS_PORT/__auth")
nginx_auth=$(curl -s "http://127.0.0.1:$NGINX_PORT/__auth")
case "$sidecar_auth" in Bearer\ *) ;; *) die "the sidecar did not inject a bearer token: $sidecar_auth" ;; esac
case "$nginx_auth" in Bearer\ *) ;; *) die "nginx did not inject a bearer token: $nginx_auth" ;; esac
log "Authorization header: sidecar ${#sidecar_auth} bytes (token $(( ${#sidecar_auth} - 7 ))), nginx ${#nginx_auth} bytes"
url_of() {
    case $1 in
        direct) echo "http://127.0.0.1:$UPSTREAM_PORT$REQ_PATH" ;;
        nginx) echo "http://127.0.0.1:$NGINX_PORT$REQ_PATH" ;;
        sidecar) echo "http://127.0.0.1:$TS_PORT$REQ_PATH" ;;
        *) die "unknown target $1" ;;
    esac
}
for t in $TARGETS; do
    body=$(curl -s -w ' %{http_code}' "$(url_of "$t")")
    [ "$body" = "ok 200" ] || die "$t: expected 'ok 200' from $(url_of "$t"), got '$body'"
done

servers_of() {
    case $1 in
        direct) echo "$upstream_PID" ;;
        nginx) echo "$proxy_PID $upstream_PID" ;;
        sidecar) echo "$sidecar_PID $upstream_PID" ;;
    esac
}

# One wrk run; appends a row to results.tsv (measured runs only).
RESULTS="$OUT/results.tsv"
printf 'target\trun\trequests\terrors\trps\tp50_us\tp90_us\tp99_us\tp999_us\tmax_us\tbusy\tserver_cpu\tloadgen_cpu\n' >"$RESULTS"
run_wrk() { # target run-label seconds
    local target=$1 label=$2 secs=$3 url servers before after t0 t1 busy0 busy1 file line
    url=$(url_of "$target")
    servers=$(servers_of "$target")
    file="$OUT/wrk-$target-$label.txt"
    busy0=$(busy_count)
    before=$(cpu_ticks $servers)
    t0=$(date +%s%N)
    # The inner shell reports wrk's CPU time (its children's ticks) after wrk exits.
    taskset -c "$LOADGEN_CPU" bash -c '
        wrk "$@"
        read -r -a s < /proc/$$/stat
        echo "LOADGEN_TICKS $(( s[15] + s[16] ))"' _ \
        -t"$WRK_THREADS" -c"$CONNS" -d"${secs}s" --timeout 5s --latency -s bench/report.lua "$url" \
        >"$file" 2>&1 || true
    t1=$(date +%s%N)
    after=$(cpu_ticks $servers)
    busy1=$(busy_count)
    line=$(grep '^RESULT' "$file" || true)
    [ -n "$line" ] || { cat "$file" >&2; die "wrk failed for $target"; }
    [ "$label" = warmup ] && return 0
    local wall_ticks=$(( (t1 - t0) * CLK_TCK / 1000000000 ))
    local lg
    lg=$(awk '/^LOADGEN_TICKS/ {print $2}' "$file")
    # shellcheck disable=SC2086
    eval "$(echo "${line#RESULT }" | tr ' ' '\n' | sed 's/^/local r_/')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$target" "$label" "$r_requests" "$r_errors" "$r_rps" "$r_p50_us" "$r_p90_us" \
        "$r_p99_us" "$r_p999_us" "$r_max_us" "$(( busy0 + busy1 ))" \
        "$(awk -v a="$(( after - before ))" -v w="$wall_ticks" 'BEGIN{printf "%.2f", a / w}')" \
        "$(awk -v a="$lg" -v w="$wall_ticks" 'BEGIN{printf "%.2f", a / w}')" >>"$RESULTS"
    log "$target run $label: $(printf '%.0f' "$r_rps") req/s, p50 ${r_p50_us} µs, p99 ${r_p99_us} µs, errors $r_errors"
}

log "warm-up: ${WARMUP}s per target; then $RUNS × ${DURATION}s per target, interleaved; $CONNS connections"
for t in $TARGETS; do run_wrk "$t" warmup "$WARMUP"; done
for r in $(seq "$RUNS"); do
    for t in $TARGETS; do run_wrk "$t" "$r" "$DURATION"; done
done

# ---------------------------------------------------------------------------------------------
{
    echo "# bench/run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "sidecar: $TS_BIN ($(stat -c %s "$TS_BIN") bytes), $("$TS_BIN" --version 2>/dev/null || true)"
    echo "nginx: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "load: wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s on CPU $LOADGEN_CPU; servers on CPU $SERVER_CPU; path $REQ_PATH"
    echo "Authorization: sidecar ${#sidecar_auth} bytes, nginx ${#nginx_auth} bytes"
    echo
    python3 bench/summarize.py "$RESULTS"
    echo
    echo "server_cpu = CPU-seconds of the servers per second (1.00 = they had CPU $SERVER_CPU to themselves"
    echo "and used all of it); loadgen_cpu likewise for wrk. Per run:"
    column -t -s $'\t' "$RESULTS"
} | tee "$OUT/summary.md"
log "results in $OUT"
