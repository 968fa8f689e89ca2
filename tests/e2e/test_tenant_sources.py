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


SPOOFS = ("7.7.7.7", "8.8.8.8", "9.9.9.9")


def peer_config(source: dict) -> dict:
    """The issue's config: one token per bucket, no refill to speak of. Every bucket a request
    could land in is listed, so ratelimit-policy names the bucket that was charged."""
    return {"capacity": 1, "refill_rate": 0.001, "rate_limit_headers": "ietf",
            "tenants": {t: {"capacity": 1} for t in ("127.0.0.1", "nobody", *SPOOFS)},
            "tenant": {"from": [source, {"header": "x-tenant-id"}], "default": "nobody"}}


LISTENERS = {
    # the HCM as an operator behind one trusted proxy/LB would configure it (defaults)
    "xff": {"plugin_config": xff_config(1)},
    # Envoy at the edge: use_remote_address appends the peer to XFF
    "xff_edge": {"plugin_config": xff_config(1), "hcm_extra": {"use_remote_address": True}},
    "xff_edge2": {"plugin_config": xff_config(2), "hcm_extra": {"use_remote_address": True}},
    "source_ip": {"capacity": 100, "refill_rate": SLOW, "rate_limit_headers": "ietf",
                  "tenants": {"127.0.0.1": {"capacity": 3}}, "tenant": {"from": [{"source_ip": True}]}},
    # Issue 15: source_ip under Envoy's default HCM (no use_remote_address) ...
    "peer": {"plugin_config": peer_config({"source_ip": True})},
    # ... at the edge, where Envoy's address is always the TCP peer ...
    "peer_edge": {"plugin_config": peer_config({"source_ip": True}), "hcm_extra": {"use_remote_address": True}},
    # ... behind one trusted proxy: Envoy takes the client from XFF, which the plugin must be told to trust
    "trusted_hop": {"plugin_config": peer_config({"source_ip": {"trusted_client_address": True}}),
                    "hcm_extra": {"use_remote_address": True, "xff_num_trusted_hops": 1}},
    "trusted_hop_peer_only": {"plugin_config": peer_config({"source_ip": True}),
                              "hcm_extra": {"use_remote_address": True, "xff_num_trusted_hops": 1}},
    # the opt-in on the default HCM: the trap the opt-in's documentation warns about
    "trusted_default_hcm": {"plugin_config": peer_config({"source_ip": {"trusted_client_address": True}})},
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


def on_one_connection(port: int, headers: list[dict]) -> list:
    with Client(port) as c:
        return [c.request("/", h) for h in headers]


def test_default_hcm_xff_cannot_move_a_client_to_a_bucket_of_its_choosing(envoy):
    """Issue 15: Envoy's default HCM takes the downstream address from the rightmost XFF entry,
    so `source.address` was whatever the client wrote, and each forged value was a fresh
    bucket (200, 429, 200, 200 before the fix). Now such an address (port 0 in Envoy) is
    refused: every forged request lands in `tenant.default`, one shared bucket, and the tenant
    header listed after source_ip is not consulted either."""
    resps = on_one_connection(envoy.port("peer"), [
        {}, {},
        *({"x-forwarded-for": ip, "x-tenant-id": ip} for ip in SPOOFS),
        {"x-forwarded-for": "6.6.6.6, 7.7.7.7"},
        {},
    ])
    assert [policy(r) for r in resps] == ["127.0.0.1", "127.0.0.1", "nobody", "nobody", "nobody", "nobody",
                                          "127.0.0.1"]
    assert statuses(resps) == [200, 429, 200, 429, 429, 429, 429]


def test_edge_hcm_source_ip_is_the_tcp_peer_whatever_the_xff(envoy):
    """use_remote_address: true (no trusted hops): Envoy's address is the connection's peer,
    so source_ip is the TCP peer and XFF is only data."""
    resps = on_one_connection(envoy.port("peer_edge"), [{}, *({"x-forwarded-for": ip} for ip in SPOOFS)])
    assert [policy(r) for r in resps] == ["127.0.0.1"] * 4
    assert statuses(resps) == [200, 429, 429, 429]


def test_trusted_hops_with_the_opt_in_use_the_xff_client_address(envoy):
    """use_remote_address: true + xff_num_trusted_hops: 1 and
    {"source_ip": {"trusted_client_address": true}}: the client address the trusted proxy
    appended (the rightmost entry) is the tenant; entries a client prepends do not count."""
    port = envoy.port("trusted_hop")
    resps = on_one_connection(port, [
        {"x-forwarded-for": "7.7.7.7"}, {"x-forwarded-for": "7.7.7.7"}, {"x-forwarded-for": "8.8.8.8"},
        {"x-forwarded-for": "8.8.8.8, 7.7.7.7"}, {},
    ])
    assert [policy(r) for r in resps] == ["7.7.7.7", "7.7.7.7", "8.8.8.8", "7.7.7.7", "127.0.0.1"]
    assert statuses(resps) == [200, 429, 200, 429, 200]


def test_trusted_hops_without_the_opt_in_refuse_the_xff_address(envoy):
    """The same listener with plain {"source_ip": true}: an address from XFF is not the TCP
    peer, so it is refused (tenant.default) until the plugin is told to trust it."""
    resps = on_one_connection(envoy.port("trusted_hop_peer_only"), [{"x-forwarded-for": "9.9.9.9"}, {}])
    assert [policy(r) for r in resps] == ["nobody", "127.0.0.1"]


def test_the_opt_in_on_the_default_hcm_is_client_controlled(envoy):
    """Why trusted_client_address is an opt-in: on Envoy's default HCM the address it accepts
    is whatever the client puts last in XFF."""
    resps = on_one_connection(envoy.port("trusted_default_hcm"), [{"x-forwarded-for": ip} for ip in SPOOFS])
    assert [policy(r) for r in resps] == list(SPOOFS)
    assert statuses(resps) == [200, 200, 200]
