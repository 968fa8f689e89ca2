"""Issue 18: plans (tiers) and decisions you can see, in real Envoy with 2 workers.

The README's seed quotas as plans (`free` 60/min; `acme` on `pro`; `globex` its own 300/min),
exact across workers under concurrent load; each decision in a real access-log file through
`%FILTER_STATE(wasm.tenant_ratelimit:PLAIN)%`; a shadow denial named to the upstream in
`x-ratelimit-would-deny`; `enforce_percent` enforcing part of the denials.
"""

from __future__ import annotations

import time

import pytest

from .harness import bootstrap, file_access_log, http_listener, send, statuses

LOG_FORMAT = "%REQ(X-TENANT-ID)% %RESPONSE_CODE% [%FILTER_STATE(wasm.tenant_ratelimit:PLAIN)%] [%REQ(X-RATELIMIT-WOULD-DENY)%]\n"
FLUSH_WAIT = 5.0  # Envoy flushes access logs every 100 ms here (--file-flush-interval-msec)

# The README's plans with hourly refill, so the few seconds of a test refill nothing and the
# counts are exact.
PLANS = {
    "capacity": 1000, "refill_rate": "1000/h",
    "plans": {"free": {"capacity": 60, "refill_rate": "60/h"},
              "pro": {"capacity": 120, "refill_rate": "120/h"}},
    "tenant": {"from": [{"header": "x-tenant-id"}], "plan_from": [{"header": "x-plan"}], "default_plan": "free"},
    "tenants": {"acme": {"plan": "pro"}, "globex": {"capacity": 300, "refill_rate": "300/h"}},
    "filter_state": True,
}
SHADOW = {
    "capacity": 2, "refill_rate": "1/h", "shadow_header": "x-ratelimit-would-deny", "filter_state": True,
    "plans": {"trial": {"mode": "shadow"}}, "tenant": {"plan_from": [{"header": "x-plan"}]},
}
PERCENT = {"capacity": 1, "refill_rate": "1/h", "enforce_percent": 50}


@pytest.fixture(scope="module")
def setup(envoy_factory, wasm, tmp_path_factory):
    logs = tmp_path_factory.mktemp("plans_logs")
    listeners = [
        http_listener(name, config, wasm, hcm_extra={"access_log": [file_access_log(logs / f"{name}.log", LOG_FORMAT)]})
        for name, config in (("plans", PLANS), ("shadow", SHADOW), ("percent", PERCENT))
    ]
    envoy = envoy_factory(config=bootstrap(listeners), concurrency=2, extra_args=["--file-flush-interval-msec", "100"])
    return envoy, logs


def log_lines(logs, name: str, count: int) -> list[str]:
    """The first `count` lines of a listener's access log, once Envoy has flushed them."""
    deadline = time.monotonic() + FLUSH_WAIT
    while True:
        path = logs / f"{name}.log"
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines


def admitted(port: int, n: int, tenant: str, plan: str | None = None) -> int:
    headers = {"x-tenant-id": tenant, **({"x-plan": plan} if plan else {})}
    return statuses(send(port, n, headers=headers, connections=8)).count(200)


def test_plans_are_exact_across_workers_with_the_documented_precedence(setup, fresh):
    envoy, _ = setup
    port = envoy.port("plans")
    before = envoy.counters()
    assert admitted(port, 90, fresh("new")) == 60  # default_plan free
    assert admitted(port, 90, fresh("liar"), plan="platinum") == 60  # unknown plan: free, never unlimited
    assert admitted(port, 160, fresh("upgraded"), plan="pro") == 120  # plan_from
    assert admitted(port, 160, "acme", plan="free") == 120  # acme's named plan wins
    assert admitted(port, 330, "globex", plan="free") == 300  # globex's own fields win
    after = envoy.counters()
    assert after["plan.free.allowed"] - before.get("plan.free.allowed", 0) == 120
    assert after["plan.free.denied"] - before.get("plan.free.denied", 0) == 60
    assert after["plan.pro.allowed"] - before.get("plan.pro.allowed", 0) == 120
    assert after["tenant.acme.allowed"] - before.get("tenant.acme.allowed", 0) == 120
    assert after["tenant.globex.allowed"] - before.get("tenant.globex.allowed", 0) == 300


def test_each_decision_is_in_the_access_log(setup, fresh):
    envoy, logs = setup
    port = envoy.port("shadow")
    tenant = fresh("seen")
    rs = send(port, 3, headers={"x-tenant-id": tenant})
    assert statuses(rs) == [200, 200, 429]
    trial = send(port, 3, headers={"x-tenant-id": fresh("trial"), "x-plan": "trial"})
    assert statuses(trial) == [200, 200, 200]  # the trial plan is shadow: nothing denied
    lines = log_lines(logs, "shadow", 6)
    assert lines[:3] == [
        f"{tenant} 200 [tenant={tenant} plan=- rule=- policy=default limit=- outcome=allowed] [-]",
        f"{tenant} 200 [tenant={tenant} plan=- rule=- policy=default limit=- outcome=allowed] [-]",
        f"{tenant} 429 [tenant={tenant} plan=- rule=- policy=default limit=default outcome=denied] [-]",
    ], lines
    # The shadow denial reaches the upstream with the policy that would have denied it.
    assert lines[5].endswith("plan=trial rule=- policy=trial limit=trial outcome=shadow_denied] [trial]"), lines


def test_enforce_percent_enforces_part_of_the_denials(setup, fresh):
    envoy, _ = setup
    port = envoy.port("percent")
    before = envoy.counters()
    codes = statuses(send(port, 201, headers={"x-tenant-id": fresh("pct")}, connections=4))
    after = envoy.counters()
    denied = after["denied"] - before["denied"]
    shadow = after["shadow_denied"] - before["shadow_denied"]
    assert codes.count(429) == denied and denied + shadow == 200
    assert 50 <= denied <= 150, f"{denied} of 200 enforced at 50 %"
