"""Harness for the end-to-end tests: a real Envoy with tenant-ratelimit on loopback ports.

The Envoy process, the bootstrap builders, `free_port` and the wrk helpers live in
tests/support/envoy.py (shared with tests/deploy and bench/) and are re-exported here, so tests
keep importing them from `harness`:

* `bootstrap(...)`, `http_listener(...)`, `wasm_filter(...)` build an Envoy bootstrap dict;
  every listener and the admin bind 127.0.0.1 port 0 unless told otherwise, and the real
  ports are read back from the admin API, so parallel runs never collide.
* `Envoy` starts the process (`--use-dynamic-base-id`, `--concurrency 2` by default), waits
  for admin `/ready`, captures its log to a file, reads stats, and always stops it: SIGTERM,
  then SIGKILL after a bounded wait, a parent-death signal so it never outlives the test
  process, and a watchdog that kills it after `max_lifetime` seconds whatever happens.
* `request`, `send`, `burst` send HTTP/1.1 requests on keep-alive connections, optionally in
  parallel, and return `Resp(status, headers, body)`.
* `Pki` and `Jwt` make certificates and signed tokens with the `openssl` CLI.
* `Wrk` runs wrk with tests/e2e/wrk_tenants.lua in the background (churn and soak tests).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

try:  # `python -m pytest` from the repository root has it on sys.path; plain `pytest` may not
    import tests.support.envoy  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.envoy import (  # noqa: E402,F401  (re-exported for the tests)
    HOST, HTTP_TIMEOUT, READY_TIMEOUT, ROUTER, STAT_PREFIX, STOP_TIMEOUT, Envoy, EnvoyError, bootstrap,
    cluster_route, die_with_parent, ensure_tool, file_access_log, free_port, listener, vm_rss_kib, wasm_filter,
    wrk_command, wrk_result, write_lds,
)

_die_with_parent = die_with_parent  # the old private name


def http_listener(name: str, plugin_config: Any, wasm: str, *, port: int = 0,
                  pre_filters: Iterable[dict] = (), hcm_extra: dict | None = None,
                  transport_socket: dict | None = None, root_id: str | None = None) -> dict:
    """A listener: HCM -> [pre_filters] -> tenant-ratelimit -> router -> direct_response 200 "ok".

    Each listener gets its own plugin root id (so its own shared-data namespace) unless told.
    """
    filters = [*pre_filters, wasm_filter(plugin_config, wasm, root_id or f"trl_{name}")]
    return listener(name, filters, port=port, stat_prefix=name,  # listener.<name>.worker_<n>.*
                    hcm_extra=hcm_extra, transport_socket=transport_socket)


def counter_delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def prometheus_value(text: str, metric: str) -> float | None:
    """The value of an unlabelled prometheus sample `metric`."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        parts = line.split()
        # Envoy writes unlabelled samples as `name{} value`
        if len(parts) >= 2 and parts[0] in (metric, metric + "{}"):
            return float(parts[1])
    return None


# --------------------------------------------------------------------------------------------
# HTTP client


@dataclass
class Resp:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)

    def header_count(self, name: str) -> int:
        return sum(1 for n, _ in self.raw_headers if n.lower() == name.lower())


def _to_resp(r: http.client.HTTPResponse) -> Resp:
    body = r.read()
    raw = [(n, v) for n, v in r.getheaders()]
    headers: dict[str, str] = {}
    for n, v in raw:
        k = n.lower()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    return Resp(r.status, headers, body, raw)


class Client:
    """One keep-alive HTTP/1.1 connection (plain, or TLS when `ssl_context` is given)."""

    def __init__(self, port: int, ssl_context: ssl.SSLContext | None = None, host: str = HOST):
        if ssl_context is not None:
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=HTTP_TIMEOUT, context=ssl_context)
        else:
            self.conn = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT)

    def connect(self) -> "Client":
        self.conn.connect()
        return self

    def request(self, path: str = "/", headers: dict | None = None, method: str = "GET",
                body: bytes | None = None) -> Resp:
        self.conn.request(method, path, body=body, headers=headers or {})
        return _to_resp(self.conn.getresponse())

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(port: int, path: str = "/", headers: dict | None = None, method: str = "GET",
            body: bytes | None = None, ssl_context: ssl.SSLContext | None = None) -> Resp:
    """One request on a fresh connection."""
    with Client(port, ssl_context) as c:
        return c.request(path, headers, method, body)


def send(port: int, n: int, path: str = "/", headers: dict | None = None, method: str = "GET",
         connections: int = 1, ssl_context: ssl.SSLContext | None = None) -> list[Resp]:
    """`n` requests over `connections` keep-alive connections, each driven by its own thread
    (so requests on different connections run in parallel; on one connection, in sequence).
    Returned connection by connection, each connection's responses in order."""
    connections = max(1, min(connections, n)) if n else 1
    share = [n // connections + (1 if i < n % connections else 0) for i in range(connections)]

    def run(k: int) -> list[Resp]:
        with Client(port, ssl_context) as c:
            return [c.request(path, headers, method) for _ in range(k)]

    if connections == 1:
        return run(n)
    with ThreadPoolExecutor(connections) as pool:
        results = list(pool.map(run, share))
    return [r for rs in results for r in rs]


def burst(port: int, requests: list[dict], ssl_context: ssl.SSLContext | None = None) -> list[Resp]:
    """Each request on its own connection, all connected first, then released together by a
    barrier: many first-touch requests arriving at once. Each dict holds request() kwargs."""
    barrier = threading.Barrier(len(requests), timeout=HTTP_TIMEOUT)

    def run(kw: dict) -> Resp:
        c = Client(port, ssl_context).connect()
        try:
            barrier.wait()
            return c.request(**kw)
        finally:
            c.close()

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(run, requests))


