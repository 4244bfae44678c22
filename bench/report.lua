-- wrk script for bench/run.sh: prints one machine-readable line when the run ends.
-- Latencies are in microseconds (wrk's own unit); errors sum every kind wrk counts, including
-- non-2xx/3xx statuses, so a run that is not all "200 ok" is visible.
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT requests=%d errors=%d status_errors=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%.1f\n",
    summary.requests, errors, e.status, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
