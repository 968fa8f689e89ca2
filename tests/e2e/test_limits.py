"""Issue 18, several limits on one policy (`limits`), in real Envoy with 2 workers: a request
is admitted only if every limit admits, a denial debits no limit (one record, one CAS), so
concurrent load gets exactly the minimum of the limits; RateLimit-Policy lists every limit,
RateLimit and retry-after follow the limits that decide; per-limit denied stats; the checker
prints every limit and warns about long local windows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter

import pytest

from .harness import send, statuses

TWO = [{"name": "burst", "capacity": 5, "refill_rate": "5/s"},
       {"name": "minute", "capacity": 8, "refill_rate": "8/min"}]

LISTENERS = {
    # Unlisted tenants (fresh ids per test) get the top level's two limits.
    "two": {"limits": TWO, "rate_limit_headers": "ietf"},
    # No refill within a test: the tighter limit alone decides, whichever it is.
    "hour_binds": {"limits": [{"name": "minute", "capacity": 10, "refill_rate": "10/min"},
                              {"name": "hour", "capacity": 4, "refill_rate": "4/h"}]},
    "minute_binds": {"limits": [{"name": "minute", "capacity": 3, "refill_rate": "3/min"},
                                {"name": "day", "capacity": 50, "refill_rate": "50/day"}]},
    # A listed tenant, for its per-limit stats.
    "stats": {"capacity": 100, "refill_rate": "1/hour", "tenants": {"acme": {"limits": TWO}}},
}


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory(LISTENERS)


def worker_cx(envoy, listener: str) -> list[int]:
    stats = envoy.stats(f"^listener\\.{listener}\\.worker_")
    return [stats.get(f"listener.{listener}.worker_{i}.downstream_cx_total", 0) for i in range(envoy.concurrency)]


def spread(envoy, listener: str, fn):
    """Runs `fn()` until its connections landed on both workers (at most 3 tries; `fn` uses
    a fresh tenant each time)."""
    for _attempt in range(3):
        before = worker_cx(envoy, listener)
        out = fn()
        used = [a - b for a, b in zip(worker_cx(envoy, listener), before)]
        if all(used):
            return out
    pytest.fail(f"connections never spread over both workers: {used}")


def ietf(value: str) -> tuple[str, dict[str, int]]:
    m = re.fullmatch(r'"([^"]*)"((?:;[a-z]+=\d+)*)', value)
    assert m, value
    return m.group(1), {k: int(v) for k, v in (p.split("=") for p in m.group(2).split(";")[1:])}


@pytest.mark.parametrize("listener,admitted", [("hour_binds", 4), ("minute_binds", 3)])
def test_concurrent_load_gets_exactly_the_tighter_limit(envoy, fresh, listener, admitted):
    port = envoy.port(listener)

    def run():
        t = fresh(listener)
        return t, send(port, 24, headers={"x-tenant-id": t}, connections=12)

    t, resps = spread(envoy, listener, run)
    assert Counter(statuses(resps)) == {200: admitted, 429: 24 - admitted}
    # Later requests find every limit as the denials left it: nothing was debited.
    assert statuses(send(port, 6, headers={"x-tenant-id": t})) == [429] * 6


def test_burst_then_minute_exactly_the_minimum_and_headers(envoy, fresh):
    """5/s and 8/min: a concurrent burst gets the 5 (6 if a burst token refills mid-burst);
    1.5 s later another gets exactly what the minute limit has left, because the burst's
    denials took nothing from it: 8 in all, the minimum of the limits over those seconds."""
    port = envoy.port("two")

    def run():
        t = fresh("two")
        return t, time.monotonic(), send(port, 20, headers={"x-tenant-id": t}, connections=10)

    t, start, first = spread(envoy, "two", run)
    a = statuses(first).count(200)
    assert a in (5, 6), statuses(first)
    for r in first:
        assert r.headers["ratelimit-policy"] == '"burst";q=5;w=1, "minute";q=8;w=60'
    denied = [r for r in first if r.status == 429]
    for r in denied:
        # The burst decided: one second to wait, and RateLimit names it.
        assert r.headers["retry-after"] == "1"
        name, params = ietf(r.headers["ratelimit"])
        assert (name, params["r"]) == ("burst", 0)
        assert params["t"] <= 1
    time.sleep(1.5)
    second = send(port, 20, headers={"x-tenant-id": t}, connections=10)
    elapsed = time.monotonic() - start
    assert elapsed < 7, "the minute limit refills its first token 7.5 s after the first request"
    b = statuses(second).count(200)
    assert a + b == 8, (a, b)
    late = [r for r in second if r.status == 429]
    assert late
    for r in late:
        # Now the minute limit decides: retry-after is its wait (7.5 s after the first
        # request), and RateLimit reports it with nothing left.
        retry = int(r.headers["retry-after"])
        assert 5 <= retry <= 8, retry
        name, params = ietf(r.headers["ratelimit"])
        assert (name, params["r"]) == ("minute", 0)
        assert params["t"] <= retry


def test_allowed_responses_report_the_limit_closest_to_denying(envoy, fresh):
    r = send(envoy.port("two"), 1, headers={"x-tenant-id": fresh("h")})[0]
    assert r.status == 200
    assert ietf(r.headers["ratelimit"]) == ("burst", {"r": 4, "t": 1})


def test_per_limit_denied_stats(envoy):
    before = envoy.counters()
    resps = send(envoy.port("stats"), 12, headers={"x-tenant-id": "acme"}, connections=4)
    assert statuses(resps).count(200) in (5, 6)
    after = envoy.counters()
    burst = after.get("tenant.acme.limit.burst.denied", 0) - before.get("tenant.acme.limit.burst.denied", 0)
    assert burst == statuses(resps).count(429)
    assert "tenant.acme.limit.minute.denied" in after
    assert after["tenant.acme.denied"] - before.get("tenant.acme.denied", 0) == burst


@pytest.mark.skipif(not os.environ.get("CHECKER"), reason="CHECKER (native config checker) not set")
def test_checker_prints_every_limit_and_warns_about_long_local_windows(tmp_path):
    config = {"limits": [{"name": "minute", "capacity": 120, "refill_rate": "120/min"},
                         {"name": "daily", "capacity": 10000, "refill_rate": "10000/day"}],
              "tenants": {"acme": {"capacity": 5, "refill_rate": "5/s"}}}
    path = tmp_path / "limits.json"
    path.write_text(json.dumps(config))
    p = subprocess.run([os.environ["CHECKER"], str(path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"default/minute\s+capacity\s+120 ", p.stdout), p.stdout
    assert re.search(r"default/daily\s+capacity\s+10000 .*window 86400s", p.stdout), p.stdout
    warnings = [line for line in p.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1 and '"daily"' in warnings[0] and "global" in warnings[0], p.stdout
    # With a `global` section the long quota is the service's business: no warning.
    config["global"] = {"cluster": "rls", "domain": "d"}
    path.write_text(json.dumps(config))
    p = subprocess.run([os.environ["CHECKER"], str(path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "warning" not in p.stdout, p.stdout
