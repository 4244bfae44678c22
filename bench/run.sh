#!/usr/bin/env bash
# Loopback throughput and latency, side by side (see docs/benchmarks.md):
#
#   direct   wrk → upstream
#   nginx    wrk → nginx (proxy_set_header Authorization "Bearer <~800-byte JWT>", upstream
#                 keep-alive) → upstream
#   sidecar  wrk → token-sidecar dev (release build, token already cached, access log off like
#                 nginx's) → upstream
#   sidecar-log  the same with the access log on (the sidecar's default)
#
# The upstream is one nginx worker answering `200 ok`, the same for all three. wrk runs on CPU
# $LOADGEN_CPU, every server (upstream, nginx proxy, sidecar) on CPU $SERVER_CPU. Each target is
# warmed up, then measured $RUNS times interleaved (A B C A B C …); the summary gives the median
# requests/s, p50 and p99 per target and the sidecar's ratios to nginx and direct.
#
# Manual only (CI never runs it); about 2.5 minutes plus the build with the defaults. Root is needed
# only to install wrk/nginx when missing. Only 127.0.0.1 is targeted; every process it starts is
# stopped by PID on exit.
#
# Environment (defaults): CONNS=64 DURATION=10 (s per run) WARMUP=3 (s) RUNS=3 WRK_THREADS=1
#   LOADGEN_CPU=0 SERVER_CPU=1 UPSTREAM_PORT=18090 NGINX_PORT=18082 TS_PORT=18080
#   TS_ADMIN_PORT=18081 TS_LOG_PORT=18083 TS_LOG_ADMIN_PORT=18084 AUTH_BYTES=800
#   REQ_PATH=/v1/orders/42?expand=items TARGETS="direct nginx sidecar sidecar-log"
#   TS_BIN= (skip the build, use this binary)
#   TS_RUST_LOG=info OUT=target/bench/run-<timestamp>
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=run.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

CONNS=${CONNS:-64}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
RUNS=${RUNS:-3}
WRK_THREADS=${WRK_THREADS:-1}
NGINX_PORT=${NGINX_PORT:-18082}
TS_PORT=${TS_PORT:-18080}
TS_ADMIN_PORT=${TS_ADMIN_PORT:-18081}
TS_LOG_PORT=${TS_LOG_PORT:-18083}
TS_LOG_ADMIN_PORT=${TS_LOG_ADMIN_PORT:-18084}
AUTH_BYTES=${AUTH_BYTES:-800}
REQ_PATH=${REQ_PATH:-/v1/orders/42?expand=items}
TARGETS=${TARGETS:-direct nginx sidecar sidecar-log}
TS_RUST_LOG=${TS_RUST_LOG:-info}
OUT=${OUT:-$(pwd)/target/bench/run-$(date +%Y%m%d-%H%M%S)}

ensure_tools
require_free_ports "$UPSTREAM_PORT" "$NGINX_PORT" "$TS_PORT" "$TS_ADMIN_PORT" "$TS_LOG_PORT" \
    "$TS_LOG_ADMIN_PORT"
ensure_binary
mkdir -p "$OUT"

# ---------------------------------------------------------------------------------------------
start_upstream

start_nginx_proxy "$NGINX_PORT" "$AUTH_BYTES"

