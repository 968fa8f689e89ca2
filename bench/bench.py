#!/usr/bin/env python3
"""tenant-ratelimit benchmark: a program that reports numbers, not a test.

One real Envoy (V8 runtime, one worker pinned to one core, wrk pinned to the other) serves
several loopback listeners from ONE bootstrap, all answering with a direct response:

  none        no HTTP filter besides the router
  native      envoy.filters.http.local_ratelimit, per-tenant (x-tenant-id) dynamic descriptors,
              buckets too large to ever deny
  floor       a no-op proxy-wasm filter (bench/noop): the cost of running *a* Wasm filter
  ours        tenant-ratelimit, bucket too large to deny, rate_limit_headers "off"
  ours_hdrs   tenant-ratelimit, same, rate_limit_headers "x-ratelimit"

Metric: Envoy CPU microseconds per request = delta of utime+stime of the Envoy process
(/proc/<pid>/stat) over a wrk run / requests wrk completed; also requests/s and p50/p99
latency. Rounds are interleaved (each round visits every listener and connection count).
Then: admission accuracy at 2 and 4 workers, tenant spread, memory per tenant, .wasm sizes.

  ENVOY_BIN=... WASM=... python bench/bench.py            # full run -> bench/RESULTS.md, bench/*.png
  ENVOY_BIN=... WASM=... python bench/bench.py --smoke    # every code path in seconds -> bench/out/smoke/
  ENVOY_BIN=... python bench/bench.py --ab NAME=PATH.wasm[:CONFIGJSON] ... [--rounds 7] [--seconds 4]
      # A/B quick mode: only CPU us/request at 16 connections, the floor and each variant (its own
      # listener and vm_id) in one Envoy; prints a table (WASM is not needed). CONFIGJSON defaults to
      # the full run's `ours` config (bucket too large to deny, headers off).
  ENVOY_BIN=... WASM=... python bench/bench.py --only global [--smoke]
      # only the global-limits phase (below); replaces or appends the `## Global limits` section of
      # RESULTS.md (bench/ or bench/out/smoke/) and leaves the other sections alone.

Global limits phase (full run, --smoke, --only global): our filter with `global` mode "global",
"both", and lease_tokens 10 and 100, against local only; one Envoy, one listener each, a
`ratelimit` cluster to one tests/rls-server (RLS_SERVER, else tests/rls-server/target/release/
rls-server) on one redis-server, both started on free loopback ports and stopped at exit. Without
either binary the phase prints one line saying why it was skipped, and the rest still runs.

The smoke run exits 0 whenever the measurements ran: it reports, it never asserts performance.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
NOOP_MANIFEST = BENCH_DIR / "noop" / "Cargo.toml"
NOOP_WASM = BENCH_DIR / "noop" / "target" / "wasm32-wasip1" / "release" / "bench_noop.wasm"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PERF_LISTENERS = ["none", "native", "floor", "ours", "ours_hdrs"]
LABELS = {
    "none": "no filter",
    "native": "native local_ratelimit",
    "floor": "no-op Wasm (floor)",
    "ours": "ours, headers off",
    "ours_hdrs": "ours, headers on",
}
SPREAD_LISTENERS = ["native", "floor", "ours"]
HUGE = 1_000_000_000  # tokens: a bucket that never denies during a run

# Targets from the issue, reported against (not asserted).
TARGET_OFF_MAX, TARGET_OFF_AIM, TARGET_HDRS_MAX, TARGET_P99_ADDED_US = 1.15, 1.05, 1.25, 100.0


# --------------------------------------------------------------------------------------------
# child processes: every Envoy and wrk we start is killed on exit, even on error


CHILDREN: list[subprocess.Popen] = []


def _kill_children() -> None:
    for p in CHILDREN:
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(timeout=5)
            except Exception:
                try:
                    p.kill()
                    p.wait(timeout=5)
                except Exception:
                    pass
    CHILDREN.clear()


atexit.register(_kill_children)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, **kw)
    CHILDREN.append(p)
    return p


def reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    if p in CHILDREN:
        CHILDREN.remove(p)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# tools


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    log("wrk not found: apt-get install -y wrk")
    apt = ["apt-get", "install", "-y", "-q", "wrk"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(apt, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(apt, env=env, stdout=subprocess.DEVNULL, check=True)
    path = shutil.which("wrk")
    if not path:
        sys.exit("bench: wrk is required (apt-get install wrk)")
    return path


def build_noop() -> Path:
    log("building bench/noop (the no-op Wasm floor)")
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path", str(NOOP_MANIFEST)],
        check=True,
    )
    return NOOP_WASM


def cmd_out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip()
    except Exception as e:  # a version string is informative, never fatal
        return f"unavailable ({e})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# Envoy bootstrap


def hcm(stat_prefix: str, http_filters: list[dict]) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": "local",
                "virtual_hosts": [
                    {
                        "name": "backend",
                        "domains": ["*"],
                        "routes": [
                            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
                        ],
                    }
                ],
            },
            "http_filters": http_filters
            + [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        },
    }


def listener(name: str, http_filters: list[dict]) -> dict:
    # port 0: the kernel picks a free loopback port; we read it back from the admin API.
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [hcm(name, http_filters)]}],
    }


def wasm_filter(vm_id: str, wasm: Path, configuration: str) -> dict:
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": vm_id,
                "root_id": vm_id,
                "vm_config": {
                    "vm_id": vm_id,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm)}},
                },
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
            },
        },
    }


def ours_filter(vm_id: str, wasm: Path, capacity: int, refill: int, headers: str, max_tenants: int) -> dict:
    conf = {"capacity": capacity, "refill_rate": refill, "rate_limit_headers": headers, "max_tenants": max_tenants}
    return wasm_filter(vm_id, wasm, json.dumps(conf))


def native_filter(stat_prefix: str, max_tokens: int, per_second: int, max_descriptors: int) -> dict:
    bucket = {"max_tokens": max_tokens, "tokens_per_fill": per_second, "fill_interval": "1s"}
    full = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": stat_prefix,
            # The default bucket is never consumed when a tenant descriptor matches.
            "token_bucket": {"max_tokens": HUGE, "tokens_per_fill": HUGE, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": f"{stat_prefix}_enabled", "default_value": full},
            "filter_enforced": {"runtime_key": f"{stat_prefix}_enforced", "default_value": full},
            "always_consume_default_token_bucket": False,
            "rate_limits": [{"actions": [{"request_headers": {"header_name": "x-tenant-id", "descriptor_key": "tenant"}}]}],
            # An entry without a value is a wildcard: one dynamic bucket per distinct tenant (LRU-bounded).
            "descriptors": [{"entries": [{"key": "tenant"}], "token_bucket": bucket}],
            "max_dynamic_descriptors": max_descriptors,
        },
    }


def bootstrap(admin_log: Path, listeners: list[dict], clusters: list[dict] | None = None) -> dict:
    b = {
        "admin": {
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": str(admin_log),
                    },
                }
            ],
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        },
        "static_resources": {"listeners": listeners},
    }
    if clusters:
        b["static_resources"]["clusters"] = clusters
    return b


class Envoy:
    """One Envoy process on loopback; listener ports and the admin port are read back."""

    def __init__(self, envoy_bin: str, workdir: Path, name: str, listeners: list[dict], concurrency: int, cpus: str | None,
                 clusters: list[dict] | None = None, wrap: list[str] | None = None, ready_timeout: float = 60):
        self.workdir = workdir
        self.name = name
        cfg_path = workdir / f"{name}.yaml"
        cfg = bootstrap(workdir / f"{name}.admin.log", listeners, clusters)
        cfg_path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        self.admin_path = workdir / f"{name}.admin_address"
        self.admin_path.unlink(missing_ok=True)
        self.log_path = workdir / f"{name}.log"
        cmd = [
            envoy_bin,
            "-c", str(cfg_path),
            "--concurrency", str(concurrency),
            "--use-dynamic-base-id",
            "--admin-address-path", str(self.admin_path),
            "--log-level", "warn",
            "--log-path", str(self.log_path),
        ]  # fmt: skip
        if wrap:
            cmd = wrap + cmd  # e.g. valgrind: it runs Envoy in its own process, same pid
        if cpus is not None:
            cmd = ["taskset", "-c", cpus] + cmd  # taskset execs Envoy: same pid
        self.ready_timeout = ready_timeout
        self.proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.admin = self._wait_ready(len(listeners))
        self.ports = self._ports()

    def _fail(self, why: str):
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        reap(self.proc)
        raise RuntimeError(f"envoy {self.name}: {why}\n--- envoy log tail ---\n{tail}")

    def _wait_ready(self, n_listeners: int) -> str:
        deadline = time.monotonic() + self.ready_timeout
        admin = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode}")
            if admin is None and self.admin_path.exists():
                text = self.admin_path.read_text().strip()
                admin = f"http://{text}" if text else None
            if admin:
                try:
                    with urllib.request.urlopen(f"{admin}/ready", timeout=2) as r:
                        if r.status == 200:
                            return admin
                except Exception:
                    pass
            time.sleep(0.05)
        self._fail(f"not ready within {self.ready_timeout:.0f} s")
        raise AssertionError  # unreachable

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.admin}{path}", timeout=10) as r:
            return r.read().decode()

    def _ports(self) -> dict[str, int]:
        data = json.loads(self.get("/listeners?format=json"))
        return {
            s["name"]: int(s["local_address"]["socket_address"]["port_value"]) for s in data.get("listener_statuses", [])
        }

    def url(self, listener_name: str) -> str:
        return f"http://127.0.0.1:{self.ports[listener_name]}/"

    def cpu_ticks(self) -> int:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stat(self, name: str) -> int:
        """One counter or gauge by exact name (0 when absent)."""
        for line in self.get(f"/stats?filter=^{name.replace('.', '[.]')}$").splitlines():
            k, _, v = line.partition(":")
            if k.strip() == name:
                try:
                    return int(v.strip())
                except ValueError:
                    return 0
        return 0

    def stop(self):
        reap(self.proc)


def http_get(url: str, tenant: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"x-tenant-id": tenant})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


# --------------------------------------------------------------------------------------------
# wrk

LUA_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p99_us\":%d,\"mean_us\":%f," ..
    "\"err_connect\":%d,\"err_read\":%d,\"err_write\":%d,\"err_status\":%d,\"err_timeout\":%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

# One hot tenant: a static header, so wrk does no per-request Lua work.
LUA_STATIC = 'wrk.headers["x-tenant-id"] = "tenant-1"\n' + LUA_DONE

# Rotate among N tenants (args: N).
LUA_SPREAD = (
    r"""
