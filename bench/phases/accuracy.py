"""Admission accuracy: one hot tenant, capacity 100 and 50/s, 64 connections against an Envoy
with 2 and then 4 workers; admitted (Envoy's 2xx) against capacity + rate * t, ours and native."""

from __future__ import annotations

import time
from pathlib import Path

from common import listener, log, native_filter, ours_filter, start_envoy, stat
from load import LUA_DONE, Wrk


def phase_accuracy(envoy_bin: str, wasm: Path, wrk: Wrk, workdir: Path, workers_list, seconds: int) -> list[dict]:
    capacity, rate = 100, 50
    out = []
    for workers in workers_list:
        listeners = [
            listener("acc_ours", [ours_filter("acc_ours", wasm, capacity, rate, "off", 10_000)]),
            listener("acc_native", [native_filter("acc_native", capacity, rate, 1000)]),
        ]
        envoy = start_envoy(envoy_bin, workdir, f"envoy_acc_{workers}w", listeners, workers, None)
        try:
            for name in ("acc_ours", "acc_native"):
                tenant = f"hot-{workers}w-{name}"  # a fresh, full bucket
                before = stat(envoy, f"http.{name}.downstream_rq_2xx")
                t0 = time.monotonic()
                w = _wrk_one_tenant(wrk, envoy.url(name), seconds, tenant)
                elapsed = time.monotonic() - t0
                admitted = stat(envoy, f"http.{name}.downstream_rq_2xx") - before
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
