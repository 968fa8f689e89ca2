"""The Istio manifests against Istio's published CRD schemas (strict fields, CEL rules)."""

import copy
import json

import pytest
import yaml

from deploylib import ISTIO, istio_errors, is_hex64, load_docs

# istio/*.yaml files that are not Istio resources (a kubectl patch for the Deployment).
NOT_RESOURCES = {"sidecar-wasm-volume.yaml"}
MANIFESTS = sorted(p.name for p in ISTIO.glob("*.yaml") if p.name not in NOT_RESOURCES)


def doc_of(kind, file):
    return next(d for d in load_docs(ISTIO / file) if d["kind"] == kind)


def test_expected_manifests_exist():
    assert {"wasmplugin.yaml", "wasmplugin-gateway.yaml", "envoyfilter.yaml", "envoyfilter-remote.yaml"} <= set(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_istio_crd_schema(name):
    docs = load_docs(ISTIO / name)
    assert docs
    for doc in docs:
        assert istio_errors(doc) == [], f"{name}: {doc.get('kind')} {doc['metadata'].get('name')}"


def test_wasmplugin_content():
    wp = doc_of("WasmPlugin", "wasmplugin.yaml")
    spec = wp["spec"]
    assert spec["url"].startswith("oci://")
    assert is_hex64(spec["sha256"])
    assert spec["failStrategy"] == "FAIL_OPEN"
    assert spec["phase"] in ("AUTHN", "AUTHZ", "STATS")
    assert spec["selector"]["matchLabels"]
    assert spec["pluginName"] == "tenant_ratelimit"
    cfg = spec["pluginConfig"]
    assert (cfg["capacity"], cfg["refill_rate"]) == (60, "60/min")
    assert cfg["tenants"]["acme"] == {"capacity": 120, "refill_rate": "120/min"}
    assert cfg["tenants"]["globex"] == {"capacity": 300, "refill_rate": "300/min"}
    assert cfg["rules"] == [{"methods": ["GET", "HEAD"]}]
    assert cfg["tenant"]["from"] == [{"header": "x-tenant-id"}]
    # The commented alternatives name the other URL schemes Istio accepts.
    text = (ISTIO / "wasmplugin.yaml").read_text()
    assert "url: https://" in text and "url: file:///" in text


def test_gateway_wasmplugin_selects_the_gateways_listeners():
    """Istio attaches a WasmPlugin to a gateway's listeners only for mode CLIENT or
    CLIENT_AND_SERVER (istio/api wasm.proto TrafficSelector; pilot maps the gateway listener
    class to CLIENT): the sidecar example's SERVER would attach nothing."""
    spec = doc_of("WasmPlugin", "wasmplugin-gateway.yaml")["spec"]
    assert spec["selector"]["matchLabels"] == {"istio": "ingressgateway"}
    assert [m["mode"] for m in spec["match"]] == ["CLIENT"]
    assert spec["failStrategy"] == "FAIL_OPEN"
    assert spec["pluginName"] == "tenant_ratelimit"
    assert spec["url"] == doc_of("WasmPlugin", "wasmplugin.yaml")["spec"]["url"]
    sources = spec["pluginConfig"]["tenant"]["from"]
    assert sources == [{"jwt_claim": {"claim": "tenant"}}, {"source_ip": True}]
    # the sidecar example stays inbound-only
    assert [m["mode"] for m in doc_of("WasmPlugin", "wasmplugin.yaml")["spec"]["match"]] == ["SERVER"]


def test_gateway_match_mode_is_schema_checked():
    errors = mutated("WasmPlugin", "wasmplugin-gateway.yaml", lambda d: d["spec"].update(match=[{"mode": "GATEWAY"}]))
    assert any("mode" in e and "GATEWAY" in e for e in errors), errors


def test_fail_strategy_version_claims():
    """failStrategy is an Istio 1.19 field (not 1.18); FAIL_RELOAD is documented where the
    strategy is chosen."""
    for f in ("wasmplugin.yaml", "wasmplugin-gateway.yaml"):
        text = (ISTIO / f).read_text()
        assert "1.18" not in text and "failStrategy needs >= 1.19" in text, f
        assert "FAIL_RELOAD" in text, f


@pytest.mark.parametrize("file", ["envoyfilter.yaml", "envoyfilter-remote.yaml"])
def test_envoyfilter_patches_the_filter_chain_not_the_connection_manager(file):
    ef = doc_of("EnvoyFilter", file)
    (patch,) = ef["spec"]["configPatches"]
    assert patch["applyTo"] == "HTTP_FILTER"
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    f = patch["match"]["listener"]["filterChain"]["filter"]
    assert f["name"] == "envoy.filters.network.http_connection_manager"
    assert f["subFilter"]["name"] == "envoy.filters.http.router"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    value = patch["patch"]["value"]
    assert value["typed_config"]["@type"] == "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    config = value["typed_config"]["config"]
    assert config["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    assert config["configuration"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    assert isinstance(config["configuration"]["value"], str)
    json.loads(config["configuration"]["value"])
    code = config["vm_config"]["code"]
    if file == "envoyfilter.yaml":
        assert code["local"]["filename"].startswith("/")
    else:
        assert code["remote"]["http_uri"]["uri"].startswith("https://")
        assert is_hex64(code["remote"]["sha256"])


def test_remote_cluster_is_created_by_the_service_entry():
    docs = load_docs(ISTIO / "envoyfilter-remote.yaml")
    ef = next(d for d in docs if d["kind"] == "EnvoyFilter")
    se = next(d for d in docs if d["kind"] == "ServiceEntry")
    dr = next(d for d in docs if d["kind"] == "DestinationRule")
    http_uri = ef["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"][
        "remote"]["http_uri"]
    host = http_uri["uri"].split("/")[2]
    port = se["spec"]["ports"][0]["number"]
    assert http_uri["cluster"] == f"outbound|{port}||{host}"
    assert host in se["spec"]["hosts"] and dr["spec"]["host"] == host
    assert dr["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["mode"] == "SIMPLE"


def test_sidecar_volume_annotations_mount_the_envoyfilter_file():
    patch = load_docs(ISTIO / "sidecar-wasm-volume.yaml")[0]
    ann = patch["spec"]["template"]["metadata"]["annotations"]
    volumes = json.loads(ann["sidecar.istio.io/userVolume"])
    mounts = json.loads(ann["sidecar.istio.io/userVolumeMount"])
    assert [v["name"] for v in volumes] == [m["name"] for m in mounts]
    filename = doc_of("EnvoyFilter", "envoyfilter.yaml")["spec"]["configPatches"][0]["patch"]["value"][
        "typed_config"]["config"]["vm_config"]["code"]["local"]["filename"]
    assert filename == mounts[0]["mountPath"] + "/tenant_ratelimit.wasm"
    assert mounts[0]["readOnly"] is True
    # The ConfigMap the comments tell you to create, with the key the file name uses.
    text = (ISTIO / "envoyfilter.yaml").read_text()
    cm = volumes[0]["configMap"]["name"]
    assert f"create configmap {cm}" in text and "--from-file=tenant_ratelimit.wasm=" in text


def test_dockerfile_is_the_istio_image_layout():
    lines = [l.strip() for l in (ISTIO / "Dockerfile").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    assert lines == ["FROM scratch", "COPY target/wasm32-wasip1/release/tenant_ratelimit.wasm ./plugin.wasm"]
    ignore = (ISTIO / "Dockerfile.dockerignore").read_text().split()
    assert ignore == ["*", "!target/wasm32-wasip1/release/tenant_ratelimit.wasm"]


# ---- negative: a broken copy must fail the schema check --------------------------------


def mutated(kind, file, mutate):
    doc = copy.deepcopy(doc_of(kind, file))
    mutate(doc)
    return istio_errors(doc)


def test_typo_in_wasmplugin_field_is_rejected():
    def m(d):
        d["spec"]["pluginConfg"] = d["spec"].pop("pluginConfig")
    errors = mutated("WasmPlugin", "wasmplugin.yaml", m)
    assert any("pluginConfg" in e for e in errors), errors


def test_bad_fail_strategy_is_rejected():
    errors = mutated("WasmPlugin", "wasmplugin.yaml", lambda d: d["spec"].update(failStrategy="MAYBE"))
    assert any("failStrategy" in e and "MAYBE" in e for e in errors), errors


def test_bad_phase_and_url_scheme_are_rejected():
    errors = mutated("WasmPlugin", "wasmplugin.yaml", lambda d: d["spec"].update(phase="LAST"))
    assert any("phase" in e for e in errors), errors
    errors = mutated("WasmPlugin", "wasmplugin.yaml", lambda d: d["spec"].update(url="ftp://example.com/x.wasm"))
    assert any("url must have schema" in e for e in errors), errors


def test_selector_and_target_refs_together_are_rejected():
    def m(d):
        d["spec"]["targetRefs"] = [{"kind": "Service", "group": "", "name": "my-api"}]
    errors = mutated("WasmPlugin", "wasmplugin.yaml", m)
    assert any("only one of targetRefs or selector" in e for e in errors), errors


def test_typo_in_envoyfilter_match_is_rejected():
    def m(d):
        f = d["spec"]["configPatches"][0]["match"]["listener"]["filterChain"]["filter"]
        f["subfilter"] = f.pop("subFilter")
    errors = mutated("EnvoyFilter", "envoyfilter.yaml", m)
    assert any("subfilter" in e for e in errors), errors


def test_bad_envoyfilter_operation_and_context_are_rejected():
    def m(d):
        d["spec"]["configPatches"][0]["patch"]["operation"] = "INSERT_AFTER_ROUTER"
        d["spec"]["configPatches"][0]["match"]["context"] = "INBOUND"
    errors = mutated("EnvoyFilter", "envoyfilter.yaml", m)
    assert any("operation" in e for e in errors) and any("context" in e for e in errors), errors


def test_metadata_and_kind_are_checked():
    errors = mutated("WasmPlugin", "wasmplugin.yaml", lambda d: d["metadata"].update(name="Tenant_RateLimit"))
    assert any("metadata/name" in e for e in errors), errors
    errors = mutated("WasmPlugin", "wasmplugin.yaml", lambda d: d.update(apiVersion="extensions.istio.io/v1"))
    assert errors and "no Istio CRD" in errors[0]


def test_yaml_round_trip_keeps_the_manifests_valid():
    # What kubectl sends is the parsed document; make sure nothing relies on YAML-only syntax.
    for name in MANIFESTS:
        for doc in load_docs(ISTIO / name):
            assert istio_errors(yaml.safe_load(yaml.safe_dump(doc))) == []


def test_wasmplugin_and_envoyfilter_carry_the_same_config():
    wp = doc_of("WasmPlugin", "wasmplugin.yaml")["spec"]["pluginConfig"]
    ef = doc_of("EnvoyFilter", "envoyfilter.yaml")["spec"]["configPatches"][0]["patch"]["value"]
    assert json.loads(ef["typed_config"]["config"]["configuration"]["value"]) == wp
    assert ef["typed_config"]["config"]["root_id"] == doc_of("WasmPlugin", "wasmplugin.yaml")["spec"]["pluginName"]
