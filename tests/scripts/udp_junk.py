#!/usr/bin/env python3
"""Junk for a node's WireGuard UDP port, for the data-plane lab test (tests/tests/dataplane.rs).

  udp_junk.py init PUBKEY_B64 FILE   writes a 148-byte handshake initiation with a valid mac1 for
                                     PUBKEY (random everything else: what anyone who knows a
                                     node's public key can send) to FILE
  udp_junk.py random FILE            writes 148 random bytes starting 01 00 00 00 to FILE
  udp_junk.py garbage HOST PORT N    sends N random and mutated datagrams (STUN, WireGuard,
                                     disco- and relay-looking, random) from one socket; prints
                                     "sent N replies R" (R: datagrams that came back)
"""
import base64
import hashlib
import os
import random
import select
import socket
import struct
import sys

STUN_COOKIE = 0x2112A442


def mac1_init(pub):
    msg = bytearray(os.urandom(116))
    msg[0:4] = b"\x01\x00\x00\x00"
    key = hashlib.blake2s(b"mac1----" + pub).digest()
    mac1 = hashlib.blake2s(bytes(msg), key=key, digest_size=16).digest()
    return bytes(msg) + mac1 + b"\0" * 16


def templates():
    r = random.Random(17)
    out = []
    for i in range(4096):
        k = i % 6
        if k == 0:  # STUN binding responses/requests, mutated
            t = r.choice([0x0101, 0x0001, 0x0111, 0x0011])
            attrs = os.urandom(r.randrange(0, 64) & ~3)
            m = struct.pack("!HHI12s", t, len(attrs), STUN_COOKIE, os.urandom(12)) + attrs
        elif k == 1:  # STUN header with lies in the length
            m = struct.pack("!HHI12s", 0x0101, r.randrange(65536), STUN_COOKIE, os.urandom(12))
        elif k == 2:  # WireGuard message types with random bodies and sizes
            t = r.randrange(1, 5)
            size = r.choice([148, 92, 64, 32, r.randrange(4, 1400)])
            m = bytes([t, 0, 0, 0]) + os.urandom(size - 4)
        elif k == 3:  # 148 bytes starting like an initiation
            m = b"\x01\x00\x00\x00" + os.urandom(144)
        elif k == 4:  # random first bytes (disco and relay magic live there), random size
            m = os.urandom(r.randrange(1, 1500))
        else:  # tiny and empty-ish
            m = os.urandom(r.randrange(0, 8))
        out.append(m)
    return out


def garbage(host, port, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    t = templates()
    r = random.Random(5)
    replies = 0
    sent = 0
    dst = (host, port)
    for i in range(n):
        m = t[i & 4095]
        if i & 1 and len(m) > 8:
            # Mutate one byte past the first 4 (keep the kind, vary the body).
            j = 4 + (i >> 1) % (len(m) - 4)
            m = m[:j] + bytes([(m[j] + 1 + (i & 0xFF)) & 0xFF]) + m[j + 1:]
        try:
            s.sendto(m, dst)
            sent += 1
        except BlockingIOError:
            select.select([], [s], [], 0.01)
        if i & 1023 == 0:
            try:
                while True:
                    s.recv(65535)
                    replies += 1
            except BlockingIOError:
                pass
    end = select.select([s], [], [], 1.0)
    while select.select([s], [], [], 0.2)[0]:
        s.recv(65535)
        replies += 1
    print("sent", sent, "replies", replies, flush=True)


def main():
    cmd = sys.argv[1]
    if cmd == "init":
        pub = base64.b64decode(sys.argv[2])
        open(sys.argv[3], "wb").write(mac1_init(pub))
    elif cmd == "random":
        open(sys.argv[2], "wb").write(b"\x01\x00\x00\x00" + os.urandom(144))
    elif cmd == "garbage":
        garbage(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


if __name__ == "__main__":
    main()
