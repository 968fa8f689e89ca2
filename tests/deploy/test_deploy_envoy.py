"""The Envoy configs of the deployment paths, loaded and run by the real Envoy binary."""

import copy
import http.client
import http.server
import json
import threading
import time

import pytest
import yaml

from deploylib import ISTIO, REPO, bootstrap_for_filter, deploy_envoy, envoy_validate, load_docs, sha256_hex


def test_local_envoy_yaml_validates(envoy_bin, wasm):
    # envoy.yaml names the module relative to the repo root, as `make run` starts it.
    assert (REPO / "target/wasm32-wasip1/release/tenant_ratelimit.wasm").resolve() == wasm.resolve()
    r = envoy_validate(envoy_bin, REPO / "envoy-local/envoy.yaml", cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout + r.stderr


def envoyfilter_http_filter(file: str) -> dict:
    ef = next(d for d in load_docs(ISTIO / file) if d["kind"] == "EnvoyFilter")
    (patch,) = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    return copy.deepcopy(patch["patch"]["value"])


def local_filter(wasm) -> dict:
    f = envoyfilter_http_filter("envoyfilter.yaml")
    f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    return f


def plugin_config(http_filter: dict) -> dict:
    return json.loads(http_filter["typed_config"]["config"]["configuration"]["value"])


def get(conn, method="GET", tenant="acme"):
    conn.request(method, "/", headers={"x-tenant-id": tenant})
    r = conn.getresponse()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()


def drain(port, tenant, limit):
    """Sends GETs for `tenant` until the first 429 (at most `limit`); returns the number
    admitted, the 429 response, and the seconds it took."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    admitted, start = 0, time.monotonic()
    try:
        for _ in range(limit):
            status, headers, body = get(conn, tenant=tenant)
            if status == 429:
                return admitted, (status, headers, body), time.monotonic() - start
            assert status == 200, (status, body)
            admitted += 1
        pytest.fail(f"no 429 after {limit} requests for {tenant}")
    finally:
        conn.close()


def assert_limits_as_configured(port, cfg):
    burst = cfg["tenants"]["acme"]["capacity"]
    per_second = 120 / 60  # "120/min"
    assert cfg["tenants"]["acme"]["refill_rate"] == "120/min"
    admitted, (status, headers, body), elapsed = drain(port, "acme", burst * 2 + 50)
    # Exactly the burst, plus what refilled while the requests were sent (a few ms on loopback).
    assert burst <= admitted <= burst + int(per_second * elapsed) + 1, (admitted, elapsed)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert json.loads(body) == {"error": "Too Many Requests"}
    assert headers["x-ratelimit-limit"].split(",")[0].strip() == str(burst)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # Only GET/HEAD are metered: acme's POSTs still pass with an empty bucket.
        assert get(conn, "POST", "acme")[0] == 200
        assert get(conn, "HEAD", "acme")[0] == 429
        # Other tenants have their own buckets.
        assert get(conn, "GET", "globex")[0] == 200
        assert get(conn, "GET", "default")[0] == 200
    finally:
        conn.close()


def test_envoyfilter_patch_validates_in_envoy(envoy_bin, wasm, workdir):
    cfg = workdir / "bootstrap.yaml"
    cfg.write_text(yaml.safe_dump(bootstrap_for_filter(local_filter(wasm))))
    r = envoy_validate(envoy_bin, cfg)
    assert r.returncode == 0, r.stdout + r.stderr


def test_envoyfilter_patch_limits_traffic_as_configured(envoy_bin, wasm, workdir):
    f = local_filter(wasm)
    with deploy_envoy(envoy_bin, bootstrap_for_filter(f), workdir) as envoy:
        assert_limits_as_configured(envoy.port("inbound"), plugin_config(f))
    # The filter's own "configured" line (the log file is flushed when Envoy stops).
    assert "tenant-ratelimit: configured" in envoy.log_text()


class _WasmServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve_file(data: bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
        paths = []

        def do_GET(self):
            Handler.paths.append((self.path, self.headers.get("host")))
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = _WasmServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, Handler.paths


def test_remote_envoyfilter_downloads_verifies_and_limits(envoy_bin, wasm, workdir):
    # The remote form, with its cluster pointed at a loopback server holding the module and
    # the placeholder sha256 replaced by the module's real digest (as `make sha256` prints).
    f = envoyfilter_http_filter("envoyfilter-remote.yaml")
    remote = f["typed_config"]["config"]["vm_config"]["code"]["remote"]
    remote["sha256"] = sha256_hex(wasm)
    server, paths = serve_file(wasm.read_bytes())
    try:
        cluster = {
            "name": remote["http_uri"]["cluster"],
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": remote["http_uri"]["cluster"],
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": server.server_address[1]}}}}]}],
            },
        }
        with deploy_envoy(envoy_bin, bootstrap_for_filter(f, [cluster]), workdir) as envoy:
            assert_limits_as_configured(envoy.port("inbound"), plugin_config(f))
        uri = remote["http_uri"]["uri"]
        assert paths and paths[0] == ("/" + uri.split("/", 3)[3], uri.split("/")[2])
    finally:
        server.shutdown()
        server.server_close()


# ---- negative: Envoy itself refuses broken copies ---------------------------------------


def test_unknown_plugin_config_field_is_rejected_by_envoy(envoy_bin, wasm, workdir):
    f = local_filter(wasm)
    cfg = plugin_config(f)
    cfg["tenants"]["acme"]["burst"] = 10
    f["typed_config"]["config"]["configuration"]["value"] = json.dumps(cfg)
    path = workdir / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap_for_filter(f)))
    r = envoy_validate(envoy_bin, path)
    assert r.returncode != 0
    assert "Unable to create Wasm plugin" in r.stdout + r.stderr


def test_unknown_envoy_field_in_patch_is_rejected_by_envoy(envoy_bin, wasm, workdir):
    f = local_filter(wasm)
    f["typed_config"]["config"]["vm_confg"] = f["typed_config"]["config"].pop("vm_config")
    path = workdir / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap_for_filter(f)))
    r = envoy_validate(envoy_bin, path)
    assert r.returncode != 0
    assert "vm_confg" in r.stdout + r.stderr
