"""Helpers for the deployment-artifact tests: schema checks for Istio resources and the
compose file, and a real Envoy on loopback ports (tests/support/envoy.py) running an
EnvoyFilter's HTTP filter."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests/deploy is not a package: pytest puts only this folder on sys.path
    sys.path.insert(0, str(REPO))

from tests.support.envoy import Envoy, bootstrap, direct_route, listener  # noqa: E402
SCHEMAS = Path(__file__).resolve().parent / "schemas"
ISTIO = REPO / "istio"
WASM_REL = "target/wasm32-wasip1/release/tenant_ratelimit.wasm"


def load_docs(path_or_text) -> list[dict]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return [d for d in yaml.safe_load_all(text) if d is not None]


# --------------------------------------------------------------------------------------
# Istio resources against the CRDs' published openAPIV3Schema (+ their CEL rules)
# --------------------------------------------------------------------------------------

_CRDS = None


def crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, from the vendored Istio CRDs."""
    global _CRDS
    if _CRDS is None:
        data = json.loads((SCHEMAS / "istio-crds.json").read_text())
        _CRDS = {}
        for crd in data["crds"]:
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v["served"]:
                    _CRDS[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return _CRDS


def to_json_schema(node):
    """A Kubernetes structural schema as JSON Schema, with the API server's strict field
    validation (`kubectl apply --validate=strict`, the default): fields not in the schema are
    errors unless the node preserves unknown fields."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties"):
            out[k] = {name: to_json_schema(s) for name, s in v.items()}
        elif k.startswith("x-kubernetes-") or k in ("nullable", "format"):
            continue
        else:
            out[k] = to_json_schema(v)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


_DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The ObjectMeta fields a manifest may set (the server fills in the rest).
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _DNS1123_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS1123_LABEL},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}


def resource_schema(api_version: str, kind: str) -> dict | None:
    raw = crds().get((api_version, kind))
    if raw is None:
        return None
    schema = to_json_schema(raw)
    schema.setdefault("properties", {})
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = _METADATA
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    return schema


# Kubernetes CEL library functions the Istio rules use, which plain CEL lacks.
def _cel_functions():
    import celpy.celtypes as ct

    def is_url(s):
        try:
            u = urlsplit(str(s))
            return ct.BoolType(bool(u.scheme) and bool(u.netloc or u.path))
        except ValueError:
            return ct.BoolType(False)

    return {
        "isURL": is_url,
        "url": lambda s: ct.StringType(str(s)),
        "getScheme": lambda u: ct.StringType(urlsplit(str(u)).scheme),
    }


def cel_errors(schema: dict, data, path: str = "") -> list[str]:
    """Evaluates every `x-kubernetes-validations` rule on the data it applies to."""
    import celpy

    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        prog = env.program(env.compile(rule["rule"]), functions=_cel_functions())
        try:
            ok = bool(prog.evaluate({"self": celpy.json_to_cel(data)}))
        except Exception as e:  # a CEL runtime error is a rejection too
            ok, rule = False, {**rule, "message": f"{rule.get('message', '')} ({e})"}
        if not ok:
            errors.append(f"{path or '/'}: {rule.get('message', rule['rule'])}")
    if isinstance(data, dict):
        props = schema.get("properties", {})
        for k, v in data.items():
            if k in props:
                errors += cel_errors(props[k], v, f"{path}/{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += cel_errors(schema["additionalProperties"], v, f"{path}/{k}")
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(data):
            errors += cel_errors(schema["items"], v, f"{path}/{i}")
    return errors


def istio_errors(doc: dict) -> list[str]:
    """Every reason the API server (with Istio's CRDs installed) would reject `doc`."""
    import jsonschema

    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    schema = resource_schema(api_version, kind)
    if schema is None:
        return [f"no Istio CRD serves {api_version} {kind}"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"/{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    return errors + cel_errors(crds()[(api_version, kind)], doc)


# --------------------------------------------------------------------------------------
# Compose file against the compose-spec JSON schema
# --------------------------------------------------------------------------------------


def compose_errors(doc) -> list[str]:
    import jsonschema

    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"/{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def compose_bind_mounts(doc: dict, compose_dir: Path) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount, short or long syntax."""
    out = []
    for svc in doc.get("services", {}).values():
        for v in svc.get("volumes", []):
            if isinstance(v, str):
                src, _, rest = v.partition(":")
                tgt = rest.split(":")[0]
                if not (src.startswith(".") or src.startswith("/")):
                    continue  # a named volume
            elif v.get("type") == "bind":
                src, tgt = v["source"], v["target"]
            else:
                continue
            out.append(((compose_dir / src).resolve() if not src.startswith("/") else Path(src), tgt))
    return out


# --------------------------------------------------------------------------------------
# EnvoyFilter -> a runnable Envoy bootstrap
# --------------------------------------------------------------------------------------


def wasm_filter_patches(envoyfilter: dict) -> list[dict]:
    return [p for p in envoyfilter["spec"]["configPatches"] if p.get("applyTo") == "HTTP_FILTER"]


def bootstrap_for_filter(http_filter: dict, extra_clusters: list[dict] | None = None) -> dict:
    """An Envoy bootstrap: admin and one listener ("inbound") on loopback port 0, an HTTP
    connection manager whose filter chain is `http_filter` then the router, and a
    direct_response route, as the EnvoyFilter's INSERT_BEFORE router patch builds it in a
    sidecar."""
    inbound = listener("inbound", [copy.deepcopy(http_filter)], route_config=direct_route("app"))
    return bootstrap([inbound], clusters=extra_clusters or [])


def envoy_validate(envoy_bin: str, config: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def deploy_envoy(envoy_bin: str, config: dict, workdir: Path, concurrency: int = 2) -> Envoy:
    """A real Envoy on loopback running `config` (e.g. `bootstrap_for_filter(...)`); use it as a
    context manager. 60 s to get ready: the remote form downloads the module first."""
    return Envoy(envoy_bin, workdir, config, concurrency=concurrency, ready_timeout=60)


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tenant-ratelimit-deploy-"))


def sha256_hex(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_hex64(s: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{64}", s))
