"""CPU, throughput and latency by listener: interleaved rounds over connection counts, one hot
tenant, on the perf Envoy (one worker pinned) built by bench.py."""

from __future__ import annotations

from common import PERF_LISTENERS, Envoy, log
from load import Wrk, measure


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
