"""envoy-local/docker-compose.yml against the compose-spec schema, its mounts against the
repository, and its container layout against the real Envoy."""

import copy
import re
import subprocess
from pathlib import Path

import yaml

from deploylib import REPO, WASM_REL, compose_bind_mounts, compose_errors, envoy_validate

COMPOSE = REPO / "envoy-local/docker-compose.yml"


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def envoy_service(doc):
    return doc["services"]["envoy"]


def test_compose_matches_compose_spec_schema():
    assert compose_errors(compose()) == []


def test_bind_mount_sources_exist(wasm):
    mounts = compose_bind_mounts(compose(), COMPOSE.parent)
    assert mounts, "no bind mounts"
    for host, _ in mounts:
        assert host.exists(), f"{host} does not exist (run `make wasm` for the .wasm)"
    hosts = {h for h, _ in mounts}
    assert (REPO / "envoy-local/envoy.yaml").resolve() in hosts
    assert wasm.resolve() in hosts


def test_image_is_the_envoy_version_the_tests_run(envoy_bin):
    image = envoy_service(compose())["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)(?:\.(\d+)|-latest)", image)
    assert m, image
    out = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True, timeout=30).stdout
    version = re.search(r"/(\d+)\.(\d+)\.(\d+)/", out).groups()
    assert m.groups()[:2] == version[:2]
    if m.group(3):
        assert m.group(3) == version[2]


def test_listener_is_reachable_from_the_host():
    # envoy.yaml listens on 127.0.0.1: only host networking makes that the host's loopback.
    svc = envoy_service(compose())
    bootstrap = yaml.safe_load((REPO / "envoy-local/envoy.yaml").read_text())
    addresses = {l["address"]["socket_address"]["address"] for l in bootstrap["static_resources"]["listeners"]}
    if svc.get("network_mode") != "host":
        assert addresses == {"0.0.0.0"} and svc.get("ports"), "a bridge network needs 0.0.0.0 and ports"
    else:
        assert "ports" not in svc  # ignored (and rejected by docker) with host networking


def test_same_envoy_yaml_runs_in_the_container_layout(envoy_bin, workdir):
    # Lay the bind mounts out under a fake root exactly where the container sees them, run
    # the compose `command` from `working_dir` with the real Envoy (validate mode).
    doc = compose()
    svc = envoy_service(doc)
    root = workdir / "root"
    for host, target in compose_bind_mounts(doc, COMPOSE.parent):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(host)
    cwd = root / svc["working_dir"].lstrip("/")
    command = svc["command"]
    assert command[0] == "envoy" and command[1] == "-c"
    # The relative .wasm path in envoy.yaml resolves inside the mounted layout.
    assert (cwd / WASM_REL).exists()
    config = cwd / command[2]
    assert config.exists()
    r = subprocess.run([envoy_bin, "--mode", "validate", "-c", command[2], "--use-dynamic-base-id"],
                       cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- negative: broken copies must fail --------------------------------------------------


def test_volumes_typo_is_rejected():
    doc = compose()
    svc = envoy_service(doc)
    svc["volumnes"] = svc.pop("volumes")
    errors = compose_errors(doc)
    assert any("volumnes" in e for e in errors), errors


def test_bad_bind_mount_is_rejected():
    doc = compose()
    envoy_service(doc)["volumes"][0]["read_only"] = 3
    assert compose_errors(doc)
    doc = compose()
    envoy_service(doc)["volumes"][0]["typ"] = "bind"
    assert any("typ" in e for e in compose_errors(doc))


def test_missing_host_path_is_detected(tmp_path):
    doc = compose()
    envoy_service(doc)["volumes"][1]["source"] = "../target/wasm32-wasip1/release/tenant-ratelimit.wasm"
    missing = [h for h, _ in compose_bind_mounts(doc, COMPOSE.parent) if not h.exists()]
    assert missing and missing[0].name == "tenant-ratelimit.wasm"


def test_wrong_mount_target_breaks_the_container_layout(envoy_bin, workdir):
    doc = compose()
    envoy_service(doc)["volumes"][1]["target"] = "/etc/envoy/tenant_ratelimit.wasm"
    svc = envoy_service(doc)
    root = workdir / "root"
    for host, target in compose_bind_mounts(doc, COMPOSE.parent):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(host)
    cwd = root / svc["working_dir"].lstrip("/")
    r = subprocess.run([envoy_bin, "--mode", "validate", "-c", svc["command"][2], "--use-dynamic-base-id"],
                       cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