local n, i = 1, 0
local hdrs = {}
function init(args)
  n = tonumber(args[1]) or 1
end
function request()
  i = i % n + 1
  hdrs["x-tenant-id"] = "tenant-" .. i
  return wrk.format(nil, nil, hdrs)
end
"""
    + LUA_DONE
)

# Distinct tenants, one after another (args: prefix, first id, count); the thread stops after
# `count` responses.
LUA_DISTINCT = (
    r"""
local prefix, nxt, count, seen = "m", 0, 1, 0
local hdrs = {}
function init(args)
  prefix = args[1]; nxt = tonumber(args[2]); count = tonumber(args[3])
end
function request()
  hdrs["x-tenant-id"] = prefix .. nxt
  nxt = nxt + 1
  return wrk.format(nil, nil, hdrs)
end
function response(status, headers, body)
  seen = seen + 1
  if seen == count then
    -- thread:stop() ends this thread, but wrk's main thread sleeps for the whole -d; the
    -- driver sees this line and sends SIGINT, on which wrk prints its summary at once.
    io.write("BENCHSTOP\n"); io.flush()
    wrk.thread:stop()
  end
end
"""
    + LUA_DONE
)


class Wrk:
    def __init__(self, wrk_bin: str, workdir: Path, cpus: str | None):
        self.bin = wrk_bin
        self.cpus = cpus
        self.scripts = {}
        for name, text in {"static": LUA_STATIC, "spread": LUA_SPREAD, "distinct": LUA_DISTINCT}.items():
            p = workdir / f"wrk_{name}.lua"
            p.write_text(text)
            self.scripts[name] = p

    def run(self, url: str, conns: int, seconds: int, script: str, args=(), threads: int = 1, pin: bool = True) -> dict:
        cmd = [self.bin, "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--latency", "--timeout", "5s"]
        cmd += ["-s", str(self.scripts[script]), url]
        if args:
            cmd += ["--"] + [str(a) for a in args]
        if pin and self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        p = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        watchdog = threading.Timer(seconds + 60, p.kill)  # wrk is bounded in time, whatever happens
        watchdog.start()
        try:
            for line in p.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if line.startswith("BENCHSTOP"):
                    p.send_signal(signal.SIGINT)
            p.wait(timeout=10)
        finally:
            watchdog.cancel()
            reap(p)
        out = "".join(lines)
        for line in out.splitlines():
            if line.startswith("BENCHJSON "):
                return json.loads(line[len("BENCHJSON ") :])
        raise RuntimeError(f"wrk produced no summary (exit {p.returncode}):\n{out[-2000:]}")


def machine_busy_ticks() -> int:
    """All CPUs' non-idle time (/proc/stat), in clock ticks."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - (f[4] if len(f) > 4 else 0)  # minus idle and iowait


def measure(envoy: Envoy, wrk: Wrk, name: str, conns: int, seconds: int, script="static", args=()) -> dict:
    m0, t0 = machine_busy_ticks(), envoy.cpu_ticks()
    w = wrk.run(envoy.url(name), conns, seconds, script, args)
    t1, m1 = envoy.cpu_ticks(), machine_busy_ticks()
    cpu_us = (t1 - t0) * 1e6 / CLK_TCK
    reqs = max(w["requests"], 1)
    dur_s = max(w["duration_us"], 1) / 1e6
    errors = w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"]
    return {
        "listener": name,
        "conns": conns,
        "requests": w["requests"],
        "cpu_us_per_req": cpu_us / reqs,
        "rps": w["requests"] / dur_s,
        "p50_us": w["p50_us"],
        "p99_us": w["p99_us"],
        "envoy_cpu_util": cpu_us / 1e6 / dur_s,
        # CPUs busy with anything but Envoy (wrk itself is at most ~1): above 1 means other load.
        "other_cpu": ((m1 - m0) - (t1 - t0)) / CLK_TCK / dur_s,
        "non2xx": w["err_status"],
        "socket_errors": errors,
    }


# --------------------------------------------------------------------------------------------
# statistics


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(samples: list[dict], key: str) -> tuple[float, float, float]:
    xs = [s[key] for s in samples]
    return med(xs), min(xs), max(xs)


def paired_ratios(rows: list[dict], num: str, den: str, key: str) -> list[float]:
    """Per-round ratios num/den (both measured in the same round)."""
    by_round = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["listener"]] = r[key]
    return [v[num] / v[den] for v in by_round.values() if num in v and den in v and v[den] > 0] or [float("nan")]