# The sidecar in dev mode (its embedded authorization server issues the token), started on the
# server CPU so that Tokio sizes its runtime for the one CPU it has. "sidecar" runs without the
# access log (like nginx here), "sidecar-log" with it (the sidecar's default).
start_sidecar() { # name port admin-port access_log
    sed -e "s#http://127.0.0.1:18090#http://127.0.0.1:$UPSTREAM_PORT#" \
        -e "s#^access_log = .*#access_log = $4#" bench/sidecar.toml >"$WORK/$1.toml"
    log "token-sidecar dev ($1, access_log = $4) on 127.0.0.1:$2 (CPU $SERVER_CPU): $TS_BIN"
    taskset -c "$SERVER_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG="$TS_RUST_LOG" "$TS_BIN" dev \
        --config "$WORK/$1.toml" --listen "127.0.0.1:$2" --admin-listen "127.0.0.1:$3" \
        >"$OUT/$1.stdout" 2>>"$OUT/$1.stderr" &
    local pid=$!
    PIDS+=("$pid")
    printf -v "${1//-/_}_PID" '%s' "$pid"
    wait_ready "$3" "$pid" 20 || { cat "$OUT/$1.stderr" >&2; die "$1 did not become ready"; }
}
start_sidecar sidecar "$TS_PORT" "$TS_ADMIN_PORT" false
case " $TARGETS " in
    *" sidecar-log "*) start_sidecar sidecar-log "$TS_LOG_PORT" "$TS_LOG_ADMIN_PORT" true ;;
esac

# What each proxy injects, and that every target answers.
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
        sidecar-log) echo "http://127.0.0.1:$TS_LOG_PORT$REQ_PATH" ;;
        *) die "unknown target $1" ;;
    esac
}
servers_of() {
    case $1 in
        direct) echo "$upstream_PID" ;;
        nginx) echo "$proxy_PID $upstream_PID" ;;
        sidecar) echo "$sidecar_PID $upstream_PID" ;;
        sidecar-log) echo "$sidecar_log_PID $upstream_PID" ;;
    esac
}
for t in $TARGETS; do
    body=$(curl -s -w ' %{http_code}' "$(url_of "$t")")
    [ "$body" = "ok 200" ] || die "$t: expected 'ok 200' from $(url_of "$t"), got '$body'"
done

