"""Issue 15, item 3: a denied gRPC call is a real gRPC error a client does not retry at once.

A grpcio client talks h2c to Envoy, which proxies over HTTP/2 to a grpcio upstream (generic
handlers on raw bytes, no protoc). The denial must reach the client as RESOURCE_EXHAUSTED
(or the configured `deny.grpc_status`) with our `grpc-message` and the gRFC A6
`grpc-retry-pushback-ms` beside `retry-after`, and every local reply names its reason in
`%RESPONSE_CODE_DETAILS%` in the access log.
"""

from __future__ import annotations

import json
import os
import time
from concurrent import futures

# grpcio's wheels enable gRPC core's fork handlers unless told otherwise; the harness forks
# Envoy with a preexec_fn (which runs at-fork handlers in the child) while this module's
# gRPC threads run. Turn them off before grpc initialises: the child only execs.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

import grpc  # noqa: E402
import pytest  # noqa: E402

from .harness import HOST, bootstrap, cluster_route, file_access_log, free_port, http_listener, request
from .rls import grpc_cluster

SERVICE, METHOD = "e2e.Echo", "Call"
PATH = f"/{SERVICE}/{METHOD}"
LOG_FORMAT = "%REQ(X-TENANT-ID)% %RESPONSE_CODE% %GRPC_STATUS_NUMBER% %RESPONSE_CODE_DETAILS%\n"
RPC_TIMEOUT = 5.0
FLUSH_WAIT = 5.0  # Envoy flushes access logs every 100 ms here (--file-flush-interval-msec)

# RateLimitResponse{overall_code: OVER_LIMIT}: field 1, varint 2.
OVER_LIMIT = b"\x08\x02"


class GrpcServer:
    """An in-process grpcio server on loopback answering unary calls with `answer(bytes)`."""

    def __init__(self, service: str, method: str, answer):
        self.calls = 0
        self._answer = answer
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(self._call)})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    def _call(self, body: bytes, _context) -> bytes:
        self.calls += 1
        return self._answer(body)

    def stop(self) -> None:
        self.server.stop(grace=None)


def listener(name: str, plugin_config: dict, wasm: str, log_dir) -> dict:
    """A listener routing to the gRPC upstream, with its own access-log file."""
    return http_listener(name, plugin_config, wasm, hcm_extra={
        "route_config": cluster_route("upstream"),
        "access_log": [file_access_log(log_dir / f"{name}.log", LOG_FORMAT)],
    })


SLOW = "1/min"


@pytest.fixture(scope="module")
def servers():
    upstream = GrpcServer(SERVICE, METHOD, lambda body: body)
    rls = GrpcServer("envoy.service.ratelimit.v3.RateLimitService", "ShouldRateLimit", lambda _: OVER_LIMIT)
    yield upstream, rls
    upstream.stop()
    rls.stop()


@pytest.fixture(scope="module")
def setup(envoy_factory, wasm, servers, tmp_path_factory):
    upstream, rls = servers
    logs = tmp_path_factory.mktemp("grpc_access_logs")
    dead = free_port()  # nothing listens: the service call fails
    listeners = [
        listener("local", {"capacity": 2, "refill_rate": SLOW}, wasm, logs),
        listener("one", {"capacity": 1, "refill_rate": SLOW}, wasm, logs),
        # One slot, held for an hour by the first tenant: every later new tenant overflows.
        listener("full", {"capacity": 1, "refill_rate": "1/h", "max_tenants": 1, "overflow": "deny"}, wasm, logs),
        listener("global_over", {"capacity": 100, "refill_rate": 100, "global": {
            "cluster": "rls", "domain": "e2e", "timeout_ms": 2000, "mode": "global"}}, wasm, logs),
        listener("global_down", {"capacity": 100, "refill_rate": 100, "global": {
            "cluster": "down", "domain": "e2e", "timeout_ms": 2000, "mode": "global", "failure_mode": "deny"}}, wasm, logs),
    ]
    clusters = [grpc_cluster("upstream", upstream.port), grpc_cluster("rls", rls.port), grpc_cluster("down", dead)]
    envoy = envoy_factory(config=bootstrap(listeners, clusters=clusters),
                          extra_args=["--file-flush-interval-msec", "100"])
    return envoy, logs, upstream


@pytest.fixture(scope="module")
def custom(envoy_factory, wasm, servers, tmp_path_factory):
    """A separate Envoy for the new `deny` fields, so the other tests still run (and show
    the old behaviour) against a build that rejects them."""
    upstream, _ = servers
    logs = tmp_path_factory.mktemp("grpc_custom_logs")
    config = {"capacity": 1, "refill_rate": SLOW, "deny": {"grpc_status": 14, "grpc_message": "slow down, 100%"}}
    envoy = envoy_factory(config=bootstrap([listener("custom", config, wasm, logs)],
                                           clusters=[grpc_cluster("upstream", upstream.port)]),
                          extra_args=["--file-flush-interval-msec", "100"], name="custom")
    return envoy, logs


def call(port: int, tenant: str) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:
    """One unary call on a fresh channel: (code, details, trailing metadata)."""
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        stub = channel.unary_unary(PATH)
        try:
            _, c = stub.with_call(b"ping", metadata=[("x-tenant-id", tenant)], timeout=RPC_TIMEOUT)
            return c.code(), c.details(), dict(c.trailing_metadata() or ())
        except grpc.RpcError as e:
            return e.code(), e.details(), dict(e.trailing_metadata() or ())


