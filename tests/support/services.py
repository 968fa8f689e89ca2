"""The rate-limit service the `global` mode talks to: redis-server and tenant-ratelimit-service.

* `Redis`: the Debian `redis-server` on a free loopback port, no persistence, in a work dir
  (also a Redis Cluster node, with `extra_args`); `redis_bin()`, `redis_cli_bin()`.
* `RedisCluster`: 3 masters + 3 replicas (six `Redis`), joined with `redis-cli --cluster create`.
* `build_service()`: `$SERVICE`, else `cargo build --profile service -p tenant-ratelimit-service`.
* `Service`: the service (service/, docs/service.md) with a config dict; `.stats()` reads its
  call counters from `/metrics`; `.hup(config)`, `.metrics()`, `.metric(name)`.

Every process gets SIGKILL if the Python process dies (parent-death signal), and `stop()` is
SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .envoy import HOST, die_with_parent, file_tail, free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
# `make service` builds with the `service` profile (and copies the binary to target/release/).
SERVICE_BIN = REPO / "target" / "service" / "tenant-ratelimit-service"
START_TIMEOUT = 20.0
BUILD_TIMEOUT = 1800.0


def spawn_logged(cmd: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """A service process in `cwd`, its output appended to `log_path`, SIGKILLed with us."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)


# --------------------------------------------------------------------------------------------
# Redis


def redis_bin() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)


def redis_cli_bin() -> str | None:
    return shutil.which("redis-cli") or ("/usr/bin/redis-cli" if os.access("/usr/bin/redis-cli", os.X_OK) else None)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    rng = random.Random()
    while True:
        p = rng.randrange(20000, 55535)
        if _port_free(p) and _port_free(p + 10000):
            return p


class Redis:
    """One redis-server on loopback, no persistence, in a work dir. `extra_args` go on its
    command line (e.g. `--cluster-enabled yes`); `start()` after `stop()`/`kill()` reuses the
    port, so clients reconnect to the same address."""

    def __init__(self, workdir: Path, binary: str, extra_args: list[str] | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.extra_args = extra_args or []
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """One RESP command, the raw first reply line (enough for PING / DBSIZE / FLUSHALL)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        with socket.create_connection((HOST, self.port), timeout=timeout) as s:
            s.sendall(payload)
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.strip()

    def cli(self, *args: str) -> str:
        """`redis-cli` against this node: the whole (multi-line) reply as text."""
        p = subprocess.run([redis_cli_bin() or "redis-cli", "-h", HOST, "-p", str(self.port), *args],
                           capture_output=True, timeout=5)
        return p.stdout.decode(errors="replace").strip()

    def commandstats(self) -> dict[str, int]:
        """Calls per command on this node (INFO commandstats: also the commands a Lua script
        runs), without INFO itself (the probe's own)."""
        out = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            name, _, rest = line.partition(":")
            if name.startswith("cmdstat_") and name != "cmdstat_info" and rest.startswith("calls="):
                out[name.removeprefix("cmdstat_")] = int(rest.split(",", 1)[0].removeprefix("calls="))
        return out

    def start(self) -> "Redis":
        fixed = self.port
        cluster = "--cluster-enabled" in self.extra_args
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = fixed or (free_cluster_port() if cluster else free_port())
            self.proc = spawn_logged(
                [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir), "--protected-mode", "yes", "--daemonize", "no", *self.extra_args],
                self.dir, self.log_path)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.command("PING") == b"+PONG":
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            stop_process(self.proc)
        raise RuntimeError(f"redis-server did not start\n{file_tail(self.log_path)}")

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------------------------
# Redis Cluster


class RedisCluster:
    """3 masters + 3 replicas on loopback. `cluster-node-timeout` 1000 ms so a replica takes
    over a failed master within a few seconds."""

    def __init__(self, workdir: Path, server: str, cli: str):
        self.dir = Path(workdir)
        self.server = server
        self.cli = cli
        self.nodes: list[Redis] = []

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> "RedisCluster":
        for i in range(6):
            node = Redis(self.dir / f"n{i}", self.server,
                         ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "1000",
                          # A replica may always take over (the test kills a master on purpose).
                          "--cluster-replica-validity-factor", "0",
                          "--repl-diskless-sync-delay", "0"])
            self.nodes.append(node.start())
        p = subprocess.run([self.cli, "--cluster", "create", *[f"{HOST}:{n.port}" for n in self.nodes],
                            "--cluster-replicas", "1", "--cluster-yes"],
                           capture_output=True, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {p.stdout[-2000:]!r} {p.stderr[-2000:]!r}")
        self.wait_ok()
        # Replicas in sync (a replica without the data would come back empty on failover).
        deadline = time.monotonic() + 30
        for n in self.nodes:
            while True:
                info = n.cli("INFO", "replication")
                if "role:master" in info or "master_link_status:up" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {n.port} not in sync: {info}")
                time.sleep(0.1)
        return self

    def info(self, node: Redis, *args: str) -> str:
        p = subprocess.run([self.cli, "-h", HOST, "-p", str(node.port), *args], capture_output=True, timeout=5)
        return p.stdout.decode(errors="replace")

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            states = [self.info(n, "cluster", "info") for n in live]
            if all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.2)

    def master_of(self, key: str) -> Redis:
        slot = int(self.info(self.nodes[0], "cluster", "keyslot", key).strip())
        for line in self.info(self.nodes[0], "cluster", "nodes").splitlines():
            parts = line.split()
            if "master" in parts[2] and "fail" not in parts[2]:
                for rng in parts[8:]:
                    lo, _, hi = rng.partition("-")
                    if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                        port = int(re.split("[:@]", parts[1])[1])
                        return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no master for slot {slot}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


