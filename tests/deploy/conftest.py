"""Fixtures for the deployment-artifact tests (run by `make e2e` with ENVOY_BIN, WASM and
CHECKER set to absolute paths)."""

import os
import shutil
from pathlib import Path

import pytest


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests with `make e2e`", pytrace=False)
    path = Path(value)
    if not path.is_file():
        pytest.fail(f"{name}={value} does not exist (run `make wasm` and "
                    "`cargo build --release --bin tenant-ratelimit-check`)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    return str(_env_path("ENVOY_BIN"))


@pytest.fixture(scope="session")
def wasm() -> Path:
    return _env_path("WASM")


@pytest.fixture(scope="session")
def checker() -> str:
    return str(_env_path("CHECKER"))


@pytest.fixture
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    yield d
    shutil.rmtree(d, ignore_errors=True)