# ---------------------------------------------------------------------------------------------
# One wrk run; measured runs append a row to results.tsv.
RESULTS="$OUT/results.tsv"
printf 'target\trun\trequests\terrors\trps\tp50_us\tp90_us\tp99_us\tp999_us\tmax_us\tbusy\tserver_cpu\tloadgen_cpu\tproxy_cpu_us\tproxy_user_us\tproxy_sys_us\tproxy_preempt\n' >"$RESULTS"
run_wrk() { # target run-label seconds
    local target=$1 label=$2 secs=$3 url servers before after t0 t1 busy0 busy1 file line lg
    local proxy p0 p1
    url=$(url_of "$target")
    servers=$(servers_of "$target")
    file="$OUT/wrk-$target-$label.txt"
    busy0=$(busy_count)
    # The proxy alone (nginx's master with its worker, or the sidecar): its CPU per request.
    proxy=${servers%% *}
    [ "$target" = direct ] && proxy=
    p0="0 0 0 0"
    [ -n "$proxy" ] && p0=$(proc_counts "$proxy")
    # shellcheck disable=SC2086
    before=$(cpu_ticks $servers)
    t0=$(date +%s%N)
    # The inner shell reports wrk's CPU time (its reaped children's ticks) once wrk exits.
    taskset -c "$LOADGEN_CPU" bash -c '
        wrk "$@"
        read -r -a s < /proc/$$/stat
        echo "LOADGEN_TICKS $(( s[15] + s[16] ))"' _ \
        -t"$WRK_THREADS" -c"$CONNS" -d"${secs}s" --timeout 5s --latency -s bench/report.lua "$url" \
        >"$file" 2>&1 || true
    t1=$(date +%s%N)
    # shellcheck disable=SC2086
    after=$(cpu_ticks $servers)
    p1="0 0 0 0"
    [ -n "$proxy" ] && p1=$(proc_counts "$proxy")
    busy1=$(busy_count)
    line=$(grep '^RESULT' "$file" || true)
    [ -n "$line" ] || { cat "$file" >&2; die "wrk failed for $target"; }
    # The access log grows by ~250 bytes a request: keep its first lines, drop the rest (the file
    # is opened for appending, so the sidecar keeps writing to the same, now shorter, file).
    if [ "$target" = sidecar-log ]; then
        head -c 65536 "$OUT/sidecar-log.stderr" >"$WORK/log-head"
        : >"$OUT/sidecar-log.stderr"
        [ -s "$OUT/sidecar-log.head" ] || cp "$WORK/log-head" "$OUT/sidecar-log.head"
    fi
    [ "$label" = warmup ] && return 0
    local wall_ticks=$(( (t1 - t0) * CLK_TCK / 1000000000 ))
    lg=$(awk '/^LOADGEN_TICKS/ {print $2}' "$file")
    local r_requests r_errors r_status_errors r_rps r_p50_us r_p90_us r_p99_us r_p999_us r_max_us r_mean_us
    eval "$(echo "${line#RESULT }" | tr ' ' '\n' | sed 's/^/r_/')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$target" "$label" "$r_requests" "$r_errors" "$r_rps" "$r_p50_us" "$r_p90_us" \
        "$r_p99_us" "$r_p999_us" "$r_max_us" "$(( busy0 + busy1 ))" \
        "$(awk -v a="$(( after - before ))" -v w="$wall_ticks" 'BEGIN{printf "%.2f", a / w}')" \
        "$(awk -v a="$lg" -v w="$wall_ticks" 'BEGIN{printf "%.2f", a / w}')" \
        "$(awk -v a="$p0" -v b="$p1" -v n="$r_requests" -v hz="$CLK_TCK" 'BEGIN {
            # proxy_cpu_us, proxy_user_us, proxy_sys_us, proxy_preempt (0 without requests)
            split(a, x, " "); split(b, y, " "); u = y[1] - x[1]; s = y[2] - x[2]
            if (n == 0) { printf "0.00\t0.00\t0.00\t0.000"; exit }
            printf "%.2f\t%.2f\t%.2f\t%.3f", (u + s) / hz / n * 1e6, u / hz / n * 1e6,
                s / hz / n * 1e6, (y[4] - x[4]) / n }')" >>"$RESULTS"
    log "$target run $label: $(printf '%.0f' "$r_rps") req/s, p50 ${r_p50_us} µs, p99 ${r_p99_us} µs, errors $r_errors, server CPU $(tail -1 "$RESULTS" | cut -f12)"
}

log "warm-up ${WARMUP}s per target, then $RUNS × ${DURATION}s per target interleaved, $CONNS connections"
for t in $TARGETS; do run_wrk "$t" warmup "$WARMUP"; done
for r in $(seq "$RUNS"); do
    for t in $TARGETS; do run_wrk "$t" "$r" "$DURATION"; done
done

# ---------------------------------------------------------------------------------------------
{
    echo "# bench/run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(machine_line)"
    echo "sidecar: $TS_BIN ($(stat -c %s "$TS_BIN") bytes), $("$TS_BIN" --version 2>/dev/null || true)"
    echo "nginx: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
    echo "load: wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s on CPU $LOADGEN_CPU; servers on CPU $SERVER_CPU; path $REQ_PATH"
    echo "Authorization: sidecar ${#sidecar_auth} bytes, nginx ${#nginx_auth} bytes"
    echo
    python3 bench/summarize.py "$RESULTS"
    echo
    echo "server_cpu: CPU-seconds the servers got per second (1.00 = all of CPU $SERVER_CPU);"
    echo "loadgen_cpu: the same for wrk on CPU $LOADGEN_CPU; proxy_cpu_us: CPU µs the proxy alone"
    echo "(user + system, from /proc) spent per request, then split into user space and kernel;"
    echo "proxy_preempt: the proxy's involuntary context switches per request (preempted while"
    echo "runnable, mostly by the upstream it woke on the same CPU). Per run:"
    echo
    column -t -s $'\t' "$RESULTS"
} | tee "$OUT/summary.md"
log "results in $OUT"
