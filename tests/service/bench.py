"""Measures tenant-ratelimit-service on loopback: service and Redis CPU per decision (from
/proc/<pid>/stat), calls/s, client-side p50/p99 latency, and Redis commands per call.

    .venv/bin/python -m tests.service.bench [--calls 20000] [--threads 8] [--tenants 1000]

(run from the repository root after `make service`; SERVICE=path overrides the binary).
The client is Python grpcio on the same machine, so calls/s is a floor, not the service's
ceiling; the CPU per call is measured on the service and Redis processes alone."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.rlsproto import METHOD, request  # noqa: E402
from service.svc import Redis, Service, build_service, redis_server  # noqa: E402

import grpc  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--tenants", type=int, default=1000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="svc-bench-"))
    r = Redis(work / "redis", redis_server()).start()
    config = {"domains": {"bench": {"capacity": 1000000, "refill_rate": "1000000/s"}}}
    s = Service(build_service(), work, ["--redis", r.url], config, name="bench").start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{s.port}")
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        bodies = [request("bench", [[("tenant", f"t{i}")]], 1) for i in range(args.tenants)]
        for b in bodies[:50]:
            call(b, timeout=5)  # warm up (connections, script cache)
        redis_pid = r.proc.pid
        svc_pid = s.proc.pid
        cmds0 = s.metric("trl_service_redis_commands_total")
        svc0, redis0 = cpu_seconds(svc_pid), cpu_seconds(redis_pid)
        latencies: list[float] = []
        lock = threading.Lock()
        per_thread = args.calls // args.threads

        def run(k: int) -> None:
            mine = []
            for i in range(per_thread):
                body = bodies[(k * per_thread + i) % len(bodies)]
                t0 = time.perf_counter()
                call(body, timeout=5)
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(k,)) for k in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        n = len(latencies)
        svc_cpu = cpu_seconds(svc_pid) - svc0
        redis_cpu = cpu_seconds(redis_pid) - redis0
        cmds = s.metric("trl_service_redis_commands_total") - cmds0
        latencies.sort()
        print(f"calls                 {n} ({args.threads} client threads, {args.tenants} tenants)")
        print(f"calls/s               {n / wall:.0f}")
        print(f"latency p50 / p99     {statistics.median(latencies) * 1e6:.0f} us / {latencies[int(n * 0.99)] * 1e6:.0f} us")
        print(f"service CPU per call  {svc_cpu / n * 1e6:.1f} us")
        print(f"redis CPU per call    {redis_cpu / n * 1e6:.1f} us")
        print(f"service+redis per call {(svc_cpu + redis_cpu) / n * 1e6:.1f} us")
        print(f"redis commands / call {cmds / n:.2f}")
        channel.close()
    finally:
        s.stop()
        r.stop()


if __name__ == "__main__":
    main()
