"""Invalid plugin configs are refused with one actionable log line, and what Envoy does then;
readable rates ("120/min", "7200/hour", ...) are accepted.

Observed with Envoy 1.40 and a static (bootstrap) listener: `on_configure` returns false, the
filter logs `tenant-ratelimit: invalid plugin config: field ...` at error level, Envoy logs
"Plugin tenant_ratelimit failed to load" / "Unable to create Wasm plugin tenant_ratelimit"
and exits with status 1 before serving anything on any listener (also with
`failure_policy: FAIL_OPEN`). A bad config pushed over LDS is rejected instead and the old
listener keeps serving (test_reconfig.py).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from .harness import Envoy, bootstrap, http_listener, request, send, statuses

GOOD = {"capacity": 3, "refill_rate": "1/min"}

BAD = {
    "bad_unit": ({"capacity": 3, "refill_rate": "5/fortnight"},
                 "invalid plugin config: field `refill_rate`: \"5/fortnight\": unknown unit \"fortnight\"; "
                 "accepted units: s, sec, second, min, minute, h, hour, d, day"),
    "typo": ({"capacity": 3, "refill_rate": 1, "capacty": 5},
             "invalid plugin config: field `capacty`: unknown field; expected one of: capacity,"),
    "tenant_capacity": ({"capacity": 3, "refill_rate": 1, "tenants": {"acme": {"capacity": 0}}},
                        "invalid plugin config: field `tenants.acme.capacity`: must be a whole number from 1"),
    "not_json": ('{"capacity": 3,', "invalid plugin config: not valid JSON"),
}


def start_bad(envoy_factory, wasm, plugin, extra_wasm_config=None) -> Envoy:
    bad = http_listener("bad", plugin, wasm)
    if extra_wasm_config:
        bad["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]["config"].update(
            extra_wasm_config)
    return envoy_factory(config=bootstrap([http_listener("good", GOOD, wasm), bad]), start=False)


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_config_is_refused_and_envoy_exits(envoy_factory, wasm, case):
    plugin, message = BAD[case]
    envoy = start_bad(envoy_factory, wasm, plugin)
    envoy.spawn()
    rc = envoy.wait_exit(20)
    log = envoy.log_text()
    assert rc not in (None, 0), f"Envoy kept running with an invalid plugin config:\n{envoy.log_tail()}"
    lines = [l for l in log.splitlines() if "tenant-ratelimit: invalid plugin config" in l]
    assert len(lines) >= 1, envoy.log_tail()
    assert "[error][wasm]" in lines[0]
    assert message in lines[0], lines[0]
    assert "Unable to create Wasm plugin tenant_ratelimit" in log
    assert not re.search(r"configured: capacity \d+, .*root id \"trl_bad\"", log)


def test_fail_open_does_not_keep_envoy_up(envoy_factory, wasm):
    """failure_policy FAIL_OPEN governs VM crashes at runtime, not a refused configuration:
    Envoy still exits at startup."""
    envoy = start_bad(envoy_factory, wasm, BAD["bad_unit"][0], {"failure_policy": "FAIL_OPEN"})
    envoy.spawn()
    assert envoy.wait_exit(20) not in (None, 0), envoy.log_tail()
    assert "field `refill_rate`" in envoy.log_text()


@pytest.mark.skipif(not os.environ.get("CHECKER"), reason="CHECKER (native config checker) not set")
@pytest.mark.parametrize("case", sorted(BAD))
def test_checker_reports_what_envoy_logs(envoy_factory, wasm, case):
    """`make check-config` on the very bootstrap Envoy refused prints the same message."""
    plugin, message = BAD[case]
    envoy = start_bad(envoy_factory, wasm, plugin)
    envoy.config_path.write_text(__import__("yaml").safe_dump(envoy.config))
    p = subprocess.run([os.environ["CHECKER"], str(envoy.config_path)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1, p.stdout + p.stderr
    assert message in p.stdout, p.stdout


RATES = {
    "capacity": 1, "refill_rate": "1/hour", "rate_limit_headers": "ietf",
    "tenants": {
        "per-min": {"capacity": 60, "refill_rate": "60/min"},      # 1/s   -> w = 60
        "per-hour": {"capacity": 2, "refill_rate": "7200/hour"},   # 2/s   -> w = 1
        "per-day": {"capacity": 1, "refill_rate": "1/day"},        # w = 86400
        "spaced": {"capacity": 10, "refill_rate": "5 / second"},   # w = 2
        "number": {"capacity": 4, "refill_rate": 0.5},              # w = 8
        "minute": {"capacity": 120, "refill_rate": "120/minute"},  # w = 60
    },
}


def test_readable_rates_are_accepted(envoy_factory):
    envoy = envoy_factory({"rates": RATES})
    port = envoy.port("rates")
    want = {"per-min": 60, "per-hour": 1, "per-day": 86400, "spaced": 2, "number": 8, "minute": 60}
    for tenant, window in want.items():
        r = request(port, headers={"x-tenant-id": tenant})
        cap = RATES["tenants"][tenant]["capacity"]
        assert r.headers["ratelimit-policy"] == f'"{tenant}";q={cap};w={window}'
    assert statuses(send(port, 2, headers={"x-tenant-id": "per-day"})) == [429, 429]