def div(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a 1-second smoke run on a busy machine can see 0 CPU ticks)."""
    return a / b if b else float("nan")


def fmt_range(m, lo, hi, nd=2) -> str:
    return f"{m:.{nd}f} ({lo:.{nd}f}-{hi:.{nd}f})"


# --------------------------------------------------------------------------------------------
# phases


def phase_perf(envoy: Envoy, wrk: Wrk, conns_list, rounds: int, seconds: int, warm_s: int) -> list[dict]:
    if warm_s:
        log(f"warm-up: {warm_s} s per listener")
        for name in PERF_LISTENERS:
            wrk.run(envoy.url(name), 16, warm_s, "static")
    rows = []
    n = len(PERF_LISTENERS)
    for rnd in range(rounds):
        order = PERF_LISTENERS[rnd % n :] + PERF_LISTENERS[: rnd % n]  # rotate to spread drift
        for conns in conns_list:
            for name in order:
                r = measure(envoy, wrk, name, conns, seconds)
                r["round"] = rnd
                rows.append(r)
            line = ", ".join(
                f"{x['listener']} {x['cpu_us_per_req']:.2f}"
                for x in rows
                if x["round"] == rnd and x["conns"] == conns
            )
            log(f"round {rnd + 1}/{rounds} c={conns}: us/req {line}")
    return rows


def phase_spread(envoy: Envoy, wrk: Wrk, tenant_counts, rounds: int, seconds: int, conns: int, warm_s: int) -> list[dict]:
    rows = []
    for nt in tenant_counts if warm_s else []:  # create every bucket before the first round
        for name in SPREAD_LISTENERS:
            wrk.run(envoy.url(name), conns, warm_s, "spread", (nt,))
    for rnd in range(rounds):
        for nt in tenant_counts:
            for name in SPREAD_LISTENERS:
                r = measure(envoy, wrk, name, conns, seconds, "spread", (nt,))
                r.update(round=rnd, tenants=nt)
                rows.append(r)
        log(f"spread round {rnd + 1}/{rounds} done")
    return rows


def phase_accuracy(envoy_bin: str, wasm: Path, wrk: Wrk, workdir: Path, workers_list, seconds: int) -> list[dict]:
    capacity, rate = 100, 50
    out = []
    for workers in workers_list:
        listeners = [
            listener("acc_ours", [ours_filter("acc_ours", wasm, capacity, rate, "off", 10_000)]),
            listener("acc_native", [native_filter("acc_native", capacity, rate, 1000)]),
        ]
        envoy = Envoy(envoy_bin, workdir, f"envoy_acc_{workers}w", listeners, workers, None)
        try:
            for name in ("acc_ours", "acc_native"):
                tenant = f"hot-{workers}w-{name}"  # a fresh, full bucket
                before = envoy.stat(f"http.{name}.downstream_rq_2xx")
                t0 = time.monotonic()
                w = _wrk_one_tenant(wrk, envoy.url(name), seconds, tenant)
                elapsed = time.monotonic() - t0
                admitted = envoy.stat(f"http.{name}.downstream_rq_2xx") - before
                t = w["duration_us"] / 1e6
                bound = capacity + rate * t
                out.append(
                    {
                        "workers": workers,
                        "filter": "ours" if name == "acc_ours" else "native",
                        "seconds": t,
                        "requests": w["requests"],
                        "admitted": admitted,
                        "admitted_wrk": w["requests"] - w["err_status"],
                        "bound": bound,
                        "over": admitted - bound,
                        "wall": elapsed,
                    }
                )
                log(f"accuracy {workers} workers {name}: admitted {admitted} of {w['requests']}, bound {bound:.1f}")
        finally:
            envoy.stop()
    return out


def _wrk_one_tenant(wrk: Wrk, url: str, seconds: int, tenant: str) -> dict:
    # 64 keep-alive connections, two wrk threads, Envoy and wrk share both cores.
    script = Path(wrk.scripts["static"]).with_name(f"wrk_hot_{tenant}.lua")
    script.write_text(f'wrk.headers["x-tenant-id"] = "{tenant}"\n' + LUA_DONE)
    wrk.scripts[script.stem] = script
    return wrk.run(url, 64, seconds, script.stem, threads=2, pin=False)


MEM_CONNS = 8


def phase_memory(envoy_bin: str, wasm: Path, wrk: Wrk, workdir: Path, steps, cpus) -> list[dict]:
    """RSS before and after `steps` (cumulative) distinct tenants, ids handed out one after
    another by one wrk Lua counter over a few keep-alive connections."""
    max_t = max(200_000, 2 * steps[-1])
    out = []
    for kind in ("ours", "native"):
        # A bucket that stays short of full for the whole run (refill 1 token per 1000 s): a full
        # bucket's slot may be reused by another tenant, which would hide the per-tenant cost.
        if kind == "ours":
            filt = wasm_filter(
                "mem_ours",
                wasm,
                json.dumps({"capacity": 100, "refill_rate": 0.001, "rate_limit_headers": "off", "max_tenants": max_t}),
            )
        else:
            filt = native_filter("mem_native", 100, 1, max_t)
        envoy = Envoy(envoy_bin, workdir, f"envoy_mem_{kind}", [listener("mem", [filt])], 1, cpus)
        try:
            url = envoy.url("mem")
            http_get(url, "warm")
            time.sleep(0.5)
            rss0 = envoy.rss_kib()
            row = {"filter": kind, "rss0_kib": rss0, "steps": []}
            sent = 0
            for i, target in enumerate(steps):
                count = target - sent
                # a prefix per step: the few requests in flight when a step stops stay distinct too
                w = wrk.run(url, MEM_CONNS, 300, "distinct", (f"m{i}-", 0, count))
                sent = target
                time.sleep(0.5)
                rss = envoy.rss_kib()
                slots = envoy.stat("wasmcustom.tenant_ratelimit.live_slots") if kind == "ours" else None
                row["steps"].append({"tenants": target, "requests": w["requests"], "rss_kib": rss, "live_slots": slots})
                log(f"memory {kind}: {target} tenants -> RSS {rss / 1024:.1f} MiB (start {rss0 / 1024:.1f} MiB)")
            out.append(row)
        finally:
            envoy.stop()
    return out


# --------------------------------------------------------------------------------------------
# global limits: our filter asking a rate-limit service (tests/rls-server on redis-server)

RLS_DEFAULT = REPO / "tests" / "rls-server" / "target" / "release" / "rls-server"
GLOBAL_LISTENERS = ["g_local", "g_global", "g_both", "g_lease10", "g_lease100"]
GLOBAL_LABELS = {
    "g_local": "local only (no `global`)",
    "g_global": "mode global",
    "g_both": "mode both",
    "g_lease10": "mode global, lease_tokens 10",
    "g_lease100": "mode global, lease_tokens 100",
}
GLOBAL_SECTIONS = {  # the `global` section of each listener's config (None: local only)
    "g_local": None,
    "g_global": {"mode": "global"},
    "g_both": {"mode": "both"},
    "g_lease10": {"mode": "global", "lease_tokens": 10},
    "g_lease100": {"mode": "global", "lease_tokens": 100},
}
GLOBAL_DOMAIN = "bench"
GLOBAL_TIMEOUT_MS = 200
GLOBAL_CONNS = 16
GLOBAL_LIMIT = {"namespace": GLOBAL_DOMAIN, "max_value": HUGE, "seconds": 60, "conditions": [], "variables": ["tenant"]}
STAT = "wasmcustom.tenant_ratelimit."


class GlobalSkip(Exception):
    """The global phase cannot run here (missing rls-server or redis-server)."""


def global_prereqs() -> tuple[str, str]:
    """(rls-server, redis-server) binaries, or GlobalSkip saying what is missing."""
    rls = os.environ.get("RLS_SERVER") or str(RLS_DEFAULT)
    if not (Path(rls).is_file() and os.access(rls, os.X_OK)):
        how = "RLS_SERVER" if os.environ.get("RLS_SERVER") else "cargo build --release --manifest-path tests/rls-server/Cargo.toml, or set RLS_SERVER"
        raise GlobalSkip(f"no rls-server binary at {rls} ({how})")
    redis = shutil.which("redis-server")
    if not redis:
        raise GlobalSkip("redis-server is not installed (apt-get install -y redis-server)")
    return rls, redis


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child if bench.py dies without running its atexit handler."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_service(cmd_for_port, ready, log_path: Path, what: str) -> tuple[subprocess.Popen, int]:
    """Starts a loopback service on a free port (3 tries: the port can be taken in between)."""
    for _attempt in range(3):
        port = free_port()
        with open(log_path, "ab") as logf:
            p = spawn(cmd_for_port(port), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                      preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and p.poll() is None:
            if ready(port):
                return p, port
            time.sleep(0.05)
        reap(p)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"{what} did not start\n--- log tail ---\n{tail}")


def _rls_ready(log_path: Path):
    return lambda _port: log_path.exists() and b"listening on " in log_path.read_bytes()


def proc_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def global_listener_config(wasm: Path, name: str) -> dict:
    conf = {"capacity": HUGE, "refill_rate": HUGE, "rate_limit_headers": "off", "max_tenants": 20_000}
    sec = GLOBAL_SECTIONS[name]
    if sec is not None:
        conf["global"] = {"cluster": "ratelimit", "domain": GLOBAL_DOMAIN, "timeout_ms": GLOBAL_TIMEOUT_MS,
                          "failure_mode": "allow", "tenant_key": "tenant"} | sec
    return wasm_filter(f"trl_{name}", wasm, json.dumps(conf))


def rls_cluster(port: int) -> dict:
    """STATIC, HTTP/2 (as tests/e2e/rls.py `grpc_cluster`)."""
    return {
        "name": "ratelimit",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": "ratelimit",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }  # fmt: skip


def phase_global(envoy_bin: str, wasm: Path, wrk: Wrk, workdir: Path, rounds: int, seconds: int, warm_s: int,
                 cpus: str | None) -> dict:
    """One Envoy (1 worker, pinned like the perf phase), one listener per variant, a `ratelimit`
    cluster to one rls-server on one redis-server (both unpinned). Raises GlobalSkip."""
    rls_bin, redis_bin = global_prereqs()
    gdir = workdir / "global"
    gdir.mkdir(exist_ok=True)
    redis, redis_port = _start_service(
        lambda port: [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", str(gdir), "--protected-mode", "yes", "--daemonize", "no"],
        _redis_ping, gdir / "redis.log", "redis-server")
    limits = gdir / "limits.json"
    limits.write_text(json.dumps([GLOBAL_LIMIT]))
    rls_log = gdir / "rls.log"
    # Its stdout gets one line per call: kept in the work dir (removed at exit), only read at start.
    rls, rls_port = _start_service(
        lambda port: [rls_bin, "--listen", f"127.0.0.1:{port}", "--redis", f"redis://127.0.0.1:{redis_port}",
                      "--limits", str(limits)],
        _rls_ready(rls_log), rls_log, "rls-server")
    service_pids = [rls.pid, redis.pid]
    versions = {"redis": cmd_out([redis_bin, "--version"]), "rls_server": rls_bin}
    log(f"global: redis-server on {redis_port}, rls-server on {rls_port}")
    rows: list[dict] = []
    try:
        listeners = [listener(n, [global_listener_config(wasm, n)]) for n in GLOBAL_LISTENERS]
        envoy = Envoy(envoy_bin, workdir, "envoy_global", listeners, 1, cpus, clusters=[rls_cluster(rls_port)])
        try:
            counters = ("global_calls", "global_errors", "global_over_limit", "lease_hits")
            snap = lambda: {k: envoy.stat(STAT + k) for k in counters}  # noqa: E731
            for name in GLOBAL_LISTENERS:  # sanity: 200, and a global listener really calls the service
                c0 = snap()
                status, _ = http_get(envoy.url(name), "sanity")
                c1 = snap()
                if status != 200:
                    raise RuntimeError(f"listener {name}: status {status}")
                calls, errs = c1["global_calls"] - c0["global_calls"], c1["global_errors"] - c0["global_errors"]
                want = 0 if GLOBAL_SECTIONS[name] is None else 1
                if calls != want or errs:
                    raise RuntimeError(f"listener {name}: {calls} service calls, {errs} errors (want {want}, 0)\n"
                                       f"rls-server log tail:\n{rls_log.read_text(errors='replace')[-1500:]}")
            if warm_s:
                log(f"global warm-up: {warm_s} s per listener")
                for name in GLOBAL_LISTENERS:
                    wrk.run(envoy.url(name), GLOBAL_CONNS, warm_s, "static")
            n = len(GLOBAL_LISTENERS)
            for rnd in range(rounds):
                order = GLOBAL_LISTENERS[rnd % n :] + GLOBAL_LISTENERS[: rnd % n]
                for name in order:
                    c0, s0 = snap(), sum(proc_ticks(p) for p in service_pids)
                    r = measure(envoy, wrk, name, GLOBAL_CONNS, seconds)
                    s1, c1 = sum(proc_ticks(p) for p in service_pids), snap()
                    reqs = max(r["requests"], 1)
                    r["round"] = rnd
                    r["service_cpu_us_per_req"] = (s1 - s0) * 1e6 / CLK_TCK / reqs
                    for k in counters:
                        r[k] = c1[k] - c0[k]
                    r["calls_per_req"] = r["global_calls"] / reqs
                    rows.append(r)
                line = ", ".join(f"{x['listener']} {x['rps']:.0f}/s {x['cpu_us_per_req']:.1f}us"
                                 for x in rows if x["round"] == rnd)
                log(f"global round {rnd + 1}/{rounds}: {line}")
        finally:
            envoy.stop()
    finally:
        reap(rls)
        reap(redis)
    return {"rows": rows, "rounds": rounds, "seconds": seconds, "warm": warm_s, "conns": GLOBAL_CONNS,
            "timeout_ms": GLOBAL_TIMEOUT_MS, "limit": GLOBAL_LIMIT, "versions": versions,
            "load": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def run_global_phase(*args) -> dict:
    """phase_global, or {"skipped": why} after printing one line."""
    try:
        return phase_global(*args)
    except GlobalSkip as e:
        print(f"[bench] global phase skipped: {e}", flush=True)
        return {"skipped": str(e)}


def global_section(g: dict, load_start: str = "", load_end: str = "") -> str:
    """The `## Global limits` section of RESULTS.md."""
    head = "## Global limits\n\n"
    if "skipped" in g:
        return head + f"Skipped: {g['skipped']}.\n"
    rows = g["rows"]
    lim = g["limit"]
    lines = [
        f"Our filter asking a rate-limit service (`global` section) against the same filter with local "
        f"buckets only. One Envoy (`--concurrency 1`, pinned like the perf phase), one listener per "
        f"variant (its own `root_id`/`vm_id`), a `ratelimit` cluster (STATIC, HTTP/2) to ONE "
        f"`tests/rls-server` (limitador over Redis; it serialises its calls) backed by ONE `redis-server`, "
        f"both on loopback and unpinned (they share the machine with wrk). One hot tenant "
        f"(`x-tenant-id: tenant-1`), {g['conns']} connections, {g['rounds']} interleaved round{'s' if g['rounds'] != 1 else ''} of "
        f"{g['seconds']} s after a {g['warm']} s warm-up per listener; median (min-max) over rounds.",
        "",
        f"Nothing is denied: the service limit is {lim['max_value']:,} per {lim['seconds']} s per tenant, "
        f"the local bucket {HUGE:,} at {HUGE:,}/s; `timeout_ms` {g['timeout_ms']}, `failure_mode` allow. "
        f"**Service CPU** = rls-server + redis-server utime+stime per request; **calls/request** = "
        f"`global_calls` / requests; **errors** = `global_errors` (service errors and timeouts, each "
        f"admitted) summed over rounds; **other CPU** = CPUs busy with anything but Envoy (wrk, and here the "
        f"service too). Redis: `{g['versions']['redis'].split(' sha=')[0]}`."
        + (f" Load average at start / end of this phase: {load_start} / {load_end}." if load_start else ""),
        "",
        "| listener | requests/s | p99 us | Envoy CPU us/request | CPU / local (per-round) | service CPU us/request "
        "| calls/request | errors | other CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in GLOBAL_LISTENERS:
        s = [r for r in rows if r["listener"] == name]
        if not s:
            continue
        pr = paired_ratios(rows, name, "g_local", "cpu_us_per_req")
        ratio = "1" if name == "g_local" else f"{med(pr):.2f} ({min(pr):.2f}-{max(pr):.2f})"
        lines.append(
            f"| {GLOBAL_LABELS[name]} | {fmt_range(*summarize(s, 'rps'), nd=0)} | {fmt_range(*summarize(s, 'p99_us'), nd=0)} "
            f"| {fmt_range(*summarize(s, 'cpu_us_per_req'))} | {ratio} | {fmt_range(*summarize(s, 'service_cpu_us_per_req'))} "
            f"| {med([r['calls_per_req'] for r in s]):.3f} | {sum(r['global_errors'] for r in s):,} "
            f"| {med([r['other_cpu'] for r in s]):.2f} |"
        )
    bad = [r for r in rows if r["non2xx"] or r["socket_errors"]]
    if bad:
        lines.append(f"\nNote: {len(bad)} runs saw non-2xx responses or socket errors (should be none).")
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# report


def perf_tables(rows: list[dict], conns_list) -> tuple[str, dict]:
    lines = []
    headline = {}
    for conns in conns_list:
        sub = [r for r in rows if r["conns"] == conns]
        lines.append(f"\n#### {conns} connection{'s' if conns > 1 else ''}\n")
        lines.append("| listener | CPU us/request | requests/s | p50 us | p99 us | Envoy CPU util | other CPU |")
        lines.append("|---|---|---|---|---|---|---|")
        for name in PERF_LISTENERS:
            s = [r for r in sub if r["listener"] == name]
            if not s:
                continue
            cpu = summarize(s, "cpu_us_per_req")
            rps = summarize(s, "rps")
            p50 = summarize(s, "p50_us")
            p99 = summarize(s, "p99_us")
            util = summarize(s, "envoy_cpu_util")
            other = summarize(s, "other_cpu")
            headline[(conns, name)] = {"cpu": cpu, "rps": rps, "p50": p50, "p99": p99}
            lines.append(
                f"| {LABELS[name]} | {fmt_range(*cpu)} | {fmt_range(*rps, nd=0)} | {fmt_range(*p50, nd=0)} | "
                f"{fmt_range(*p99, nd=0)} | {fmt_range(*util)} | {fmt_range(*other)} |"
            )
        lines.append("")
        lines.append("| ratio (CPU us/request) | ratio of medians | per-round range |")
        lines.append("|---|---|---|")
        for num, den in [("ours", "floor"), ("ours_hdrs", "floor"), ("ours", "native"), ("ours", "none"),
                         ("ours_hdrs", "none"), ("floor", "none"), ("native", "none")]:  # fmt: skip
            pr = paired_ratios(sub, num, den, "cpu_us_per_req")
            if (conns, num) not in headline or (conns, den) not in headline:
                continue
            rm = div(headline[(conns, num)]["cpu"][0], headline[(conns, den)]["cpu"][0])
            headline[(conns, f"{num}/{den}")] = (rm, min(pr), max(pr))
            lines.append(f"| {num} / {den} | {rm:.3f} | {min(pr):.3f}-{max(pr):.3f} |")
    bad = [r for r in rows if r["non2xx"] or r["socket_errors"]]
    if bad:
        lines.append(f"\nNote: {len(bad)} runs saw non-2xx responses or socket errors (should be none).")
    return "\n".join(lines), headline


def spread_table(rows: list[dict], tenant_counts) -> tuple[str, dict]:
    lines = [
        "| tenants | native us/req | floor us/req | ours us/req | ours / floor | ours / native | ours / floor per-round |",
        "|---|---|---|---|---|---|---|",
    ]
    res = {}
    for nt in tenant_counts:
        sub = [r for r in rows if r["tenants"] == nt]
        m = {n: summarize([r for r in sub if r["listener"] == n], "cpu_us_per_req") for n in SPREAD_LISTENERS}
        pr = paired_ratios(sub, "ours", "floor", "cpu_us_per_req")
        rf = div(m["ours"][0], m["floor"][0])
        rn = div(m["ours"][0], m["native"][0])
        res[nt] = rf
        lines.append(
            f"| {nt:,} | {fmt_range(*m['native'])} | {fmt_range(*m['floor'])} | {fmt_range(*m['ours'])} | "
            f"{rf:.3f} | {rn:.3f} | {min(pr):.3f}-{max(pr):.3f} |"
        )
    return "\n".join(lines), res


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| workers | filter | t (s) | requests | admitted (Envoy 2xx) | capacity + rate*t | admitted - bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['filter']} | {r['seconds']:.2f} | {r['requests']:,} | {r['admitted']:,} | "
            f"{r['bound']:.1f} | {r['over']:+.1f} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = [
        "| filter | distinct tenants | requests (step) | RSS before (MiB) | RSS after (MiB) | delta (MiB) | bytes/tenant | live slots |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for s in r["steps"]:
            d = s["rss_kib"] - r["rss0_kib"]
            per = d * 1024 / s["tenants"] if s["tenants"] else 0
            slots = "" if s["live_slots"] is None else f"{s['live_slots']:,}"
            lines.append(
                f"| {r['filter']} | {s['tenants']:,} | {s['requests']:,} | {r['rss0_kib'] / 1024:.1f} | {s['rss_kib'] / 1024:.1f} | "
                f"{d / 1024:.1f} | {per:.0f} | {slots} |"
            )
    return "\n".join(lines)


def plots(rows: list[dict], conns_list, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(conns_list)
    for i, conns in enumerate(conns_list):
        meds, lo, hi = [], [], []
        for name in PERF_LISTENERS:
            m, a, b = summarize([r for r in rows if r["conns"] == conns and r["listener"] == name], "cpu_us_per_req")
            meds.append(m), lo.append(m - a), hi.append(b - m)
        xs = [j + (i - (len(conns_list) - 1) / 2) * width for j in range(len(PERF_LISTENERS))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=f"{conns} conn")
    ax.set_xticks(range(len(PERF_LISTENERS)), [LABELS[n] for n in PERF_LISTENERS], rotation=12)
    ax.set_ylabel("Envoy CPU us / request (median, min-max)")
    ax.set_title("Envoy CPU per request by listener (1 worker)")
    ax.legend()
    fig.tight_layout()
    p = outdir / "cpu_per_request.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in PERF_LISTENERS:
        ys = [summarize([r for r in rows if r["conns"] == c and r["listener"] == name], "rps")[0] for c in conns_list]
        ax.plot(conns_list, ys, marker="o", label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks(conns_list, [str(c) for c in conns_list])
    ax.set_xlabel("connections")
    ax.set_ylabel("requests/s (median)")
    ax.set_title("Throughput by connections (1 Envoy worker, 1 core)")
    ax.legend()
    fig.tight_layout()
    p = outdir / "rps_by_connections.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def where_we_stand(head: dict, conns_list, acc: list[dict], spread: dict, perf: list[dict]) -> str:
    lines = []
    other = med([r["other_cpu"] for r in perf])
    if other > 1.2:
        lines.append(
            f"- **Caveat: the machine was not quiet.** Median CPUs busy with something other than Envoy during "
            f"the runs: {other:.2f} (wrk alone accounts for at most ~1.0). Absolute numbers are inflated and "
            f"noisy; the interleaved same-round ratios are the robust part. Re-run `make bench` on an idle machine."
        )
    big = max(conns_list)
    for conns in conns_list:
        r = head.get((conns, "ours/floor"))
        if r:
            aim = "; aim 1.05x " + verdict(r[0] <= TARGET_OFF_AIM)
            lines.append(
                f"- Headers off, {conns} conn: {r[0]:.3f}x the floor (per-round {r[1]:.3f}-{r[2]:.3f}); "
                f"target <= {TARGET_OFF_MAX}x {verdict(r[0] <= TARGET_OFF_MAX)}{aim}."
            )
    for conns in conns_list:
        r = head.get((conns, "ours_hdrs/floor"))
        if r:
            lines.append(
                f"- Headers on, {conns} conn: {r[0]:.3f}x the floor (per-round {r[1]:.3f}-{r[2]:.3f}); "
                f"target <= {TARGET_HDRS_MAX}x {verdict(r[0] <= TARGET_HDRS_MAX)}."
            )
    for r in acc:
        if r["filter"] == "ours":
            lines.append(
                f"- Over-admission, ours, {r['workers']} workers: admitted {r['admitted']} vs bound {r['bound']:.1f} "
                f"({r['over']:+.1f}); target <= +1 token {verdict(r['over'] <= 1.0)}."
            )
    if (big, "ours") in head and (big, "none") in head:
        for name in ("ours", "ours_hdrs"):
            added = head[(big, name)]["p99"][0] - head[(big, "none")]["p99"][0]
            lines.append(
                f"- p99 added over no filter at {big} connections ({LABELS[name]}): {added:.0f} us "
                f"(median p99 {head[(big, name)]['p99'][0]:.0f} vs {head[(big, 'none')]['p99'][0]:.0f} us); "
                f"target < {TARGET_P99_ADDED_US:.0f} us {verdict(added < TARGET_P99_ADDED_US)}."
            )
    if spread:
        worst = max(spread.items(), key=lambda kv: kv[1])
        lines.append(
            f"- Tenant spread: ours/floor {', '.join(f'{v:.3f}x at {k:,}' for k, v in spread.items())} tenants "
            f"(worst {worst[1]:.3f}x at {worst[0]:,}; informational, the targets are stated for one hot tenant)."
        )
    return "\n".join(lines)


def write_report(path: Path, ctx: dict) -> None:
    c = ctx
    md = f"""# tenant-ratelimit benchmark results

