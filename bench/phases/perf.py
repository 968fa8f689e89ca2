"""CPU, throughput and latency by listener: interleaved rounds over connection counts, one hot
tenant, on the perf Envoy (one worker pinned) built by bench.py."""

from __future__ import annotations

from common import PERF_LISTENERS, Envoy, log
from load import Wrk, measure_round, rotated


def phase_perf(envoy: Envoy, wrk: Wrk, conns_list, rounds: int, seconds: int, warm_s: int) -> list[dict]:
    if warm_s:
        log(f"warm-up: {warm_s} s per listener")
        for name in PERF_LISTENERS:
            wrk.run(envoy.url(name), 16, warm_s, "static")
    rows = []
    for rnd in range(rounds):
        order = rotated(PERF_LISTENERS, rnd)
        for conns in conns_list:
            rows += measure_round(envoy, wrk, order, rnd, conns, seconds)
            line = ", ".join(
                f"{x['listener']} {x['cpu_us_per_req']:.2f}"
                for x in rows
                if x["round"] == rnd and x["conns"] == conns
            )
            log(f"round {rnd + 1}/{rounds} c={conns}: us/req {line}")
    return rows
