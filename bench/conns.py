#!/usr/bin/env python3
"""Connection helpers for bench/resources.sh. Loopback only; every mode is bounded in time and count.

hold PORT N PATH SECONDS [PARALLEL]
    Opens N connections to 127.0.0.1:PORT, sends one keep-alive GET PATH on each (all at once, or
    at most PARALLEL connections opening and waiting for their answer at a time), reads each
    response, prints "HELD <ok> <failed>" and keeps the sockets open for SECONDS (or
    until it is stopped), then closes them.

burst PORT N PATH TIMEOUT
    N concurrent GET PATH on N fresh connections (all sent at once); prints one JSON line with
    the status counts and latency percentiles in ms.

startup TRIALS PORT ADMIN_PORT -- CMD...
    Runs CMD TRIALS times; each time measures exec → the proxy port accepting a TCP connection
    (polled in a tight loop) and exec → /readyz 200, then stops it with SIGTERM. Prints one JSON
    line with every trial in ms. The child runs on CPU $BENCH_SERVER_CPU when that is set.
"""
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time


def request_bytes(port: int, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench-conns\r\n"
            "Accept: */*\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = None
    chunked = False
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
        if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        while True:
            size = int((await reader.readline()).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def one(port: int, path: str, keep: list, timeout: float):
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(request_bytes(port, path))
        await writer.drain()
        status = await asyncio.wait_for(read_response(reader), timeout)
        keep.append(writer)
        return status, (time.perf_counter() - t0) * 1000
    except Exception as e:  # noqa: BLE001 - any failure is counted, not raised
        return f"error:{type(e).__name__}", (time.perf_counter() - t0) * 1000


async def hold(port: int, n: int, path: str, seconds: float, parallel: int):
    keep: list = []
    gate = asyncio.Semaphore(parallel if parallel > 0 else n)

    async def gated():
        async with gate:
            return await one(port, path, keep, 10.0)

    results = await asyncio.gather(*(gated() for _ in range(n)))
    ok = sum(1 for s, _ in results if s == 200)
    print(f"HELD {ok} {n - ok}", flush=True)
    await asyncio.sleep(seconds)
    for w in keep:
        w.close()


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


async def burst(port: int, n: int, path: str, timeout: float):
    keep: list = []
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(port, path, keep, timeout) for _ in range(n)))
    wall = (time.perf_counter() - t0) * 1000
    for w in keep:
        w.close()
    statuses: dict = {}
    for s, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    lat = [ms for _, ms in results]
    print(json.dumps({
        "requests": n, "statuses": statuses, "wall_ms": round(wall, 1),
        "latency_ms": {"min": round(min(lat), 1), "p50": round(pct(lat, 50), 1),
                       "p99": round(pct(lat, 99), 1), "max": round(max(lat), 1)},
    }), flush=True)


def http_status(port: int, path: str) -> int:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
            return int(data.split(b" ")[1])
    except (OSError, ValueError, IndexError):
        return 0


def pin():
    """In the child before exec: run on $BENCH_SERVER_CPU (like `taskset`, without its exec)."""
    cpu = os.environ.get("BENCH_SERVER_CPU")
    if cpu is not None:
        os.sched_setaffinity(0, {int(cpu)})


def startup(trials: int, port: int, admin: int, cmd: list):
    listen_ms, ready_ms = [], []
    for _ in range(trials):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=pin)
        try:
            listening = None
            deadline = t0 + 10
            while time.perf_counter() < deadline and proc.poll() is None:
                s = socket.socket()
                try:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        listening = (time.perf_counter() - t0) * 1000
                        break
                finally:
                    s.close()
            if listening is None:
                raise SystemExit(f"the sidecar did not listen on {port} (exit {proc.poll()})")
            ready = None
            while time.perf_counter() < deadline and proc.poll() is None:
                if http_status(admin, "/readyz") == 200:
                    ready = (time.perf_counter() - t0) * 1000
                    break
                time.sleep(0.0005)
            if ready is None:
                raise SystemExit("the sidecar did not become ready")
            listen_ms.append(listening)
            ready_ms.append(ready)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    summary = lambda v: {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
                         "max": round(max(v), 2)}
    print(json.dumps({"trials": trials, "listen_ms": summary(listen_ms),
                      "ready_ms": summary(ready_ms),
                      "all_listen_ms": [round(x, 2) for x in listen_ms]}), flush=True)


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "hold":
        asyncio.run(hold(int(args[0]), int(args[1]), args[2], float(args[3]),
                         int(args[4]) if len(args) > 4 else 0))
    elif mode == "burst":
        asyncio.run(burst(int(args[0]), int(args[1]), args[2], float(args[3])))
    elif mode == "startup":
        sep = args.index("--")
        startup(int(args[0]), int(args[1]), int(args[2]), args[sep + 1:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
