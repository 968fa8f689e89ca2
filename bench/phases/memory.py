"""Memory per tenant: RSS of a one-worker Envoy before and after sending distinct tenants."""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import http_get, listener, log, native_filter, start_envoy, stat, vm_filter
from load import Wrk


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
            filt = vm_filter(
                "mem_ours",
                wasm,
                json.dumps({"capacity": 100, "refill_rate": 0.001, "rate_limit_headers": "off", "max_tenants": max_t}),
            )
        else:
            filt = native_filter("mem_native", 100, 1, max_t)
        envoy = start_envoy(envoy_bin, workdir, f"envoy_mem_{kind}", [listener("mem", [filt])], 1, cpus)
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
                # The gauge is published on the filter's 1 s tick: wait for it to settle.
                slots = (envoy.wait_flush(), stat(envoy, "wasmcustom.tenant_ratelimit.live_slots"))[1] \
                    if kind == "ours" else None
                row["steps"].append({"tenants": target, "requests": w["requests"], "rss_kib": rss, "live_slots": slots})
                log(f"memory {kind}: {target} tenants -> RSS {rss / 1024:.1f} MiB (start {rss0 / 1024:.1f} MiB)")
            out.append(row)
        finally:
            envoy.stop()
    return out
