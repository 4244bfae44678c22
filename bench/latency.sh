#!/usr/bin/env bash
# Added latency at a fixed request rate (the way the mesh projects report it; see
# docs/benchmarks.md): direct vs nginx vs sidecar, 16 connections, at 1,000 and 10,000 req/s,
# constant-rate load from `oha -q` (it keeps sending on schedule whatever the latency, so a slow
# answer cannot hide the ones queued behind it: no coordinated omission). Prints p50/p99/p99.9
# per target and rate, the added latency over direct and the sidecar/nginx ratios.
#
# oha: taken from $OHA, else PATH, else $OHA_ROOT/bin/oha; built with
# `cargo install oha --locked --root $OHA_ROOT` when absent (minutes; outside the repository).
#
# Environment (defaults): RATES="1000 10000" CONNS=16 DURATION=20 (seconds per run) RUNS=3
#   (interleaved) WARMUP=3 TARGETS="direct nginx sidecar" LOADGEN_CPU=0 SERVER_CPU=1
#   UPSTREAM_PORT=18090 TS_PORT=18080 TS_ADMIN_PORT=18081 NGINX_PORT=18082 AUTH_BYTES=800
#   TS_BIN= (skip the build) OHA_ROOT=$HOME/.cache/token-sidecar-bench/oha
#   OUT=target/bench/latency-<timestamp>
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=latency.sh
# shellcheck source=bench/lib.sh
source bench/lib.sh

RATES=${RATES:-1000 10000}
CONNS=${CONNS:-16}
DURATION=${DURATION:-20}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-3}
TARGETS=${TARGETS:-direct nginx sidecar}
TS_PORT=${TS_PORT:-18080}
TS_ADMIN_PORT=${TS_ADMIN_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
AUTH_BYTES=${AUTH_BYTES:-800}
REQ_PATH=${REQ_PATH:-/v1/orders/42?expand=items}
OHA_ROOT=${OHA_ROOT:-$HOME/.cache/token-sidecar-bench/oha}
OUT=${OUT:-$(pwd)/target/bench/latency-$(date +%Y%m%d-%H%M%S)}

ensure_tools
OHA=${OHA:-$(command -v oha || echo "$OHA_ROOT/bin/oha")}
if [ ! -x "$OHA" ]; then
    log "building oha into $OHA_ROOT (once; takes minutes)"
    nice cargo install oha --locked --root "$OHA_ROOT" >&2
    OHA=$OHA_ROOT/bin/oha
fi
# JSON output: `--output-format json` in current oha, `-j` in older releases.
if "$OHA" --help 2>/dev/null | grep -q -- '--output-format'; then OHA_JSON="--output-format json"; else OHA_JSON=-j; fi
ensure_binary
require_free_ports "$UPSTREAM_PORT" "$TS_PORT" "$TS_ADMIN_PORT" "$NGINX_PORT"
mkdir -p "$OUT"

start_upstream
start_nginx_proxy "$NGINX_PORT" "$AUTH_BYTES"
sed -e "s#http://127.0.0.1:18090#http://127.0.0.1:$UPSTREAM_PORT#" \
    -e "s#^access_log = .*#access_log = false#" bench/sidecar.toml >"$WORK/sidecar.toml"
taskset -c "$SERVER_CPU" env "${NO_SIDECAR_ENV[@]}" RUST_LOG=warn "$TS_BIN" dev \
    --config "$WORK/sidecar.toml" --listen "127.0.0.1:$TS_PORT" \
    --admin-listen "127.0.0.1:$TS_ADMIN_PORT" >"$OUT/sidecar.stdout" 2>"$OUT/sidecar.stderr" &
SIDECAR_PID=$!
PIDS+=("$SIDECAR_PID")
wait_ready "$TS_ADMIN_PORT" "$SIDECAR_PID" 20 || { cat "$OUT/sidecar.stderr" >&2; die "sidecar not ready"; }

port_of() {
    case $1 in
        direct) echo "$UPSTREAM_PORT" ;;
        nginx) echo "$NGINX_PORT" ;;
        sidecar) echo "$TS_PORT" ;;
        *) die "unknown target $1" ;;
    esac
}
# One constant-rate run: prints "p50 p99 p99.9 errors" in µs. oha's JSON gives seconds. `-w`
# lets the requests in flight when the time is up finish (oha otherwise aborts them and counts
# them as errors, "aborted due to deadline").
run_oha() { # port rate seconds json-out
    taskset -c "$LOADGEN_CPU" "$OHA" --no-tui $OHA_JSON -z "${3}s" -w -c "$CONNS" -q "$2" \
        --latency-correction "http://127.0.0.1:$1$REQ_PATH" >"$4"
    python3 - "$4" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if k != "200") + sum(d.get("errorDistribution", {}).values())
