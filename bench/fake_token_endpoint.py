#!/usr/bin/env python3
"""A counting stand-in for a token endpoint, for bench/resources.sh (loopback only).

POST /token           → 200 {"access_token": <~793-byte JWT-shaped token>, "token_type": "Bearer",
                        "expires_in": TTL}, after DELAY_MS. The client assertion is not verified:
                        the sidecar's own signing is measured by benches/hot_path.rs.
GET  /stats           → {"token_requests": N}
GET  /set?ttl=S&delay_ms=D&reset=1 → changes TTL / delay, optionally zeroes the count.

usage: fake_token_endpoint.py PORT [--ttl 3600] [--delay-ms 0]
Prints "ready" on stdout once listening.
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_jwt  # noqa: E402

STATE = {"ttl": 3600, "delay_ms": 0, "count": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        if urlparse(self.path).path != "/token":
            return self.send_json(404, {"error": "not_found"})
        with LOCK:
            STATE["count"] += 1
            ttl, delay = STATE["ttl"], STATE["delay_ms"]
        if delay:
            time.sleep(delay / 1000)
        self.send_json(200, {
            "access_token": fake_jwt.make(800, ttl),
            "token_type": "Bearer",
            "expires_in": ttl,
        })

    def do_GET(self):
        u = urlparse(self.path)
        if u.path == "/stats":
            with LOCK:
                return self.send_json(200, {"token_requests": STATE["count"], "ttl": STATE["ttl"],
                                            "delay_ms": STATE["delay_ms"]})
        if u.path == "/set":
            q = parse_qs(u.query)
            with LOCK:
                if "ttl" in q:
                    STATE["ttl"] = int(q["ttl"][0])
                if "delay_ms" in q:
                    STATE["delay_ms"] = int(q["delay_ms"][0])
                if q.get("reset") == ["1"]:
                    STATE["count"] = 0
                return self.send_json(200, dict(STATE))
        self.send_json(404, {"error": "not_found"})


def main():
    args = sys.argv[1:]
    port = int(args[0])
    if "--ttl" in args:
        STATE["ttl"] = int(args[args.index("--ttl") + 1])
    if "--delay-ms" in args:
        STATE["delay_ms"] = int(args[args.index("--delay-ms") + 1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
