"""One real Envoy on loopback ports, its bootstrap, and wrk: shared by tests/e2e, tests/deploy
and bench/. Standard library plus pyyaml (the bootstrap file).

* Builders return plain bootstrap dicts: `wasm_filter`, `native_filter` (Envoy's
  local_ratelimit keyed on x-tenant-id), `listener` (HCM -> filters -> router -> a direct 200
  "ok" unless given a route), `grpc_cluster`, `file_access_log`, `cluster_route`, `bootstrap`,
  `write_lds`. Every listener and the admin bind 127.0.0.1 port 0 unless told otherwise; the
  real ports are read back from the admin API, so parallel runs never collide.
* `Envoy` starts the process (`--use-dynamic-base-id`, admin address file, optionally under a
  wrapper such as valgrind and pinned with taskset), waits for admin `/ready`, reads the
  listener ports and stats, and always stops it: SIGTERM, then SIGKILL after a bounded wait, a
  parent-death signal so it never outlives the Python process, and a watchdog that kills it
  after `max_lifetime` seconds whatever happens.
* `wrk_command` and `wrk_result` build a wrk command line and read the one JSON line a wrk Lua
  `done()` prints; `ensure_tool` finds (or apt-installs) wrk, valgrind, redis-server.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import yaml

HOST = "127.0.0.1"
STAT_PREFIX = "wasmcustom.tenant_ratelimit."
# The filter's tick period (src/filter/mod.rs TICK_MS): it publishes its counters on the tick.
COUNTER_FLUSH_S = 1.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 10.0
# The default bucket of `native_filter`: never consumed when a tenant descriptor matches.
NATIVE_DEFAULT_TOKENS = 1_000_000_000


# --------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """A currently free loopback port (for what needs a fixed port: LDS files, services)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child (no dlopen between fork and exec)
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the thread that started it dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_process(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, a bounded wait, SIGKILL. Returns the exit code (None: never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def file_tail(path: Path, n: int = 30) -> str:
    """The last `n` lines of a log file ("" when there is none)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def ensure_tool(name: str, package: str | None = None) -> str | None:
    """The `name` binary, installed with apt-get (`package`, default `name`) when missing and
    possible (root, Debian). None when it cannot be had."""
    path = shutil.which(name)
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", package or name]
    for cmds in ([install], [["apt-get", "update", "-q"], install]):
        try:
            if all(subprocess.run(c, env=env, capture_output=True, timeout=300).returncode == 0 for c in cmds):
                break
        except (OSError, subprocess.TimeoutExpired):
            pass
    return shutil.which(name)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat), in clock ticks; 0
    when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------------------------
# Bootstrap builders


def wasm_filter(plugin_config: Any, wasm: str | Path, root_id: str = "tenant_ratelimit",
                vm_id: str = "tenant_ratelimit", name: str = "tenant_ratelimit") -> dict:
    """The envoy.filters.http.wasm entry; `plugin_config` is a dict (sent as JSON) or a raw str."""
    value = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": root_id,
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": value,
                },
            },
        },
    }


def native_filter(stat_prefix: str, max_tokens: int, per_second: int, max_descriptors: int) -> dict:
    """Envoy's local_ratelimit with one dynamic bucket per x-tenant-id (`max_tokens`, refilled
    `per_second` each second, at most `max_descriptors` buckets, LRU), always enforced."""
    bucket = {"max_tokens": max_tokens, "tokens_per_fill": per_second, "fill_interval": "1s"}
    full = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": stat_prefix,
            "token_bucket": {"max_tokens": NATIVE_DEFAULT_TOKENS, "tokens_per_fill": NATIVE_DEFAULT_TOKENS,
                             "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": f"{stat_prefix}_enabled", "default_value": full},
            "filter_enforced": {"runtime_key": f"{stat_prefix}_enforced", "default_value": full},
            "always_consume_default_token_bucket": False,
            "rate_limits": [{"actions": [{"request_headers": {"header_name": "x-tenant-id", "descriptor_key": "tenant"}}]}],
            # An entry without a value is a wildcard: one dynamic bucket per distinct tenant.
            "descriptors": [{"entries": [{"key": "tenant"}], "token_bucket": bucket}],
            "max_dynamic_descriptors": max_descriptors,
        },
    }


ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def direct_route(virtual_host: str = "backend") -> dict:
    """A route_config answering every request with a direct 200 "ok" (no upstream)."""
    return {
        "name": "local",
        "virtual_hosts": [{
            "name": virtual_host,
            "domains": ["*"],
            "routes": [{
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
            }],
        }],
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


def listener(name: str, http_filters: Iterable[dict], *, port: int = 0, stat_prefix: str | None = None,
             route_config: dict | None = None, hcm_extra: dict | None = None,
             transport_socket: dict | None = None) -> dict:
    """A listener on 127.0.0.1:`port`: HCM (stat prefix `name`) -> `http_filters` -> router,
    with `route_config` (default: the direct 200 "ok"). `stat_prefix` also names the
    listener's own stats (listener.<prefix>.*) when given."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": route_config or direct_route(),
        "http_filters": [*http_filters, ROUTER],
    }
    hcm.update(hcm_extra or {})
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if transport_socket:
        chain["transport_socket"] = transport_socket
    out: dict = {"name": name}
    if stat_prefix:
        out["stat_prefix"] = stat_prefix
    out["address"] = {"socket_address": {"address": HOST, "port_value": port}}
    out["filter_chains"] = [chain]
    return out