print(f'{p["p50"] * 1e6:.0f} {p["p99"] * 1e6:.0f} {p["p99.9"] * 1e6:.0f} {bad}')
PY
}

printf 'target\trate\trun\tp50_us\tp99_us\tp999_us\terrors\tbusy\n' >"$OUT/results.tsv"
for rate in $RATES; do
    for t in $TARGETS; do
        log "warm-up $t at $rate req/s"
        run_oha "$(port_of "$t")" "$rate" "$WARMUP" "$OUT/warmup.json" >/dev/null
    done
    for run in $(seq "$RUNS"); do
        for t in $TARGETS; do
            busy=$(busy_count)
            read -r p50 p99 p999 bad <<<"$(run_oha "$(port_of "$t")" "$rate" "$DURATION" "$OUT/$t-$rate-$run.json")"
            log "$t $rate req/s run $run: p50 ${p50} µs, p99 ${p99} µs, p99.9 ${p999} µs, errors $bad, busy $busy"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$rate" "$run" "$p50" "$p99" "$p999" "$bad" "$busy" >>"$OUT/results.tsv"
        done
    done
done

python3 - "$OUT/results.tsv" <<'PY' | tee "$OUT/summary.md"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = {}
for r in rows:
    med.setdefault((r["target"], r["rate"]), []).append(r)
print("| target | req/s | p50 µs | p99 µs | p99.9 µs | added p50 | added p99 | added p99.9 | errors | busy runs |")
print("|---|---|---|---|---|---|---|---|---|---|")
stats = {}
for (t, rate), rs in med.items():
    stats[(t, rate)] = [statistics.median(float(r[k]) for r in rs) for k in ("p50_us", "p99_us", "p999_us")]
for (t, rate), (a, b, c) in stats.items():
    d = stats.get(("direct", rate))
    add = [f"{x - y:+.0f} µs" for x, y in zip((a, b, c), d)] if d else ["-"] * 3
    rs = med[(t, rate)]
    print(f"| {t} | {rate} | {a:.0f} | {b:.0f} | {c:.0f} | {add[0]} | {add[1]} | {add[2]} | "
          f"{sum(int(r['errors']) for r in rs)} | {sum(1 for r in rs if r['busy'] != '0')} |")
print()
for rate in sorted({r for _, r in stats}, key=int):
    s, n, d = stats.get(("sidecar", rate)), stats.get(("nginx", rate)), stats.get(("direct", rate))
    if s and n:
        print(f"{rate} req/s: sidecar/nginx p50 {s[0] / n[0]:.2f}×, p99 {s[1] / n[1]:.2f}×, p99.9 {s[2] / n[2]:.2f}×")
    if s and n and d:
        # A ratio of added latencies means nothing when nginx added none (noise).
        ratio = lambda i: f"{(s[i] - d[i]) / (n[i] - d[i]):.2f}×" if n[i] - d[i] > 0 else "n/a"
        print(f"{rate} req/s: added over direct, sidecar/nginx: p50 {ratio(0)}, p99 {ratio(1)}, p99.9 {ratio(2)}")
PY
log "results in $OUT"
