"""Issue 12: rules with their own limit (a bucket per tenant and rule), unmetered paths."""

from __future__ import annotations

import pytest

from .harness import request, send, statuses

SLOW = "1/hour"
LOGIN = {"name": "login", "methods": ["POST"], "path_prefix": "/login", "capacity": 2, "refill_rate": "5/min"}

LISTENERS = {
    "rules": {"capacity": 5, "refill_rate": SLOW, "rules": [LOGIN, {"path_prefix": "/"}],
              "rate_limit_headers": "ietf"},
    "partial": {"capacity": 1, "refill_rate": SLOW,
                "rules": [{"path_prefix": "/api"}, {"path_prefix": "/free", "cost": 0}]},
}


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory(LISTENERS)


def test_login_rule_limits_post_login_per_tenant(envoy, fresh):
    port = envoy.port("rules")
    a, b = fresh("rule-a"), fresh("rule-b")
    before = envoy.counters()
    logins = send(port, 4, path="/login", method="POST", headers={"x-tenant-id": a})
    assert statuses(logins) == [200, 200, 429, 429]
    assert logins[0].headers["ratelimit-policy"] == '"login";q=2;w=24'  # 2 tokens at 5/min
    assert logins[2].headers["ratelimit"].startswith('"login";r=0;')
    # another tenant has its own login bucket
    assert statuses(send(port, 3, path="/login?next=/", method="POST", headers={"x-tenant-id": b})) == [200, 200, 429]
    # GET / (and GET /login: the login rule is POST only) use the tenant's bucket, untouched by logins
    gets = send(port, 3, path="/", headers={"x-tenant-id": a}) + send(port, 3, path="/login", headers={"x-tenant-id": a})
    assert statuses(gets) == [200] * 5 + [429]
    assert [r.headers["ratelimit"].split(";")[1] for r in gets] == ["r=4", "r=3", "r=2", "r=1", "r=0", "r=0"]
    assert {r.headers["ratelimit-policy"] for r in gets} == {'"default";q=5;w=18000'}
    after = envoy.counters()
    assert after["rule.login.allowed"] - before.get("rule.login.allowed", 0) == 4
    assert after["rule.login.denied"] - before.get("rule.login.denied", 0) == 3
    assert after["rule.login.shadow_denied"] == 0
    assert after["allowed"] - before["allowed"] == 4 + 5
    assert after["denied"] - before["denied"] == 3 + 1
    assert "tenant_ratelimit_rule_login_allowed" in envoy.prometheus()


def test_requests_matching_no_rule_are_unmetered(envoy, fresh):
    port = envoy.port("partial")
    t = {"x-tenant-id": fresh("partial")}
    before = envoy.counter("unmetered")
    assert statuses(send(port, 3, path="/other", headers=t)) == [200] * 3
    assert statuses(send(port, 2, path="/free/x", headers=t)) == [200] * 2
    assert envoy.counter("unmetered") - before == 5
    r = request(port, path="/other", headers=t)
    assert "x-ratelimit-limit" not in r.headers  # unmetered: no quota to report
    assert statuses(send(port, 2, path="/api/v1", headers=t)) == [200, 429]
