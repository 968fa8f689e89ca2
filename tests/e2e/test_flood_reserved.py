"""Issue 15, item 2: a flood of junk tenant ids must never lock a listed tenant out.

The configuration of the report (2 workers, max_tenants 2000, unknown tenants 5 tokens at
0.001/s, "vip" listed with 10 tokens) plus a per-rule limit ("login", 3 tokens). wrk sends
two bounded floods of fresh random ids at 127.0.0.1: far more ids than slots, and with that
refill no junk bucket is full again, so every slot stays taken and the overflow bucket is
drained. Then "vip", never seen before, sends 15 requests over two connections (both
workers): exactly 10 must pass (before reserved keys: 0), and its login bucket exactly 3.
The key count stays bounded by the config: max_tenants slots + 1 overflow key + 2
reserved keys (vip, vip's login bucket).
"""

from __future__ import annotations

import os
import time

from .harness import Client, Wrk

MAX_TENANTS = 2000
# Per flood: 10x the slots, sent as fast as wrk goes (about 2 s here); -d is the hard bound.
# TRL_FLOOD_REQUESTS=200000 replays the report's floods (about 15 s each).
FLOOD_REQUESTS = int(os.environ.get("TRL_FLOOD_REQUESTS", "20000"))
FLOOD_SECONDS = 60

CONFIG = {
    "capacity": 5,
    "refill_rate": 0.001,
    "max_tenants": MAX_TENANTS,
    "tenants": {"vip": {"capacity": 10, "refill_rate": 0.001}},
    "rules": [
        {"name": "login", "path_prefix": "/login", "capacity": 3, "refill_rate": 0.001},
        {"path_prefix": "/"},
    ],
}


def flood(envoy, wrk_bin: str, port: int, prefix: str) -> None:
    """FLOOD_REQUESTS fresh ids; stopped as soon as Envoy has counted them."""
    total = "http.flood.downstream_rq_total"
    start = envoy.stat(total) or 0
    w = Wrk(wrk_bin, port, duration=FLOOD_SECONDS, threads=2, connections=16,
            limit=FLOOD_REQUESTS // 2 + 100, env={"TRL_WRK_MODE": "distinct", "TRL_WRK_PREFIX": prefix})
    with w:
        t0 = time.monotonic()
        while w.running():
            if (envoy.stat(total) or 0) - start >= FLOOD_REQUESTS:
                w.stop()
                break
            time.sleep(0.1)
        result = w.wait()
    seconds = time.monotonic() - t0
    print(f"\nflood {prefix}: {result.requests} requests in {seconds:.1f} s ({result.requests / seconds:.0f}/s)")
    assert result.errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}, result.stdout
    assert (envoy.stat(total) or 0) - start >= FLOOD_REQUESTS, result.stdout


def admitted(port: int, n: int, path: str = "/") -> int:
    """`n` requests as vip, alternating two keep-alive connections (so both workers)."""
    got = 0
    with Client(port) as a, Client(port) as b:
        for i in range(n):
            r = (a, b)[i % 2].request(path=path, headers={"x-tenant-id": "vip"})
            assert r.status in (200, 429), (r.status, r.body)
            got += r.status == 200
    return got


def test_a_junk_id_flood_never_locks_out_a_listed_tenant(envoy_factory, wrk_bin):
    envoy = envoy_factory({"flood": CONFIG})
    port = envoy.port("flood")

    flood(envoy, wrk_bin, port, "junk-a-")
    flood(envoy, wrk_bin, port, "junk-b-")
    c = envoy.counters()
    print(f"\nflood: after two floods {c}")
    # Every slot holds a live junk bucket and the overflow bucket is drained.
    assert c.get("live_slots", 0) == MAX_TENANTS + 1, c
    assert c.get("overflow_used", 0) > FLOOD_REQUESTS, c
    with Client(port) as cl:
        assert cl.request(headers={"x-tenant-id": "junk-late"}).status == 429

    assert admitted(port, 15) == 10
    assert admitted(port, 6, "/login") == 3
    c = envoy.counters()
    assert c.get("tenant.vip.allowed") == 10, c
    assert c.get("rule.login.allowed") == 3, c
    # Bounded by the config: the slots, the overflow key, vip's two reserved keys.
    assert c.get("live_slots") == MAX_TENANTS + 1 + 2, c
    assert c.get("store_errors", 0) == 0, c

    # Another flood changes nothing for vip: its bucket stays exactly where it was.
    flood(envoy, wrk_bin, port, "junk-c-")
    assert admitted(port, 5) == 0
    assert envoy.counters().get("live_slots") == MAX_TENANTS + 1 + 2
    assert envoy.proc.poll() is None
    assert "panic" not in envoy.log_text()
