"""Reconfiguration keeps each tenant's spent tokens. The listener comes from LDS on a file
(`path_config_source`); rewriting the file (atomic rename) makes Envoy build a new filter
config, i.e. a new plugin `on_configure`, while the buckets live on in shared data.
A bad config pushed this way is rejected and the previous one keeps serving."""

from __future__ import annotations

import time

import pytest

from .harness import bootstrap, free_port, http_listener, request, send, statuses, write_lds

RATE = "1/hour"  # keep the rate: the bucket state is a time, read with the current rate


@pytest.fixture(scope="module")
def lds(envoy_factory, wasm, tmp_path_factory):
    d = tmp_path_factory.mktemp("lds")
    path = d / "lds.yaml"
    port = free_port()
    version = [0]

    def push(plugin) -> None:
        version[0] += 1
        write_lds(path, [http_listener("dyn", plugin, wasm, port=port, root_id="tenant_ratelimit")], str(version[0]))

    push({"capacity": 5, "refill_rate": RATE, "deny": {"body": "v1", "content_type": "text/plain"}})
    envoy = envoy_factory(config=bootstrap(lds_path=str(path)))
    envoy.push = push
    envoy.dyn_port = port
    return envoy


def wait_stat(envoy, name: str, value: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (envoy.stat(name) or 0) >= value and (envoy.stat("listener_manager.total_listeners_warming") or 0) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {value}:\n{envoy.log_tail()}")


def test_spent_tokens_survive_a_config_change(lds):
    port = lds.dyn_port
    assert statuses(send(port, 6, headers={"x-tenant-id": "spent"})) == [200] * 5 + [429]
    assert statuses(send(port, 2, headers={"x-tenant-id": "half"})) == [200] * 2
    assert statuses(send(port, 2, headers={"x-tenant-id": "shrink"})) == [200] * 2

    ok = lds.stat("listener_manager.lds.update_success")
    lds.push({"capacity": 5, "refill_rate": RATE, "deny": {"body": "v2", "content_type": "text/plain"}})
    wait_stat(lds, "listener_manager.lds.update_success", ok + 1)
    # new connections now reach the new config; a reset bucket would answer 200 here
    deadline = time.monotonic() + 10
    while True:
        r = request(port, headers={"x-tenant-id": "spent"})
        assert r.status == 429, "spent tokens were forgotten on reconfiguration"
        if r.body == b"v2" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.body == b"v2", "the new config never took effect"
    r = request(port, headers={"x-tenant-id": "half"})
    assert (r.status, r.headers["x-ratelimit-remaining"]) == (200, "2")

    # a smaller capacity: spent tokens still count (2 of the new 3 are spent)
    ok = lds.stat("listener_manager.lds.update_success")
    lds.push({"capacity": 3, "refill_rate": RATE, "deny": {"body": "v3", "content_type": "text/plain"}})
    wait_stat(lds, "listener_manager.lds.update_success", ok + 1)
    deadline = time.monotonic() + 10
    while request(port, headers={"x-tenant-id": "spent"}).body != b"v3":
        assert time.monotonic() < deadline, "v3 never took effect"
        time.sleep(0.05)
    r = request(port, headers={"x-tenant-id": "shrink"})
    assert (r.status, r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == (200, "3", "0")
    assert request(port, headers={"x-tenant-id": "shrink"}).status == 429
    assert request(port, headers={"x-tenant-id": "spent"}).status == 429


def test_bad_config_over_lds_is_rejected_and_old_config_keeps_serving(lds, fresh):
    port = lds.dyn_port
    rejected = lds.stat("listener_manager.lds.update_rejected") or 0
    lds.push({"capacity": 3, "refill_rate": "3/fortnight"})
    deadline = time.monotonic() + 15
    while (lds.stat("listener_manager.lds.update_rejected") or 0) <= rejected:
        assert time.monotonic() < deadline, f"bad LDS update never rejected:\n{lds.log_tail()}"
        time.sleep(0.05)
    assert "invalid plugin config: field `refill_rate`" in lds.log_text()
    t = fresh("after-bad")
    resps = send(port, 4, headers={"x-tenant-id": t})
    assert statuses(resps) == [200, 200, 200, 429]  # still the last good config (capacity 3)
    assert resps[3].body == b"v3"
