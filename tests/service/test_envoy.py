"""Issue 17 through real Envoy: two tenant-ratelimit-service replicas behind one Envoy
cluster, on one redis-server. Two Envoys run our filter in `global` mode; one Envoy runs
Envoy's native `envoy.filters.http.ratelimit` against the same service."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from e2e.harness import HOST, ROUTER, bootstrap, http_listener, request, send, statuses
from tests.support.services import global_section

N = 20
SLOW = "1/hour"
CONFIG = {
    "domains": {
        "exact": {"capacity": N, "refill_rate": SLOW},
        "lease": {"capacity": N, "refill_rate": SLOW},
        "kill": {"capacity": 60, "refill_rate": SLOW},
        "gcra": {"capacity": 3, "refill_rate": 1},
        "native": {"capacity": 3, "refill_rate": SLOW,
                   "rules": [{"name": "upload", "path_prefix": "/upload", "capacity": 1, "refill_rate": SLOW}]},
    },
}
BIG_LOCAL = {"capacity": 100000, "refill_rate": "100000/s"}  # never the deciding limit



LISTENERS = {
    "exact": {**BIG_LOCAL, "global": global_section("exact")},
    "lease": {**BIG_LOCAL, "global": global_section("lease", lease_tokens=5)},
    "kill": {**BIG_LOCAL, "global": global_section("kill")},
    "gcra": {**BIG_LOCAL, "global": global_section("gcra")},
    "down_deny": {**BIG_LOCAL, "global": global_section("exact", timeout_ms=300)},
    "down_allow": {**BIG_LOCAL, "global": global_section("exact", timeout_ms=300, failure_mode="allow")},
}


def rls_cluster(ports: list[int]) -> dict:
    """The service replicas as one STATIC HTTP/2 cluster (round robin)."""
    return {
        "name": "ratelimit",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {
            "cluster_name": "ratelimit",
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": p}}}} for p in ports]}],
        },
    }


@pytest.fixture(scope="module")
def services(svc_factory, redis):
    return [svc_factory(["--redis", redis.url], CONFIG) for _ in range(2)]


@pytest.fixture(scope="module")
def envoys(envoy_factory, wasm, services):
    clusters = [rls_cluster([s.port for s in services])]
    built = [http_listener(n, cfg, wasm) for n, cfg in LISTENERS.items()]
    return [envoy_factory(config=bootstrap(built, clusters=clusters), name=f"proxy{i}-") for i in range(2)]


def spread(envoys, listener: str, tenant: str, n: int, path: str = "/") -> list[int]:
    """`n` concurrent requests for one tenant, alternating between the Envoys."""
    def one(i: int) -> int:
        return request(envoys[i % len(envoys)].port(listener), path, {"x-tenant-id": tenant}).status

    with ThreadPoolExecutor(12) as pool:
        return list(pool.map(one, range(n)))


def test_filter_global_mode_is_exact_across_proxies_and_replicas(envoys, services, fresh):
    t = fresh()
    codes = spread(envoys, "exact", t, 3 * N)
    assert Counter(codes) == {200: N, 429: 2 * N}
    # Both service replicas took calls (the Envoy cluster balances over them).
    for s in services:
        assert s.metric('trl_service_calls_total{result="ok"}') > 0


def test_leases_never_admit_more_than_granted(envoys, fresh):
    """lease_tokens 5: each call takes 5 tokens; with capacity 20 the service grants 4 leases
    in all, so the proxies admit exactly 20 (none beyond what was granted)."""
    t = fresh()
    codes = spread(envoys, "lease", t, 3 * N)
    assert Counter(codes) == {200: N, 429: 2 * N}


def test_gcra_through_the_filter(envoys, fresh):
    t = fresh()
    port = envoys[0].port("gcra")
    got = [request(port, "/", {"x-tenant-id": t}) for _ in range(4)]
    assert statuses(got) == [200, 200, 200, 429]
    assert got[3].headers.get("retry-after") == "1"
    time.sleep(1.05)
    # One token per second, not a new window of 3.
    assert statuses([request(envoys[1].port("gcra"), "/", {"x-tenant-id": t}) for _ in range(2)]) == [200, 429]


def test_kill_one_replica_under_load_never_over_admits(envoys, services, svc_factory, redis, fresh):
    """Load on one tenant while one service replica is SIGKILLed: calls it had in flight are
    lost (the proxies deny them: failure_mode deny), none is admitted twice, the other
    replica keeps answering."""
    t = fresh()
    codes: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():
            c = request(envoys[i % 2].port("kill"), "/", {"x-tenant-id": t}).status
            with lock:
                codes.append(c)
                if len(codes) >= 200:
                    stop.set()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 30
    while len(codes) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    services[1].kill()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    admitted = codes.count(200)
    assert admitted <= 60
    assert services[0].running()
    # Service replica 0 still decides: a fresh tenant gets answers (200s) through it.
    assert 200 in statuses([request(envoys[0].port("exact"), "/", {"x-tenant-id": fresh()}) for _ in range(4)])
    # Restart the replica for the following tests in this module.
    services[1].start()


# --------------------------------------------------------------------------------------------
# Envoy's native rate-limit filter against the same service


def native_listeners(origin_port: int, domain: str = "native") -> tuple[dict, dict]:
    """`native`: HCM -> envoy.filters.http.ratelimit (domain "native", x-ratelimit headers)
    -> router -> cluster `origin`; `origin`: a direct 200 (the native filter needs a route
    to a cluster)."""
    origin = {
        "name": "origin",
        "address": {"socket_address": {"address": HOST, "port_value": origin_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "origin",
            "route_config": {"virtual_hosts": [{"name": "origin_vh", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]}]},
            "http_filters": [ROUTER]}}]}],
    }
    rate_limits = [
        {"actions": [{"request_headers": {"header_name": "x-tenant-id", "descriptor_key": "tenant"}}]},
        {"actions": [{"request_headers": {"header_name": "x-tenant-id", "descriptor_key": "tenant"}},
                     {"generic_key": {"descriptor_key": "rule", "descriptor_value": "upload"}}]},
    ]
    front = {
        "name": "native",
        "address": {"socket_address": {"address": HOST, "port_value": 0}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "native",
            "route_config": {"virtual_hosts": [{"name": "native_vh", "domains": ["*"], "routes": [
                {"match": {"prefix": "/upload"}, "route": {"cluster": "origin", "rate_limits": rate_limits}},
                {"match": {"prefix": "/"}, "route": {"cluster": "origin", "rate_limits": rate_limits[:1]}}]}]},
            "http_filters": [
                {"name": "envoy.filters.http.ratelimit", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                    "domain": domain,
                    "timeout": "2s",
                    "failure_mode_deny": True,
                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                    "rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": "ratelimit"}},
                                           "transport_api_version": "V3"}}},
                ROUTER]}}]}],
    }
    return front, origin


def make_native(envoy_factory, services, domain: str):
    from e2e.harness import free_port
    origin_port = free_port()
    front, origin = native_listeners(origin_port, domain)
    origin_cluster = {
        "name": "origin", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "origin", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": origin_port}}}}]}]},
    }
    config = bootstrap([front, origin], clusters=[rls_cluster([s.port for s in services]), origin_cluster])
    return envoy_factory(config=config, name=f"native-{domain}-")


@pytest.fixture(scope="module")
def native(envoy_factory, services):
    return make_native(envoy_factory, services, "native")


def test_native_filter_headers_come_from_our_statuses(native, fresh):
    t = fresh()
    port = native.port("native")
    got = [request(port, "/", {"x-tenant-id": t}) for _ in range(4)]
    assert statuses(got) == [200, 200, 200, 429]
    assert [r.headers.get("x-ratelimit-remaining") for r in got] == ["2", "1", "0", "0"]
    # current_limit: capacity 3 per the smallest unit covering the refill time (3 hours -> a day).
    assert got[0].headers.get("x-ratelimit-limit") == "3, 3;w=86400"
    # Reset: when the bucket is full again (1 hour after one token was spent).
    assert 3590 <= int(got[0].headers.get("x-ratelimit-reset")) <= 3600


def test_native_filter_per_rule_descriptor(native, fresh):
    """/upload sends the tenant descriptor and the (tenant, rule) descriptor: the rule's
    bucket (1) denies the second upload, and the tenant bucket is not debited for it."""
    t = fresh()
    port = native.port("native")
    assert statuses([request(port, "/upload", {"x-tenant-id": t}) for _ in range(2)]) == [200, 429]
    # The denied upload took nothing from the tenant's 3: two more plain requests pass.
    assert statuses([request(port, "/", {"x-tenant-id": t}) for _ in range(3)]) == [200, 200, 429]


def test_redis_stopped_failure_mode_applies_within_timeout(envoys, services, redis, fresh):
    """Redis stops answering (SIGSTOP): within the filter's 300 ms timeout its failure_mode
    decides: deny -> 429, allow -> 200. (The filter's gRPC call carries no grpc-timeout
    header, so the service gives up at --redis-timeout-ms; test_service checks that path.)"""
    t = fresh()
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        for listener, want in [("down_deny", 429), ("down_allow", 200)]:
            started = time.monotonic()
            r = request(envoys[0].port(listener), "/", {"x-tenant-id": t})
            elapsed = time.monotonic() - started
            assert r.status == want, listener
            assert elapsed < 0.6, (listener, elapsed)
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    # And back: Redis answers again, so do the service and the filter.
    assert request(envoys[1].port("exact"), "/", {"x-tenant-id": t}).status == 200


def test_filter_and_native_proxies_share_one_exact_bucket(envoys, envoy_factory, services, fresh):
    """Both proxies with our filter and one with Envoy's native filter, same domain, one
    tenant, concurrent load: exactly `capacity` admitted across all three."""
    native_exact = make_native(envoy_factory, services, "exact")
    t = fresh()
    targets = [(envoys[0], "exact"), (envoys[1], "exact"), (native_exact, "native")]

    def one(i: int) -> int:
        envoy, listener = targets[i % 3]
        return request(envoy.port(listener), "/", {"x-tenant-id": t}).status

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(3 * N)))
    assert Counter(codes) == {200: N, 429: 2 * N}
