"""Harness for the end-to-end tests: a real Envoy with tenant-ratelimit on loopback ports.

Everything here is standard library (+ pyyaml for the bootstrap file):

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
"""

from __future__ import annotations

import base64
import ctypes
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

HOST = "127.0.0.1"
STAT_PREFIX = "wasmcustom.tenant_ratelimit."
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------------
# Bootstrap


def free_port() -> int:
    """A currently free loopback port (for configs that need a fixed port, e.g. LDS files)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wasm_filter(plugin_config: Any, wasm: str, root_id: str = "tenant_ratelimit",
                vm_id: str = "tenant_ratelimit") -> dict:
    """The envoy.filters.http.wasm entry; `plugin_config` is a dict (sent as JSON) or a raw str."""
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tenant_ratelimit",
                "root_id": root_id,
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": value,
                },
            },
        },
    }


ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def http_listener(name: str, plugin_config: Any, wasm: str, *, port: int = 0,
                  pre_filters: Iterable[dict] = (), hcm_extra: dict | None = None,
                  transport_socket: dict | None = None, root_id: str | None = None) -> dict:
    """A listener: HCM -> [pre_filters] -> tenant-ratelimit -> router -> direct_response 200 "ok".

    Each listener gets its own plugin root id (so its own shared-data namespace) unless told.
    """
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "name": "local",
            "virtual_hosts": [{
                "name": "backend",
                "domains": ["*"],
                "routes": [{
                    "match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                }],
            }],
        },
        "http_filters": [*pre_filters, wasm_filter(plugin_config, wasm, root_id or f"trl_{name}"), ROUTER],
    }
    hcm.update(hcm_extra or {})
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "stat_prefix": name,  # listener.<name>.worker_<n>.downstream_cx_total etc.
        "address": {"socket_address": {"address": HOST, "port_value": port}},
        "filter_chains": [chain],
    }


def file_access_log(path: Path | str, fmt: str) -> dict:
    """An HCM `access_log` entry writing `fmt` (Envoy command operators) lines to `path`.
    Envoy buffers file writes; start it with `--file-flush-interval-msec` to see lines soon."""
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"text_format_source": {"inline_string": fmt}},
        },
    }


def cluster_route(cluster: str, timeout: str = "5s") -> dict:
    """A route_config sending every request to `cluster` (instead of the direct 200 "ok")."""
    return {
        "name": "local",
        "virtual_hosts": [{
            "name": "backend",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": timeout}}],
        }],
    }


def bootstrap(listeners: Iterable[dict] = (), lds_path: str | None = None,
              clusters: Iterable[dict] = ()) -> dict:
    """`clusters`: extra static clusters (e.g. `rls.grpc_cluster(...)`); none by default."""
    b: dict = {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": 0}}},
        "static_resources": {"listeners": list(listeners)},
    }
    clusters = list(clusters)
    if clusters:
        b["static_resources"]["clusters"] = clusters
    if lds_path:
        b["node"] = {"id": "e2e", "cluster": "e2e"}
        b["dynamic_resources"] = {"lds_config": {"path_config_source": {"path": lds_path}}}
    return b


def write_lds(path: Path, listeners: list[dict], version: str) -> None:
    """Atomically replace an LDS file (Envoy watches for a move onto the path)."""
    resources = []
    for l in listeners:
        r = dict(l)
        r["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
        resources.append(r)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"version_info": version, "resources": resources}, sort_keys=False))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The Envoy process


class EnvoyError(RuntimeError):
    pass


_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child (no dlopen between fork and exec)
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: Envoy gets SIGKILL if the test process dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Envoy:
    """One Envoy process. Use as a context manager or call start()/stop()."""

    def __init__(self, envoy_bin: str, workdir: Path, config: dict, *, concurrency: int = 2,
                 name: str = "envoy", log_level: str = "info", max_lifetime: float = 300.0,
                 extra_args: Iterable[str] = ()):
        self.envoy_bin = envoy_bin
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.concurrency = concurrency
        self.name = name
        self.log_level = log_level
        self.max_lifetime = max_lifetime
        self.extra_args = list(extra_args)  # more command-line flags, e.g. --file-flush-interval-msec
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self.admin_path = self.workdir / f"{name}.admin"
        self.proc: subprocess.Popen | None = None
        self.admin_port: int | None = None
        self._ports: dict[str, int] = {}
        self._watchdog: threading.Timer | None = None

    # -- lifecycle

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        for p in (self.admin_path,):
            p.unlink(missing_ok=True)
        cmd = [
            self.envoy_bin, "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            "--use-dynamic-base-id", "--base-id-path", str(self.workdir / f"{self.name}.base-id"),
            "--admin-address-path", str(self.admin_path),
            "--log-level", self.log_level,
            "--drain-time-s", "1", "--parent-shutdown-time-s", "2",
            *self.extra_args,
        ]
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._watchdog = threading.Timer(self.max_lifetime, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()

    def start(self, timeout: float = READY_TIMEOUT) -> "Envoy":
        self.spawn()
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_admin(self, timeout: float = READY_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                text = self.admin_path.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text:
                self.admin_port = int(text.rsplit(":", 1)[1])
                return self.admin_port
            time.sleep(0.05)
        raise EnvoyError(f"no admin address after {timeout}s\n{self.log_tail()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        self.wait_admin(timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                status, _ = self.admin("/ready")
                if status == 200:
                    self.refresh_ports()
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready after {timeout}s\n{self.log_tail()}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def stop(self) -> int | None:
        """SIGTERM, bounded wait, SIGKILL. Returns the exit code."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._log_file.close()
        return self.proc.returncode

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code if the process exits within `timeout`, else None (still running)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- admin

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        assert self.admin_port is not None, "admin not up"
        req = urllib.request.Request(f"http://{HOST}:{self.admin_port}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def refresh_ports(self) -> dict[str, int]:
        _, text = self.admin("/listeners?format=json")
        ports = {}
        for l in json.loads(text).get("listener_statuses", []):
            ports[l["name"]] = int(l["local_address"]["socket_address"]["port_value"])
        self._ports = ports
        return ports

    def port(self, listener: str) -> int:
        if listener not in self._ports:
            self.refresh_ports()
        return self._ports[listener]

    def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges from `/stats?format=json` (histograms skipped)."""
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + urllib.parse.quote(filter_regex)
        _, text = self.admin(path)
        out = {}
        for s in json.loads(text).get("stats", []):
            if "value" in s:
                out[s["name"]] = int(s["value"])
        return out

    def stats_text(self) -> dict[str, int]:
        """The plain-text `/stats` view (`name: value` lines), histograms skipped."""
        _, text = self.admin("/stats")
        out = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(": ")
            if name and value.lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int | None:
        return self.stats("^" + re.escape(name) + "$").get(name)

    def counter(self, short: str) -> int:
        """`wasmcustom.tenant_ratelimit.<short>`, 0 when not (yet) defined."""
        return self.stat(STAT_PREFIX + short) or 0

    def counters(self) -> dict[str, int]:
        """Every tenant_ratelimit stat, keyed by the short name."""
        return {k[len(STAT_PREFIX):]: v for k, v in self.stats("tenant_ratelimit").items()
                if k.startswith(STAT_PREFIX)}

    def prometheus(self) -> str:
        _, text = self.admin("/stats/prometheus")
        return text

    # -- log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def wasm_log_lines(self) -> list[str]:
        return [l for l in self.log_text().splitlines() if "wasm" in l.lower()]


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
    import shutil
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmds in ([["apt-get", "install", "-y", "-q", "wrk"]],
                 [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "wrk"]]):
        try:
            if all(subprocess.run(c, env=env, capture_output=True, timeout=300).returncode == 0 for c in cmds):
                break
        except (OSError, subprocess.TimeoutExpired):
            pass
    return shutil.which("wrk")


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
        self.cmd = [wrk_bin, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(duration))}s",
                    "--timeout", timeout, "-s", str(WRK_SCRIPT), f"http://{HOST}:{port}/"]
        self.env = dict(os.environ, TRL_WRK_LIMIT=str(limit), **(env or {}))
        self.duration = duration
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Wrk":
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent)
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
        for line in out.splitlines():
            if line.startswith("WRK_RESULT "):
                r = json.loads(line.split(" ", 1)[1])
                errors = {k: r[k] for k in ("connect", "read", "write", "timeout")}
                return WrkResult(r["requests"], seconds, errors, out)
        raise RuntimeError(f"wrk exited {self.proc.returncode} without a result:\n{out[-2000:]}")

    def __enter__(self) -> "Wrk":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


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
