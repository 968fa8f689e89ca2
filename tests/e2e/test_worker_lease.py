"""Issue 11's worker-local fast path (`worker_lease`, opt-in) in real Envoy with 2 workers:
never more than the bucket holds; while leases are out, at most workers x lease fewer; the
unspent tokens go back within a tick; small buckets are not leased, so they stay exact."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from .harness import send, statuses

LEASE = 4
LISTENERS = {
    "lease": {"capacity": 100, "refill_rate": "1/hour", "worker_lease": LEASE},
    "small": {"capacity": 5, "refill_rate": "1/hour", "worker_lease": LEASE},
}


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory(LISTENERS)


def test_never_over_admits_and_under_admits_at_most_workers_times_lease(envoy, fresh):
    port = envoy.port("lease")
    t = {"x-tenant-id": fresh("lease")}
    admitted = Counter(statuses(send(port, 160, headers=t, connections=8)))[200]
    assert admitted <= 100
    assert admitted >= 100 - envoy.concurrency * LEASE, admitted
    # Within a tick (1 s) the workers give back what they did not spend: the rest of the
    # bucket is then admitted, exactly 100 in all.
    time.sleep(2.5)
    admitted += Counter(statuses(send(port, 40, headers=t, connections=4)))[200]
    assert admitted == 100


def test_counters_add_up_with_worker_leases(envoy, fresh):
    """allowed + denied + shadow_denied = metered with leases out and denials: once the tick
    flushed the batched lease counters, 130 requests are 100 allowed and 30 denied."""
    port = envoy.port("lease")
    names = ("allowed", "denied", "shadow_denied")
    published = envoy.counters()
    before = {k: published.get(k, 0) for k in names}
    t = {"x-tenant-id": fresh("adds")}
    got = Counter(statuses(send(port, 130, headers=t, connections=8)))
    time.sleep(2.5)  # the tick gives leases back
    got += Counter(statuses(send(port, 30, headers=t, connections=2)))
    published = envoy.counters()
    moved = {k: published.get(k, 0) - before[k] for k in names}
    assert got[200] == 100
    assert moved == {"allowed": 100, "denied": 60, "shadow_denied": 0}, (moved, got)


def test_lease_path_counts_every_request(envoy, fresh):
    port = envoy.port("lease")
    before = envoy.counter("allowed")
    n = Counter(statuses(send(port, 50, headers={"x-tenant-id": fresh("count")}, connections=4)))[200]
    assert envoy.counter("allowed") - before == n == 50


def test_small_buckets_are_not_leased(envoy, fresh):
    port = envoy.port("small")
    got = Counter(statuses(send(port, 20, headers={"x-tenant-id": fresh("small")}, connections=10)))
    assert got == {200: 5, 429: 15}
