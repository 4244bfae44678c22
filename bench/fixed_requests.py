#!/usr/bin/env python3
"""Sends exactly N keep-alive GET requests over C connections (N/C each, one at a time per
connection) and checks every answer is 200: a load whose size, not its duration, is fixed, so
that instruction, system-call and allocation counts can be divided by N (bench/counts.sh).

usage: fixed_requests.py PORT N C [PATH]
"""
import asyncio
import sys


async def connection(port, count, path, done):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        if status != b"200":
            raise SystemExit(f"answer {status!r}")
        done[0] += 1
    writer.close()


async def main():
    port, n, c = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "/v1/orders/42?expand=items"
    done = [0]
    counts = [n // c + (1 if i < n % c else 0) for i in range(c)]
    await asyncio.gather(*(connection(port, k, path, done) for k in counts if k))
    assert done[0] == n, done
    print(done[0])


asyncio.run(main())
