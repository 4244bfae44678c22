#!/usr/bin/env python3
"""Prints a realistic-looking RS256 JWT access token whose `Bearer <jwt>` header value is exactly
N bytes (default 800): a real JSON header and claims, padded in the `scope` claim, and 256 random
bytes as the "signature" (the size of an RSA-2048 signature). Nobody verifies it: it only has to
be as large as, and shaped like, what a proxy would inject.

usage: fake_jwt.py [N] [--ttl SECONDS]
"""
import base64
import json
import os
import sys
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make(total: int, ttl: int = 3600) -> str:
    now = int(time.time())
    header = {"alg": "RS256", "typ": "at+jwt", "kid": b64(os.urandom(32))}
    claims = {
        "iss": "https://hydra.example.com/",
        "sub": "orders-service",
        "client_id": "orders-service",
        "aud": ["https://orders.internal.example.com"],
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": b64(os.urandom(16)),
        "scope": "",
    }
    sig = b64(os.urandom(256))
    words = ["orders:read", "orders:write", "billing:read", "billing:write", "inventory:read"]
    scope = ""
    i = 0
    while True:
        claims["scope"] = scope
        jwt = ".".join([b64(json.dumps(header, separators=(",", ":")).encode()),
                        b64(json.dumps(claims, separators=(",", ":")).encode()), sig])
        value = "Bearer " + jwt
        if len(value) >= total:
            break
        scope = (scope + " " if scope else "") + words[i % len(words)]
        i += 1
    # Trim back to the exact size by shortening the padding scope one character at a time.
    while len(value) > total and scope:
        scope = scope[:-1]
        claims["scope"] = scope
        jwt = ".".join([b64(json.dumps(header, separators=(",", ":")).encode()),
                        b64(json.dumps(claims, separators=(",", ":")).encode()), sig])
        value = "Bearer " + jwt
    return jwt


if __name__ == "__main__":
    args = sys.argv[1:]
    ttl = 3600
    if "--ttl" in args:
        k = args.index("--ttl")
        ttl = int(args[k + 1])
        del args[k:k + 2]
    n = int(args[0]) if args else 800
    print(make(n, ttl))