Generated by `bench/bench.py` on {c['date']}{' (SMOKE RUN: 1 round, 1 s per measurement; numbers are not meaningful)' if c['smoke'] else ''}.

Command: `{c['command']}`

## Machine and versions

- CPUs: {c['nproc']} x {c['cpu']}; pinning: {c['pinning']}
- Kernel: {c['kernel']}
- Envoy: `{c['envoy_version']}` (V8 runtime)
- rustc: `{c['rustc']}`
- wrk: `{c['wrk_version']}`
- Clock ticks per second (CPU accounting resolution): {CLK_TCK}

## Method

One Envoy process, `--concurrency 1`, pinned to one core; wrk (`-t1`) pinned to the other;
loopback only; every listener answers with a direct response (no upstream). All listeners live in
ONE bootstrap and each Wasm listener has its own `vm_id`/`root_id`. Every request carries
`x-tenant-id: tenant-1` (a static wrk header, same bytes for every listener).

- **CPU us/request** = delta of Envoy's utime+stime (`/proc/<pid>/stat`, whole process) over a
  wrk run / requests wrk completed. **Envoy CPU util** = Envoy CPU seconds / wall seconds
  (about 1.0 means Envoy's core was saturated). **Other CPU** = CPUs busy with anything but
  Envoy during the run (`/proc/stat`), wrk included (at most about 1.0); above that, something
  else was running on the machine and the numbers are noisier. Load average at start / end:
  {c['load_start']} / {c['load_end']}.
- {c['rounds']} interleaved rounds; each round visits every connection count and every listener
  (listener order rotated per round); {c['seconds']} s per measurement after a {c['warm']} s warm-up
  per listener. Cells show **median (min-max)** over rounds. Ratios: the ratio of the medians, and
  the range of the per-round (same-round, paired) ratios.
- Buckets never deny during these runs: ours `capacity`/`refill_rate` = {HUGE:,}, `max_tenants` {c['perf_max_tenants']:,};
  native `local_ratelimit` per-tenant wildcard descriptor (`rate_limits` on `x-tenant-id`,
  `max_dynamic_descriptors` {c['perf_max_tenants']:,}) with a {HUGE:,}-token bucket.
- p50/p99 are wrk's (closed loop: at 16 and 64 connections latency is mostly queueing, so p99
  differences there track throughput differences).

