#!/usr/bin/env bash
# Resource and behaviour measurements of the release binary (see docs/benchmarks.md):
#
#   1. release binary size;
#   2. exec → accepting connections, and exec → /readyz 200 (first token), over STARTUP_TRIALS;
#   3. idle RSS after start and the first token;
#   4. RSS with HOLD_CONNS (1000) open idle keep-alive connections that each made one request
#      (all at once, then HOLD_PARALLEL at a time so that the upstream pool stays small);
#   5. token requests caused by BURST (1000) concurrent requests on an empty cache (must be 1),
#      sent while the first token request is held for BURST_DELAY_MS (3 s) by the endpoint;
#   6. whether any request waits on a refresh: two REFRESH_DURATION (60 s) wrk runs, tokens of
#      3600 s and of REFRESH_TTL (10 s), with a token endpoint that takes TOKEN_DELAY_MS (100 ms):
#      a request that waited would take at least that long.
#
# The sidecar runs in its normal mode (`token-sidecar --config`) against bench/fake_token_endpoint.py,
# a counting token endpoint whose lifetime and delay can be set: `token-sidecar dev` always issues
# 3600 s tokens (src/dev/mod.rs) and answers at once. Manual only; about 3 minutes with the defaults.
# Only 127.0.0.1 is used; every process started is stopped by PID on exit.
#
# Environment (defaults): STARTUP_TRIALS=20 HOLD_CONNS=1000 BURST=1000 BURST_DELAY_MS=3000
#   REFRESH_DURATION=60 REFRESH_TTL=10 TOKEN_DELAY_MS=100 REFRESH_CONNS=32 LOADGEN_CPU=0 SERVER_CPU=1
#   UPSTREAM_PORT=18090 TS_PORT=18080 TS_ADMIN_PORT=18081 TOKEN_PORT=18091 TS_BIN=
#   HOLD_PARALLEL=8 SKIP_REFRESH= (set to 1 to skip part 6) OUT=target/bench/resources-<timestamp>
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=resources.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

STARTUP_TRIALS=${STARTUP_TRIALS:-20}
HOLD_CONNS=${HOLD_CONNS:-1000}
BURST=${BURST:-1000}
BURST_DELAY_MS=${BURST_DELAY_MS:-3000}
REFRESH_DURATION=${REFRESH_DURATION:-60}
REFRESH_TTL=${REFRESH_TTL:-10}
TOKEN_DELAY_MS=${TOKEN_DELAY_MS:-100}
REFRESH_CONNS=${REFRESH_CONNS:-32}
TS_PORT=${TS_PORT:-18080}
TS_ADMIN_PORT=${TS_ADMIN_PORT:-18081}
TOKEN_PORT=${TOKEN_PORT:-18091}
OUT=${OUT:-$(pwd)/target/bench/resources-$(date +%Y%m%d-%H%M%S)}

ensure_tools
require_free_ports "$UPSTREAM_PORT" "$TS_PORT" "$TS_ADMIN_PORT" "$TOKEN_PORT"
ensure_binary
mkdir -p "$OUT"
ulimit -n 16384 2>/dev/null || log "warning: cannot raise the open-file limit ($(ulimit -n))"
REPORT="$OUT/resources.md"
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }

start_upstream

taskset -c "$LOADGEN_CPU" python3 bench/fake_token_endpoint.py "$TOKEN_PORT" >"$WORK/logs/token.out" 2>&1 &
TOKEN_PID=$!
PIDS+=("$TOKEN_PID")
wait_port "$TOKEN_PORT" 10 || die "the fake token endpoint did not start"
token_set() { curl -sf "http://127.0.0.1:$TOKEN_PORT/set?$1" >/dev/null; }
token_count() { curl -sf "http://127.0.0.1:$TOKEN_PORT/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_requests"])'; }

cat >"$WORK/sidecar.toml" <<EOF
[proxy]
listen = "127.0.0.1:$TS_PORT"
# Room for the HOLD_CONNS idle connections measured below (the default, 32, would make the
# sidecar close idle ones to admit new ones).
max_connections = 2048

[admin]
listen = "127.0.0.1:$TS_ADMIN_PORT"

[token]
token_url = "http://127.0.0.1:$TOKEN_PORT/token"
allow_insecure_token_url = true
client_id = "bench-client"
private_key_file = "$(pwd)/tests/fixtures/keys/ec_p256_sec1.pem"

[log]
# One log line per request would fill the disk during the refresh runs.
access_log = false

