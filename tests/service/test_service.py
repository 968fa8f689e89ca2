"""Issue 17: tenant-ratelimit-service against a real redis-server, driven with a real gRPC
client (grpcio). Two service replicas share the Redis; every test uses fresh tenant ids."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.support.rlsproto import OK, OVER_LIMIT, Client, descriptor

SLOW = "1/hour"
CONFIG = {
    "domains": {
        # GCRA: 3 at once, then one per second.
        "gcra": {"capacity": 3, "refill_rate": 1},
        "exact": {"capacity": 50, "refill_rate": SLOW, "tenants": {"big": {"capacity": 80, "refill_rate": SLOW}}},
        "aon": {"capacity": 3, "refill_rate": SLOW,
                "rules": [{"name": "upload", "path_prefix": "/upload", "capacity": 2, "refill_rate": SLOW}]},
        # Unlisted tenants share one bucket of 5, and each has its own `upload` bucket of 2.
        "shared": {"capacity": 5, "refill_rate": SLOW, "unknown_tenants": "shared",
                   "rules": [{"name": "upload", "path_prefix": "/upload", "capacity": 2, "refill_rate": SLOW}]},
        # Several limits on one policy: a burst of 3 refilling at 2/s, and 5 an hour.
        "multi": {"limits": [{"name": "burst", "capacity": 3, "refill_rate": "2/s"},
                             {"name": "hour", "capacity": 5, "refill_rate": "5/h"}],
                  "rules": [{"name": "export", "path_prefix": "/export", "capacity": 10, "refill_rate": SLOW}]},
    },
}


@pytest.fixture(scope="module")
def services(svc_factory, redis):
    return [svc_factory(["--redis", redis.url], CONFIG) for _ in range(2)]


def test_gcra_not_a_window(clients, fresh):
    """Capacity 3 at 1/s: the burst, then exactly one more per second (a fixed window would
    give 3 more at the next window)."""
    t = fresh()
    c = clients[0]
    assert [c.ask("gcra", [[("tenant", t)]]).code for _ in range(3)] == [OK] * 3
    denied = c.ask("gcra", [[("tenant", t)]])
    assert denied.code == OVER_LIMIT
    assert denied.statuses[0].remaining == 0
    wait = denied.statuses[0].reset_s
    assert 0 < wait <= 1.0
    for _second in range(2):
        # Sleep until the next token, as the denial said: one admission, then denied again
        # (and that denial says how long until the following token).
        time.sleep(wait + 0.02)
        first = clients[0].ask("gcra", [[("tenant", t)]])
        second = clients[1].ask("gcra", [[("tenant", t)]])
        assert [first.code, second.code] == [OK, OVER_LIMIT]
        wait = second.statuses[0].reset_s
        assert 0 < wait <= 1.0


def test_exact_across_two_replicas_under_concurrent_load(clients, fresh):
    """200 concurrent calls for one tenant, split over two service replicas: exactly 50
    admitted (the capacity), and a listed tenant gets its own capacity."""
    for tenant, capacity in [(fresh(), 50), ("big", 80)]:
        def one(i: int) -> int:
            return clients[i % 2].ask("exact", [[("tenant", tenant)]]).code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(one, range(200)))
        assert codes.count(OK) == capacity, tenant
        assert codes.count(OVER_LIMIT) == 200 - capacity


def test_all_descriptors_or_none(clients, fresh):
    """A request's descriptors are decided together: the tenant bucket (3) is not debited
    when the rule bucket (2) denies."""
    t = fresh()
    both = [[("tenant", t)], [("tenant", t), ("rule", "upload")]]
    a = clients[0].ask("aon", both)
    assert (a.code, [s.code for s in a.statuses]) == (OK, [OK, OK])
    assert [s.remaining for s in a.statuses] == [2, 1]
    assert [s.limit for s in a.statuses] == [3, 2]
    assert clients[1].ask("aon", both).code == OK
    a = clients[0].ask("aon", both)
    assert (a.code, [s.code for s in a.statuses]) == (OVER_LIMIT, [OK, OVER_LIMIT])
    # The tenant bucket still has its last token: the denied request took nothing.
    assert a.statuses[0].remaining == 1
    assert clients[1].ask("aon", [[("tenant", t)]]).code == OK
    assert clients[0].ask("aon", [[("tenant", t)]]).code == OVER_LIMIT


def test_several_limits_on_one_policy(services, clients, redis, fresh):
    """`burst` (3 at 2/s) and `hour` (5 an hour) on one policy: 3 at once, then, once the
    burst has refilled, 2 more, then none: exactly 5. A denial by either limit debits neither
    limit, nor the request's other descriptor (the tenant's `export` rule bucket, 10). Each
    status is the limit a client must mind: the one closest to denying, or the one that
    denied."""
    t = fresh()
    both = [[("tenant", t)], [("tenant", t), ("rule", "export")]]
    total = lambda name: sum(s.metric(name) for s in services)  # noqa: E731
    hits0 = total("trl_service_hits_total")
    ok0 = total('trl_service_decisions_total{domain="multi",code="ok"}')
    before = set(redis.cli("KEYS", "trl:*").split())
    got = [clients[i % 2].ask("multi", both) for i in range(3)]
    # burst has 2, 1, 0 of 3 left, hour 4, 3, 2 of 5: burst is reported.
    assert [(a.code, a.statuses[0].limit, a.statuses[0].remaining) for a in got] == [(OK, 3, 2), (OK, 3, 1),
                                                                                     (OK, 3, 0)]
    assert [a.statuses[1].remaining for a in got] == [9, 8, 7]
    for i in range(3):
        d = clients[i % 2].ask("multi", both)
        assert (d.code, [s.code for s in d.statuses]) == (OVER_LIMIT, [OVER_LIMIT, OK])
        # The burst denied: its wait for one token (2/s).
        assert d.statuses[0].limit == 3 and 0 < d.statuses[0].reset_s <= 0.5
        assert d.statuses[1].remaining == 7
    # One key per limit, with the tenant's hash tag; a one-limit rule keeps the plain form.
    keys = set(redis.cli("KEYS", "trl:*").split()) - before
    base = next(k for k in keys if k.endswith(":l:burst")).removesuffix(":l:burst")
    assert keys == {f"{base}:l:burst", f"{base}:l:hour", f"{base}:r:export"}
    assert base.startswith("trl:{") and base.endswith("}")
    assert int(redis.cli("MEMORY", "USAGE", f"{base}:l:hour")) <= 160
    time.sleep(1.6)  # the burst is full again (3 tokens at 2/s)
    got = [clients[i % 2].ask("multi", both) for i in range(2)]
    # Now hour is closer to denying (1 then 0 left, against the burst's 2 and 1).
    assert [(a.code, a.statuses[0].limit, a.statuses[0].remaining) for a in got] == [(OK, 5, 1), (OK, 5, 0)]
    for i in range(3):
        d = clients[i % 2].ask("multi", both)
        assert (d.code, [s.code for s in d.statuses]) == (OVER_LIMIT, [OVER_LIMIT, OK])
        # The hour denied: a token every 12 minutes, the first of the 5 taken about 2 s ago.
        assert d.statuses[0].limit == 5 and 700 < d.statuses[0].reset_s <= 720
        # 5 requests admitted in all: the 6 denials took nothing from `export`.
        assert d.statuses[1].remaining == 5
    # Nor from the burst: it owes the last 2 admissions' tokens (1 s to refill), no more.
    assert int(redis.cli("PTTL", f"{base}:l:burst")) <= 1000
    # Counted per descriptor (not per limit): 11 calls of 2 descriptors costing 1 each.
    assert total("trl_service_hits_total") - hits0 == 22
    assert total('trl_service_decisions_total{domain="multi",code="ok"}') - ok0 == 5 * 2 + 6


def test_hits_addend_is_the_cost(clients, fresh):
    t = fresh()
    assert clients[0].ask("exact", [[("tenant", t)]], hits=48).statuses[0].remaining == 2
    assert clients[1].ask("exact", [[("tenant", t)]], hits=3).code == OVER_LIMIT
    # A descriptor's own hits_addend overrides the request's.
    assert clients[1].ask("exact", [descriptor([("tenant", t)], hits=2)], hits=3).code == OK


def test_unmatched_descriptors_and_hostile_requests(services, clients, redis, fresh):
    c = clients[0]
    keys_before = int(redis.cli("DBSIZE"))
    miss = lambda reason: services[0].metric(f'trl_service_unmatched_total{{reason="{reason}"}}')  # noqa: E731
    misses0 = {r: miss(r) for r in ("unknown_domain", "no_tenant", "unknown_rule")}
    # Unknown domain, no tenant entry, unknown rule: OK with no limit (the default config),
    # each counted by reason, so a typo in a client's domain or rule name shows.
    assert c.ask("nope", [[("tenant", "a")], [("tenant", "b")]]).code == OK
    assert c.ask("exact", [[("other", "a")]]).statuses[0].limit is None
    assert c.ask("aon", [[("tenant", fresh()), ("rule", "nope")]]).code == OK
    assert {r: miss(r) - n for r, n in misses0.items()} == {"unknown_domain": 2, "no_tenant": 1, "unknown_rule": 1}
    # 64 KiB values and 1,000 entries: the tenant falls back to the default tenant (a
    # bounded key), never a crash and never a key per hostile value.
    big = "x" * 65536
    a = c.ask("exact", [[("tenant", big)] + [(f"k{i}", big[:64]) for i in range(1000)]])
    assert a.code == OK
    assert c.ask("exact", [[("tenant", "has space")]]).code == OK
    assert int(redis.cli("DBSIZE")) <= keys_before + 2
    # Too many descriptors: a clear error, not unbounded work.
    with pytest.raises(grpc.RpcError) as e:
        c.ask("exact", [[("tenant", "a")]] * 65)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_descriptors" in e.value.details()
    assert all(s.running() for s in services)


def test_shared_unlisted_tenants_have_their_own_rule_buckets(clients, fresh):
    """`unknown_tenants: shared`, as in the filter: unlisted tenants debit one shared bucket
    (5), but each has its own `upload` bucket (2)."""
    a, b, c = fresh("sa"), fresh("sb"), fresh("sc")
    up = lambda t: [[("tenant", t)], [("tenant", t), ("rule", "upload")]]  # noqa: E731
    assert [clients[i % 2].ask("shared", up(a)).code for i in range(3)] == [OK, OK, OVER_LIMIT]
    # b's upload bucket is its own: full, though a's is empty.
    r = clients[1].ask("shared", up(b))
    assert (r.code, [s.remaining for s in r.statuses]) == (OK, [2, 1])
    # The shared bucket saw a's 2 and b's 1 (a's denied call took nothing): 2 left for c.
    assert clients[0].ask("shared", [[("tenant", c)]], hits=2).statuses[0].remaining == 0
    assert clients[0].ask("shared", [[("tenant", fresh("sd"))]]).code == OVER_LIMIT


def test_unmatched_error_config(svc_factory, redis):
    s = svc_factory(["--redis", redis.url], {**CONFIG, "unmatched": "error"})
    with Client(s.port) as c:
        for domain, desc in [("nope", [("tenant", "a")]), ("exact", [("other", "a")]),
                             ("aon", [("tenant", "a"), ("rule", "nope")])]:
            with pytest.raises(grpc.RpcError) as e:
                c.ask(domain, [desc])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert s.metric('trl_service_calls_total{result="refused"}') == 3


def test_one_evalsha_per_call_and_noscript_reload(services, clients, redis, fresh):
    s = services[0]
    calls0 = sum(s.metric(f'trl_service_calls_total{{result="{r}"}}') for r in ("ok", "over_limit"))
    cmds0 = s.metric("trl_service_redis_commands_total")
    for _ in range(20):
        clients[0].ask("exact", [[("tenant", fresh())], [("tenant", fresh())]])
    calls = sum(s.metric(f'trl_service_calls_total{{result="{r}"}}') for r in ("ok", "over_limit")) - calls0
    assert calls == 20
    assert s.metric("trl_service_redis_commands_total") - cmds0 == 20
    # The script cache is emptied (a Redis restart or failover looks like this): the next
    # call reloads it (EVAL) and still answers.
    assert redis.cli("SCRIPT", "FLUSH") == "OK"
    assert clients[0].ask("exact", [[("tenant", fresh())]]).code == OK
    assert s.metric("trl_service_redis_commands_total") - cmds0 == 22
    assert clients[0].ask("exact", [[("tenant", fresh())]]).code == OK
    assert s.metric("trl_service_redis_commands_total") - cmds0 == 23


def test_keys_expire_when_full_and_bytes_per_bucket(clients, redis, fresh):
    t = fresh()
    before = set(redis.cli("KEYS", "trl:*").split())
    clients[0].ask("gcra", [[("tenant", t)]], hits=2)
    new = set(redis.cli("KEYS", "trl:*").split()) - before
    assert len(new) == 1
    key = new.pop()
    pttl = int(redis.cli("PTTL", key))
    assert 1900 <= pttl <= 2001  # 2 tokens at 1/s: full again in 2 s
    assert int(redis.cli("MEMORY", "USAGE", key)) <= 160
    # The value: 25 bytes (a tag byte and three doubles, see gcra.lua).
    assert int(redis.cli("STRLEN", key)) == 25


def test_reads_the_text_value_of_earlier_builds(clients, redis, fresh):
    """A bucket stored as text "D T I" (the form earlier builds wrote) still counts: an empty
    bucket (debt = capacity * interval) written now denies, so an upgrade grants nothing twice."""
    t = fresh()
    before = set(redis.cli("KEYS", "trl:*").split())
    assert clients[0].ask("gcra", [[("tenant", t)]]).code == OK
    key = (set(redis.cli("KEYS", "trl:*").split()) - before).pop()
    sec, usec = redis.cli("TIME").split()
    interval = 1024 * 1_000_000  # 1/s in U (2^-10 us)
    assert redis.cli("SET", key, f"{3 * interval} {int(sec) * 1_000_000 + int(usec)} {interval}", "PX", "5000") == "OK"
    denied = clients[1].ask("gcra", [[("tenant", t)]])
    assert denied.code == OVER_LIMIT
    assert 0.5 < denied.statuses[0].reset_s <= 1.0  # the one token refills 1 s after the SET


def test_metrics_and_health(services):
    s = services[0]
    text = s.metrics()
    assert 'trl_service_decisions_total{domain="exact",code="ok"}' in text
    assert "trl_service_redis_seconds_bucket{le=\"+Inf\"}" in text
    assert s.http("/healthz") == 200
    assert s.http("/ready") == 200


def test_sighup_reload_keeps_bucket_state(svc_factory, redis, fresh):
    config = {"domains": {"d": {"capacity": 5, "refill_rate": SLOW}}}
    s = svc_factory(["--redis", redis.url], config)
    t = fresh()
    with Client(s.port) as c:
        assert c.ask("d", [[("tenant", t)]], hits=4).statuses[0].remaining == 1
        # A bigger limit: the 4 spent tokens stay spent.
        s.hup({"domains": {"d": {"capacity": 10, "refill_rate": SLOW}}})
        assert c.ask("d", [[("tenant", t)]]).statuses[0].remaining == 5
        # A broken file is refused and the running config kept.
        s.hup({"domains": {"d": {"capacity": 0, "refill_rate": SLOW}}})
        assert "field `domains.d.capacity`" in s.log_text()
        assert c.ask("d", [[("tenant", t)]]).statuses[0].remaining == 4
    assert s.metric('trl_service_config_reloads_total{result="error"}') == 1


def test_sighup_several_limits_keep_their_state_by_name(svc_factory, redis, fresh):
    """A policy going from one limit to several starts its new keys full (the old key is no
    longer debited and expires); after that each limit keeps its key, and its spent tokens,
    by name, whatever the order or the other limits."""
    def limits(*named):
        return {"domains": {"d": {"limits": [{"name": n, "capacity": c, "refill_rate": SLOW} for n, c in named]}}}

    s = svc_factory(["--redis", redis.url], {"domains": {"d": {"capacity": 5, "refill_rate": SLOW}}})
    t = fresh()
    with Client(s.port) as c:
        before = set(redis.cli("KEYS", "trl:*").split())
        assert c.ask("d", [[("tenant", t)]], hits=4).statuses[0].remaining == 1
        (old,) = set(redis.cli("KEYS", "trl:*").split()) - before
        s.hup(limits(("a", 5), ("b", 8)))
        a = c.ask("d", [[("tenant", t)]], hits=2)
        assert (a.code, a.statuses[0].limit, a.statuses[0].remaining) == (OK, 5, 3)
        assert set(redis.cli("KEYS", "trl:*").split()) - before == {old, f"{old}:l:a", f"{old}:l:b"}
        # Reordered, `b` shrunk to 3 (its 2 spent tokens stay spent), `c` added (full).
        s.hup(limits(("c", 4), ("b", 3), ("a", 5)))
        a = c.ask("d", [[("tenant", t)]])
        assert (a.code, a.statuses[0].limit, a.statuses[0].remaining) == (OK, 3, 0)
        d = c.ask("d", [[("tenant", t)]])
        assert (d.code, d.statuses[0].limit) == (OVER_LIMIT, 3)
    assert s.metric('trl_service_config_reloads_total{result="ok"}') == 2


def test_a_smaller_capacity_at_the_same_rate_clamps_the_debt(svc_factory, redis, fresh):
    """1 token/s, capacity 100, all spent; reloaded with capacity 2 at the same rate: the debt
    is at most the new capacity (as in the filter), so a token comes back within about 1 s,
    not after the old 100 s."""
    config = {"domains": {"d": {"capacity": 100, "refill_rate": 1}}}
    s = svc_factory(["--redis", redis.url], config)
    t = fresh()
    with Client(s.port) as c:
        assert c.ask("d", [[("tenant", t)]], hits=100).code == OK
        s.hup({"domains": {"d": {"capacity": 2, "refill_rate": 1}}})
        assert c.ask("d", [[("tenant", t)]]).code == OVER_LIMIT
        deadline = time.monotonic() + 4
        while c.ask("d", [[("tenant", t)]]).code != OK:
            assert time.monotonic() < deadline, "no token 4 s after shrinking the capacity"
            time.sleep(0.1)


def test_config_errors_name_the_field(service_bin, tmp_path, redis):
    path = tmp_path / "bad.json"
    path.write_text('{"domains": {"acme": {"capacity": 5, "refill_rate": 1, "tenants": {"x": {"capacity": -1}}}}}')
    p = subprocess.run([service_bin, "--listen", "127.0.0.1:0", "--redis", redis.url, "--config", str(path)],
                       capture_output=True, timeout=10)
    assert p.returncode == 1
    assert b"field `domains.acme.tenants.x.capacity`" in p.stderr


def test_redis_slow_or_down_is_a_prompt_grpc_error(svc_factory, tmp_path_factory, fresh):
    """Redis stopped (SIGSTOP: accepts, never answers) or gone: the call fails with a gRPC
    error before the caller's deadline, is counted, and the service recovers on its own."""
    from .svc import Redis, redis_server

    r = Redis(tmp_path_factory.mktemp("redis-down"), redis_server()).start()
    try:
        s = svc_factory(["--redis", r.url], CONFIG)
        t = fresh()
        with Client(s.port) as c:
            assert c.ask("exact", [[("tenant", t)]]).code == OK
            os.kill(r.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    c.ask("exact", [[("tenant", t)]], timeout=0.3)
                elapsed = time.monotonic() - started
                # The service's own error, not the client giving up.
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
                assert elapsed < 0.3
            finally:
                os.kill(r.proc.pid, signal.SIGCONT)
            r.kill()
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                c.ask("exact", [[("tenant", t)]], timeout=0.5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 0.5
            assert s.metric('trl_service_calls_total{result="redis_error"}') == 2
            assert s.running()
            # Redis back on the same port (empty): the service reconnects without a restart.
            r.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    assert c.ask("exact", [[("tenant", t)]], timeout=1).code == OK
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, s.log_text()[-2000:]
                    time.sleep(0.2)
    finally:
        r.stop()


def test_wait_for_replicas(svc_factory, tmp_path_factory, fresh):
    """`--redis-wait-replicas 1`: an answer is sent only once the replica holds the write; a
    replica that stops acknowledging makes calls fail (UNAVAILABLE, counted) after
    `--redis-wait-ms`, not hang, and they succeed again when it is back."""
    from .svc import Redis, redis_server

    master = Redis(tmp_path_factory.mktemp("wait-master"), redis_server()).start()
    replica = Redis(tmp_path_factory.mktemp("wait-replica"), redis_server(),
                    ["--replicaof", "127.0.0.1", str(master.port)])
    try:
        replica.start()
        deadline = time.monotonic() + 10
        while "master_link_status:up" not in replica.cli("INFO", "replication"):
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        s = svc_factory(["--redis", master.url, "--redis-wait-replicas", "1", "--redis-wait-ms", "100"], CONFIG)
        t = fresh()
        with Client(s.port) as c:
            assert c.ask("gcra", [[("tenant", t)]]).code == OK
            # Acknowledged by the replica before the answer: the key is there already.
            (key,) = master.cli("KEYS", "trl:*").split()
            assert replica.cli("EXISTS", key) == "1"
            os.kill(replica.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    c.ask("gcra", [[("tenant", t)]], timeout=2)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "WAIT" in e.value.details()
                assert 0.1 <= time.monotonic() - started < 1.0
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            assert c.ask("gcra", [[("tenant", t)]]).code == OK
        assert s.metric('trl_service_redis_errors_total{kind="replicas"}') == 1
    finally:
        replica.stop()
        master.stop()


def test_sigterm_drains_and_exits_zero(svc_factory, redis):
    s = svc_factory(["--redis", redis.url], CONFIG)
    with Client(s.port) as c:
        assert c.ask("exact", [[("tenant", "drain")]]).code in (OK, OVER_LIMIT)
    assert s.stop() == 0
