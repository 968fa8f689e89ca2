"""deploy/service, checked offline: the Kubernetes manifests hang together (selectors, named
ports, probes on the service's real endpoints), the ConfigMap's limits pass the service's
own config check, the Deployment's args start the real binary, the EnvoyFilter matches
Istio's CRD schema (tests/deploy's machinery), and the Dockerfile builds what `make service`
builds."""

from __future__ import annotations

import importlib.util
import subprocess
import time
from pathlib import Path

import yaml

from e2e.harness import free_port  # noqa: F401

from tests.support.envoy import stop_process

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "service"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind() -> dict[str, dict]:
    return {d["kind"]: d for d in docs("kubernetes.yaml")}


def test_manifests_hang_together():
    k = by_kind()
    assert set(k) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    dep = k["Deployment"]
    assert dep["apiVersion"] == "apps/v1" and k["PodDisruptionBudget"]["apiVersion"] == "policy/v1"
    assert dep["spec"]["replicas"] >= 2
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], k["Service"]["spec"]["selector"],
                     k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert k["PodDisruptionBudget"]["spec"]["minAvailable"] < dep["spec"]["replicas"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {p["targetPort"] for p in k["Service"]["spec"]["ports"]} <= set(ports)
    args = dict(a.split("=", 1) for a in c["args"])
    assert args["--listen"].endswith(f":{ports['grpc']}")
    assert args["--metrics"].endswith(f":{ports['metrics']}")
    mount = c["volumeMounts"][0]["mountPath"]
    assert args["--config"] == f"{mount}/limits.json"
    assert dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == k["ConfigMap"]["metadata"]["name"]


def test_configmap_limits_pass_the_service_check(service_bin, tmp_path):
    path = tmp_path / "limits.json"
    path.write_text(by_kind()["ConfigMap"]["data"]["limits.json"])
    p = subprocess.run([service_bin, "--check-config", str(path)], capture_output=True, timeout=10)
    assert p.returncode == 0, p.stderr
    path.write_text('{"domains": {"tenants": {"capacity": 0, "refill_rate": 1}}}')
    p = subprocess.run([service_bin, "--check-config", str(path)], capture_output=True, timeout=10)
    assert p.returncode == 1 and b"domains.tenants.capacity" in p.stderr


def test_deployment_args_start_the_binary(service_bin, redis, tmp_path):
    """The container's args, with the addresses swapped for loopback ones, start the real
    service, which serves /ready and /healthz on the probe port, and SIGTERM exits 0."""
    import urllib.request

    (c,) = by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"]
    limits = tmp_path / "limits.json"
    limits.write_text(by_kind()["ConfigMap"]["data"]["limits.json"])
    metrics_port = free_port()
    swap = {"--listen": f"127.0.0.1:{free_port()}", "--redis": redis.url, "--config": str(limits),
            "--metrics": f"127.0.0.1:{metrics_port}"}
    args = [f"{k}={swap.get(k, v)}" for k, v in (a.split("=", 1) for a in c["args"])]
    log = tmp_path / "svc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([service_bin, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while b"listening on" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        for path in ("/ready", "/healthz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}{path}", timeout=5) as r:
                assert r.status == 200
    finally:
        assert stop_process(proc) == 0


def test_envoyfilter_matches_the_istio_crd_schema():
    spec = importlib.util.spec_from_file_location("deploylib", REPO / "tests" / "deploy" / "deploylib.py")
    deploylib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploylib)
    (ef,) = docs("istio-cluster.yaml")
    assert deploylib.istio_errors(ef) == []
    cluster = ef["spec"]["configPatches"][0]["patch"]["value"]
    k = by_kind()
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr["address"].startswith(k["Service"]["metadata"]["name"] + ".")
    assert addr["port_value"] == next(p["port"] for p in k["Service"]["spec"]["ports"] if p["name"] == "grpc")
    assert "http2_protocol_options" in str(cluster)


def test_dockerfile_builds_what_make_service_builds():
    text = (DEPLOY / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "cargo build --locked --profile service -p tenant-ratelimit-service" in text
    assert "--profile service -p tenant-ratelimit-service" in makefile
    assert "target/service/tenant-ratelimit-service" in text
    assert 'ENTRYPOINT ["/usr/local/bin/tenant-ratelimit-service"]' in text
    assert "USER 65532" in text