## Headline (CPU per request, {max(c['conns'])} connections)

{c['headline']}

## Where we stand

{c['stand']}

## CPU, throughput and latency by listener
{c['perf']}

![CPU per request](cpu_per_request.png)
![requests/s by connections](rps_by_connections.png)

## Tenant spread

wrk's Lua `request()` rotates `x-tenant-id` over N tenants (the same script for every listener),
{c['spread_conns']} connections, {c['spread_rounds']} interleaved rounds of {c['spread_seconds']} s, median (min-max).

{c['spread']}

## Admission accuracy

`capacity` 100, `refill_rate` 50/s, one hot tenant (fresh bucket), 64 keep-alive connections
(wrk `-t2`, unpinned) for {c['acc_seconds']} s against a separate Envoy with 2 and then 4 workers.
Admitted = the listener's `downstream_rq_2xx` delta from Envoy's stats; t = wrk's run duration.
Native: the same wildcard descriptor, `max_tokens` 100, `tokens_per_fill` 50, `fill_interval` 1 s,
`local_rate_limit_per_downstream_connection` false (default: one bucket per Envoy process, shared
by the workers).

{c['accuracy']}

## Memory

A separate Envoy (1 worker) per filter; RSS (`VmRSS`) after one warm-up request, then after
sending distinct tenants (ids handed out one after another by one wrk Lua counter, 8 keep-alive
connections), cumulatively. Every bucket stays short of full during the run (ours: `capacity` 100,
`refill_rate` 0.001/s, `max_tenants` {c['mem_max_tenants']:,}, so no slot is reused; native: `max_tokens` 100,
1 token/s, `max_dynamic_descriptors` {c['mem_max_tenants']:,}). Requests = wrk's count for that step (a few
more than the new tenants: requests in flight when the step stops).