# --------------------------------------------------------------------------------------------
# tenant-ratelimit-service


def build_service() -> str:
    """The service binary: $SERVICE, else `cargo build --profile service` (incremental: a
    no-op when up to date)."""
    given = os.environ.get("SERVICE")
    if given:
        return given
    cargo = shutil.which("cargo")
    if cargo is None:
        if SERVICE_BIN.exists():
            return str(SERVICE_BIN)
        raise RuntimeError("no cargo to build the service (set SERVICE)")
    p = subprocess.run([cargo, "build", "--quiet", "--profile", "service", "-p", "tenant-ratelimit-service"],
                       cwd=REPO, capture_output=True, timeout=BUILD_TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"building the service failed:\n{p.stderr.decode(errors='replace')[-4000:]}")
    return str(SERVICE_BIN)


class Fleet:
    """Service processes started in one work dir and stopped together: the body of a
    module-scoped factory fixture (`yield fleet.make`, then `fleet.stop()`)."""

    def __init__(self, binary: str, workdir: Path):
        self.binary = binary
        self.workdir = Path(workdir)
        self.started: list[Service] = []

    def make(self, redis_args: list[str], config: dict, *, start: bool = True,
             extra: list[str] | None = None) -> "Service":
        s = Service(self.binary, self.workdir, redis_args, config, name=f"svc{len(self.started)}", extra=extra)
        self.started.append(s)
        if start:
            s.start()
        return s

    def stop(self) -> None:
        for s in self.started:
            s.stop()


def global_section(domain: str, **kw) -> dict:
    """The filter's `global` config for the test services: timeout 2 s and failure_mode deny,
    so a slow answer on a loaded box never turns into an extra admission."""
    g = {"cluster": "ratelimit", "domain": domain, "timeout_ms": 2000, "failure_mode": "deny", "mode": "global"}
    g.update(kw)
    return g


class Service:
    """tenant-ratelimit-service with a config dict (`{"domains": {...}}`, docs/service.md) on
    free loopback ports (gRPC `port`, `/metrics` on `metrics_port`)."""

    def __init__(self, binary: str, workdir: Path, redis_args: list[str], config: dict, *,
                 name: str = "svc", extra: list[str] | None = None):
        self.binary = binary
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis_args = redis_args
        self.config = config
        self.name = name
        self.extra = extra or []
        self.port = 0
        self.metrics_port = 0
        self.proc: subprocess.Popen | None = None
        self.config_path = self.dir / f"{name}.json"
        self.log_path = self.dir / f"{name}.log"

    def write_config(self, config: dict | None = None) -> None:
        if config is not None:
            self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config))
        tmp.replace(self.config_path)

    def start(self) -> "Service":
        """Starts on free ports, or on the previous ones when restarting (the Envoy cluster
        keeps pointing at them)."""
        self.write_config()
        fixed = (self.port, self.metrics_port) if self.port else None
        for _attempt in range(3):
            self.port, self.metrics_port = fixed or (free_port(), free_port())
            start_at = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = spawn_logged(
                [self.binary, "--listen", f"{HOST}:{self.port}", *self.redis_args, "--config", str(self.config_path),
                 "--metrics", f"{HOST}:{self.metrics_port}", "--log-level", "info", *self.extra],
                self.dir, self.log_path)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                with open(self.log_path, "rb") as f:
                    f.seek(start_at)
                    if b"listening on " in f.read():
                        return self
                time.sleep(0.05)
            stop_process(self.proc)
        raise RuntimeError(f"{self.name} did not start\n{file_tail(self.log_path)}")

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def hup(self, config: dict) -> None:
        """Rewrites the config and sends SIGHUP; returns once the reload is logged."""
        before = self.log_text().count("config reload")
        self.write_config(config)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while self.log_text().count("config reload") == before:
            assert time.monotonic() < deadline, f"no reload logged\n{file_tail(self.log_path)}"
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 30) -> str:
        return file_tail(self.log_path, n)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, line_prefix: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stats(self) -> dict[str, int]:
        """Calls since this process started, from `/metrics`: `requests` (all answered calls),
        `ok`, `over_limit`, `errors` (`redis_error` + `refused`), `hits` (tokens requested:
        the sum of the decided descriptors' costs), `redis_commands`."""
        calls: dict[str, int] = {}
        hits = commands = 0
        for line in self.metrics().splitlines():
            if line.startswith("trl_service_calls_total{result=\""):
                result = line.split('"', 2)[1]
                calls[result] = int(float(line.rsplit(" ", 1)[1]))
            elif line.startswith("trl_service_hits_total "):
                hits += int(float(line.rsplit(" ", 1)[1]))
            elif line.startswith("trl_service_redis_commands_total "):
                commands = int(float(line.rsplit(" ", 1)[1]))
        return {"requests": sum(calls.values()), "ok": calls.get("ok", 0), "over_limit": calls.get("over_limit", 0),
                "errors": calls.get("redis_error", 0) + calls.get("refused", 0), "hits": hits,
                "redis_commands": commands}

    def http(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
