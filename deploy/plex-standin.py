#!/usr/bin/env python3
"""A stand-in for Plex in the demo and tests: serves the files of one directory over HTTP with
byte-range requests (what video players use to seek), and logs every request's client address,
so you can see which address the home server saw.

    plex-standin.py DIR [--bind 0.0.0.0] [--port 32400] [--token-file FILE] [--prefs FILE]
                        [--sessions FILE] [--session-secs 60]

Log lines go to stdout, one per request:
    2025-01-01T12:00:00Z client=192.0.2.50:51234 "GET /sample.mp4" 206 bytes=0-1048575/52428800

It also answers the few Plex Media Server API endpoints `homeport plex setup` and `plex check`
use, with Plex's names and error statuses (sources: python-plexapi plexapi/settings.py and
plexapi/server.py; the community OpenAPI spec github.com/LukeHagar/plex-api-spec):
- GET /identity (no token): MediaContainer with machineIdentifier and version.
- GET /:/prefs: every Setting (id, label, type, default, value); PUT /:/prefs?NAME=VALUE&...
  sets them: 400 for a name it does not know or a value of the wrong type, nothing is changed
  then. Values are kept in --prefs FILE (JSON) when given.
- GET /status/sessions: one session per client address that fetched a file in the last
  --session-secs seconds (Player.address = the address the connection came from), plus the
  sessions listed in --sessions FILE (a JSON list of {"address", "user", "title", "local"}),
  read at every request so a test can add some.
The API wants the token of --token-file in the X-Plex-Token header or query parameter (401
without it); without --token-file any token is accepted. JSON when the request's Accept header
asks for it (as Plex does), XML otherwise. Files are served without a token.
"""
import argparse
import http.server
import json
import mimetypes
import os
import re
import sys
import threading
import time
import urllib.parse
from xml.sax.saxutils import quoteattr

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024
MACHINE_ID = "0123456789abcdef0123456789abcdef01234567"
VERSION = "1.41.0.0000-standin"

# The preferences the stand-in knows: Plex's own ids, types and defaults (Settings → Network and
# Remote Access). id: (type, default, label)
SETTINGS = {
    "FriendlyName": ("text", "plex-standin", "Friendly name"),
    "PublishServerOnPlexOnlineKey": ("bool", False, "Enable Remote Access (publish to plex.tv)"),
    "ManualPortMappingMode": ("bool", False, "Manually specify public port"),
    "ManualPortMappingPort": ("int", 32400, "Public port"),
    "customConnections": ("text", "", "Custom server access URLs"),
    "RelayEnabled": ("bool", True, "Enable Relay"),
    "LanNetworksBandwidth": ("text", "", "LAN Networks"),
    "allowedNetworks": ("text", "", "List of IP addresses and networks that are allowed without auth"),
    "secureConnections": ("int", 1, "Secure connections"),
    "TreatWanIpAsLocal": ("bool", False, "Treat WAN IP As LAN Bandwidth"),
    "EnableIPv6": ("bool", False, "Enable support for IPv6"),
}


def parse_value(kind, raw):
    """A PUT value as its type, or None when it is not one (Plex answers 400 then)."""
    if kind == "bool":
        return {"1": True, "true": True, "0": False, "false": False}.get(raw.lower())
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            return None
    return raw


