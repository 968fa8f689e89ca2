"""Issue 17 on a real Redis Cluster (3 masters + 3 replicas, started by the fixture): two
service replicas with `--redis-cluster`, exactness, all-or-nothing within a slot and across
slots, and a master failover without restarting the service."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.support.rlsproto import OK, OVER_LIMIT, Client

SLOW = "1/hour"
CONFIG = {
    "domains": {
        "exact": {"capacity": 50, "refill_rate": SLOW},
        "aon": {"capacity": 3, "refill_rate": SLOW,
                "rules": [{"name": "upload", "path_prefix": "/upload", "capacity": 2, "refill_rate": SLOW}]},
        "multi": {"limits": [{"name": "a", "capacity": 3, "refill_rate": SLOW},
                             {"name": "b", "capacity": 4, "refill_rate": SLOW}]},
    },
}


@pytest.fixture(scope="module")
def services(svc_factory, redis_cluster):
    args = ["--redis-cluster", ",".join(redis_cluster.urls)]
    return [svc_factory(args, CONFIG) for _ in range(2)]


def test_exact_across_two_replicas_on_a_cluster(clients, fresh):
    tenants = [fresh() for _ in range(4)]  # spread over the masters' slots

    def one(i: int) -> tuple[str, int]:
        t = tenants[i % len(tenants)]
        return t, clients[i % 2].ask("exact", [[("tenant", t)]]).code

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(4 * 120)))
    for t in tenants:
        codes = [c for tt, c in got if tt == t]
        assert codes.count(OK) == 50, t


def test_all_or_nothing_in_one_slot(clients, fresh):
    """A tenant's buckets share a hash tag, so one script decides them together."""
    t = fresh()
    both = [[("tenant", t)], [("tenant", t), ("rule", "upload")]]
    assert [clients[0].ask("aon", both).code for _ in range(3)] == [OK, OK, OVER_LIMIT]
    assert [clients[1].ask("aon", [[("tenant", t)]]).code for _ in range(2)] == [OK, OVER_LIMIT]


def test_all_or_nothing_across_slots_refunds(clients, services, fresh):
    """Two tenants (two slots) in one request: when the second is over its limit, the first
    is refunded, so it keeps all its tokens."""
    a, b = fresh("a"), fresh("b")
    assert clients[0].ask("aon", [[("tenant", b)]], hits=3).code == OK
    for _ in range(3):
        r = clients[0].ask("aon", [[("tenant", a)], [("tenant", b)]])
        assert (r.code, r.statuses[1].code) == (OVER_LIMIT, OVER_LIMIT)
    assert clients[1].ask("aon", [[("tenant", a)]], hits=3).code == OK


def test_several_limits_in_one_slot(clients, services, redis_cluster, fresh):
    """Every limit of a bucket is a key in the tenant's slot: one script call per request
    decides them all, and a denial by one limit takes nothing from the other."""
    t = fresh()
    s, c = services[0], clients[0]
    masters = [n for n in redis_cluster.nodes
               if n.proc.poll() is None and "role:master" in n.cli("INFO", "replication")]
    before = {n.port: set(n.cli("KEYS", "trl:*").split()) for n in masters}
    assert c.ask("multi", [[("tenant", t)]], hits=2).code == OK  # a: 1 left, b: 2
    cmds0 = s.metric("trl_service_redis_commands_total")
    d = c.ask("multi", [[("tenant", t)]], hits=2)  # a denies; b alone would admit
    assert (d.code, d.statuses[0].limit, d.statuses[0].remaining) == (OVER_LIMIT, 3, 1)
    a = c.ask("multi", [[("tenant", t)]])  # b still has 2: both admit
    assert (a.code, a.statuses[0].limit, a.statuses[0].remaining) == (OK, 3, 0)
    assert c.ask("multi", [[("tenant", t)]]).code == OVER_LIMIT
    assert s.metric("trl_service_redis_commands_total") - cmds0 == 3
    new = {n.port: set(n.cli("KEYS", "trl:*").split()) - before[n.port] for n in masters}
    (keys,) = [k for k in new.values() if k]
    assert sorted(k.rsplit(":l:", 1)[1] for k in keys) == ["a", "b"]


def test_wait_for_replicas_on_a_cluster(svc_factory, redis_cluster, fresh):
    """`--redis-wait-replicas 1`: the WAIT goes to the master that took the write (in the
    script's pipeline), whose replica acknowledges it; for tenants on every master."""
    s = svc_factory(["--redis-cluster", ",".join(redis_cluster.urls), "--redis-wait-replicas", "1",
                     "--redis-wait-ms", "500"], CONFIG)
    with Client(s.port) as c:
        for _ in range(12):
            assert c.ask("exact", [[("tenant", fresh("w"))]]).code == OK
    assert s.metric('trl_service_calls_total{result="ok"}') == 12
    assert s.metric('trl_service_redis_errors_total{kind="replicas"}') == 0


def test_master_failover_recovers_without_restart(clients, services, redis_cluster, fresh):
    t = fresh()
    masters = [n for n in redis_cluster.nodes
               if n.proc.poll() is None and "role:master" in n.cli("INFO", "replication")]
    before = {n.port: set(n.cli("KEYS", "trl:*").split()) for n in masters}
    assert clients[0].ask("exact", [[("tenant", t)]], hits=40).code == OK
    # The master that got the new key.
    holder = next((n for n in masters if set(n.cli("KEYS", "trl:*").split()) - before[n.port]), None)
    assert holder is not None
    time.sleep(0.5)  # replication is asynchronous: let the replica have the write
    holder.kill()
    started = time.monotonic()
    codes = []
    while time.monotonic() - started < 20:
        try:
            codes.append(clients[1].ask("exact", [[("tenant", t)]], timeout=1).code)
            if len(codes) >= 12:
                break
        except grpc.RpcError:
            time.sleep(0.1)
    # The promoted replica had the bucket: exactly the 10 tokens left, then denials.
    assert codes.count(OK) == 10, codes
    assert codes[-1] == OVER_LIMIT
    assert all(s.running() for s in services)
    redis_cluster.wait_ok()
