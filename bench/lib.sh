# Shared by bench/run.sh and bench/resources.sh; source it from the repository root.
# Every process started here is recorded in PIDS and stopped by PID on exit; nothing else is
# touched (the system nginx service included). Only 127.0.0.1 is used.

LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
UPSTREAM_PORT=${UPSTREAM_PORT:-18090}
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[%s %s] %s\n' "${BENCH_NAME:-bench}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs wrk and nginx when missing (Debian; needs root). `apt-get update` only if needed.
ensure_tools() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get install -y "${missing[@]}" >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }
    fi
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    local t
    for t in taskset python3 curl wrk; do
        command -v "$t" >/dev/null || die "$t is required"
    done
    [ "$(nproc)" -ge 2 ] || log "warning: fewer than 2 CPUs; the CPU pinning is meaningless"
}

# A scratch directory and the process bookkeeping.
WORK=$(mktemp -d /tmp/token-sidecar-bench.XXXXXX)
mkdir -p "$WORK/tmp" "$WORK/logs"
chmod 1777 "$WORK/tmp"
PIDS=()
stop_pid() { # pid: TERM, up to 5 s, then KILL
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
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
    for _ in $(seq $(( $2 * 20 ))); do port_open "$1" && return 0; sleep 0.05; done
    return 1
}
require_free_ports() {
    local p
    for p in "$@"; do
        port_open "$p" && die "127.0.0.1:$p is already in use; set the *_PORT variables"
    done
    return 0
}

# `proc_counts PID…` → "utime stime voluntary involuntary" summed over the PIDs and their
# direct children (nginx workers): CPU ticks in user space and in the kernel, and context
# switches the process asked for (it blocked) or suffered (it was preempted while runnable).
proc_counts() {
    local pid u=0 s=0 v=0 n=0 a b f=()
    for pid in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
        # Fields after the ")" that closes comm: state is [0], utime [11], stime [12].
        read -r -a f <<<"$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        [ "${#f[@]}" -gt 12 ] || continue
        u=$(( u + f[11] )); s=$(( s + f[12] ))
        read -r a b < <(awk '/^voluntary_ctxt_switches/ {a = $2} /^nonvoluntary_ctxt_switches/ {b = $2}
            END {print a + 0, b + 0}' "/proc/$pid/status" 2>/dev/null) || continue
        v=$(( v + a )); n=$(( n + b ))
    done
    echo "$u $s $v $n"
}
# CPU ticks (user + system) of processes and their direct children.
cpu_ticks() {
    local u s _
    read -r u s _ <<<"$(proc_counts "$@")"
    echo $(( u + s ))
}
busy_count() { # compilations running right now (the usual source of noise here)
    { pgrep -x rustc || true; pgrep -x cargo || true; } | wc -l
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_split() { # "anonymous A kB + file-backed F kB" (the binary's and libraries' mapped pages)
    awk '/^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} /^RssShmem:/ {s = $2}
         END {printf "anonymous %d kB + file-backed %d kB", a, f + s}' "/proc/$1/status"
}

# The release binary: $TS_BIN if set, else `cargo build --release --locked`.
ensure_binary() {
    if [ -z "${TS_BIN:-}" ]; then
        log "cargo build --release --locked"
        cargo build --release --locked >&2
        TS_BIN=${CARGO_TARGET_DIR:-$(pwd)/target}/release/token-sidecar
    fi
    [ -x "$TS_BIN" ] || die "no binary at $TS_BIN"
}

# Any SIDECAR_* variable is a config override for the sidecar (and an unknown key is fatal), so
# none is passed on: use as `env "${NO_SIDECAR_ENV[@]}" …`.
NO_SIDECAR_ENV=()
for _v in $(compgen -e | grep '^SIDECAR_' || true); do NO_SIDECAR_ENV+=(-u "$_v"); done

NGINX_HTTP_COMMON="
    access_log off;
    client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
    uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 75s;"

# An nginx instance of our own: `start_nginx NAME CONF PORT` sets NAME_PID (the master's PID).
start_nginx() {
    taskset -c "$SERVER_CPU" "$NGINX" -e "$WORK/logs/$1-startup.log" -p "$WORK" -c "$2" \
        >"$WORK/logs/$1.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$3" 10 || { cat "$WORK/logs/$1"* >&2; die "$1 nginx did not start"; }
    printf -v "${1}_PID" '%s' "$pid"
}

# The upstream for every target: one nginx worker answering 200 "ok", and echoing the
# Authorization header on /__auth (used once, to check what a proxy injects).
start_upstream() {
    cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/logs/upstream-error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    $NGINX_HTTP_COMMON
    server {
        listen 127.0.0.1:$UPSTREAM_PORT reuseport backlog=4096;
        location = /__auth { return 200 \$http_authorization; }
        location / { return 200 "ok"; }
    }
}
EOF
    log "upstream nginx on 127.0.0.1:$UPSTREAM_PORT (CPU $SERVER_CPU)"
    start_nginx upstream "$WORK/upstream.conf" "$UPSTREAM_PORT"
}

# The nginx reverse proxy to compare with: one worker, the Authorization header set to a fixed
# JWT-shaped token of the given size, keep-alive to the upstream. `start_nginx_proxy PORT BYTES`
# sets proxy_PID.
start_nginx_proxy() {
    local jwt
    jwt=$(python3 bench/fake_jwt.py "$2")
    cat >"$WORK/proxy.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/proxy.pid;
error_log $WORK/logs/proxy-error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    $NGINX_HTTP_COMMON
    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$1 reuseport backlog=4096;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:$UPSTREAM_PORT;
            proxy_set_header Authorization "Bearer $jwt";
        }
    }
}
EOF
    log "proxy nginx on 127.0.0.1:$1 (CPU $SERVER_CPU)"
    start_nginx proxy "$WORK/proxy.conf" "$1"
}

wait_ready() { # admin-port pid seconds → 0 once /readyz answers 200
    for _ in $(seq $(( $3 * 20 ))); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz")" = 200 ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

machine_line() {
    echo "$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
}
