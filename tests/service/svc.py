"""Processes for the service tests: tenant-ratelimit-service, a Redis Cluster of 3 masters +
3 replicas, all on loopback ports picked at start, stopped by pid at the end.

* `build_service()`, `Service` (from tests/support/services.py, shared with tests/e2e and the
  bench): the service with a config dict; `.hup(config)`, `.metrics()`, `.stats()`.
* `RedisCluster` (also from tests/support/services.py): six `redis-server --cluster-enabled
  yes`, joined with `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`.
"""

from __future__ import annotations

from e2e.harness import HOST  # noqa: F401  (also puts the repository root on sys.path)
# Shared with tests/e2e and the bench (tests/support/services.py), re-exported here.
from tests.support.services import (Redis, RedisCluster, Service, build_service, redis_bin,  # noqa: F401
                                    redis_cli_bin)


def redis_server() -> str | None:
    return redis_bin()


def redis_cli() -> str | None:
    return redis_cli_bin()
