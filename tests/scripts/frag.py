#!/usr/bin/env python3
"""Fragment attacks and big datagrams for the data-plane lab test (tests/tests/dataplane.rs).

  frag.py syn SRC DST DPORT tiny|split   a TCP SYN sent as two raw IP fragments: "tiny" puts only
                                         8 bytes of the TCP header in the first fragment (no
                                         flags), "split" the whole header plus 4 bytes
  frag.py udp DST DPORT SIZE             one UDP datagram of SIZE bytes (the kernel fragments it)
  frag.py listen ADDR PORT...            prints "udp PORT LEN" for every datagram received
"""
import ipaddress
import select
import socket
import struct
import sys


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_syn(src, dst, sport, dport, payload):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    seg = hdr + payload
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(seg))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(seg), 6)
    c = csum(pseudo + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def fragment(src, dst, proto, payload, ident, start, end, more):
    part = payload[start:end]
    if src.version == 4:
        fo = (start // 8) | (0x2000 if more else 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(part), ident & 0xFFFF, fo, 64, proto, 0,
                         src.packed, dst.packed)
        return ip + part
    fh = struct.pack("!BBHI", proto, 0, start | (1 if more else 0), ident)
    ip = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(part), 44, 64, src.packed, dst.packed)
    return ip + fh + part


def send_raw(dst, pkts):
    fam = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for p in pkts:
        s.sendto(p, (str(dst), 0))


def main():
    cmd = sys.argv[1]
    if cmd == "syn":
        src, dst = ipaddress.ip_address(sys.argv[2]), ipaddress.ip_address(sys.argv[3])
        dport, how = int(sys.argv[4]), sys.argv[5]
        seg = tcp_syn(src, dst, 40000 + dport, dport, b"\0" * 12)
        cut = 8 if how == "tiny" else 24
        ident = 0x4000 + dport + (1 if how == "tiny" else 0)
        send_raw(dst, [fragment(src, dst, 6, seg, ident, 0, cut, True),
                       fragment(src, dst, 6, seg, ident, cut, len(seg), False)])
    elif cmd == "udp":
        dst, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.sendto(b"x" * size, (dst, port))
    elif cmd == "listen":
        addr = sys.argv[2]
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        socks = []
        for p in sys.argv[3:]:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((addr, int(p)))
            socks.append((s, p))
        print("listening", flush=True)
        while True:
            r, _, _ = select.select([s for s, _ in socks], [], [])
            for s, p in socks:
                if s in r:
                    d = s.recv(65535)
                    print("udp", p, len(d), flush=True)


if __name__ == "__main__":
    main()
