"""Load with wrk, and what one wrk run costs Envoy: `Wrk` (pinned, bounded in time, Lua scripts
for one hot tenant, a rotation over N tenants, or distinct tenants one after another) and
`measure` (Envoy CPU per request, requests/s, latency, other CPU on the machine)."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

from common import CLK_TCK, reap, spawn
from tests.support.envoy import Envoy, wrk_command, wrk_result

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
        cmd = wrk_command(self.bin, url, self.scripts[script], threads=threads, connections=conns, seconds=seconds,
                          latency=True, args=args, cpus=self.cpus if pin else None)
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
        result = wrk_result(out, "BENCHJSON")
        if result is None:
            raise RuntimeError(f"wrk produced no summary (exit {p.returncode}):\n{out[-2000:]}")
        return result


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



def rotated(names: list[str], rnd: int) -> list[str]:
    """`names` rotated by the round number: each round starts elsewhere, to spread drift."""
    k = rnd % len(names)
    return names[k:] + names[:k]


def measure_round(envoy: Envoy, wrk: Wrk, names: list[str], rnd: int, conns: int, seconds: int) -> list[dict]:
    """One `measure` per listener, in this order, each row tagged with the round."""
    rows = []
    for name in names:
        r = measure(envoy, wrk, name, conns, seconds)
        r["round"] = rnd
        rows.append(r)
    return rows
