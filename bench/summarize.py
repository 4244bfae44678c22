#!/usr/bin/env python3
"""Summarizes bench/run.sh results: median requests/s, p50 and p99 per target over its runs, and
the ratios of the sidecar to nginx and to direct. Input: a TSV with the columns
target, run, requests, errors, rps, p50_us, p90_us, p99_us, p999_us, max_us, busy and, when
present, proxy_cpu_us (the proxy's CPU per request), proxy_user_us / proxy_sys_us (its split
into user space and kernel) and proxy_preempt (involuntary context switches per request).

usage: summarize.py results.tsv [markdown-out]
"""
import csv
import statistics
import sys


def main() -> None:
    path = sys.argv[1]
    rows = list(csv.DictReader(open(path), delimiter="\t"))
    order = []
    by = {}
    for r in rows:
        t = r["target"]
        if t not in by:
            order.append(t)
            by[t] = []
        by[t].append(r)

    def med(t, k):
        return statistics.median(float(r[k]) for r in by[t])

    def spread(t, k):
        v = [float(r[k]) for r in by[t]]
        m = statistics.median(v)
        return 100.0 * (max(v) - min(v)) / m if m else 0.0

    has_cpu = "proxy_cpu_us" in rows[0] and "nginx" in by
    has_split = "proxy_preempt" in rows[0] and "nginx" in by

    lines = []
    lines.append("| target | runs | median req/s | (spread) | p50 µs | p99 µs | p99.9 µs | max µs | errors | busy runs |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for t in order:
        errors = sum(int(r["errors"]) for r in by[t])
        busy = sum(1 for r in by[t] if r["busy"] != "0")
        lines.append(
            f"| {t} | {len(by[t])} | {med(t, 'rps'):,.0f} | ±{spread(t, 'rps') / 2:.1f}% | "
            f"{med(t, 'p50_us'):.0f} | {med(t, 'p99_us'):.0f} | {med(t, 'p999_us'):.0f} | "
            f"{med(t, 'max_us'):.0f} | {errors} | {busy} |"
        )
    lines.append("")
    for mine in (t for t in order if t.startswith("sidecar")):
        for other in ("nginx", "direct"):
            if other in by:
                lines.append(
                    f"- {mine}/{other}: throughput {med(mine, 'rps') / med(other, 'rps'):.2f}×, "
                    f"p50 {med(mine, 'p50_us') / med(other, 'p50_us'):.2f}×, "
                    f"p99 {med(mine, 'p99_us') / med(other, 'p99_us'):.2f}×"
                    + (
                        f", proxy CPU per request {med(mine, 'proxy_cpu_us'):.1f} µs vs "
                        f"{med(other, 'proxy_cpu_us'):.1f} µs = "
                        f"{med(mine, 'proxy_cpu_us') / med(other, 'proxy_cpu_us'):.2f}×"
                        if other == "nginx" and has_cpu
                        else ""
                    )
                    + (
                        f" (user {med(mine, 'proxy_user_us'):.1f} vs {med(other, 'proxy_user_us'):.1f} µs, "
                        f"kernel {med(mine, 'proxy_sys_us'):.1f} vs {med(other, 'proxy_sys_us'):.1f} µs; "
                        f"preempted {med(mine, 'proxy_preempt'):.2f} vs {med(other, 'proxy_preempt'):.2f} "
                        f"times per request)"
                        if other == "nginx" and has_split
                        else ""
                    )
                )
    if "nginx" in by and "direct" in by:
        lines.append(
            f"- nginx/direct: throughput {med('nginx', 'rps') / med('direct', 'rps'):.2f}×, "
            f"p99 {med('nginx', 'p99_us') / med('direct', 'p99_us'):.2f}×"
        )
    lines.append("")
    lines.append("spread = (max - min) / median / 2 over the runs; busy runs = runs during which "
                 "another rustc/cargo process was seen (noise).")
    text = "\n".join(lines)
    print(text)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