def grpc_cluster(name: str, port: int, connect_timeout: str = "1s") -> dict:
    """A STATIC HTTP/2 cluster at 127.0.0.1:`port` (for gRPC calls from the filter)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": HOST, "port_value": port}}}}]}],
        },
    }


def file_access_log(path: Path | str, fmt: str | None = None) -> dict:
    """An `access_log` entry writing to `path`, in `fmt` (Envoy command operators) when given.
    Envoy buffers file writes; start it with `--file-flush-interval-msec` to see lines soon."""
    typed = {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path),
    }
    if fmt is not None:
        typed["log_format"] = {"text_format_source": {"inline_string": fmt}}
    return {"name": "envoy.access_loggers.file", "typed_config": typed}


def bootstrap(listeners: Iterable[dict] = (), lds_path: str | None = None, clusters: Iterable[dict] = (),
              admin_access_log: Path | str | None = None) -> dict:
    """Admin on 127.0.0.1 port 0 (its requests logged to `admin_access_log` when given), static
    `listeners` and `clusters`, and listeners from the LDS file `lds_path` when given."""
    admin: dict = {}
    if admin_access_log is not None:
        admin["access_log"] = [file_access_log(admin_access_log)]
    admin["address"] = {"socket_address": {"address": HOST, "port_value": 0}}
    b: dict = {"admin": admin, "static_resources": {"listeners": list(listeners)}}
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


class Envoy:
    """One Envoy process. Use as a context manager or call start()/stop().

    `wrap` runs Envoy under another program that execs or traces it in the same process (e.g.
    valgrind); `cpus` pins it with `taskset -c` (which execs Envoy: same pid). Its stdout and
    stderr go to `<name>.log` in `workdir`. `max_lifetime=None` turns the watchdog off (the
    bench's long runs stop their Envoys themselves)."""

    def __init__(self, envoy_bin: str, workdir: Path, config: dict, *, concurrency: int = 2,
                 name: str = "envoy", log_level: str = "info", max_lifetime: float | None = 300.0,
                 extra_args: Iterable[str] = (), wrap: Iterable[str] = (), cpus: str | None = None,
                 ready_timeout: float = READY_TIMEOUT):
        self.envoy_bin = envoy_bin
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.concurrency = concurrency
        self.name = name
        self.log_level = log_level
        self.max_lifetime = max_lifetime
        self.extra_args = list(extra_args)  # more command-line flags, e.g. --file-flush-interval-msec
        self.wrap = list(wrap)
        self.cpus = cpus
        self.ready_timeout = ready_timeout
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self.admin_path = self.workdir / f"{name}.admin"
        self.proc: subprocess.Popen | None = None
        self.admin_port: int | None = None
        self._ports: dict[str, int] = {}
        self._watchdog: threading.Timer | None = None
        self._log_file = None

    # -- lifecycle

    def command(self) -> list[str]:
        cmd = [
            self.envoy_bin, "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            "--use-dynamic-base-id", "--base-id-path", str(self.workdir / f"{self.name}.base-id"),
            "--admin-address-path", str(self.admin_path),
            "--log-level", self.log_level,
            "--drain-time-s", "1", "--parent-shutdown-time-s", "2",
            *self.extra_args,
        ]
        cmd = self.wrap + cmd
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        return cmd

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.admin_path.unlink(missing_ok=True)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        if self.max_lifetime is not None:
            self._watchdog = threading.Timer(self.max_lifetime, self._kill)
            self._watchdog.daemon = True
            self._watchdog.start()

    def start(self, timeout: float | None = None) -> "Envoy":
        self.spawn()
        try:
            self.wait_ready(self.ready_timeout if timeout is None else timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise EnvoyError(f"envoy exited with {self.proc.returncode}\n{self.log_tail()}")

    def wait_admin(self, timeout: float = READY_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
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
            self._check_alive()
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
        code = stop_process(self.proc)
        if self._log_file is not None:
            self._log_file.close()
        return code

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

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def cpu_ticks(self) -> int:
        return cpu_ticks(self.pid)

    def rss_kib(self) -> int:
        return vm_rss_kib(self.pid)

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

    def url(self, listener: str) -> str:
        return f"http://{HOST}:{self.port(listener)}/"

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
        """`wasmcustom.tenant_ratelimit.<short>` once published (`wait_flush`), 0 when not
        defined."""
        return self.wait_flush().get(short, 0)

    def counters(self, settled: bool = True) -> dict[str, int]:
        """Every tenant_ratelimit stat, keyed by the short name: once published (`wait_flush`),
        or as they are now (`settled=False`, for polling while load runs)."""
        if settled:
            return self.wait_flush()
        return {k[len(STAT_PREFIX):]: v for k, v in self.stats("tenant_ratelimit").items()
                if k.startswith(STAT_PREFIX)}

    def wait_flush(self, timeout: float = 30.0) -> dict[str, int]:
        """Waits until the filter has handed Envoy every count of the requests finished so far,
        and returns the tenant_ratelimit stats (short names). The filter counts per worker and
        publishes on its tick, every COUNTER_FLUSH_S on each worker (README "Stats"): values
        unchanged over more than one period mean every worker ticked in that window with
        nothing older left to publish. Fails after `timeout` if they never settle."""
        deadline = time.monotonic() + timeout
        last, since = self.counters(settled=False), time.monotonic()
        while True:
            time.sleep(0.2)
            now, t = self.counters(settled=False), time.monotonic()
            if now != last:
                last, since = now, t
            elif t - since > COUNTER_FLUSH_S * 1.3:
                return now
            if t > deadline:
                raise AssertionError(f"tenant_ratelimit stats still changing after {timeout} s: {now}")

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


# --------------------------------------------------------------------------------------------
# wrk


def wrk_command(wrk_bin: str, url: str, script: Path | str, *, threads: int, connections: int, seconds: float,
                timeout: str = "5s", latency: bool = False, args: Iterable[Any] = (),
                cpus: str | None = None) -> list[str]:
    """A bounded wrk run (`-d` whole seconds, at least 1) of a Lua `script` against `url`;
    `args` go to the script's `init`, `cpus` pins wrk with taskset."""
    cmd = [wrk_bin, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(seconds))}s"]
    if latency:
        cmd.append("--latency")
    cmd += ["--timeout", timeout, "-s", str(script), url]
    args = [str(a) for a in args]
    if args:
        cmd += ["--", *args]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus] + cmd
    return cmd


def wrk_result(output: str, marker: str) -> dict | None:
    """The JSON object on the line `<marker> {...}` a wrk Lua `done()` printed, None if none."""
    for line in output.splitlines():
        if line.startswith(marker + " "):
            return json.loads(line[len(marker) + 1:])
    return None
