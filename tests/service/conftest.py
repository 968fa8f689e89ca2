"""Fixtures for the tenant-ratelimit-service suites: the service binary, a Debian
redis-server, a service factory, and (from tests/e2e) Envoy and the .wasm."""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest

from e2e.conftest import envoy_bin, envoy_factory, wasm  # noqa: F401 (fixtures)
from e2e.rls import redis  # noqa: F401 (fixture: one redis-server per module)

from tests.support.rlsproto import Client
from tests.support.services import Fleet
from .svc import RedisCluster, build_service, redis_cli, redis_server

_ids = itertools.count()


@pytest.fixture(scope="session")
def service_bin() -> str:
    try:
        return build_service()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    server, cli = redis_server(), redis_cli()
    if server is None or cli is None:
        pytest.skip("no redis-server / redis-cli (apt-get install -y redis-server)")
    c = RedisCluster(tmp_path_factory.mktemp("cluster"), server, cli)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def svc_factory(service_bin, tmp_path_factory):
    """`make(redis_args, config, start=True, extra=None)` -> a Service, stopped at module end."""
    fleet = Fleet(service_bin, tmp_path_factory.mktemp("svc"))
    yield fleet.make
    fleet.stop()


@pytest.fixture(scope="module")
def clients(services):
    """A gRPC client per service replica of the module's `services` fixture."""
    cs = [Client(s.port) for s in services]
    yield cs
    for c in cs:
        c.close()


@pytest.fixture
def fresh():
    """fresh("acme") -> a tenant id never used before in this run (buckets start full)."""
    def make(prefix: str = "t") -> str:
        return f"{prefix}-{os.getpid()}-{next(_ids)}"
    return make
