"""The rate-limit service for the `global` mode tests: pytest fixtures over
tests/support/services.py (`Redis`, `RlsServer`, `build_rls_server`, `tenant_limit`,
re-exported here) and `grpc_cluster(name, port)`, the Envoy cluster (STATIC, HTTP/2) for the
filter's `global.cluster`.
"""

from __future__ import annotations

import subprocess

import pytest

from . import harness  # noqa: F401  (puts the repository root on sys.path for tests.support)
from tests.support.envoy import grpc_cluster  # noqa: F401
from tests.support.services import Redis, RlsServer, build_rls_server, redis_bin, tenant_limit  # noqa: F401


# --------------------------------------------------------------------------------------------
# Fixtures (import them into a test module: `from .rls import redis, rls_bin, rls_factory`)


@pytest.fixture(scope="session")
def rls_bin() -> str:
    try:
        return build_rls_server()
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
def rls_factory(rls_bin, redis, tmp_path_factory):
    """`make(limits, delay_ms=0, no_statuses=False)` -> a started RlsServer on the module's
    Redis, stopped at the end of the module."""
    started: list[RlsServer] = []
    workdir = tmp_path_factory.mktemp("rls")

    def make(limits: list[dict], *, delay_ms: int = 0, start: bool = True, no_statuses: bool = False) -> RlsServer:
        s = RlsServer(rls_bin, workdir, redis.url, limits, delay_ms=delay_ms, name=f"rls{len(started)}",
                      no_statuses=no_statuses)
        started.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in started:
        s.stop()