{c['memory']}

{c['global']}
## Module size

| module | bytes |
|---|---|
| ours (`{c['wasm_name']}`) | {c['wasm_size']:,} |
| no-op floor (`bench/noop`) | {c['noop_size']:,} |

Wall time of this run: {c['wall']:.0f} s.
"""
    path.write_text(md)


# --------------------------------------------------------------------------------------------
# A/B quick mode: CPU per request only, floor + variants in one Envoy

AB_DEFAULT_CONFIG = {"capacity": HUGE, "refill_rate": HUGE, "rate_limit_headers": "off", "max_tenants": 20_000}


def parse_ab(spec: str) -> tuple[str, Path, str]:
    """NAME=PATH.wasm[:CONFIGJSON] -> (name, path, configuration string)."""
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise ValueError(f"--ab {spec!r}: expected NAME=PATH.wasm[:CONFIGJSON]")
    if not all(c.isalnum() or c in "_-" for c in name) or name == "floor":
        raise ValueError(f"--ab {spec!r}: NAME must be [A-Za-z0-9_-]+ and not 'floor'")
    path, colon, conf = rest.partition(":")
    if colon:
        try:
            json.loads(conf)
        except json.JSONDecodeError as e:
            raise ValueError(f"--ab {spec!r}: CONFIGJSON is not JSON: {e}") from None
    else:
        conf = json.dumps(AB_DEFAULT_CONFIG)
    wasm = Path(path).resolve()
    if not wasm.is_file():
        raise ValueError(f"--ab {spec!r}: no such file {wasm}")
    return name, wasm, conf


def run_ab(args, envoy_bin: str) -> int:
    try:
        variants = [parse_ab(s) for s in args.ab]
    except ValueError as e:
        sys.exit(f"bench: {e}")
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        sys.exit("bench: --ab names must be distinct")
    rounds, seconds, conns, warm = args.rounds, args.seconds, args.conns, args.warm
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    wrk_bin = ensure_wrk()
    noop = build_noop()
    cores = sorted(os.sched_getaffinity(0))
    envoy_cpus, wrk_cpus = (str(cores[0]), str(cores[1])) if len(cores) >= 2 else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="trl-ab-"))
    wrk = Wrk(wrk_bin, workdir, wrk_cpus)
    order_all = ["floor"] + names
    sizes = {"floor": noop.stat().st_size} | {n: w.stat().st_size for n, w, _ in variants}
    confs = {n: c for n, _, c in variants}
    log(f"A/B: {len(order_all)} listeners, {rounds} rounds x {seconds} s, {conns} connections; load {load_start}")
    rows: list[dict] = []
    try:
        listeners = [listener("floor", [wasm_filter("bench_noop", noop, "{}")])]
        listeners += [listener(n, [wasm_filter(f"ab_{n}", w, c)]) for n, w, c in variants]
        envoy = Envoy(envoy_bin, workdir, "envoy_ab", listeners, 1, envoy_cpus)
        try:
            for name in order_all:
                status, hdrs = http_get(envoy.url(name), "sanity")
                if status != 200:
                    raise RuntimeError(f"listener {name}: status {status}")
                log(f"listener {name}: 200, x-ratelimit-limit {'present' if 'x-ratelimit-limit' in hdrs else 'absent'}")
            if warm:
                for name in order_all:
                    wrk.run(envoy.url(name), conns, warm, "static")
            n = len(order_all)
            for rnd in range(rounds):
                order = order_all[rnd % n :] + order_all[: rnd % n]  # rotate to spread drift
                for name in order:
                    r = measure(envoy, wrk, name, conns, seconds)
                    r["round"] = rnd
                    rows.append(r)
                line = ", ".join(f"{x['listener']} {x['cpu_us_per_req']:.2f}" for x in rows if x["round"] == rnd)
                log(f"round {rnd + 1}/{rounds}: us/req {line}")
            try:  # the filters' own counters (summed over every listener that defines them)
                custom = [x for x in envoy.get("/stats?filter=^wasmcustom[.]").splitlines() if not x.endswith(": 0")]
                log("wasmcustom stats: " + "; ".join(custom))
            except Exception as e:  # informative only
                log(f"wasmcustom stats unavailable: {e}")
        finally:
            envoy.stop()
    finally:
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    out = [
        f"A/B: CPU us/request, {conns} connections, 1 Envoy worker (pinned), {rounds} interleaved rounds x {seconds} s",
        f"load average start / end: {load_start} / {load_end}; "
        f"median other CPU (non-Envoy busy CPUs, wrk <= ~1.0): {med([r['other_cpu'] for r in rows]):.2f}",
        "",
        "| listener | bytes | CPU us/request median (min-max) | / floor: median of per-round ratios (min-max) "
        f"| / {names[0]}: same | req/s median |",
        "|---|---|---|---|---|---|",
    ]

    def ratio(num: str, den: str) -> str:
        if num == den:
            return "1"
        pr = paired_ratios(rows, num, den, "cpu_us_per_req")
        return f"{med(pr):.3f} ({min(pr):.3f}-{max(pr):.3f})"

    for name in order_all:
        s = [r for r in rows if r["listener"] == name]
        cpu = summarize(s, "cpu_us_per_req")
        out.append(
            f"| {name} | {sizes[name]:,} | {fmt_range(*cpu)} | {ratio(name, 'floor')} | {ratio(name, names[0])} "
            f"| {med([r['rps'] for r in s]):.0f} |"
        )
    bad = [r for r in rows if r["non2xx"] or r["socket_errors"]]
    if bad:
        out.append(f"\nNote: {len(bad)} runs saw non-2xx responses or socket errors (should be none).")
    out.append("")
    out += [f"config {n}: {confs[n]}" for n in names]
    text = "\n".join(out)
    print()
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.md").write_text(text + "\n")
        (args.out / "ab.json").write_text(json.dumps({"rows": rows, "sizes": sizes, "configs": confs,
                                                      "load_start": load_start, "load_end": load_end}, indent=1))
        log(f"wrote {args.out / 'ab.md'}, {args.out / 'ab.json'}")
    return 0


# --------------------------------------------------------------------------------------------
# --only global: this phase alone, its section replaced (or appended) in RESULTS.md


def replace_section(text: str, section: str, heading: str = "## Global limits") -> str:
    """`text` with its `heading` section (up to the next `## ` heading) replaced by `section`,
    or with `section` appended when there is none."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + rest if rest else "")


