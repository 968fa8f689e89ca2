"""Global limits: our filter asking a rate-limit service (tests/rls-server on redis-server, both
started by tests/support/services.py) against the same filter with local buckets only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from common import CLK_TCK, HUGE, REPO, cmd_out, http_get, listener, loadavg, log, start_envoy, stat, vm_filter
from load import Wrk, measure, rotated
from tests.support.envoy import STAT_PREFIX as STAT, cpu_ticks, grpc_cluster
from tests.support.services import Redis, RlsServer

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


def global_listener_config(wasm: Path, name: str) -> dict:
    conf = {"capacity": HUGE, "refill_rate": HUGE, "rate_limit_headers": "off", "max_tenants": 20_000}
    sec = GLOBAL_SECTIONS[name]
    if sec is not None:
        conf["global"] = {"cluster": "ratelimit", "domain": GLOBAL_DOMAIN, "timeout_ms": GLOBAL_TIMEOUT_MS,
                          "failure_mode": "allow", "tenant_key": "tenant"} | sec
    return vm_filter(f"trl_{name}", wasm, json.dumps(conf))


def phase_global(envoy_bin: str, wasm: Path, wrk: Wrk, workdir: Path, rounds: int, seconds: int, warm_s: int,
                 cpus: str | None) -> dict:
    """One Envoy (1 worker, pinned like the perf phase), one listener per variant, a `ratelimit`
    cluster to one rls-server on one redis-server (both unpinned). Raises GlobalSkip."""
    rls_bin, redis_bin = global_prereqs()
    gdir = workdir / "global"
    gdir.mkdir(exist_ok=True)
    redis = Redis(gdir, redis_bin).start()
    # No stats file (a write per call); its log gets one line per call: kept in the work dir
    # (removed at exit), only read at start.
    rls = RlsServer(rls_bin, gdir, redis.url, [GLOBAL_LIMIT], stats_file=False)
    try:
        rls.start()
        service_pids = [rls.proc.pid, redis.proc.pid]
        versions = {"redis": cmd_out([redis_bin, "--version"]), "rls_server": rls_bin}
        log(f"global: redis-server on {redis.port}, rls-server on {rls.port}")
        rows: list[dict] = []
        listeners = [listener(n, [global_listener_config(wasm, n)]) for n in GLOBAL_LISTENERS]
        envoy = start_envoy(envoy_bin, workdir, "envoy_global", listeners, 1, cpus,
                            clusters=[grpc_cluster("ratelimit", rls.port)])
        try:
            counters = ("global_calls", "global_errors", "global_over_limit", "lease_hits")
            snap = lambda: {k: stat(envoy, STAT + k) for k in counters}  # noqa: E731
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
                                       f"rls-server log tail:\n{rls.log_tail(40)}")
            if warm_s:
                log(f"global warm-up: {warm_s} s per listener")
                for name in GLOBAL_LISTENERS:
                    wrk.run(envoy.url(name), GLOBAL_CONNS, warm_s, "static")
            for rnd in range(rounds):
                for name in rotated(GLOBAL_LISTENERS, rnd):
                    c0, s0 = snap(), sum(cpu_ticks(p) for p in service_pids)
                    r = measure(envoy, wrk, name, GLOBAL_CONNS, seconds)
                    s1, c1 = sum(cpu_ticks(p) for p in service_pids), snap()
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
        rls.stop()
        redis.stop()
    return {"rows": rows, "rounds": rounds, "seconds": seconds, "warm": warm_s, "conns": GLOBAL_CONNS,
            "timeout_ms": GLOBAL_TIMEOUT_MS, "limit": GLOBAL_LIMIT, "versions": versions, "load": loadavg()}


def run_global_phase(*args) -> dict:
    """phase_global, or {"skipped": why} after printing one line."""
    try:
        return phase_global(*args)
    except GlobalSkip as e:
        print(f"[bench] global phase skipped: {e}", flush=True)
        return {"skipped": str(e)}

