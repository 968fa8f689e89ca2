"""Issue 7: soak. Concurrent wrk load across several tenants for `TRL_SOAK_SECONDS`
(default 20; the real soak is 600) while the listener's plugin config is reloaded through
LDS from a file every `TRL_SOAK_RELOAD_SECONDS` (default 5; 30 for the real soak),
alternating two valid configs.

    TRL_SOAK_SECONDS=600 TRL_SOAK_RELOAD_SECONDS=30 .venv/bin/python -m pytest -s tests/e2e/test_soak.py

Must hold: no 5xx, every reload accepted and applied, a probe tenant with a known budget
(capacity 10, refill 1/hour, same in both configs) gets exactly 10 requests through over the
whole run, and Envoy's VmRSS at the end is within RSS_BOUND_MIB of its value after warm-up.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from .harness import Wrk, bootstrap, free_port, http_listener, request, vm_rss_kib, write_lds

SOAK_SECONDS = float(os.environ.get("TRL_SOAK_SECONDS", "20"))
RELOAD_SECONDS = float(os.environ.get("TRL_SOAK_RELOAD_SECONDS", "5"))
LOAD_TENANTS = 32
PROBE_CAPACITY = 10
# Measured here: within +-2 MiB over 20 s (4 reloads) and over 600 s (20 reloads).
RSS_BOUND_MIB = 16


def config(version: str, capacity: int) -> dict:
    return {
        "capacity": capacity,
        "refill_rate": "50/s",
        "max_tenants": 256,
        "tenants": {"probe": {"capacity": PROBE_CAPACITY, "refill_rate": "1/hour"}},
        "deny": {"body": version, "content_type": "text/plain"},
    }


CONFIGS = [("A", config("A", 20)), ("B", config("B", 40))]


def test_soak_with_reloads(envoy_factory, wasm, wrk_bin, tmp_path):
    lds = tmp_path / "lds.yaml"
    port = free_port()
    pushes = [0]

    def push(i: int) -> None:
        pushes[0] += 1
        _, plugin = CONFIGS[i % 2]
        write_lds(lds, [http_listener("soak", plugin, wasm, port=port, root_id="tenant_ratelimit")],
                  str(pushes[0]))

    push(0)
    envoy = envoy_factory(config=bootstrap(lds_path=str(lds)), max_lifetime=SOAK_SECONDS + 180)
    deadline = time.monotonic() + 15
    while envoy.stat("listener_manager.lds.update_success") != 1 or request(port).status not in (200, 429):
        assert time.monotonic() < deadline, envoy.log_tail()
        time.sleep(0.05)
    pid = envoy.proc.pid

    stop = threading.Event()
    probe_statuses: list[int] = []
    deny_bodies: set[bytes] = set()
    probe_errors: list[BaseException] = []

    def probe() -> None:
        try:
            while not stop.is_set():
                r = request(port, headers={"x-tenant-id": "probe"})  # a new connection: the newest config
                probe_statuses.append(r.status)
                if r.status == 429:
                    deny_bodies.add(r.body)
                stop.wait(0.25)
        except BaseException as e:
            probe_errors.append(e)

    t0 = time.monotonic()
    w = Wrk(wrk_bin, port, duration=SOAK_SECONDS + 1, threads=2, connections=8,
            env={"TRL_WRK_MODE": "cycle", "TRL_WRK_PREFIX": "soak", "TRL_WRK_TENANTS": str(LOAD_TENANTS)})
    prober = threading.Thread(target=probe, daemon=True)
    rss_samples: list[tuple[float, int]] = []
    warm_rss = None
    warm_at = min(RELOAD_SECONDS + 2, SOAK_SECONDS / 3)
    with w:
        prober.start()
        next_reload = t0 + RELOAD_SECONDS
        i = 0
        while w.running() and time.monotonic() - t0 < SOAK_SECONDS + 10:
            now = time.monotonic()
            if now >= next_reload and now - t0 < SOAK_SECONDS - 1:
                i += 1
                push(i)
                next_reload += RELOAD_SECONDS
            rss = vm_rss_kib(pid)
            rss_samples.append((now - t0, rss))
            if warm_rss is None and now - t0 >= warm_at:
                warm_rss = rss
            time.sleep(0.2)
        result = w.wait()
    stop.set()
    prober.join(15)
    # let the last LDS update land, then read everything
    deadline = time.monotonic() + 15
    while (envoy.stat("listener_manager.lds.update_success") or 0) < pushes[0]:
        assert time.monotonic() < deadline, envoy.log_tail()
        time.sleep(0.05)
    end_rss = vm_rss_kib(pid)
    elapsed = time.monotonic() - t0
    http = envoy.stats(r"^http\.soak\.downstream_rq_([1-5]xx|total)$")
    c = envoy.counters()
    lds_stats = envoy.stats(r"^listener_manager\.lds\.update_")
    wasm_stats = envoy.stats(r"^wasm\.")
    peak = max(r for _, r in rss_samples)
    growth = (end_rss - warm_rss) / 1024 if warm_rss else 0.0
    admitted = probe_statuses.count(200)
    print(f"\nsoak: {elapsed:.1f} s, {pushes[0] - 1} reloads, wrk {result.requests} requests "
          f"({result.requests / result.seconds:.0f} req/s) errors {result.errors}")
    print(f"soak: http {http}, lds {lds_stats}")
    print(f"soak: counters allowed {c.get('allowed')} denied {c.get('denied')} store_errors {c.get('store_errors')} "
          f"cas_retries {c.get('cas_retries')} live_slots {c.get('live_slots')} overflow_used {c.get('overflow_used')}")
    print(f"soak: wasm {({k: v for k, v in wasm_stats.items() if 'remote_load' not in k})}")
    print(f"soak: probe {admitted} admitted of {len(probe_statuses)}, deny bodies {sorted(deny_bodies)}")
    print(f"soak: RSS warm {warm_rss and warm_rss / 1024:.1f} MiB, end {end_rss / 1024:.1f} MiB, "
          f"peak {peak / 1024:.1f} MiB, growth {growth:+.1f} MiB (bound {RSS_BOUND_MIB} MiB)")

    assert not probe_errors, probe_errors
    assert result.requests > 0
    assert result.errors["connect"] == 0 and result.errors["timeout"] == 0, result.stdout
    assert http.get("http.soak.downstream_rq_5xx", 0) == 0, http
    assert c.get("store_errors", 0) == 0, c
    assert lds_stats.get("listener_manager.lds.update_rejected", 0) == 0, envoy.log_tail()
    assert lds_stats.get("listener_manager.lds.update_success", 0) >= pushes[0]
    failed = {k: v for k, v in wasm_stats.items() if ("fail" in k or "vm_reload" in k) and v}
    assert failed == {}, failed
    assert set(probe_statuses) <= {200, 429}, probe_statuses
    # the probe's budget is exact across every reload (1/hour: no refill within the run)
    assert elapsed < 3600
    assert admitted == PROBE_CAPACITY, probe_statuses
    if pushes[0] > 1:
        assert deny_bodies == {b"A", b"B"}, "the reloads never took effect"
    assert warm_rss is not None
    assert abs(growth) < RSS_BOUND_MIB, rss_samples[::max(1, len(rss_samples) // 20)]
    assert envoy.proc.poll() is None
    assert "panic" not in envoy.log_text()