[[route]]
name = "bench"
path_prefix = "/"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
allow_insecure_upstream = true
scope = ["orders:read"]
audience = ["https://orders.internal.example.com"]
EOF

SIDECAR_PID=""
start_sidecar() { # label: starts it on the server CPU with RUST_LOG=info, stderr to $OUT/label.stderr
    taskset -c "$SERVER_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG=info "$TS_BIN" --config "$WORK/sidecar.toml" \
        >"$OUT/$1.stdout" 2>"$OUT/$1.stderr" &
    SIDECAR_PID=$!
    PIDS+=("$SIDECAR_PID")
}
stop_sidecar() { [ -n "$SIDECAR_PID" ] && stop_pid "$SIDECAR_PID"; SIDECAR_PID=""; }
metrics_snapshot() { # file: /metrics from the admin port, when the build has it
    curl -s -o "$1" -w '%{http_code}' "http://127.0.0.1:$TS_ADMIN_PORT/metrics" || true
}

say "# bench/resources.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""
say "machine: $(machine_line); binary: $TS_BIN"
say "compilations running at the start: $(busy_count)"
say ""

# 1. Binary size. ------------------------------------------------------------------------------
size=$(stat -c %s "$TS_BIN")
say "## binary size"
say ""
say "release binary: $size bytes ($(awk -v s="$size" 'BEGIN{printf "%.2f", s / 1048576}') MiB)"
say ""

