"""Issue 12: tenant from a JWT claim. Envoy's jwt_authn runs first with a local JWKS and
`payload_in_metadata: jwt_payload`; our filter reads the claim from that dynamic metadata.
Issue 15: the `istio` listener runs jwt_authn exactly as Istio's RequestAuthentication
configures it (`payload_in_metadata: payload`), and jwt_claim finds the claim with no
metadata_key. Tokens are RS256, signed with the openssl CLI."""

from __future__ import annotations

import time

import pytest

from .harness import Jwt, bootstrap, http_listener, request, send, statuses

ISSUER = "https://issuer.e2e.test"


def jwt_authn(jwks: str) -> dict:
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"e2e": {"issuer": ISSUER, "local_jwks": {"inline_string": jwks},
                                  "payload_in_metadata": "jwt_payload", "forward": True}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "e2e"}}],
        },
    }


def istio_jwt_authn(jwks: str) -> dict:
    """What istiod generates for one RequestAuthentication jwtRule (istio/istio
    pilot/pkg/security/authn/policy_applier.go, convertToEnvoyJwtConfig, with the JWKS
    inlined as PILOT_JWT_ENABLE_REMOTE_JWKS=istiod does): provider "origins-0",
    payload_in_metadata "payload" (filters.EnvoyJwtFilterPayload), scope/permission normalized,
    a token optional (allow_missing) but rejected when invalid, CORS preflight bypassed."""
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"origins-0": {
                "issuer": ISSUER,
                "local_jwks": {"inline_string": jwks},
                "payload_in_metadata": "payload",
                "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]},
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
            "bypass_cors_preflight": True,
        },
    }


def plugin(claim: str) -> dict:
    return {"capacity": 10, "refill_rate": "1/hour", "rate_limit_headers": "ietf",
            "tenant": {"from": [{"jwt_claim": {"claim": claim}}, {"header": "x-tenant-id"}]},
            "tenants": {"acme": {"capacity": 2}, "globex": {"capacity": 3}, "evil": {"capacity": 2}}}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("jwt")
    return Jwt(d, kid="good"), Jwt(d, kid="good")  # the second: same kid, a key nobody trusts


@pytest.fixture(scope="module")
def envoy(envoy_factory, keys, wasm):
    good, _ = keys
    pre = [jwt_authn(good.jwks())]
    return envoy_factory(config=bootstrap([
        http_listener("jwt", plugin("tenant"), wasm, pre_filters=pre),
        http_listener("jwt_nested", plugin("org.id"), wasm, pre_filters=pre),
        http_listener("istio", plugin("tenant"), wasm, pre_filters=[istio_jwt_authn(good.jwks())]),
    ]))


def claims(**kw) -> dict:
    now = int(time.time())
    return {"iss": ISSUER, "sub": "user", "iat": now, "exp": now + 3600, **kw}


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def policy(r) -> str:
    return r.headers["ratelimit-policy"].split(";")[0].strip('"')


def test_valid_token_selects_the_tenant_bucket(envoy, keys):
    good, _ = keys
    resps = send(envoy.port("jwt"), 3, headers={**bearer(good.token(claims(tenant="acme"))), "x-tenant-id": "globex"})
    assert statuses(resps) == [200, 200, 429]
    assert {policy(r) for r in resps} == {"acme"}
    # another token, another tenant
    r = request(envoy.port("jwt"), headers=bearer(good.token(claims(tenant="globex"))))
    assert (r.status, policy(r)) == (200, "globex")


def test_nested_claim(envoy, keys):
    good, _ = keys
    resps = send(envoy.port("jwt_nested"), 4, headers=bearer(good.token(claims(org={"id": "globex", "n": 1}))))
    assert statuses(resps) == [200, 200, 200, 429]
    assert {policy(r) for r in resps} == {"globex"}


def test_token_without_the_claim_falls_through(envoy, keys):
    good, _ = keys
    r = request(envoy.port("jwt"), headers={**bearer(good.token(claims())), "x-tenant-id": "globex"})
    assert (r.status, policy(r)) == (200, "globex")  # next source: the header
    r = request(envoy.port("jwt"), headers=bearer(good.token(claims(tenant=42))))
    assert (r.status, policy(r)) == (200, "default")  # not a string: default tenant
    r = request(envoy.port("jwt_nested"), headers=bearer(good.token(claims(org="acme"))))
    assert (r.status, policy(r)) == (200, "default")  # "org" is not an object


def test_expired_and_forged_tokens_never_reach_the_filter(envoy, keys):
    good, forger = keys
    before = envoy.counters()
    bad = [
        good.token(claims(tenant="evil", iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
        forger.token(claims(tenant="evil")),
        good.token(claims(tenant="evil"))[:-4] + "AAAA",
    ]
    resps = [request(envoy.port("jwt"), headers=bearer(t)) for t in bad]
    resps.append(request(envoy.port("jwt"), headers={"x-tenant-id": "evil"}))  # no token at all
    assert statuses(resps) == [401] * 4
    assert b"expired" in resps[0].body.lower()
    for r in resps:
        assert "ratelimit" not in r.headers
    after = envoy.counters()
    for name in ("allowed", "denied", "tenant.evil.allowed", "tenant.evil.denied"):
        assert after[name] == before[name], name


def test_istio_request_authentication_payload_is_found_by_default(envoy, keys):
    """No metadata_key in the plugin config: the claim is read from the key Istio sets."""
    good, forger = keys
    port = envoy.port("istio")
    resps = send(port, 4, headers={**bearer(good.token(claims(tenant="globex"))), "x-tenant-id": "acme"})
    assert [policy(r) for r in resps] == ["globex"] * 4
    assert statuses(resps) == [200, 200, 200, 429]
    # Istio lets a request without a token through (allow_missing): the next source decides
    r = request(port, headers={"x-tenant-id": "evil"})
    assert (r.status, policy(r)) == (200, "evil")
    # an invalid token is still refused by jwt_authn before the filter runs
    assert request(port, headers=bearer(forger.token(claims(tenant="evil")))).status == 401