def log_lines(logs, name: str, tenant: str, n: int) -> list[list[str]]:
    """The access-log lines of `tenant` once there are `n` (Envoy writes them asynchronously)."""
    path = logs / f"{name}.log"
    deadline = time.monotonic() + FLUSH_WAIT
    while True:
        text = path.read_text() if path.exists() else ""
        lines = [l.split() for l in text.splitlines() if l.startswith(tenant + " ")]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_denied_call_is_resource_exhausted_with_pushback(setup, fresh):
    envoy, logs, upstream = setup
    tenant = fresh("grpc")
    before = upstream.calls
    results = [call(envoy.port("local"), tenant) for _ in range(3)]
    assert [r[0] for r in results] == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert upstream.calls - before == 2  # the upstream never saw the denied call
    code, details, trailers = results[2]
    assert details == "Too Many Requests"
    assert trailers.get("retry-after") == "60"
    assert trailers.get("grpc-retry-pushback-ms") == "60000"
    assert trailers.get("x-ratelimit-remaining") == "0"
    lines = log_lines(logs, "local", tenant, 3)
    assert [l[1:] for l in lines] == [["200", "0", "via_upstream"], ["200", "0", "via_upstream"],
                                      ["200", "8", "tenant_ratelimit_denied"]]


def test_configured_grpc_status_and_message(custom, fresh):
    envoy, logs = custom
    tenant = fresh("grpc14")
    first, denied = call(envoy.port("custom"), tenant), call(envoy.port("custom"), tenant)
    assert first[0] == grpc.StatusCode.OK
    assert denied[0] == grpc.StatusCode.UNAVAILABLE
    assert denied[1] == "slow down, 100%"  # percent-encoded on the wire, decoded by the client
    assert denied[2].get("grpc-retry-pushback-ms") == "60000"
    assert [l[1:] for l in log_lines(logs, "custom", tenant, 2)][1] == ["200", "14", "tenant_ratelimit_denied"]


def test_plain_http_denial_keeps_deny_status_and_logs_details(setup, fresh):
    envoy, logs, _ = setup
    tenant = fresh("http")
    port = envoy.port("one")
    call(port, tenant)  # spends the one token
    r = request(port, "/", headers={"x-tenant-id": tenant, "content-type": "application/json"})
    assert r.status == 429
    assert r.headers["content-type"] == "application/json"
    assert "grpc-status" not in r.headers and "grpc-retry-pushback-ms" not in r.headers
    assert r.headers["retry-after"] == "60"
    assert [l[1:] for l in log_lines(logs, "one", tenant, 2)][1] == ["429", "-", "tenant_ratelimit_denied"]


@pytest.mark.parametrize("name, details", [("global_over", "tenant_ratelimit_global_over_limit"),
                                           ("global_down", "tenant_ratelimit_global_error")])
def test_global_denials_are_resource_exhausted_and_say_why(setup, fresh, name, details):
    envoy, logs, upstream = setup
    tenant = fresh(name)
    before = upstream.calls
    code, message, trailers = call(envoy.port(name), tenant)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
    assert message == "Too Many Requests"
    assert trailers.get("grpc-retry-pushback-ms") == "1000"
    assert upstream.calls == before
    assert [l[1:] for l in log_lines(logs, name, tenant, 1)] == [["200", "8", details]]


def test_overflow_denial_says_overflow(setup, fresh):
    envoy, logs, _ = setup
    port = envoy.port("full")
    holder, newcomer = fresh("holder"), fresh("newcomer")
    call(port, holder)  # takes the only slot (or finds it taken: either way it stays live)
    code, _, trailers = call(port, newcomer)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers.get("grpc-retry-pushback-ms") == "1000"
    assert [l[1:] for l in log_lines(logs, "full", newcomer, 1)] == [["200", "8", "tenant_ratelimit_overflow_denied"]]


def test_grpc_web_without_the_grpc_web_filter_gets_grpc_headers(setup, fresh):
    """Envoy does not treat application/grpc-web as gRPC; the reply still carries the gRPC
    status in headers (what a gRPC-Web client reads from a trailers-only response)."""
    envoy, logs, _ = setup
    tenant = fresh("web")
    port = envoy.port("one")
    call(port, tenant)
    r = request(port, PATH, method="POST", body=b"\x00\x00\x00\x00\x00",
                headers={"x-tenant-id": tenant, "content-type": "application/grpc-web+proto"})
    assert r.status == 200
    assert r.headers["grpc-status"] == "8"
    assert r.headers["grpc-message"] == "Too Many Requests"
    assert r.headers["grpc-retry-pushback-ms"] == "60000"
    assert r.body == b""  # (and Envoy drops the content type of a bodyless non-gRPC reply)
    assert [l[1:] for l in log_lines(logs, "one", tenant, 2)][1] == ["200", "-", "tenant_ratelimit_denied"]


RETRYING = json.dumps({"methodConfig": [{
    "name": [{"service": SERVICE}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.01s", "maxBackoff": "0.01s",
                    "backoffMultiplier": 1, "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]},
}]})


def test_a_retrying_client_honours_the_pushback(setup, fresh):
    """A client whose retry policy covers both codes (10 ms backoff, 5 attempts) makes one
    attempt, not five: it waits the pushback (60 s) and its 1 s deadline ends the call.
    Before the fix it got UNAVAILABLE without pushback and retried at once."""
    envoy, _, _ = setup
    tenant = fresh("retry")
    port = envoy.port("one")
    call(port, tenant)  # spends the one token
    before = envoy.counter("denied")
    options = [("grpc.enable_retries", 1), ("grpc.service_config", RETRYING)]
    with grpc.insecure_channel(f"{HOST}:{port}", options=options) as channel:
        try:
            channel.unary_unary(PATH).with_call(b"ping", metadata=[("x-tenant-id", tenant)], timeout=1.0)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    attempts = envoy.counter("denied") - before
    assert attempts == 1, f"{attempts} denied attempts, last code {code}"
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
