"""A tiny in-process RLS v3 service (grpcio, messages hand-encoded with
tests/support/rlsproto.py) for the two `global` cases the real service must not offer:

* answers **without descriptor statuses** (as Limitador does), so the filter has no reset time
  to bound a lease by;
* answers after a fixed delay (`delay_ms`), so the filter's `timeout_ms` fires and Envoy resets
  the stream (counted as `cancelled`).

Each (domain, tenant) has an exact counter (`limits[domain]` tokens, never refilled), under one
lock: a call is admitted when its `hits_addend` still fits, else OVER_LIMIT. Every call is
recorded (`calls`: (tenant, hits_addend, admitted)).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

# The harness forks Envoy with a preexec_fn while this module's gRPC threads run: gRPC core's
# fork handlers must be off before grpc initialises (see test_grpc.py).
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

import grpc  # noqa: E402

from .harness import HOST  # noqa: E402
from tests.support.rlsproto import fields  # noqa: E402

SERVICE, METHOD = "envoy.service.ratelimit.v3.RateLimitService", "ShouldRateLimit"
OK, OVER_LIMIT = 1, 2


def parse(body: bytes, tenant_key: str = "tenant") -> tuple[str, list[tuple[str | None, int | None]], int]:
    """RateLimitRequest -> (domain, [(tenant entry value, descriptor hits_addend)], hits_addend)."""
    domain, descriptors, hits = "", [], 0
    for tag, v in fields(body):
        if tag == 1:
            domain = v.decode()
        elif tag == 2:
            tenant, dhits = None, None
            for t, x in fields(v):
                if t == 1:  # entry {key = 1, value = 2}
                    kv = dict(fields(x))
                    if kv.get(1, b"").decode() == tenant_key:
                        tenant = kv.get(2, b"").decode()
                elif t == 3:  # google.protobuf.UInt64Value hits_addend
                    dhits = dict(fields(x)).get(1, 0)
            descriptors.append((tenant, dhits))
        elif tag == 3:
            hits = v
    return domain, descriptors, hits


class StubRls:
    """The stub on a free loopback port (`port`); `stats()` like Service.stats() plus
    `cancelled` (calls whose client was gone when the answer was ready)."""

    def __init__(self, limits: dict[str, int], *, delay_ms: int = 0):
        self.limits = limits
        self.delay_ms = delay_ms
        self.lock = threading.Lock()
        self.used: dict[tuple[str, str], int] = {}
        self.counts = {"requests": 0, "hits": 0, "ok": 0, "over_limit": 0, "errors": 0, "cancelled": 0}
        self.calls: list[tuple[str, int, bool]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(self._call)})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port(f"{HOST}:0")
        self.server.start()

    def _call(self, body: bytes, context) -> bytes:
        with self.lock:
            self.counts["requests"] += 1
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
            if not context.is_active():
                with self.lock:
                    self.counts["cancelled"] += 1
                return b""
        domain, descriptors, request_hits = parse(body)
        cap = self.limits.get(domain)
        over = False
        with self.lock:
            # All or nothing over the call's descriptors, as the real service.
            wanted = []
            for tenant, dhits in descriptors:
                cost = dhits if dhits is not None else (request_hits or 1)
                self.counts["hits"] += cost
                if cap is not None and tenant is not None:
                    wanted.append(((domain, tenant), cost))
            over = any(self.used.get(k, 0) + c > cap for k, c in wanted)
            if not over:
                for k, c in wanted:
                    self.used[k] = self.used.get(k, 0) + c
            self.counts["over_limit" if over else "ok"] += 1
            for (_, tenant), cost in wanted:
                self.calls.append((tenant, cost, not over))
        # RateLimitResponse{overall_code}: field 1, varint; no descriptor statuses.
        return bytes([0x08, OVER_LIMIT if over else OK])

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def tenant_calls(self, tenant: str) -> list[tuple[str, int, bool]]:
        with self.lock:
            return [c for c in self.calls if c[0] == tenant]

    def log_tail(self, n: int = 30) -> str:
        with self.lock:
            return "\n".join(f"call tenant={t} hits_addend={h} -> {'OK' if ok else 'OVER_LIMIT'}"
                             for t, h, ok in self.calls[-n:])

    def stop(self) -> None:
        self.server.stop(grace=None)