def run_only_global(args, envoy_bin: str, wasm: Path, rounds: int, seconds: int, warm: int) -> int:
    outdir = args.out or (BENCH_DIR / "out" / "smoke" if args.smoke else BENCH_DIR)
    try:
        global_prereqs()
    except GlobalSkip as e:
        print(f"[bench] global phase skipped: {e}", flush=True)
        return 0
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    wrk_bin = ensure_wrk()
    cores = sorted(os.sched_getaffinity(0))
    envoy_cpus, wrk_cpus = (str(cores[0]), str(cores[1])) if len(cores) >= 2 else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="trl-global-"))
    try:
        wrk = Wrk(wrk_bin, workdir, wrk_cpus)
        g = run_global_phase(envoy_bin, wasm, wrk, workdir, rounds, seconds, warm, envoy_cpus)
    finally:
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if "skipped" in g:
        return 0
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = global_section(g, load_start, load_end)
    cmd = f"bench/bench.py --only global{' --smoke' if args.smoke else ''}"
    section = section.replace("\n\n", f"\n\nMeasured by `{cmd}` on {date}"
                              f"{' (SMOKE: 1 round of 1 s, not meaningful)' if args.smoke else ''}. ", 1)
    outdir.mkdir(parents=True, exist_ok=True)
    report = outdir / "RESULTS.md"
    report.write_text(replace_section(report.read_text() if report.exists() else "", section).lstrip("\n"))
    raw = (outdir if (args.smoke or args.out) else BENCH_DIR / "out") / "global.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(g, indent=1))
    log(f"wrote {report} (section `## Global limits`), {raw}")
    print()
    print(section)
    return 0


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every code path in seconds; writes to bench/out/smoke")
    ap.add_argument("--out", type=Path, help="output directory (default: bench/ for a full run)")
    ap.add_argument("--only", choices=["global"],
                    help="run one phase only: `global` updates (or appends) the `## Global limits` section "
                         "of RESULTS.md in the output directory and leaves the rest of the file alone")
    ab = ap.add_argument_group("A/B quick mode (only with --ab)")
    ab.add_argument("--ab", action="append", metavar="NAME=PATH.wasm[:CONFIGJSON]",
                    help="a variant to compare with the floor (repeatable); CONFIGJSON defaults to "
                         "the full run's `ours` config (bucket too large to deny, headers off)")
    ab.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ab.add_argument("--seconds", type=int, default=4, help="seconds per measurement (default 4)")
    ab.add_argument("--conns", type=int, default=16, help="wrk connections (default 16)")
    ab.add_argument("--warm", type=int, default=2, help="warm-up seconds per listener (default 2)")
    args = ap.parse_args()

    envoy_bin = os.environ.get("ENVOY_BIN")
    if args.ab:
        if args.smoke:
            sys.exit("bench: --ab and --smoke are exclusive")
        if not envoy_bin or not Path(envoy_bin).exists():
            sys.exit("bench: set ENVOY_BIN to the Envoy binary")
        return run_ab(args, envoy_bin)
    wasm = os.environ.get("WASM")
    if not envoy_bin or not wasm:
        sys.exit("bench: set ENVOY_BIN and WASM (make bench does)")
    wasm = Path(wasm).resolve()
    if not Path(envoy_bin).exists() or not wasm.exists():
        sys.exit(f"bench: missing {envoy_bin if not Path(envoy_bin).exists() else wasm}")
    wasm_size = wasm.stat().st_size  # the module Envoy loads below (a rebuild mid-run would not be measured)
    g_rounds, g_seconds, g_warm = (1, 1, 0) if args.smoke else (5, 4, 2)
    if args.only == "global":
        return run_only_global(args, envoy_bin, wasm, g_rounds, g_seconds, g_warm)

    if args.smoke:
        conns_list, rounds, seconds, warm = [1, 64], 1, 1, 0
        spread_counts, spread_rounds, spread_seconds = [1, 100], 1, 1
        acc_seconds, mem_steps = 1, [10, 100]
        outdir = args.out or BENCH_DIR / "out" / "smoke"
    else:
        conns_list, rounds, seconds, warm = [1, 16, 64], 5, 5, 2
        spread_counts, spread_rounds, spread_seconds = [1, 100, 10_000], 5, 3
        acc_seconds, mem_steps = 10, [1_000, 100_000]
        outdir = args.out or BENCH_DIR
    spread_conns = 64
    perf_max_tenants = 20_000
    outdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    wrk_bin = ensure_wrk()
    noop = build_noop()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        envoy_cpus, wrk_cpus = str(cores[0]), str(cores[1])
        pinning = f"Envoy on CPU {envoy_cpus}, wrk on CPU {wrk_cpus} (taskset)"
    else:
        envoy_cpus = wrk_cpus = None
        pinning = "none (only one CPU available)"

    workdir = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    wrk = Wrk(wrk_bin, workdir, wrk_cpus)
    log(f"work dir {workdir}; output {outdir}")
    try:
        listeners = [
            listener("none", []),
            listener("native", [native_filter("native", HUGE, HUGE, perf_max_tenants)]),
            listener("floor", [wasm_filter("bench_noop", noop, "{}")]),
            listener("ours", [ours_filter("trl_off", wasm, HUGE, HUGE, "off", perf_max_tenants)]),
            listener("ours_hdrs", [ours_filter("trl_hdrs", wasm, HUGE, HUGE, "x-ratelimit", perf_max_tenants)]),
        ]
        envoy = Envoy(envoy_bin, workdir, "envoy_perf", listeners, 1, envoy_cpus)
        try:
            # Sanity: every listener answers 200; headers appear only where configured.
            for name in PERF_LISTENERS:
                status, hdrs = http_get(envoy.url(name), "sanity")
                if status != 200:
                    raise RuntimeError(f"listener {name}: status {status}")
                has = "x-ratelimit-limit" in hdrs
                if has != (name == "ours_hdrs"):
                    raise RuntimeError(f"listener {name}: x-ratelimit-limit present={has}")
            perf = phase_perf(envoy, wrk, conns_list, rounds, seconds, warm)
            log("tenant spread")
            spread = phase_spread(envoy, wrk, spread_counts, spread_rounds, spread_seconds, spread_conns, warm)
        finally:
            envoy.stop()
        log("admission accuracy")
        acc = phase_accuracy(envoy_bin, wasm, wrk, workdir, [2, 4], acc_seconds)
        log("memory")
        mem = phase_memory(envoy_bin, wasm, wrk, workdir, mem_steps, envoy_cpus)
        log("global limits")
        g_load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        glob = run_global_phase(envoy_bin, wasm, wrk, workdir, g_rounds, g_seconds, g_warm, envoy_cpus)
        g_load1 = " ".join(Path("/proc/loadavg").read_text().split()[:3])

        perf_md, head = perf_tables(perf, conns_list)
        spread_md, spread_res = spread_table(spread, spread_counts)
        big = max(conns_list)
        hl = ["| listener | CPU us/request | requests/s | p99 us |", "|---|---|---|---|"]
        for name in PERF_LISTENERS:
            h = head[(big, name)]
            hl.append(f"| {LABELS[name]} | {fmt_range(*h['cpu'])} | {h['rps'][0]:.0f} | {h['p99'][0]:.0f} |")
        hl += ["", "| ratio | CPU/request |", "|---|---|"]
        for k in ("ours/floor", "ours_hdrs/floor", "ours/native", "ours/none"):
            if (big, k) in head:
                r = head[(big, k)]
                hl.append(f"| {k} | {r[0]:.3f} (per-round {r[1]:.3f}-{r[2]:.3f}) |")

        files = plots(perf, conns_list, outdir)
        raw = {"perf": perf, "spread": spread, "accuracy": acc, "memory": mem, "global": glob}
        # Raw samples: next to the report for smoke/--out runs, in the ignored bench/out/ otherwise.
        raw_path = outdir / "results.json" if (args.smoke or args.out) else BENCH_DIR / "out" / "results.json"
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps(raw, indent=1))

        rel = lambda p: os.path.relpath(p, REPO) if str(p).startswith(str(REPO)) else str(p)  # noqa: E731
        command = "make bench" + (
            "-smoke" if args.smoke else ""
        ) + f"  (= ENVOY_BIN={rel(envoy_bin)} WASM={rel(wasm)} .venv/bin/python bench/bench.py{' --smoke' if args.smoke else ''})"
        ctx = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": args.smoke,
            "command": command,
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "pinning": pinning,
            "kernel": platform.release(),
            "envoy_version": cmd_out([envoy_bin, "--version"]).splitlines()[-1].split("version:", 1)[-1].strip(),
            "rustc": cmd_out(["rustc", "--version"]),
            "wrk_version": cmd_out([wrk_bin, "-v"]).splitlines()[0] if cmd_out([wrk_bin, "-v"]) else "?",
            "rounds": rounds,
            "seconds": seconds,
            "warm": warm,
            "conns": conns_list,
            "perf_max_tenants": perf_max_tenants,
            "headline": "\n".join(hl),
            "stand": where_we_stand(head, conns_list, acc, spread_res, perf),
            "perf": perf_md,
            "spread": spread_md,
            "spread_conns": spread_conns,
            "spread_rounds": spread_rounds,
            "spread_seconds": spread_seconds,
            "accuracy": accuracy_table(acc),
            "acc_seconds": acc_seconds,
            "memory": memory_table(mem),
            "global": global_section(glob, g_load0, g_load1),
            "mem_max_tenants": max(200_000, 2 * mem_steps[-1]),
            "wasm_name": wasm.name,
            "wasm_size": wasm_size,
            "noop_size": noop.stat().st_size,
            "wall": time.monotonic() - started,
            "load_start": load_start,
            "load_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        }
        report = outdir / "RESULTS.md"
        write_report(report, ctx)
        log(f"wrote {rel(report)}, {', '.join(rel(f) for f in files)}, {rel(raw_path)}")
        print()
        print("\n".join(hl))
        print()
        print(ctx["stand"])
        print()
        print(ctx["global"])
    finally:
        _kill_children()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
