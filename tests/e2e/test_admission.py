"""Issue 3: exact admission across workers, tenants, overrides, refill, shadow mode, headers,
the deny reply, stats, near_limit and the first-touch race. One Envoy (--concurrency 2), one
listener per plugin config, distinct tenant ids per test."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from .harness import STAT_PREFIX, Client, burst, prometheus_value, request, send, statuses

SLOW = "1/hour"  # no refill within a test

LISTENERS = {
    "basic": {"capacity": 5, "refill_rate": "1/min",
              "tenants": {"gold": {"capacity": 8, "refill_rate": SLOW},
                          "counted": {"capacity": 3, "refill_rate": SLOW}}},
    "refill": {"capacity": 1, "refill_rate": "2/s"},
    "shadow": {"capacity": 2, "refill_rate": SLOW, "mode": "shadow", "tenants": {"shadowed": {"capacity": 2}}},
    "tshadow": {"capacity": 1, "refill_rate": SLOW,
                "tenants": {"new": {"capacity": 1, "mode": "shadow"}, "old": {"capacity": 1}}},
    "deny": {"capacity": 1, "refill_rate": SLOW,
             "deny": {"status": 503, "body": "slow down, please", "content_type": "text/plain; charset=utf-8"}},
    "near": {"capacity": 10, "refill_rate": SLOW},
    "race": {"capacity": 3, "refill_rate": SLOW},
    "readable": {"capacity": 2, "refill_rate": "120/min"},
}


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory(LISTENERS)


def tenant(t: str) -> dict:
    return {"x-tenant-id": t}


def worker_cx(envoy, listener: str) -> list[int]:
    stats = envoy.stats(f"^listener\\.{listener}\\.worker_")
    return [stats.get(f"listener.{listener}.worker_{i}.downstream_cx_total", 0) for i in range(envoy.concurrency)]


def test_exact_admission_across_workers(envoy, fresh):
    """capacity 5: exactly 5 of 20 quick requests pass, over parallel connections that land
    on both workers (retried with a new tenant in the unlikely case the kernel put every
    connection on one worker)."""
    port = envoy.port("basic")
    for _attempt in range(3):
        before = worker_cx(envoy, "basic")
        resps = send(port, 20, headers=tenant(fresh("exact")), connections=10)
        used = [a - b for a, b in zip(worker_cx(envoy, "basic"), before)]
        assert Counter(statuses(resps)) == {200: 5, 429: 15}
        if all(used):
            return
    pytest.fail(f"connections never spread over both workers: {used}")


def test_two_tenants_are_independent(envoy, fresh):
    port = envoy.port("basic")
    a, b = fresh("a"), fresh("b")
    assert statuses(send(port, 7, headers=tenant(a))) == [200] * 5 + [429] * 2
    assert statuses(send(port, 7, headers=tenant(b))) == [200] * 5 + [429] * 2
    assert request(port, headers=tenant(a)).status == 429


def test_query_parameter_tenant(envoy, fresh):
    port = envoy.port("basic")
    q = fresh("q")
    assert statuses(send(port, 6, path=f"/items?x=1&tenant={q}")) == [200] * 5 + [429]
    # the same tenant by header shares the bucket; the header wins over the query
    assert request(port, headers=tenant(q)).status == 429
    assert request(port, path=f"/?tenant={q}", headers=tenant(fresh("other"))).status == 200


def test_per_tenant_override(envoy, fresh):
    port = envoy.port("basic")
    resps = send(port, 10, headers=tenant("gold"))
    assert statuses(resps) == [200] * 8 + [429] * 2
    assert resps[0].headers["x-ratelimit-limit"] == "8"
    assert request(port, headers=tenant(fresh("plain"))).headers["x-ratelimit-limit"] == "5"


def test_refill_after_waiting(envoy, fresh):
    port = envoy.port("refill")
    t = fresh("refill")
    with Client(port) as c:
        assert c.request(headers=tenant(t)).status == 200
        denied = c.request(headers=tenant(t))
        assert denied.status == 429
        assert denied.headers["retry-after"] == "1"
        time.sleep(0.6)
        assert c.request(headers=tenant(t)).status == 200
        assert c.request(headers=tenant(t)).status == 429


def test_readable_rate_is_accepted(envoy, fresh):
    """"120/min" = 2 tokens/s: capacity 2 -> 2 pass, then one more after ~0.5 s."""
    port = envoy.port("readable")
    t = fresh("readable")
    assert statuses(send(port, 3, headers=tenant(t))) == [200, 200, 429]
    time.sleep(0.6)
    assert request(port, headers=tenant(t)).status == 200


def test_shadow_mode_passes_everything_and_counts(envoy, fresh):
    port = envoy.port("shadow")
    before = envoy.counters()
    resps = send(port, 6, headers=tenant(fresh("sh")), connections=3)
    resps += send(port, 5, headers=tenant("shadowed"))
    after = envoy.counters()
    assert statuses(resps) == [200] * 11
    assert after["shadow_denied"] - before["shadow_denied"] == 4 + 3
    assert after["denied"] - before["denied"] == 0
    assert after["allowed"] - before["allowed"] == 2 + 2
    assert after["tenant.shadowed.shadow_denied"] - before.get("tenant.shadowed.shadow_denied", 0) == 3
    assert after["tenant.shadowed.denied"] == 0


def test_per_tenant_shadow(envoy, fresh):
    """tenants.new has mode shadow: never denied but counted; other tenants enforced."""
    port = envoy.port("tshadow")
    before = envoy.counters()
    assert statuses(send(port, 4, headers=tenant("new"))) == [200] * 4
    assert statuses(send(port, 3, headers=tenant("old"))) == [200, 429, 429]
    assert statuses(send(port, 2, headers=tenant(fresh("unlisted")))) == [200, 429]
    after = envoy.counters()
    assert after["tenant.new.shadow_denied"] - before["tenant.new.shadow_denied"] == 3
    assert after["tenant.new.denied"] == 0
    assert after["tenant.old.denied"] - before["tenant.old.denied"] == 2
    assert after["shadow_denied"] - before["shadow_denied"] == 3
    assert after["denied"] - before["denied"] == 3


def test_rate_limit_headers_and_default_deny(envoy, fresh):
    port = envoy.port("basic")
    resps = send(port, 6, headers=tenant(fresh("hdr")))
    for i, r in enumerate(resps[:5]):
        assert r.status == 200
        assert r.body == b"ok\n"
        assert r.headers["x-ratelimit-limit"] == "5"
        assert r.headers["x-ratelimit-remaining"] == str(4 - i)
        reset = int(r.headers["x-ratelimit-reset"])
        assert 0 < reset <= 60 * (i + 1)  # until the bucket is full again
        assert "retry-after" not in r.headers
    denied = resps[5]
    assert denied.status == 429
    assert denied.headers["x-ratelimit-limit"] == "5"
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert 0 < int(denied.headers["x-ratelimit-reset"]) <= 300
    retry = denied.headers["retry-after"]
    assert retry.isdigit() and 1 <= int(retry) <= 60
    assert denied.headers["content-type"] == "application/json"
    assert denied.header_count("content-type") == 1
    assert denied.body == b'{"error":"Too Many Requests"}'


def test_configured_deny_reply(envoy, fresh):
    port = envoy.port("deny")
    t = fresh("deny")
    ok, denied = send(port, 2, headers=tenant(t))
    assert ok.status == 200
    assert denied.status == 503
    assert denied.body == b"slow down, please"
    assert denied.headers["content-type"] == "text/plain; charset=utf-8"
    assert denied.header_count("content-type") == 1
    assert int(denied.headers["retry-after"]) >= 1
    assert denied.headers["x-ratelimit-remaining"] == "0"


def test_stats_in_stats_and_prometheus(envoy, fresh):
    port = envoy.port("basic")
    unlisted = fresh("unlisted")
    envoy.wait_flush()  # the views below read what the filter has published
    before_text = envoy.stats_text()
    before_prom = envoy.prometheus()
    statuses_ = statuses(send(port, 5, headers=tenant("counted")) + send(port, 6, headers=tenant(unlisted)))
    assert statuses_ == [200] * 3 + [429] * 2 + [200] * 5 + [429]
    envoy.wait_flush()
    after_text = envoy.stats_text()
    after_prom = envoy.prometheus()

    def d(name):
        return after_text.get(STAT_PREFIX + name, 0) - before_text.get(STAT_PREFIX + name, 0)

    assert d("allowed") == 8
    assert d("denied") == 3
    assert d("tenant.counted.allowed") == 3
    assert d("tenant.counted.denied") == 2
    # per-tenant stats exist only for listed tenants
    assert not [n for n in after_text if unlisted in n or unlisted.replace("-", "_") in n]
    assert STAT_PREFIX + "tenant.gold.allowed" in after_text

    def p(metric):
        return prometheus_value(after_prom, metric) - (prometheus_value(before_prom, metric) or 0)

    assert p("tenant_ratelimit_allowed") == 8
    assert p("tenant_ratelimit_denied") == 3
    assert p("tenant_ratelimit_tenant_counted_allowed") == 3
    assert p("tenant_ratelimit_tenant_counted_denied") == 2
    assert envoy.stat(STAT_PREFIX + "allowed") == after_text[STAT_PREFIX + "allowed"]  # JSON view agrees


def test_near_limit_counter(envoy, fresh):
    """near_limit_fraction defaults to 0.2: of 10 tokens, admissions leaving 1 and 0 count."""
    port = envoy.port("near")
    before = envoy.counter("near_limit")
    assert statuses(send(port, 11, headers=tenant(fresh("near")))) == [200] * 10 + [429]
    assert envoy.counter("near_limit") - before == 2


def test_first_touch_race(envoy, fresh):
    """40 simultaneous first requests (each on its own connection) for each of 4 fresh
    tenants, capacity 3: exactly 3 admitted per tenant, whichever worker creates the bucket."""
    port = envoy.port("race")
    tenants = [fresh("race") for _ in range(4)]
    reqs = [{"headers": tenant(t)} for _ in range(40) for t in tenants]
    before = worker_cx(envoy, "race")
    resps = burst(port, reqs)
    used = [a - b for a, b in zip(worker_cx(envoy, "race"), before)]
    admitted = Counter(r["headers"]["x-tenant-id"] for r, resp in zip(reqs, resps) if resp.status == 200)
    assert {t: admitted[t] for t in tenants} == {t: 3 for t in tenants}
    assert Counter(statuses(resps)) == {200: 12, 429: 148}
    assert all(used), f"one worker served every connection: {used}"


def test_invalid_tenant_ids_fall_back_to_the_default_tenant(envoy):
    """Too long or with a space: not a tenant id, so the request is charged to `default`
    (a bad header never bypasses the limiter). Only this test uses `default` on `basic`."""
    port = envoy.port("basic")
    assert statuses(send(port, 5)) == [200] * 5
    for bad in ("x" * 129, "a b", "a\tb"):  # (leading whitespace is OWS: HTTP strips it)
        assert request(port, headers=tenant(bad)).status == 429, repr(bad)
    assert request(port, path="/?tenant=has%20space").status == 429
    assert request(port, headers=tenant("x" * 128)).status == 200  # 128 is the limit


def test_exact_admission_with_four_workers(envoy_factory, fresh):
    envoy4 = envoy_factory({"basic": LISTENERS["basic"]}, concurrency=4, name="four")
    port = envoy4.port("basic")
    tenants = [fresh("four") for _ in range(3)]
    reqs = [{"headers": tenant(t)} for _ in range(20) for t in tenants]
    resps = burst(port, reqs)
    admitted = Counter(r["headers"]["x-tenant-id"] for r, resp in zip(reqs, resps) if resp.status == 200)
    assert {t: admitted[t] for t in tenants} == {t: 5 for t in tenants}
    assert sum(1 for n in worker_cx(envoy4, "basic") if n) >= 2