class Api:
    """The API state: preferences and the clients seen fetching files."""
    lock = threading.Lock()
    token = None
    prefs_file = None
    sessions_file = None
    session_secs = 60
    prefs = {k: v[1] for k, v in SETTINGS.items()}
    seen = {}  # client ip -> (last time, path)

    @classmethod
    def load(cls):
        if cls.prefs_file and os.path.exists(cls.prefs_file):
            with open(cls.prefs_file) as f:
                for k, v in json.load(f).items():
                    if k in SETTINGS:
                        cls.prefs[k] = v

    @classmethod
    def save(cls):
        if cls.prefs_file:
            tmp = cls.prefs_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(cls.prefs, f, indent=1)
            os.replace(tmp, cls.prefs_file)

    @classmethod
    def sessions(cls):
        now = time.time()
        out = []
        with cls.lock:
            seen = sorted(cls.seen.items())
        for i, (ip, (t, path)) in enumerate(seen):
            if now - t < cls.session_secs:
                out.append({"address": ip, "user": "viewer", "title": path, "local": False})
        if cls.sessions_file and os.path.exists(cls.sessions_file):
            with open(cls.sessions_file) as f:
                out.extend(json.load(f))
        return out


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
        if self.api():
            return
        self.serve()

    def do_PUT(self):
        if self.api():
            return
        self.fail(405, "PUT is only for /:/prefs")

    def wants_json(self):
        return "json" in self.headers.get("Accept", "")

    def reply(self, status, obj, detail=""):
        """`obj` is a MediaContainer: (attributes, [(child tag, attributes, [(tag, attrs)])])."""
        attrs, children = obj
        if self.wants_json():
            mc = dict(attrs)
            for tag, a, sub in children:
                item = dict(a)
                for stag, sa in sub:
                    item[stag] = sa
                mc.setdefault(tag, []).append(item)
            body = json.dumps({"MediaContainer": mc}).encode()
            ctype = "application/json"
        else:
            def xa(a):
                return "".join(f" {k}={quoteattr(str(int(v)) if isinstance(v, bool) else str(v))}" for k, v in a.items())
            inner = ""
            for tag, a, sub in children:
                subx = "".join(f"<{st}{xa(sa)}/>" for st, sa in sub)
                inner += f"<{tag}{xa(a)}>{subx}</{tag}>" if subx else f"<{tag}{xa(a)}/>"
            body = f'<?xml version="1.0" encoding="UTF-8"?>\n<MediaContainer{xa(attrs)}>{inner}</MediaContainer>\n'.encode()
            ctype = "text/xml;charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.log(status, detail)

    def authorized(self, query):
        if Api.token is None:
            return True
        given = self.headers.get("X-Plex-Token") or query.get("X-Plex-Token", [None])[0]
        return given == Api.token

    def api(self):
        """Answers the API endpoints; False for anything else (a file)."""
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if url.path == "/identity" and self.command == "GET":
            self.reply(200, ({"size": 0, "claimed": 1, "machineIdentifier": MACHINE_ID, "version": VERSION}, []), "identity")
            return True
        if url.path not in ("/:/prefs", "/status/sessions"):
            return False
        if not self.authorized(query):
            self.fail(401, "unauthorized: a valid X-Plex-Token is needed")
            return True
        if url.path == "/:/prefs" and self.command == "GET":
            with Api.lock:
                items = [
                    ("Setting", {"id": k, "label": SETTINGS[k][2], "type": SETTINGS[k][0],
                                 "default": SETTINGS[k][1], "value": Api.prefs[k]}, [])
                    for k in SETTINGS
                ]
            self.reply(200, ({"size": len(items)}, items), "prefs")
            return True
        if url.path == "/:/prefs" and self.command == "PUT":
            changes = {}
            for k, vals in query.items():
                if k == "X-Plex-Token":
                    continue
                if k not in SETTINGS:
                    self.fail(400, f"unknown preference {k}")
                    return True
                v = parse_value(SETTINGS[k][0], vals[-1])
                if v is None:
                    self.fail(400, f"bad value {vals[-1]!r} for {k} ({SETTINGS[k][0]})")
                    return True
                changes[k] = v
            with Api.lock:
                Api.prefs.update(changes)
                Api.save()
            self.reply(200, ({"size": 0}, []), "set " + ",".join(sorted(changes)))
            return True
        if url.path == "/status/sessions" and self.command == "GET":
            items = []
            for i, s in enumerate(Api.sessions()):
                local = bool(s.get("local", False))
                items.append(("Metadata", {"type": "movie", "title": s.get("title", "")}, [
                    ("User", {"id": i + 1, "title": s.get("user", "viewer")}),
                    ("Player", {"address": s["address"], "local": local, "relayed": False,
                                "state": "playing", "title": "standin-player", "product": "curl"}),
                    ("Session", {"id": f"s{i + 1}", "location": "lan" if local else "wan", "bandwidth": 10000}),
                ]))
            self.reply(200, ({"size": len(items)}, items), f"sessions={len(items)}")
            return True
        self.fail(405, f"{self.command} not allowed on {url.path}")
        return True

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
        with Api.lock:
            Api.seen[self.client_address[0]] = (time.time(), "/" + os.path.basename(full))
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
    ap.add_argument("--token-file", help="the API's token (default: any token is accepted)")
    ap.add_argument("--prefs", help="JSON file the preferences are read from and saved to")
    ap.add_argument("--sessions", help="JSON list of extra sessions, read at every request")
    ap.add_argument("--session-secs", type=int, default=60,
                    help="how long a client that fetched a file counts as a session")
    a = ap.parse_args()
    if not os.path.isdir(a.dir):
        sys.exit(f"plex-standin: {a.dir} is not a directory")
    if a.token_file:
        with open(a.token_file) as f:
            Api.token = f.read().strip()
    Api.prefs_file, Api.sessions_file, Api.session_secs = a.prefs, a.sessions, a.session_secs
    Api.load()
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
