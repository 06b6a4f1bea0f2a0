#!/usr/bin/env python3
"""Runs a real wsgate, drives traffic that causes (nearly) every metric, and writes two scrapes.

Used by deploy/monitoring/check: the dashboard's panels and the alert rules are then evaluated
by promtool against what a real gateway exports, so a renamed metric or label cannot leave a
blank panel or a dead alert.

What it starts, all on loopback with ports from binding port 0: a TCP echo backend, a
"firehose" backend that sends without pause (so a client's Close leaves bytes to discard), a
port that is bound but not listening (connection refused), and the gateway with one route per
behaviour (plain, pool with a dead member, backend down with 1013 and with 502, bearer auth
with user labels, token-mapped targets, idle timeout, max_sessions 1, firehose). The traffic
runs twice; the gateway is scraped after each round, so every counter has two samples to take
a rate over. Every wait is on an event (a frame read, a metric reaching a value), with a
deadline.

Usage: exercise.py WSGATE_BINARY OUT_DIR  ->  OUT_DIR/scrape-{0,1,2}.prom (0: before any traffic),
instance (the admin address)
Stdlib only (Python 3.11).
"""

import base64
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request

DEADLINE = 20.0  # seconds for any one awaited event
GOOD_TOKEN = "monitoring-check-token"


# ---- backends -------------------------------------------------------------------------------

def serve(handler):
    """A TCP server on 127.0.0.1:0 running `handler(conn)` per connection in a thread."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def echo(conn):
    with conn:
        while True:
            try:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
            except OSError:
                return


def firehose(conn):
    chunk = b"x" * 65536
    with conn:
        try:
            while True:
                conn.sendall(chunk)
        except OSError:
            return


# ---- a minimal WebSocket client (RFC 6455) ------------------------------------------------

class WS:
    def __init__(self, sock, rest=b""):
        self.sock = sock
        self.buf = rest

    def _read(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("socket closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, opcode, payload):
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def recv(self):
        """One frame: (opcode, payload). Pings are answered and skipped."""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.send(0xA, payload)
                continue
            return opcode, payload

    def close(self, code=1000):
        """Sends Close and reads until the gateway's Close; returns its code."""
        self.send(0x8, struct.pack("!H", code))
        return self.wait_close()

    def wait_close(self):
        while True:
            opcode, payload = self.recv()
            if opcode == 0x8:
                self.sock.close()
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def echo_round(self, size=1000, count=5):
        for _ in range(count):
            msg = os.urandom(size)
            self.send(0x2, msg)
            got = b""
            while len(got) < len(msg):
                opcode, payload = self.recv()
                got += payload
            assert got == msg, "echo differs"


def upgrade(port, path, headers=None, tls=False):
    """Sends an upgrade request; returns (status, WS or None)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            break
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    if status != 101:
        sock.close()
        return status, None
    return status, WS(sock, rest)


def expect(what, got, want):
    if got != want:
        raise SystemExit(f"exercise: {what}: got {got!r}, want {want!r}")


# ---- the gateway ----------------------------------------------------------------------------

def write_config(d, echo_port, fire_port, dead_port):
    token_hash = hashlib.sha256(GOOD_TOKEN.encode()).hexdigest()
    with open(os.path.join(d, "desks.toml"), "w") as f:
        f.write(f'"good" = "127.0.0.1:{echo_port}"\n"outside" = "10.9.9.9:{echo_port}"\n')
    cfg = f"""
[listeners.plain]
address = "127.0.0.1:0"

[listeners.secure]
address = "127.0.0.1:0"
tls = {{ cert = "cert.pem", key = "key.pem", generate_self_signed = true }}

[routes.echo]
path = "/echo"
backend = "127.0.0.1:{echo_port}"

[routes.pool]
path = "/pool"
backends = [
  {{ name = "live", address = "127.0.0.1:{echo_port}" }},
  {{ name = "dead", address = "127.0.0.1:{dead_port}" }},
]
[routes.pool.health]
interval_secs = 0
eject_after_failures = 1
eject_secs = 3600

[routes.down]
path = "/down"
backend = "127.0.0.1:{dead_port}"

