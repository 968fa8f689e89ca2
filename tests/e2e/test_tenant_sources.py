"""Issue 12: tenant from X-Forwarded-For (trusted hops) and from the client IP.

The filter reads X-Forwarded-For as the HCM hands it on, and counts `trusted_hops` entries
from the right. What the HCM does to the header first decides which setting is right:

* `use_remote_address: false` (the default, Envoy behind a trusted proxy): Envoy does not
  touch XFF; the rightmost entry is the one the last proxy appended.
* `use_remote_address: true` (Envoy at the edge): Envoy appends the peer address
  (here 127.0.0.1) before any HTTP filter runs, so that address is one more hop to trust.
"""

from __future__ import annotations

import pytest

from .harness import Client, request, send, statuses

SLOW = "1/hour"
LISTED = {ip: {"capacity": 2} for ip in ("1.1.1.1", "2.2.2.2", "6.6.6.6", "9.9.9.9", "10.0.0.1", "127.0.0.1")}


def xff_config(hops: int) -> dict:
    return {"capacity": 100, "refill_rate": SLOW, "rate_limit_headers": "ietf", "tenants": LISTED,
            "tenant": {"from": [{"xff": {"trusted_hops": hops}}, {"header": "x-tenant-id"}]}}


LISTENERS = {
    # the HCM as an operator behind one trusted proxy/LB would configure it (defaults)
    "xff": {"plugin_config": xff_config(1)},
    # Envoy at the edge: use_remote_address appends the peer to XFF
    "xff_edge": {"plugin_config": xff_config(1), "hcm_extra": {"use_remote_address": True}},
    "xff_edge2": {"plugin_config": xff_config(2), "hcm_extra": {"use_remote_address": True}},
    "source_ip": {"capacity": 100, "refill_rate": SLOW, "rate_limit_headers": "ietf",
                  "tenants": {"127.0.0.1": {"capacity": 3}}, "tenant": {"from": [{"source_ip": True}]}},
}


@pytest.fixture(scope="module")
def envoy(envoy_factory):
    return envoy_factory(LISTENERS)


def policy(r) -> str:
    return r.headers["ratelimit-policy"].split(";")[0].strip('"')


def xff(value: str, **extra) -> dict:
    return {"x-forwarded-for": value, **extra}


def test_xff_trusted_hops_picks_the_client(envoy):
    port = envoy.port("xff")
    r = request(port, headers=xff("6.6.6.6, 1.1.1.1, 10.0.0.1"))
    assert r.status == 200 and policy(r) == "1.1.1.1"


def test_xff_prepended_entries_do_not_change_the_bucket(envoy):
    """A client that prepends (or sends its own) XFF entries still lands in the bucket of the
    address the trusted proxy appended: 2.2.2.2 gets its 2 tokens, not more."""
    port = envoy.port("xff")
    forged = ["9.9.9.9, 6.6.6.6, 2.2.2.2, 10.0.0.1", "2.2.2.2, 10.0.0.1", "127.0.0.1,2.2.2.2 , 10.0.0.1",
              "6.6.6.6, 2.2.2.2, 10.0.0.1"]
    resps = [request(port, headers=xff(v, **{"x-tenant-id": "9.9.9.9"})) for v in forged]
    assert [policy(r) for r in resps] == ["2.2.2.2"] * 4
    assert statuses(resps) == [200, 200, 429, 429]
    r = request(port, headers=xff("2.2.2.2, 6.6.6.6, 10.0.0.1"))  # 6.6.6.6 is a bucket of its own
    assert (r.status, policy(r)) == (200, "6.6.6.6")


def test_xff_with_too_few_entries_falls_through(envoy, fresh):
    port = envoy.port("xff")
    # one entry = only the trusted hop itself: next source (the header)
    r = request(port, headers=xff("10.0.0.1", **{"x-tenant-id": "9.9.9.9"}))
    assert policy(r) == "9.9.9.9"
    # no XFF and no header: the default tenant
    assert policy(request(port)) == "default"
    assert policy(request(port, headers=xff("10.0.0.1"))) == "default"
    # a header tenant that is not listed still gets its own bucket (capacity 100)
    r = request(port, headers={"x-tenant-id": fresh("xff")})
    assert r.headers["ratelimit-policy"] == '"default";q=100;w=360000'


def test_xff_with_use_remote_address_counts_envoy_as_a_hop(envoy):
    """use_remote_address: true -> Envoy appends 127.0.0.1; with trusted_hops 1 the tenant is
    the client's own rightmost entry, with trusted_hops 2 it is the entry before it."""
    r = request(envoy.port("xff_edge"), headers=xff("6.6.6.6, 1.1.1.1, 10.0.0.1"))
    assert policy(r) == "10.0.0.1"
    r = request(envoy.port("xff_edge"))  # no XFF sent: Envoy's own entry is the only one
    assert policy(r) == "default"
    r = request(envoy.port("xff_edge2"), headers=xff("6.6.6.6, 1.1.1.1"))
    assert policy(r) == "6.6.6.6"


def test_source_ip_is_the_tenant(envoy):
    """Every connection from 127.0.0.1 (whatever its source port) shares one bucket; a tenant
    header is ignored because it is not a configured source."""
    port = envoy.port("source_ip")
    resps = [request(port, headers={"x-tenant-id": f"h{i}"}) for i in range(3)]
    resps += send(port, 2, connections=2)
    assert [policy(r) for r in resps] == ["127.0.0.1"] * 5
    assert statuses(resps) == [200, 200, 200, 429, 429]
