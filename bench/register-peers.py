#!/usr/bin/env python3
"""Registers N nodes that never come online (bench/rss-100-peers.sh), each with a fresh X25519 key,
the way `homeport up` does: POST /api/v1/node/challenge, then POST /api/v1/node/register with the
proof of possession of the private key (homeport_proto::register). The auth key comes from the
HOMEPORT_AUTHKEY environment variable (never from argv).

Usage: HOMEPORT_AUTHKEY=... register-peers.py https://HOST:PORT N
Needs python3-cryptography (deploy/setup.sh installs it)."""
import base64, hashlib, hmac, json, os, ssl, struct, sys, urllib.request
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives import serialization

CAPVER = 2
RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def b64url(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def unb64url(s): return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
def lp(b): return struct.pack(">I", len(b)) + b


def post(ctx, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, context=ctx) as r:
        return json.load(r)


def main():
    base, n = sys.argv[1].rstrip("/"), int(sys.argv[2])
    authkey = os.environ["HOMEPORT_AUTHKEY"]
    # A throwaway lab coordinator with a self-signed certificate; nothing else is contacted.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for i in range(1, n + 1):
        node = X25519PrivateKey.generate()
        pub = node.public_key().public_bytes(**RAW)
        ch = post(ctx, base + "/api/v1/node/challenge")
        challenge = unb64url(ch["challenge"])
        coord = base64.b64decode(ch["coordinator_key"])
        shared = node.exchange(X25519PublicKey.from_public_bytes(coord))
        key = hmac.new(shared, b"homeport register proof v1", hashlib.sha256).digest()
        hostname = f"peer{i}"
        t = (lp(b"homeport-register-v1") + lp(challenge) + lp(coord) + lp(pub) + lp(authkey.encode())
             + lp(hostname.encode()) + struct.pack(">I", CAPVER) + lp(b""))
        proof = hmac.new(key, t, hashlib.sha256).digest()
        post(ctx, base + "/api/v1/node/register", {
            "authkey": authkey, "public_key": base64.b64encode(pub).decode(), "hostname": hostname,
            "capver": CAPVER, "challenge": ch["challenge"], "proof": b64url(proof)})


if __name__ == "__main__":
    main()
