#!/usr/bin/env python3
"""A stand-in for Plex in the demo and tests: serves the files of one directory over HTTP with
byte-range requests (what video players use to seek), and logs every request's client address,
so you can see which address the home server saw.

    plex-standin.py DIR [--bind 0.0.0.0] [--port 32400]

Log lines go to stdout, one per request:
    2025-01-01T12:00:00Z client=192.0.2.50:51234 "GET /sample.mp4" 206 bytes=0-1048575/52428800
"""
import argparse
import http.server
import mimetypes
import os
import re
import sys
import time

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "plex-standin/1"
    protocol_version = "HTTP/1.1"
    root = "."

    def log_message(self, fmt, *args):  # the default goes to stderr without our fields
        pass

    def log(self, status, detail=""):
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        host, port = self.client_address[:2]
        line = f'{ts} client={host}:{port} "{self.command} {self.path}" {status}'
        if detail:
            line += f" {detail}"
        print(line, flush=True)

    def fail(self, status, message, extra_headers=()):
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.log(status, message)

    def resolve(self):
        """Only plain file names directly in the served directory: no paths, no traversal."""
        name = self.path.split("?", 1)[0].lstrip("/")
        if name == "":
            return None, "index"
        if "/" in name or name.startswith(".") or "\\" in name:
            return None, "not found"
        full = os.path.join(self.root, name)
        if not os.path.isfile(full):
            return None, "not found"
        return full, None

    def do_HEAD(self):
        self.serve()

    def do_GET(self):
        self.serve()

    def serve(self):
        full, why = self.resolve()
        if full is None:
            if why == "index":
                names = sorted(n for n in os.listdir(self.root) if not n.startswith("."))
                body = ("\n".join(names) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.log(200, "index")
                return
            self.fail(404, "not found")
            return
        size = os.path.getsize(full)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = RANGE_RE.match(rng.strip())
            # Several ranges ("bytes=0-1,5-9") are legal but rare: answering with the whole file is allowed.
            if m and (m.group(1) or m.group(2)):
                first, last = m.group(1), m.group(2)
                if first == "":  # suffix: the last N bytes
                    n = int(last)
                    start, end = max(0, size - n), size - 1
                    if n == 0:
                        start = size
                else:
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
                if start >= size or start > end:
                    self.fail(416, f"range {rng} not satisfiable for {size} bytes",
                              [("Content-Range", f"bytes */{size}")])
                    return
                status = 206
            elif not m and "," not in rng:
                self.fail(416, f"bad Range header {rng!r}: accepted is bytes=FIRST-LAST, bytes=FIRST- or bytes=-N",
                          [("Content-Range", f"bytes */{size}")])
                return
        length = end - start + 1 if size else 0
        self.send_response(status)
        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        self.send_header("Content-Type", ctype)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and length:
            with open(full, "rb") as f:
                f.seek(start)
                while sent < length:
                    buf = f.read(min(CHUNK, length - sent))
                    if not buf:
                        break
                    try:
                        self.wfile.write(buf)
                    except (BrokenPipeError, ConnectionResetError):
                        break  # players close connections while seeking; not an error
                    sent += len(buf)
        detail = f"bytes={start}-{end}/{size}" if status == 206 else f"bytes={size}"
        self.log(status, f"{detail} sent={sent}")


def main():
    ap = argparse.ArgumentParser(description="HTTP file server with byte ranges that logs client addresses")
    ap.add_argument("dir", help="directory whose files are served")
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=32400)
    a = ap.parse_args()
    if not os.path.isdir(a.dir):
        sys.exit(f"plex-standin: {a.dir} is not a directory")
    Handler.root = os.path.abspath(a.dir)
    srv = http.server.ThreadingHTTPServer((a.bind, a.port), Handler)
    srv.daemon_threads = True
    print(f"plex-standin: serving {Handler.root} on {a.bind}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
