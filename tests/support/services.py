"""The rate-limit service the `global` mode talks to: redis-server and tests/rls-server.

* `Redis`: the Debian `redis-server` on a free loopback port, no persistence, in a work dir
  (also a Redis Cluster node, with `extra_args`); `redis_bin()`, `redis_cli_bin()`.
* `build_rls_server()`: `cargo build --release` of tests/rls-server (its own target dir);
  `RLS_SERVER=/path/to/rls-server` skips the build.
* `RlsServer`: rls-server on a free loopback port with a limits list; `.stats()` reads the
  per-call counters it writes (`requests`, `hits`, `ok`, `over_limit`, `errors`);
  `no_statuses=True` makes it answer without descriptor statuses, as Limitador does;
  `stats_file=False` leaves the stats file out (the bench: no file write per call).

Every process gets SIGKILL if the Python process dies (parent-death signal), and `stop()` is
SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .envoy import HOST, die_with_parent, file_tail, free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
RLS_CRATE = REPO / "tests" / "rls-server"
RLS_BIN = RLS_CRATE / "target" / "release" / "rls-server"
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
# rls-server


def build_rls_server() -> str:
    """The rls-server binary: $RLS_SERVER, else a `cargo build --release` of tests/rls-server
    (incremental: a no-op when up to date)."""
    given = os.environ.get("RLS_SERVER")
    if given:
        return given
    cargo = shutil.which("cargo")
    if cargo is None:
        if RLS_BIN.exists():
            return str(RLS_BIN)
        raise RuntimeError("no cargo to build tests/rls-server (set RLS_SERVER)")
    p = subprocess.run([cargo, "build", "--quiet", "--release", "--manifest-path", str(RLS_CRATE / "Cargo.toml")],
                       capture_output=True, timeout=BUILD_TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"building rls-server failed:\n{p.stderr.decode(errors='replace')[-4000:]}")
    return str(RLS_BIN)


def tenant_limit(domain: str, max_value: int, seconds: int = 60, key: str = "tenant",
                 conditions: list[str] | None = None, name: str | None = None) -> dict:
    """One limitador limit: `max_value` per `seconds`, one counter per value of `key`."""
    limit = {"namespace": domain, "max_value": max_value, "seconds": seconds,
             "conditions": conditions or [], "variables": [key]}
    if name:
        limit["name"] = name
    return limit


class RlsServer:
    def __init__(self, binary: str, workdir: Path, redis_url: str, limits: list[dict], *,
                 delay_ms: int = 0, name: str = "rls", no_statuses: bool = False, stats_file: bool = True):
        self.binary = binary
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.limits = limits
        self.delay_ms = delay_ms
        self.no_statuses = no_statuses
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.limits_path = self.dir / f"{name}.limits.json"
        self.stats_path: Path | None = self.dir / f"{name}.stats.json" if stats_file else None
        self.log_path = self.dir / f"{name}.log"

    def start(self, port: int | None = None) -> "RlsServer":
        """Starts on `port` (default: the previous one if restarting, else a free one)."""
        self.limits_path.write_text(json.dumps(self.limits))
        if self.stats_path is not None:
            self.stats_path.unlink(missing_ok=True)
        for _attempt in range(3):
            self.port = port or self.port or free_port()
            start_at = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = spawn_logged(
                [self.binary, "--listen", f"{HOST}:{self.port}", "--redis", self.redis_url,
                 "--limits", str(self.limits_path), "--delay-ms", str(self.delay_ms)]
                + (["--stats-file", str(self.stats_path)] if self.stats_path is not None else [])
                + (["--no-statuses"] if self.no_statuses else []),
                self.dir, self.log_path)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                with open(self.log_path, "rb") as f:
                    f.seek(start_at)
                    if b"listening on " in f.read():
                        return self
                time.sleep(0.05)
            stop_process(self.proc)
            if port is not None:
                break
            self.port = 0
        raise RuntimeError(f"rls-server did not start\n{file_tail(self.log_path)}")

    def stop(self) -> None:
        stop_process(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stats(self) -> dict[str, int]:
        """Calls since this process started: requests (counted on arrival), hits, ok,
        over_limit, errors, cancelled (the client reset the stream before the answer)."""
        try:
            assert self.stats_path is not None, "started with stats_file=False"
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"requests": 0, "hits": 0, "ok": 0, "over_limit": 0, "errors": 0, "cancelled": 0}

    def calls(self) -> list[str]:
        """The per-call log lines (`call N domain=... descriptors=[tenant=x] -> OK/remaining=...`,
        `call N -> CANCELLED ...`)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [l for l in text.splitlines() if l.startswith("call ")]

    def log_tail(self, n: int = 30) -> str:
        return file_tail(self.log_path, n)
