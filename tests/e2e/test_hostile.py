"""Issue 7: hostile input through real Envoy. Huge header values (the listener's HCM allows
96 KiB of headers so they reach the filter), non-UTF-8 and control bytes in the tenant
header (raw socket: http.client refuses them), repeated tenant headers, percent-encoded
and repeated query parameters, very long paths.

Must hold: Envoy keeps serving, the VM never fails (no panic / failed-callback lines, no
wasm failure stats), and nothing bypasses the limit: every variant is limited, and every
variant whose id is invalid falls back to tenant `default`, so they all share its bucket.
Envoy's own codec may refuse some bytes (400) before the filter runs: that is not a bypass.
"""

from __future__ import annotations

import re

import pytest

from .harness import Client, raw_http, request

CAPACITY = 3
CONFIG = {"capacity": CAPACITY, "refill_rate": "1/hour"}
BIG = 60 * 1024
LONG_PATH = 32 * 1024


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory({
        "hostile": {"plugin_config": CONFIG, "hcm_extra": {"max_request_headers_kb": 96}},
    })


def raw_get(path: bytes, header_lines: list[bytes]) -> bytes:
    """One HTTP/1.1 request with `connection: close`, bytes exactly as given."""
    return (b"GET " + path + b" HTTP/1.1\r\nhost: e2e\r\n" + b"".join(h + b"\r\n" for h in header_lines)
            + b"connection: close\r\n\r\n")


def send_raw(envoy, path: bytes, header_lines: list[bytes], repeat: int) -> list[int]:
    """`repeat` requests, each on its own connection; a status of 0 = no HTTP response."""
    return [raw_http(envoy.port("hostile"), raw_get(path, header_lines))[0] or 0 for _ in range(repeat)]


def vm_failures(envoy) -> dict[str, int]:
    return {k: v for k, v in envoy.stats("wasm").items()
            if re.search(r"fail|crash|abort|vm_reload", k) and v}


BAD_LOG = re.compile(r"panic|Function: proxy_on_\w+ failed|wasm.*(critical|\[error\])|"
                     r"\[critical\]|Plugin configured to fail closed|VM (has )?failed", re.I)


def bad_log_lines(envoy) -> list[str]:
    return [l for l in envoy.log_text().splitlines() if BAD_LOG.search(l)]


# Variants whose tenant id is invalid, or absent: each must land in the `default` bucket.
# (path, header lines); http.client cannot send most of these, so all go raw.
DEFAULT_VARIANTS = {
    "60KiB tenant header": (b"/", [b"x-tenant-id: " + b"a" * BIG]),
    "129-byte tenant header": (b"/", [b"x-tenant-id: " + b"b" * 129]),
    "non-UTF-8 tenant header": (b"/", [b"x-tenant-id: caf\xe9-\xff\xfe"]),
    "UTF-8 non-ASCII tenant header": (b"/", ["x-tenant-id: café".encode()]),
    "tab inside tenant header": (b"/", [b"x-tenant-id: a\tb"]),
    "space inside tenant header": (b"/", [b"x-tenant-id: a b"]),
    "control byte 0x01 in tenant header": (b"/", [b"x-tenant-id: a\x01b"]),
    "DEL in tenant header": (b"/", [b"x-tenant-id: a\x7fb"]),
    "NUL in tenant header": (b"/", [b"x-tenant-id: a\x00b"]),
    "empty tenant header": (b"/", [b"x-tenant-id: "]),
    "bad percent escape in query": (b"/?tenant=%zz", []),
    "truncated percent escape in query": (b"/?tenant=ab%4", []),
    "percent-encoded NUL in query": (b"/?tenant=a%00b", []),
    "percent-encoded space in query": (b"/?tenant=a%20b", []),
    "percent-encoded non-UTF-8 in query": (b"/?tenant=%ff%fe", []),
    "60KiB query tenant": (b"/?tenant=" + b"q" * BIG, []),
    "32KiB path, no tenant": (b"/" + b"p" * LONG_PATH, []),
    "60KiB junk header, no tenant": (b"/", [b"x-junk: " + b"j" * BIG]),
    "no tenant at all": (b"/", []),
}


