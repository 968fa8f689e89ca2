"""Issue 18 in the fleet service: plans. The same config as the filter's, with `plans`; a
descriptor's `plan` entry (the filter sends it with `global.plan_key`) puts an unlisted
tenant on that plan, a listed tenant's named plan wins, an unknown plan is `default_plan`."""

from __future__ import annotations

import pytest

from tests.support.rlsproto import OK, OVER_LIMIT

SLOW = "1/hour"
CONFIG = {
    "domains": {
        "tiers": {
            "capacity": 1, "refill_rate": SLOW,
            "plans": {"free": {"capacity": 2, "refill_rate": SLOW}, "pro": {"capacity": 5, "refill_rate": SLOW}},
            "tenant": {"plan_from": [{"header": "x-plan"}], "default_plan": "free"},
            "tenants": {"acme": {"plan": "pro"}, "globex": {"capacity": 3, "refill_rate": SLOW}},
        },
        "shared": {
            "capacity": 1, "refill_rate": SLOW, "unknown_tenants": "shared",
            "plans": {"pro": {"capacity": 4, "refill_rate": SLOW}},
            "tenant": {"plan_from": [{"header": "x-plan"}]},
        },
    },
}


@pytest.fixture(scope="module")
def services(svc_factory, redis):
    return [svc_factory(["--redis", redis.url], CONFIG) for _ in range(2)]


def admitted(clients, domain: str, tenant: str, plan: str | None, n: int) -> int:
    entries = [("tenant", tenant)] + ([("plan", plan)] if plan else [])
    return sum(clients[i % 2].ask(domain, [entries]).code == OK for i in range(n))


def test_the_plan_entry_picks_an_unlisted_tenants_limit(clients, fresh):
    assert admitted(clients, "tiers", fresh("p"), "pro", 8) == 5
    assert admitted(clients, "tiers", fresh("f"), "free", 8) == 2
    assert admitted(clients, "tiers", fresh("n"), None, 8) == 2  # default_plan
    assert admitted(clients, "tiers", fresh("u"), "platinum", 8) == 2  # unknown: default_plan


def test_listed_tenants_keep_their_named_plan_and_own_fields(clients):
    assert admitted(clients, "tiers", "acme", "free", 8) == 5
    assert admitted(clients, "tiers", "globex", "pro", 8) == 3


def test_shared_unlisted_tenants_share_one_bucket_per_plan(clients, fresh):
    a, b = fresh("sa"), fresh("sb")
    assert admitted(clients, "shared", a, "pro", 3) == 3
    r = clients[0].ask("shared", [[("tenant", b), ("plan", "pro")]])
    assert (r.code, r.statuses[0].remaining) == (OK, 0)  # the 4th of pro's shared 4
    assert clients[1].ask("shared", [[("tenant", b), ("plan", "pro")]]).code == OVER_LIMIT
    # Unlisted tenants without a plan have the top level's shared bucket, apart from pro's.
    assert clients[0].ask("shared", [[("tenant", a)]]).code == OK
