"""Issue 12: tenant from the peer certificate's URI SAN (`{"peer_principal": true}`, the
`connection.uri_san_peer_certificate` property) on a listener that requires client certs."""

from __future__ import annotations

import ssl

import pytest

from .harness import Pki, bootstrap, http_listener, request, send, statuses

X = "spiffe://cluster.local/ns/a/sa/x"
Y = "spiffe://cluster.local/ns/a/sa/y"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.server_cert = pki.server()
    pki.x = pki.client("client-x", X)
    pki.y = pki.client("client-y", Y)
    return pki


@pytest.fixture(scope="module")
def envoy(envoy_factory, pki, wasm):
    cert, key = pki.server_cert
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(cert)},
                                      "private_key": {"filename": str(key)}}],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}},
            },
        },
    }
    plugin = {"capacity": 50, "refill_rate": "1/hour", "rate_limit_headers": "ietf",
              "tenant": {"from": [{"peer_principal": True}]},
              "tenants": {X: {"capacity": 2}, Y: {"capacity": 2}}}
    return envoy_factory(config=bootstrap([http_listener("mtls", plugin, wasm, transport_socket=tls)]))


def policy(r) -> str:
    return r.headers["ratelimit-policy"].split(";")[0].strip('"')


def test_workloads_get_separate_buckets(envoy, pki):
    port = envoy.port("mtls")
    cx, cy = pki.client_context(*pki.x), pki.client_context(*pki.y)
    rx = send(port, 3, ssl_context=cx, headers={"x-tenant-id": "ignored"})
    assert [policy(r) for r in rx] == [X] * 3
    assert statuses(rx) == [200, 200, 429]
    ry = send(port, 3, ssl_context=cy)
    assert [policy(r) for r in ry] == [Y] * 3
    assert statuses(ry) == [200, 200, 429]
    assert request(port, ssl_context=cx).status == 429  # a new connection, the same identity
    counters = envoy.counters()
    assert counters["tenant.spiffe___cluster_local_ns_a_sa_x.allowed"] == 2
    assert counters["tenant.spiffe___cluster_local_ns_a_sa_y.denied"] == 1


def test_client_without_certificate_is_refused_by_tls(envoy, pki):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(envoy.port("mtls"), ssl_context=pki.client_context())
