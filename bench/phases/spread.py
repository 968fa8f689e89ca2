"""Tenant spread: wrk's Lua `request()` rotates x-tenant-id over N tenants, on the perf Envoy."""

from __future__ import annotations

from common import SPREAD_LISTENERS, Envoy, log
from load import Wrk, measure


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