[routes.down-http]
path = "/down-http"
backend = "127.0.0.1:{dead_port}"
on_backend_unavailable = "http"

[routes.auth]
path = "/auth"
backend = "127.0.0.1:{echo_port}"
[routes.auth.auth]
type = "bearer"
tokens = ["ops=sha256:{token_hash}"]
user_label = true

[routes.desks]
path = "/desks/"
match = "prefix"
[routes.desks.targets]
map_file = "desks.toml"
allow = ["127.0.0.1/32"]
allow_ports = [{echo_port}]

[routes.idle]
path = "/idle"
backend = "127.0.0.1:{echo_port}"
limits = {{ idle_timeout_secs = 0.5 }}

[routes.capped]
path = "/capped"
backend = "127.0.0.1:{echo_port}"
limits = {{ max_sessions = 1 }}

[routes.firehose]
path = "/firehose"
backend = "127.0.0.1:{fire_port}"
limits = {{ close_timeout_secs = 0.3 }}

[limits.per_client]
max_auth_failures = 0

[shutdown]
drain_delay_secs = 0
close_window_secs = 0.5
deadline_secs = 2

[admin]
address = "127.0.0.1:0"

[log]
format = "json"
"""
    path = os.path.join(d, "config.toml")
    with open(path, "w") as f:
        f.write(cfg)
    return path


class Gateway:
    def __init__(self, binary, config):
        self.proc = subprocess.Popen([binary, "run", "--config", config], stderr=subprocess.PIPE, text=True)
        self.urls = {}
        self.admin = None
        self.lines = []
        deadline = time.monotonic() + DEADLINE
        # Startup logs one "listening" line per listener, then "admin listening".
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            fields = rec.get("fields", rec)
            msg = fields.get("message")
            if msg == "listening":
                self.urls[fields["listener"]] = fields["url"]
            elif msg == "admin listening":
                self.admin = fields["url"]
            if self.admin and len(self.urls) == 2:
                break
            if time.monotonic() > deadline:
                break
        if not self.admin or len(self.urls) != 2:
            self.proc.kill()
            raise SystemExit("exercise: the gateway did not start:\n" + "".join(self.lines[-20:]))
        threading.Thread(target=lambda: [self.lines.append(l) for l in self.proc.stderr], daemon=True).start()
        self.plain = int(self.urls["plain"].rsplit(":", 1)[1])
        self.secure = int(self.urls["secure"].rsplit(":", 1)[1])

    def scrape(self):
        with urllib.request.urlopen(self.admin, timeout=DEADLINE) as r:
            return r.read().decode()

    def value(self, name, **labels):
        """Sum of the samples of `name` whose labels include `labels`; None if there are none."""
        total = None
        for line in self.scrape().splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + float(m.group(4))
        return total

    def await_metric(self, what, cond, name, **labels):
        deadline = time.monotonic() + DEADLINE
        while True:
            v = self.value(name, **labels)
            if v is not None and cond(v):
                return v
            if time.monotonic() > deadline:
                raise SystemExit(f"exercise: timed out waiting for {what} ({name} {labels} = {v})")
            time.sleep(0.05)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def round_of_traffic(gw, config_path):
    p = gw.plain
    # Plain sessions through the bridge, closed by the client with 1000.
    for _ in range(3):
        st, ws = upgrade(p, "/echo")
        expect("/echo upgrade", st, 101)
        ws.echo_round()
        expect("/echo close", ws.close(), 1000)
    # The same over TLS.
    st, ws = upgrade(gw.secure, "/echo", tls=True)
    expect("wss /echo upgrade", st, 101)
    ws.echo_round(size=20000, count=2)
    ws.close()
    # A pool with a dead member: round robin reaches it, the session fails over, it is ejected.
    for _ in range(2):
        st, ws = upgrade(p, "/pool")
        expect("/pool upgrade", st, 101)
        ws.echo_round()
        ws.close()
    gw.await_metric("the dead pool member ejected", lambda v: v == 0, "wsgate_backend_up", route="pool", backend="dead")
    # A backend that refuses: 101 then 1013 (close), or 502 (http).
    st, ws = upgrade(p, "/down")
    expect("/down upgrade", st, 101)
    expect("/down close code", ws.wait_close(), 1013)
    st, _ = upgrade(p, "/down-http")
    expect("/down-http status", st, 502)
    # Bearer auth: a good token (counted by user), a wrong one, none.
    st, ws = upgrade(p, "/auth", {"Authorization": f"Bearer {GOOD_TOKEN}"})
    expect("/auth good token", st, 101)
    ws.echo_round(count=1)
    ws.close()
    expect("/auth bad token", upgrade(p, "/auth", {"Authorization": "Bearer wrong"})[0], 401)
    expect("/auth no token", upgrade(p, "/auth")[0], 401)
    # Token-mapped targets: a good token, an unknown one, one outside the allow-list.
    st, ws = upgrade(p, "/desks/good")
    expect("/desks/good", st, 101)
    ws.echo_round(count=1)
    ws.close()
    expect("/desks/unknown", upgrade(p, "/desks/unknown")[0], 404)
    expect("/desks/outside", upgrade(p, "/desks/outside")[0], 403)
    # No route.
    expect("/nothing", upgrade(p, "/nothing")[0], 404)
    # Idle timeout: the gateway closes with 1000.
    st, ws = upgrade(p, "/idle")
    expect("/idle upgrade", st, 101)
    ws.echo_round(count=1)
    expect("/idle close code", ws.wait_close(), 1000)
    # max_sessions = 1: the second session is shed with 1013.
    st, held = upgrade(p, "/capped")
    expect("/capped first", st, 101)
    held.echo_round(count=1)
    st, ws = upgrade(p, "/capped")
    expect("/capped second", st, 101)
    expect("/capped second close code", ws.wait_close(), 1013)
    held.close()
    # A backend that keeps sending after the client's Close: the linger discards bytes.
    before = gw.value("wsgate_dropped_bytes_total", route="firehose") or 0.0
    st, ws = upgrade(p, "/firehose")
    expect("/firehose upgrade", st, 101)
    ws.recv()
    ws.close()
    gw.await_metric("dropped bytes counted", lambda v: v > before, "wsgate_dropped_bytes_total", route="firehose")
    # Plain text to the TLS port: a failed TLS handshake.
    before = gw.value("wsgate_tls_handshake_failures_total", listener="secure", reason="error") or 0.0
    with socket.create_connection(("127.0.0.1", gw.secure), timeout=DEADLINE) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    gw.await_metric("a TLS handshake failure", lambda v: v > before, "wsgate_tls_handshake_failures_total",
                    listener="secure", reason="error")
    # A rejected reload, then a good one.
    good = open(config_path).read()
    for text, result in ((good + "\n[nonsense\n", "error"), (good, "ok")):
        before = gw.value("wsgate_config_reloads_total", result=result) or 0.0
        with open(config_path, "w") as f:
            f.write(text)
        gw.proc.send_signal(signal.SIGHUP)
        gw.await_metric(f"a reload with result {result}", lambda v: v > before, "wsgate_config_reloads_total",
                        result=result)
    # Every session has ended and been counted.
    gw.await_metric("all sessions ended", lambda v: v == 0, "wsgate_sessions_open")


def main():
    binary, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    _, echo_port = serve(echo)
    _, fire_port = serve(firehose)
    dead = socket.socket()  # bound, never listening: connects to it are refused
    dead.bind(("127.0.0.1", 0))
    config = write_config(out, echo_port, fire_port, dead.getsockname()[1])
    gw = Gateway(binary, config)
    try:
        with open(os.path.join(out, "scrape-0.prom"), "w") as f:
            f.write(gw.scrape())  # before any traffic: which series exist from the start
        for i in (1, 2):
            round_of_traffic(gw, config)
            with open(os.path.join(out, f"scrape-{i}.prom"), "w") as f:
                f.write(gw.scrape())
        with open(os.path.join(out, "instance"), "w") as f:
            f.write(gw.admin.split("//", 1)[1].split("/", 1)[0])
    except BaseException:
        sys.stderr.write("exercise: the gateway's last log lines:\n" + "".join(gw.lines[-30:]))
        raise
    finally:
        gw.stop()
    with open(os.path.join(out, "gateway.log"), "w") as f:
        f.writelines(gw.lines)


if __name__ == "__main__":
    main()
