"""A real S3 endpoint for tests and benchmarks: moto's standalone server (its own process,
HTTP on 127.0.0.1), and a TCP proxy in front of it that adds a round-trip latency to every
request and counts the bytes each side sends. Nothing is patched in-process: sparsekd's
clients (pyarrow's S3, boto3) talk HTTP to these servers.

    with S3Server() as s3:                      # AWS_* variables for it: s3.env
        s3.make_bucket("cache")
        with DelayProxy(s3.port, delay_s=0.02) as proxy:   # proxy.env: through the proxy
            ...
            proxy.bytes_down                    # bytes the server sent to clients
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint_env(port: int) -> dict:
    """The environment that points S3 clients at 127.0.0.1:port."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


class S3Server:
    """moto's S3 server in a subprocess. `auth=True`: every request must be signed with
    keys moto's IAM knows (none are made here, so any credentials are refused)."""

    def __init__(self, auth: bool = False, timeout_s: float = 60):
        self.port = free_port()
        env = {**os.environ}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.1)
        self.env = endpoint_env(self.port)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under `prefix`: {key relative to the prefix: bytes} (read with
        boto3, independently of sparsekd's clients)."""
        c, out, token = self.client(), {}, None
        while True:
            kw = {
                "Bucket": bucket,
                "Prefix": prefix,
                **({"ContinuationToken": token} if token else {}),
            }
            page = c.list_objects_v2(**kw)
            for o in page.get("Contents", []):
                key = o["Key"]
                out[key[len(prefix) :].lstrip("/")] = c.get_object(Bucket=bucket, Key=key)[
                    "Body"
                ].read()
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b'Content-Length: 89\r\n\r\n<?xml version="1.0"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce</Message></Error>"
)


class DelayProxy:
    """TCP proxy 127.0.0.1:port -> 127.0.0.1:target. Each request (the first bytes a client
    sends after the server last spoke) is held `delay_s` before it is forwarded: an added
    round-trip latency per request. Counts bytes both ways and the requests seen, and
    calls `on_request(first_bytes)` for each (a test can kill a writer there);
    `fail_every=N` answers every Nth request with a 503 "slow down" and hangs up."""

    def __init__(self, target_port: int, delay_s: float = 0.0, on_request=None, fail_every=0):
        self.target, self.delay_s, self.on_request = target_port, delay_s, on_request
        self.fail_every, self.failed = fail_every, 0  # answer every Nth request with a 503
        self.bytes_up = self.bytes_down = self.requests = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.env = endpoint_env(self.port)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.bytes_up = self.bytes_down = self.requests = 0

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = {"server_spoke": True}
            threading.Thread(
                target=self._pump, args=(client, server, True, state), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, False, state), daemon=True
            ).start()

    def _pump(self, src, dst, upstream: bool, state: dict) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream:
                    if state["server_spoke"]:  # a new request
                        state["server_spoke"] = False
                        with self._lock:
                            self.requests += 1
                            fail = self.fail_every and self.requests % self.fail_every == 0
                            self.failed += bool(fail)
                        if fail:  # a transient error: S3's "slow down", then hang up
                            src.sendall(SLOW_DOWN)
                            return
                        if self.on_request is not None:
                            self.on_request(data[:200])
                        if self.delay_s:
                            time.sleep(self.delay_s)
                    with self._lock:
                        self.bytes_up += len(data)
                else:
                    state["server_spoke"] = True
                    with self._lock:
                        self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BlackHole:
    """A server on 127.0.0.1 that accepts every connection, reads what it is sent and never
    answers: the endpoint of a store that hangs (a firewall that drops replies, a stuck
    proxy). Counts the connections; closes them all on exit."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    @staticmethod
    def _swallow(conn) -> None:
        try:
            while conn.recv(1 << 16):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()
        for c in self.connections:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
