"""The rate-limit service for the `global` mode tests: pytest fixtures over
tests/support/services.py (`Redis`, `Service`, `build_service`, re-exported here) and
`grpc_cluster(name, port)`, the Envoy cluster (STATIC, HTTP/2) for the filter's
`global.cluster`. The service is the real tenant-ratelimit-service (service/,
docs/service.md) on a real redis-server; tests/e2e/rls_stub.py is a Python stand-in for the
two answers the service never gives (no statuses, a fixed delay).
"""

from __future__ import annotations

import subprocess

import pytest

from . import harness  # noqa: F401  (puts the repository root on sys.path for tests.support)
from tests.support.envoy import grpc_cluster  # noqa: F401
from tests.support.services import Fleet, Redis, Service, build_service, redis_bin  # noqa: F401


# --------------------------------------------------------------------------------------------
# Fixtures (import them into a test module: `from .rls import redis, service_bin, service_factory`)


@pytest.fixture(scope="session")
def service_bin() -> str:
    try:
        return build_service()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    binary = redis_bin()
    if binary is None:
        pytest.skip("no redis-server (apt-get install -y redis-server)")
    r = Redis(tmp_path_factory.mktemp("redis"), binary).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def service_factory(service_bin, redis, tmp_path_factory):
    """`make(domains)` -> a started Service on the module's Redis with config
    `{"domains": domains}` (each domain: the filter's limits schema), stopped at the end of
    the module."""
    fleet = Fleet(service_bin, tmp_path_factory.mktemp("svc"))

    def make(domains: dict[str, dict], *, start: bool = True, extra: list[str] | None = None) -> Service:
        return fleet.make(["--redis", redis.url], {"domains": domains}, start=start, extra=extra)

    yield make
    fleet.stop()


@pytest.fixture(scope="module")
def stub_factory():
    """`make(limits, delay_ms=0)` -> a started StubRls (tests/e2e/rls_stub.py), stopped at the
    end of the module."""
    from .rls_stub import StubRls  # imports grpc: only for the modules that use it

    started: list[StubRls] = []

    def make(limits: dict[str, int], *, delay_ms: int = 0) -> StubRls:
        s = StubRls(limits, delay_ms=delay_ms)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
