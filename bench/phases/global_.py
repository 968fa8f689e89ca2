"""Global limits: our filter asking the rate-limit service (tenant-ratelimit-service, started by
tests/support/services.py) against the same filter with local buckets only, in two topologies:
one service on one redis-server, and two services (round robin) on a Redis Cluster of 3
masters + 3 replicas. Then, per topology, the service alone at a fixed 1,000 calls/s, open loop
(service/examples/rls_load.rs: calls sent on schedule, each timed from its scheduled send, so
queueing counts): the latency a request waits for its call, and the CPU per decision."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from common import CLK_TCK, HUGE, REPO, cmd_out, http_get, listener, loadavg, log, start_envoy, stat, vm_filter
from load import Wrk, measure, rotated
from tests.support.envoy import STAT_PREFIX as STAT, cpu_ticks, grpc_cluster
from tests.support.services import SERVICE_BIN, Redis, RedisCluster, Service, redis_cli_bin

# g_*: one service on one redis-server (cluster `ratelimit`); c_*: two services on a Redis
# Cluster (cluster `ratelimit_cluster`, both replicas round robin). g_local is the baseline of
# both (the "added latency" is a row's p50/p99 minus g_local's in the same round).
GLOBAL_LISTENERS = ["g_local", "g_global", "g_both", "g_lease10", "g_lease100", "c_global", "c_lease10"]
GLOBAL_LABELS = {
    "g_local": "local only (no `global`)",
    "g_global": "mode global",
    "g_both": "mode both",
    "g_lease10": "mode global, lease_tokens 10",
    "g_lease100": "mode global, lease_tokens 100",
    "c_global": "mode global, 2 services + Redis Cluster",
    "c_lease10": "mode global, lease_tokens 10, 2 services + Redis Cluster",
}
GLOBAL_SECTIONS = {  # the `global` section of each listener's config (None: local only)
    "g_local": None,
    "g_global": {"mode": "global"},
    "g_both": {"mode": "both"},
    "g_lease10": {"mode": "global", "lease_tokens": 10},
    "g_lease100": {"mode": "global", "lease_tokens": 100},
    "c_global": {"mode": "global", "cluster": "ratelimit_cluster"},
    "c_lease10": {"mode": "global", "lease_tokens": 10, "cluster": "ratelimit_cluster"},
}
GLOBAL_DOMAIN = "bench"
GLOBAL_TIMEOUT_MS = 200
GLOBAL_CONNS = 16
# The service's limit: never denies during a run (10^9 tokens; a run spends a few million).
# The refill is slow on purpose: a lease lives until the bucket would be full again
# (duration_until_reset), so a bucket refilling at 10^9/s would make every lease expire at once.
GLOBAL_LIMIT = {"capacity": HUGE, "refill_rate": "1000/s"}


# The open-loop run: a fixed rate (issue 17's latency target is p99 < 2 ms at 1,000 calls/s),
# bounded in time; after a warm-up second (connections, script cache).
OPEN_LOOP_RATE = 1000
OPEN_LOOP_SECONDS = 10
OPEN_LOOP_WARM = 1
LOAD_BIN = REPO / "target" / "service" / "examples" / "rls_load"


class GlobalSkip(Exception):
    """The global phase cannot run here (missing service binary or redis-server)."""


def global_prereqs() -> tuple[str, str, str]:
    """(tenant-ratelimit-service, redis-server, redis-cli) binaries, or GlobalSkip saying what
    is missing."""
    svc = os.environ.get("SERVICE") or str(SERVICE_BIN)
    if not (Path(svc).is_file() and os.access(svc, os.X_OK)):
        how = "SERVICE" if os.environ.get("SERVICE") else "`make service`, or set SERVICE"
        raise GlobalSkip(f"no tenant-ratelimit-service binary at {svc} ({how})")
    redis = shutil.which("redis-server")
    cli = redis_cli_bin()
    if not redis or not cli:
        raise GlobalSkip("redis-server / redis-cli are not installed (apt-get install -y redis-server)")
    return svc, redis, cli


def load_bin() -> str:
    """service/examples/rls_load (built with the service's profile; incremental when `make
    service` ran)."""
    cargo = shutil.which("cargo")
    if cargo is not None:
        p = subprocess.run([cargo, "build", "--quiet", "--profile", "service", "-p", "tenant-ratelimit-service",
                            "--example", "rls_load"], cwd=REPO, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise GlobalSkip(f"building service/examples/rls_load failed: {p.stderr[-2000:]}")
    if not LOAD_BIN.is_file():
        raise GlobalSkip(f"no {LOAD_BIN} (cargo build --profile service -p tenant-ratelimit-service --example rls_load)")
    return str(LOAD_BIN)


def open_loop(load: str, svcs, nodes, masters, rate: int, seconds: int, warm: int) -> dict:
    """rls_load against `svcs` (round robin, one HTTP/2 connection each, as an Envoy worker
    keeps): latency from the scheduled send (us), service and Redis CPU per call, commands."""
    cmds0 = redis_commands(masters)
    p = subprocess.run([load, "--target", ",".join(f"127.0.0.1:{s.port}" for s in svcs), "--rate", str(rate),
                        "--seconds", str(seconds), "--warm", str(warm), "--domain", GLOBAL_DOMAIN,
                        "--svc-pids", ",".join(str(s.proc.pid) for s in svcs),
                        "--redis-pids", ",".join(str(n.proc.pid) for n in nodes)],
                       capture_output=True, text=True, timeout=seconds + warm + 60)
    cmds1 = redis_commands(masters)
    if p.returncode != 0:
        raise RuntimeError(f"rls_load failed ({p.returncode}): {p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    # The commands cover the warm-up too: per call over all calls sent.
    sent = r["calls"] * (seconds + warm) / seconds
    r["redis_sent_per_call"] = (cmds1[0] - cmds0[0]) / max(sent, 1)
    r["load"] = loadavg()
    return r


def redis_commands(nodes) -> tuple[int, int]:
    """(commands the service sent: EVALSHA + EVAL, all commands Redis ran: with the ones inside
    the script) over `nodes`."""
    sent = total = 0
    for n in nodes:
        stats = n.commandstats()
        sent += stats.get("evalsha", 0) + stats.get("eval", 0)
        total += sum(stats.values())
    return sent, total


def two_endpoint_cluster(name: str, ports: list[int]) -> dict:
    """grpc_cluster with one endpoint per port (round robin)."""
    c = grpc_cluster(name, ports[0])
    c["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports]
    return c


def global_listener_config(wasm: Path, name: str) -> dict:
    conf = {"capacity": HUGE, "refill_rate": HUGE, "rate_limit_headers": "off", "max_tenants": 20_000}
    sec = GLOBAL_SECTIONS[name]
    if sec is not None:
        conf["global"] = {"cluster": "ratelimit", "domain": GLOBAL_DOMAIN, "timeout_ms": GLOBAL_TIMEOUT_MS,
                          "failure_mode": "allow", "tenant_key": "tenant"} | sec
    return vm_filter(f"trl_{name}", wasm, json.dumps(conf))


def phase_global(envoy_bin: str, wasm: Path, wrk: Wrk, workdir: Path, rounds: int, seconds: int, warm_s: int,
                 cpus: str | None) -> dict:
    """One Envoy (1 worker, pinned like the perf phase), one listener per variant; cluster
    `ratelimit` to one service on one redis-server, cluster `ratelimit_cluster` to two services
    on a Redis Cluster (all unpinned). Raises GlobalSkip."""
    svc_bin, redis_bin, cli_bin = global_prereqs()
    gdir = workdir / "global"
    gdir.mkdir(exist_ok=True)
    config = {"domains": {GLOBAL_DOMAIN: GLOBAL_LIMIT}}
    started: list = []
    try:
        redis = Redis(gdir / "redis", redis_bin).start()
        started.append(redis)
        single = Service(svc_bin, gdir, ["--redis", redis.url], config, name="svc-single").start()
        started.append(single)
        cluster = RedisCluster(gdir / "cluster", redis_bin, cli_bin)
        started.append(cluster)
        cluster.start()
        pair = []
        for i in range(2):
            pair.append(Service(svc_bin, gdir, ["--redis-cluster", ",".join(cluster.urls)], config,
                                name=f"svc-cluster{i}").start())
            started.append(pair[-1])
        # Which processes count as "service" and "Redis" for each listener's rows.
        # Commands are counted on the masters only: a replica also runs each replicated write.
        masters = [n for n in cluster.nodes if "role:master" in n.cli("INFO", "replication")]
        topo = {"g": ([single], [redis], [redis]), "c": (pair, cluster.nodes, masters)}
        versions = {"redis": cmd_out([redis_bin, "--version"]),
                    "service": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip()}
        log(f"global: redis-server on {redis.port}, service on {single.port}; "
            f"cluster {[n.port for n in cluster.nodes]}, services on {[s.port for s in pair]}")
        rows: list[dict] = []
        listeners = [listener(n, [global_listener_config(wasm, n)]) for n in GLOBAL_LISTENERS]
        envoy = start_envoy(envoy_bin, workdir, "envoy_global", listeners, 1, cpus,
                            clusters=[grpc_cluster("ratelimit", single.port),
                                      two_endpoint_cluster("ratelimit_cluster", [s.port for s in pair])])
        try:
            counters = ("global_calls", "global_errors", "global_over_limit", "lease_hits")
            # The filter publishes its counters on its 1 s tick: wait for them to settle.
            snap = lambda: (envoy.wait_flush(), {k: stat(envoy, STAT + k) for k in counters})[1]  # noqa: E731
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
                                       f"service log tail:\n{single.log_tail(40)}\n{pair[0].log_tail(20)}")
            if warm_s:
                log(f"global warm-up: {warm_s} s per listener")
                for name in GLOBAL_LISTENERS:
                    wrk.run(envoy.url(name), GLOBAL_CONNS, warm_s, "static")
            for rnd in range(rounds):
                for name in rotated(GLOBAL_LISTENERS, rnd):
                    svcs, nodes, masters = topo[name[0]]
                    svc_ticks = lambda: sum(cpu_ticks(s.proc.pid) for s in svcs)  # noqa: E731
                    redis_ticks = lambda: sum(cpu_ticks(n.proc.pid) for n in nodes)  # noqa: E731
                    cmds0 = redis_commands(masters)
                    c0, s0, r0 = snap(), svc_ticks(), redis_ticks()
                    r = measure(envoy, wrk, name, GLOBAL_CONNS, seconds)
                    s1, r1, c1 = svc_ticks(), redis_ticks(), snap()
                    cmds1 = redis_commands(masters)
                    reqs = max(r["requests"], 1)
                    r["round"] = rnd
                    for k in counters:
                        r[k] = c1[k] - c0[k]
                    calls = max(r["global_calls"], 1)
                    svc_us, redis_us = (s1 - s0) * 1e6 / CLK_TCK, (r1 - r0) * 1e6 / CLK_TCK
                    r["service_cpu_us_per_req"] = (svc_us + redis_us) / reqs
                    # Per decision (one service call): the service's processes, then Redis's.
                    r["svc_cpu_us_per_call"] = svc_us / calls
                    r["redis_cpu_us_per_call"] = redis_us / calls
                    r["calls_per_s"] = r["global_calls"] / max(seconds, 1)
                    r["redis_sent_per_call"] = (cmds1[0] - cmds0[0]) / calls
                    r["redis_cmds_per_call"] = (cmds1[1] - cmds0[1]) / calls
                    r["calls_per_req"] = r["global_calls"] / reqs
                    rows.append(r)
                base = next(x for x in rows if x["round"] == rnd and x["listener"] == "g_local")
                for x in rows:
                    if x["round"] == rnd:
                        x["added_p50_us"] = x["p50_us"] - base["p50_us"]
                        x["added_p99_us"] = x["p99_us"] - base["p99_us"]
                line = ", ".join(f"{x['listener']} {x['rps']:.0f}/s {x['cpu_us_per_req']:.1f}us"
                                 for x in rows if x["round"] == rnd)
                log(f"global round {rnd + 1}/{rounds}: {line}")
        finally:
            envoy.stop()
        # The service alone at a fixed rate, open loop (Envoy stopped, so it takes no CPU).
        load = load_bin()
        ol_seconds, ol_warm = (1, 0) if seconds <= 1 else (OPEN_LOOP_SECONDS, OPEN_LOOP_WARM)
        open_rows = {}
        for t, label in [("g", "1 service + Redis"), ("c", "2 services + Redis Cluster")]:
            svcs, nodes, masters = topo[t]
            time.sleep(0.5)
            open_rows[t] = open_loop(load, svcs, nodes, masters, OPEN_LOOP_RATE, ol_seconds, ol_warm) | {"label": label}
            log(f"global open loop {label}: {open_rows[t]}")
    finally:
        for p in reversed(started):
            p.stop()
    return {"rows": rows, "rounds": rounds, "seconds": seconds, "warm": warm_s, "conns": GLOBAL_CONNS,
            "timeout_ms": GLOBAL_TIMEOUT_MS, "limit": GLOBAL_LIMIT, "versions": versions, "load": loadavg(),
            "open_loop": {"rate": OPEN_LOOP_RATE, "seconds": ol_seconds, "warm": ol_warm, "rows": open_rows}}


def run_global_phase(*args) -> dict:
    """phase_global, or {"skipped": why} after printing one line."""
    try:
        return phase_global(*args)
    except GlobalSkip as e:
        print(f"[bench] global phase skipped: {e}", flush=True)
        return {"skipped": str(e)}