def test_invalid_ids_share_the_default_bucket_and_envoy_survives(envoy):
    before_fail = vm_failures(envoy)
    per_variant: dict[str, list[int]] = {}
    for name, (path, headers) in DEFAULT_VARIANTS.items():
        per_variant[name] = send_raw(envoy, path, headers, repeat=2)
    print("\nhostile default-bucket variants:")
    for name, st in per_variant.items():
        print(f"  {name}: {st}")
    admitted = sum(s == 200 for st in per_variant.values() for s in st)
    reached = [n for n, st in per_variant.items() if any(s in (200, 429) for s in st)]
    for name, st in per_variant.items():
        assert st, f"{name}: no response at all"
        assert set(st) <= {200, 429, 400, 431}, f"{name}: unexpected statuses {st}"
        assert not any(s >= 500 for s in st), f"{name}: {st}"
    # every variant that reached the filter was charged to `default`: 3 admitted in total
    assert len(reached) >= 12, reached
    assert admitted == CAPACITY, per_variant
    # and `default` is now empty for everyone, whichever way it is named
    assert request(envoy.port("hostile")).status == 429
    assert request(envoy.port("hostile"), headers={"x-tenant-id": "default"}).status == 429
    # each variant keeps being limited when repeated (no variant escapes later on)
    for name, (path, headers) in DEFAULT_VARIANTS.items():
        st = send_raw(envoy, path, headers, repeat=3)
        assert 200 not in st, f"{name} passed after `default` was spent: {st}"
    assert envoy.proc.poll() is None
    assert request(envoy.port("hostile"), headers={"x-tenant-id": "alive-1"}).status == 200
    assert vm_failures(envoy) == before_fail == {}
    assert bad_log_lines(envoy) == [], bad_log_lines(envoy)


# Variants with a valid id that must be limited like any tenant: (path, headers, tenant the
# bucket belongs to, checked afterwards with a plain request).
VALID_VARIANTS = {
    "percent-encoded and repeated query": (b"/?tenant=a%63me&tenant=other", [], "acme"),
    "repeated query, encoded first": (b"/x?a=1&tenant=%62eta&tenant=beta2&tenant=", [], "beta"),
    "32KiB path with query tenant": (b"/" + b"l" * LONG_PATH + b"?tenant=longpath", [], "longpath"),
    "60KiB junk header with tenant": (b"/", [b"x-junk: " + b"j" * BIG, b"x-tenant-id: bigjunk"], "bigjunk"),
    "header beats query": (b"/?tenant=q-loser", [b"x-tenant-id: h-winner"], "h-winner"),
    "invalid header falls to query": (b"/?tenant=q-fallback", [b"x-tenant-id: bad\xe9 id"], "q-fallback"),
    "128-byte tenant header": (b"/", [b"x-tenant-id: " + b"m" * 128], "m" * 128),
}


@pytest.mark.parametrize("name", list(VALID_VARIANTS))
def test_valid_variants_are_limited_to_their_tenant(envoy, name):
    path, headers, owner = VALID_VARIANTS[name]
    st = send_raw(envoy, path, headers, repeat=CAPACITY + 2)
    assert st == [200] * CAPACITY + [429] * 2, f"{name}: {st}"
    # the bucket charged was `owner`'s: a plain request for it is refused now
    assert request(envoy.port("hostile"), headers={"x-tenant-id": owner}).status == 429, name
    assert bad_log_lines(envoy) == []


def test_repeated_tenant_headers(envoy):
    """Two `x-tenant-id` lines: the limit applies to one deterministic bucket (Envoy hands
    the filter the first value), never to a fresh one per request."""
    st = send_raw(envoy, b"/", [b"x-tenant-id: rep-a", b"x-tenant-id: rep-b"], repeat=CAPACITY + 2)
    assert st == [200] * CAPACITY + [429] * 2, st
    port = envoy.port("hostile")
    a = request(port, headers={"x-tenant-id": "rep-a"}).status
    b = request(port, headers={"x-tenant-id": "rep-b"}).status
    print(f"\nrepeated tenant header: rep-a -> {a}, rep-b -> {b}")
    assert (a, b) == (429, 200), "expected the first header value to own the bucket"
    # reversed order charges rep-b
    st = send_raw(envoy, b"/", [b"x-tenant-id: rep-b", b"x-tenant-id: rep-a"], repeat=CAPACITY + 1)
    assert st == [200] * (CAPACITY - 1) + [429] * 2, st


def test_envoy_still_healthy_at_the_end(envoy):
    assert envoy.proc.poll() is None
    status, _ = envoy.admin("/ready")
    assert status == 200
    with Client(envoy.port("hostile")) as c:
        assert c.request(headers={"x-tenant-id": "alive-2"}).status == 200
    assert vm_failures(envoy) == {}
    assert bad_log_lines(envoy) == []
