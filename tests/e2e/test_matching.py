"""Issue 18, matching that does what operators mean, in real Envoy with 2 workers: a health
check under `path_separated_prefix` is exempt while `/healthzfoo` is metered, a `*.suffix` host
rule (port ignored), a header matcher, a rule on the name of the Envoy route the request
matched (`xds.route_name`), and a listed tenant's own rules tried before the top-level ones."""

from __future__ import annotations

import pytest

from .harness import send, statuses

SLOW = "1/hour"  # nothing refills during a test


def ok(name: str | None, prefix: str) -> dict:
    route = {"match": {"prefix": prefix}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    if name:
        route["name"] = name
    return route


# A VirtualService-like route table: `/reviews` is the named route "reviews-v2" (Istio names
# an Envoy route after the VirtualService's `http[].name`), the rest an unnamed route.
ROUTES = {
    "name": "local",
    "virtual_hosts": [{"name": "backend", "domains": ["*"],
                       "routes": [ok("reviews-v2", "/reviews"), ok(None, "/")]}],
}

CONFIG = {
    "capacity": 3, "refill_rate": SLOW,
    "tenants": {"acme": {"capacity": 4, "refill_rate": SLOW, "rules": [
        {"name": "acme-export", "path_separated_prefix": "/export", "capacity": 2, "refill_rate": SLOW},
        {"path": "/free", "cost": 0},
    ]}},
    "rules": [
        {"path_separated_prefix": "/healthz", "cost": 0},
        {"name": "eu", "host": "*.eu.example.com", "capacity": 1, "refill_rate": SLOW},
        {"headers": [{"name": "x-debug", "exact": "1"}], "cost": 3},
        {"name": "reviews", "route": "reviews-v2", "capacity": 2, "refill_rate": SLOW},
        {"path_prefix": "/"},
    ],
}


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory({"match": {"plugin_config": CONFIG, "hcm_extra": {"route_config": ROUTES}}},
                         concurrency=2)


def test_health_checks_are_exempt_but_a_lookalike_path_is_metered(envoy, fresh):
    port = envoy.port("match")
    t = {"x-tenant-id": fresh("health")}
    before = envoy.counter("unmetered")
    for path in ("/healthz", "/healthz/live", "/healthz?probe=1", "/healthz/"):
        assert statuses(send(port, 5, path=path, headers=t, connections=2)) == [200] * 5, path
    assert envoy.counter("unmetered") - before == 20
    # /healthzfoo is not under /healthz: the tenant's bucket (3), then denied.
    assert sorted(statuses(send(port, 5, path="/healthzfoo", headers=t, connections=2))) == [200] * 3 + [429] * 2


def test_host_suffix_rule_ignores_port_and_case(envoy, fresh):
    port = envoy.port("match")
    t = fresh("host")
    eu = {"x-tenant-id": t, "Host": "API.eu.Example.com:8443"}
    # The eu rule's own bucket: 1 per tenant, across both workers.
    assert sorted(statuses(send(port, 4, path="/x", headers=eu, connections=2))) == [200, 429, 429, 429]
    assert statuses(send(port, 1, path="/x", headers={**eu, "Host": "b.eu.example.com"})) == [429]
    # eu.example.com itself is not *.eu.example.com: the tenant's own bucket (3), untouched so far.
    apex = {"x-tenant-id": t, "Host": "eu.example.com"}
    assert statuses(send(port, 4, path="/x", headers=apex)) == [200, 200, 200, 429]


def test_header_matcher_charges_its_cost(envoy, fresh):
    port = envoy.port("match")
    t = fresh("hdr")
    # x-debug: 1 costs 3 of the tenant's 3 tokens; x-debug: 2 is an ordinary request.
    assert statuses(send(port, 2, path="/x", headers={"x-tenant-id": t, "x-debug": "1"})) == [200, 429]
    u = fresh("hdr")
    assert statuses(send(port, 4, path="/x", headers={"x-tenant-id": u, "x-debug": "2"})) == [200, 200, 200, 429]


def test_route_name_rule_meters_the_named_route(envoy, fresh):
    port = envoy.port("match")
    t = {"x-tenant-id": fresh("route")}
    before = envoy.counters()
    # /reviews/... matched the route named reviews-v2: the reviews rule's bucket (2).
    assert sorted(statuses(send(port, 5, path="/reviews/1", headers=t, connections=2))) == [200] * 2 + [429] * 3
    # Another path (the unnamed route) is the tenant's bucket, untouched by the reviews rule.
    assert statuses(send(port, 4, path="/ratings/1", headers=t)) == [200, 200, 200, 429]
    after = envoy.counters()
    assert after["rule.reviews.allowed"] - before.get("rule.reviews.allowed", 0) == 2
    assert after["rule.reviews.denied"] - before.get("rule.reviews.denied", 0) == 3


def test_a_tenants_own_rules_come_before_the_top_level_ones(envoy, fresh):
    port = envoy.port("match")
    acme = {"x-tenant-id": "acme"}
    before = envoy.counters()
    # acme's export rule: a bucket of 2 per (acme, acme-export), exact across both workers.
    assert sorted(statuses(send(port, 6, path="/export/report.csv", headers=acme, connections=3))) == \
        [200] * 2 + [429] * 4
    # acme's /free is exempt; its /healthz too (top-level rules still follow acme's own).
    assert statuses(send(port, 4, path="/free", headers=acme)) == [200] * 4
    assert statuses(send(port, 2, path="/healthz", headers=acme)) == [200] * 2
    # /exportx is not under /export: acme's own bucket (4), untouched by the export rule.
    assert statuses(send(port, 5, path="/exportx", headers=acme)) == [200] * 4 + [429]
    after = envoy.counters()
    assert after["rule.acme-export.allowed"] - before.get("rule.acme-export.allowed", 0) == 2
    assert after["rule.acme-export.denied"] - before.get("rule.acme-export.denied", 0) == 4
    assert after["unmetered"] - before["unmetered"] == 6
    # Another tenant's /free and /export are ordinary requests on its own bucket (3).
    other = {"x-tenant-id": fresh("other")}
    assert statuses(send(port, 2, path="/free", headers=other) + send(port, 2, path="/export", headers=other)) == \
        [200, 200, 200, 429]
