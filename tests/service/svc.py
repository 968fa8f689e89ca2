"""Processes for the service tests: tenant-ratelimit-service, a Redis Cluster of 3 masters +
3 replicas, all on loopback ports picked at start, stopped by pid at the end.

* `build_service()`: `$SERVICE`, else `cargo build --profile service -p tenant-ratelimit-service`.
* `Service`: the service with a config dict; `.hup(config)`, `.term()`, `.metrics()`.
* `RedisCluster`: six `redis-server --cluster-enabled yes`, joined with
  `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from e2e.harness import HOST  # noqa: F401  (also puts the repository root on sys.path)
from tests.support.envoy import die_with_parent, file_tail, free_port, stop_process
from tests.support.services import Redis, redis_bin, redis_cli_bin  # noqa: F401  (Redis: re-exported)

REPO = Path(__file__).resolve().parents[2]
# `make service` builds with the `service` profile and copies the binary to target/release/.
SERVICE_BIN = REPO / "target" / "service" / "tenant-ratelimit-service"
START_TIMEOUT = 20.0
BUILD_TIMEOUT = 1800.0


def build_service() -> str:
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


class Service:
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
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [self.binary, "--listen", f"{HOST}:{self.port}", *self.redis_args, "--config", str(self.config_path),
                 "--metrics", f"{HOST}:{self.metrics_port}", "--log-level", "info", *self.extra],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)
            log.close()
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

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, line_prefix: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def http(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def redis_server() -> str | None:
    return redis_bin()


def redis_cli() -> str | None:
    return redis_cli_bin()


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