# 2. Start-up. ---------------------------------------------------------------------------------
log "start-up: $STARTUP_TRIALS trials"
startup=$(BENCH_SERVER_CPU=$SERVER_CPU taskset -c "$LOADGEN_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG=warn \
    python3 bench/conns.py startup "$STARTUP_TRIALS" "$TS_PORT" "$TS_ADMIN_PORT" -- \
    "$TS_BIN" --config "$WORK/sidecar.toml")
say "## start-up (exec → accepting on the proxy port; exec → /readyz 200 incl. the first token)"
say ""
say '```'
say "$startup"
say '```'
say ""

# 3. Idle RSS. ---------------------------------------------------------------------------------
log "idle RSS"
start_sidecar idle
wait_ready "$TS_ADMIN_PORT" "$SIDECAR_PID" 20 || { cat "$OUT/idle.stderr" >&2; die "not ready"; }
curl -s -o /dev/null "http://127.0.0.1:$TS_PORT/"
sleep 1
idle_rss=$(rss_kb "$SIDECAR_PID")
idle_threads=$(awk '/^Threads:/ {print $2}' "/proc/$SIDECAR_PID/status")
say "## memory"
say ""
say "- idle RSS after start, first token and one request: **$idle_rss kB** ($(rss_split "$SIDECAR_PID"); $idle_threads threads)"

# 4. 1000 idle keep-alive connections. ---------------------------------------------------------
# Twice, on a fresh sidecar each: the requests all at once (the upstream pool grows with them),
# and HOLD_PARALLEL at a time (the pool stays small: the cost of the downstream connections).
hold_run() { # parallel (0 = all at once)
    local parallel=$1 held="" held_rss held_split held_fds down up after_rss hwm how
    how=$([ "$parallel" = 0 ] && echo "all sent at once" || echo "$parallel at a time")
    log "holding $HOLD_CONNS keep-alive connections ($how)"
    if [ -z "$SIDECAR_PID" ]; then
        start_sidecar "hold-$parallel"
        wait_ready "$TS_ADMIN_PORT" "$SIDECAR_PID" 20 || die "not ready"
        curl -s -o /dev/null "http://127.0.0.1:$TS_PORT/"
        sleep 1
    fi
    taskset -c "$LOADGEN_CPU" python3 bench/conns.py hold "$TS_PORT" "$HOLD_CONNS" / 30 "$parallel" \
        >"$WORK/hold.out" 2>&1 &
    HOLD_PID=$!
    PIDS+=("$HOLD_PID")
    for _ in $(seq 300); do
        held=$(grep '^HELD' "$WORK/hold.out" || true)
        [ -n "$held" ] && break
        kill -0 "$HOLD_PID" 2>/dev/null || break
        sleep 0.05
    done
    [ -n "$held" ] || { cat "$WORK/hold.out" >&2; die "could not open $HOLD_CONNS connections"; }
    sleep 0.5
    held_rss=$(rss_kb "$SIDECAR_PID")
    held_split=$(rss_split "$SIDECAR_PID")
    held_fds=$(find "/proc/$SIDECAR_PID/fd" -mindepth 1 | wc -l)
    down=$(ss -Htn state established "( sport = :$TS_PORT )" | wc -l)
    up=$(ss -Htn state established "( dport = :$UPSTREAM_PORT )" | wc -l)
    stop_pid "$HOLD_PID"
    sleep 1
    after_rss=$(rss_kb "$SIDECAR_PID")
    hwm=$(hwm_kb "$SIDECAR_PID")
    set -- ${held#HELD }
    say "- $HOLD_CONNS idle keep-alive connections, one request each, $how ($1 answered, $2 failed): **$held_rss kB** ($held_split); $held_fds fds ($down downstream, $up upstream connections established); after they closed: $after_rss kB (VmHWM $hwm kB)"
    stop_sidecar
}
say ""
hold_run 0
hold_run "${HOLD_PARALLEL:-8}"
say ""

# 5. 1000 concurrent requests on an empty cache. -----------------------------------------------
log "$BURST concurrent requests on an empty cache (token endpoint delay $BURST_DELAY_MS ms)"
token_set "ttl=3600&delay_ms=$BURST_DELAY_MS&reset=1"
start_sidecar burst
wait_port "$TS_PORT" 10 || die "the sidecar did not listen"
burst=$(taskset -c "$LOADGEN_CPU" python3 bench/conns.py burst "$TS_PORT" "$BURST" / 15)
fetches=$(token_count)
metrics_code=$(metrics_snapshot "$OUT/burst.metrics")
obtained=$(grep -c 'token obtained' "$OUT/burst.stderr" || true)
say "## single flight"
say ""
say "$BURST concurrent requests sent while the first token request was pending (the endpoint takes $BURST_DELAY_MS ms):"
say '```'
say "$burst"
say '```'
say "token requests received by the token endpoint: $fetches; \"token obtained\" log lines: $obtained"
if [ "$metrics_code" = 200 ]; then
    say "/metrics (token and cache lines):"
    say '```'
    grep -E '^[a-z_]*(cache_(hits|misses|refreshes)|token_fetches)_total[ {]' "$OUT/burst.metrics" |
        tee -a "$REPORT" || true
    say '```'
else
    say "(no /metrics endpoint in this build: HTTP $metrics_code)"
fi
say ""
stop_sidecar

# 6. Refresh under load. -----------------------------------------------------------------------
refresh_run() { # label ttl
    local label=$1 ttl=$2 before after file line code
    token_set "ttl=$ttl&delay_ms=$TOKEN_DELAY_MS&reset=1"
    start_sidecar "refresh-$label"
    wait_ready "$TS_ADMIN_PORT" "$SIDECAR_PID" 20 || die "not ready"
    before=$(token_count)
    file="$OUT/wrk-refresh-$label.txt"
    taskset -c "$LOADGEN_CPU" wrk -t1 -c"$REFRESH_CONNS" -d"${REFRESH_DURATION}s" --timeout 5s --latency \
        -s bench/report.lua "http://127.0.0.1:$TS_PORT/" >"$file" 2>&1 || true
    after=$(token_count)
    code=$(metrics_snapshot "$OUT/refresh-$label.metrics")
    line=$(grep '^RESULT' "$file" || echo "RESULT (wrk failed)")
    say "- tokens of ${ttl} s: ${line#RESULT }; token requests during the run: $(( after - before )); busy: $(busy_count)"
    if [ "$code" = 200 ]; then
        grep -E '^[a-z_]*cache_(hits|misses|refreshes)_total[ {]' "$OUT/refresh-$label.metrics" |
            sed 's/^/    /' | tee -a "$REPORT" || true
    fi
    stop_sidecar
}
if [ -z "${SKIP_REFRESH:-}" ]; then
    log "refresh: 2 × ${REFRESH_DURATION}s (tokens of 3600 s, then of $REFRESH_TTL s; endpoint delay $TOKEN_DELAY_MS ms)"
    say "## refresh under load (wrk -c$REFRESH_CONNS -d${REFRESH_DURATION}s; token endpoint delay $TOKEN_DELAY_MS ms; latencies in µs)"
    say ""
    refresh_run no-refresh 3600
    refresh_run refresh "$REFRESH_TTL"
    say ""
    say "A request that waited for a token would take at least $TOKEN_DELAY_MS ms (${TOKEN_DELAY_MS}000 µs): compare max_us."
fi
log "report: $REPORT"
