"""Every plugin config in the deployment files, parsed by the filter's own config code
(tenant-ratelimit-check links src/config.rs)."""

import subprocess

import pytest
import yaml

from deploylib import ISTIO, REPO, load_docs

CONFIG_FILES = sorted(p.name for p in ISTIO.glob("*.yaml") if p.name != "sidecar-wasm-volume.yaml")


def check(checker, *files):
    return subprocess.run([checker, *map(str, files)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_istio_manifest_config_is_accepted(checker, name):
    r = check(checker, ISTIO / name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{name}: OK" in r.stdout


def test_every_istio_yaml_is_checked_or_known_to_hold_no_config():
    # A new manifest must be added to the checker run or, if it carries no plugin config,
    # named here: nothing in istio/ escapes the config check silently.
    others = {p.name for p in ISTIO.glob("*.yaml")} - set(CONFIG_FILES)
    assert others == {"sidecar-wasm-volume.yaml"}
    for doc in load_docs(ISTIO / "sidecar-wasm-volume.yaml"):
        assert "kind" not in doc and "pluginConfig" not in yaml.safe_dump(doc)


def test_local_envoy_yaml_config_is_accepted(checker):
    r = check(checker, REPO / "envoy-local/envoy.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_checker_reports_the_limits_the_manifests_promise(checker):
    r = check(checker, ISTIO / "wasmplugin.yaml", ISTIO / "envoyfilter.yaml")
    assert r.returncode == 0, r.stdout
    for line in ("acme", "globex", "default"):
        assert line in r.stdout
    assert r.stdout.count("capacity        120  rate            2/s") == 2
    assert r.stdout.count("capacity        300  rate            5/s") == 2
    assert r.stdout.count("capacity         60  rate            1/s") == 2
    assert r.stdout.count("GET,HEAD /* cost 1") == 2


# ---- negative: broken copies must make the checker exit 1 ------------------------------


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_field_in_envoyfilter_plugin_json_is_rejected(checker, tmp_path):
    text = (ISTIO / "envoyfilter.yaml").read_text().replace('"mode": "enforce"', '"mode": "enforce", "burst": 5')
    r = check(checker, write(tmp_path, "envoyfilter.yaml", text))
    assert r.returncode == 1
    assert "`burst`: unknown field" in r.stdout


def test_bad_rate_in_wasmplugin_is_rejected(checker, tmp_path):
    text = (ISTIO / "wasmplugin.yaml").read_text().replace('refill_rate: "120/min"', 'refill_rate: "120/moon"')
    assert text != (ISTIO / "wasmplugin.yaml").read_text()
    r = check(checker, write(tmp_path, "wasmplugin.yaml", text))
    assert r.returncode == 1
    assert "tenants.acme.refill_rate" in r.stdout


def test_misspelled_plugin_config_key_is_rejected(checker, tmp_path):
    text = (ISTIO / "wasmplugin.yaml").read_text().replace("  pluginConfig:", "  pluginConfg:")
    r = check(checker, write(tmp_path, "wasmplugin.yaml", text))
    assert r.returncode == 1
    assert "no spec.pluginConfig" in r.stdout


def test_configuration_that_is_not_json_is_rejected(checker, tmp_path):
    text = (ISTIO / "envoyfilter-remote.yaml").read_text().replace('"capacity": 60,', '"capacity": 60')
    r = check(checker, write(tmp_path, "envoyfilter-remote.yaml", text))
    assert r.returncode == 1
    assert "not valid JSON" in r.stdout