def statuses(resps: Iterable[Resp]) -> list[int]:
    return [r.status for r in resps]


# --------------------------------------------------------------------------------------------
# Certificates and JWTs with the openssl CLI


def openssl(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    p = subprocess.run(["openssl", *args], cwd=cwd, input=input, capture_output=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


class Pki:
    """A CA, a server cert for 127.0.0.1 and client certs with URI SANs (EC P-256, fast)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert = self._path("ca.key"), self._path("ca.pem")
        self._key(self.ca_key)
        openssl("req", "-x509", "-new", "-key", str(self.ca_key), "-out", str(self.ca_cert), "-days", "2",
                "-subj", "/CN=e2e test CA", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)

    def _path(self, name: str) -> Path:
        return self.dir / name

    def _key(self, path: Path) -> None:
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path), cwd=self.dir)

    def issue(self, name: str, san: str, usage: str) -> tuple[Path, Path]:
        key, csr, cert, ext = (self._path(f"{name}.{s}") for s in ("key", "csr", "pem", "ext"))
        self._key(key)
        openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=self.dir)
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=self.dir)
        return cert, key

    def server(self) -> tuple[Path, Path]:
        return self.issue("server", "IP:127.0.0.1,DNS:localhost", "serverAuth")

    def client(self, name: str, uri: str) -> tuple[Path, Path]:
        return self.issue(name, f"URI:{uri}", "clientAuth")

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        ctx.check_hostname = False  # we connect to 127.0.0.1; the chain is still verified
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Jwt:
    """An RSA key pair (RS256) with its JWKS, and token minting with `openssl dgst -sign`."""

    _made = 0

    def __init__(self, directory: Path, kid: str = "e2e"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kid = kid
        Jwt._made += 1
        self.key = self.dir / f"jwt-{kid}-{Jwt._made}.key"  # several keys may share a kid
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(self.key),
                cwd=self.dir)
        modulus = openssl("rsa", "-in", str(self.key), "-noout", "-modulus", cwd=self.dir).decode()
        n = bytes.fromhex(modulus.strip().split("=", 1)[1])
        self.jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": b64url(n), "e": "AQAB"}

    def jwks(self) -> str:
        return json.dumps({"keys": [self.jwk]})

    def token(self, claims: dict) -> str:
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        sig = openssl("dgst", "-sha256", "-sign", str(self.key), cwd=self.dir, input=signing_input.encode())
        return f"{signing_input}.{b64url(sig)}"


# --------------------------------------------------------------------------------------------
# Load generation with wrk (churn and soak tests)

WRK_SCRIPT = Path(__file__).with_name("wrk_tenants.lua")


def ensure_wrk() -> str | None:
    """The wrk binary, installed with apt-get when missing and possible (root, Debian).
    Returns None when it cannot be had."""
    return ensure_tool("wrk")


@dataclass
class WrkResult:
    requests: int
    seconds: float  # wall time of the wrk run
    errors: dict[str, int]
    stdout: str


class Wrk:
    """wrk against 127.0.0.1:`port` with tests/e2e/wrk_tenants.lua, in the background.

    `env` sets the script's TRL_WRK_* variables (see the script). The run is bounded by
    `duration` (wrk -d) and by `stop()` (SIGINT: wrk stops at once and still prints its
    summary); `limit` caps the requests each thread sends."""

    def __init__(self, wrk_bin: str, port: int, *, duration: float, threads: int = 2,
                 connections: int = 16, limit: int = 0, env: dict | None = None, timeout: str = "5s"):
        self.cmd = wrk_command(wrk_bin, f"http://{HOST}:{port}/", WRK_SCRIPT, threads=threads,
                               connections=connections, seconds=duration, timeout=timeout)
        self.env = dict(os.environ, TRL_WRK_LIMIT=str(limit), **(env or {}))
        self.duration = duration
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Wrk":
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGINT)

    def wait(self) -> WrkResult:
        assert self.proc is not None
        try:
            out, _ = self.proc.communicate(timeout=self.duration + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise RuntimeError(f"wrk did not finish: {out[-2000:]}")
        seconds = time.monotonic() - self.started
        r = wrk_result(out, "WRK_RESULT")
        if r is not None:
            errors = {k: r[k] for k in ("connect", "read", "write", "timeout")}
            return WrkResult(r["requests"], seconds, errors, out)
        raise RuntimeError(f"wrk exited {self.proc.returncode} without a result:\n{out[-2000:]}")

    def __enter__(self) -> "Wrk":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()


def raw_http(port: int, data: bytes, timeout: float = HTTP_TIMEOUT) -> tuple[int | None, bytes]:
    """Send raw bytes (one HTTP/1.1 request) on a fresh connection and read one response
    (headers, then `content-length` bytes of body; or until the peer closes). Returns
    (status or None, everything read). The client closes first, so Envoy's delayed close
    does not cost a second."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        need: int | None = None
        while need is None or len(out) < need:
            try:
                b = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not b:
                break
            out += b
            if need is None and b"\r\n\r\n" in out:
                head, _, _ = out.partition(b"\r\n\r\n")
                m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                if m:
                    need = len(head) + 4 + int(m.group(1))
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", out)
    return (int(m.group(1)) if m else None), out
