"""`tenant-ratelimit-check FILE --explain REQUEST`: a request's fate offline, decided by the
filter's own code (issue 18)."""

import json
import subprocess

import pytest

from deploylib import ISTIO

CONFIG = {
    "capacity": 60, "refill_rate": "60/min",
    "tenants": {"acme": {"capacity": 120, "refill_rate": "120/min", "rules": [
        {"name": "acme-export", "path_separated_prefix": "/export", "capacity": 2, "refill_rate": "2/min"}]}},
    "rules": [
        {"path_separated_prefix": "/healthz", "cost": 0},
        {"name": "eu", "host": "*.eu.example.com", "capacity": 30, "refill_rate": "30/min"},
        {"headers": [{"name": "x-debug", "exact": "1"}], "cost": 10},
        {"name": "reviews", "route": "reviews-v2", "cost": 2},
        {"methods": ["GET", "HEAD"]},
    ],
}


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "plugin.json"
    p.write_text(json.dumps(CONFIG))
    return p


def explain(checker, file, *args):
    return subprocess.run([checker, str(file), "--explain", *args], capture_output=True, text=True, timeout=60)


def fields(stdout):
    """{label: text} of the explanation lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("  "):
            label, _, text = line.strip().partition(" ")
            out[label] = text.strip()
    return out


def test_health_check_is_unmetered_and_lookalike_is_metered(checker, config):
    r = explain(checker, config, "GET /healthz/live?probe=1")
    assert r.returncode == 0, r.stdout + r.stderr
    f = fields(r.stdout)
    assert f["rule"] == "rules[0]: ANY /healthz[/*] cost 0"
    assert f["cost"].startswith("0: unmetered")
    f = fields(explain(checker, config, "GET /healthzfoo").stdout)
    assert f["rule"] == "rules[4]: GET,HEAD /* cost 1"
    assert f["limit"] == "capacity 60, rate 1/s (60/min), refills from empty in 60s"


def test_tenant_rule_host_header_route(checker, config):
    f = fields(explain(checker, config, "GET /export/report.csv?full=1", "-H", "x-tenant-id: acme").stdout)
    assert f["tenant"] == "acme (listed; from tenant.from[0]: header x-tenant-id)"
    assert f["rule"] == 'tenants.acme.rules[0] "acme-export": ANY /export[/*] cost 1'
    assert f["policy"].startswith("acme-export (the rule's own limit")
    assert f["limit"] == "capacity 2, rate 0.033333/s (2/min), refills from empty in 60s"
    f = fields(explain(checker, config, "GET /x?tenant=globex", "-H", "Host: API.eu.example.com:8443").stdout)
    assert (f["tenant"].split()[0], f["rule"]) == ("globex", 'rules[1] "eu": ANY /* host *.eu.example.com cost 1')
    f = fields(explain(checker, config, "GET /x", "-H", "x-debug: 1").stdout)
    assert f["cost"] == "10"
    f = fields(explain(checker, config, "GET /reviews/1", "--route", "reviews-v2").stdout)
    assert f["rule"] == 'rules[3] "reviews": ANY /* route reviews-v2 cost 2'
    f = fields(explain(checker, config, "POST /x").stdout)
    assert f["rule"] == "no rule matches: unmetered"


def test_explain_reads_manifests(checker):
    r = explain(checker, ISTIO / "wasmplugin.yaml", "GET /", "-H", "x-tenant-id: acme")
    assert r.returncode == 0, r.stdout + r.stderr
    assert fields(r.stdout)["tenant"].startswith("acme (listed")


def test_usage_errors_exit_2(checker, config):
    assert explain(checker, config).returncode == 2
    assert explain(checker, config, "GET").returncode == 2
    assert explain(checker, config, "GET /", "-H", "no-colon").returncode == 2


def test_a_bad_config_exits_1_with_the_filters_error(checker, tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({**CONFIG, "rules": [{"path_separated_prefix": "/healthz/"}]}))
    r = explain(checker, p, "GET /")
    assert r.returncode == 1
    assert "rules[0].path_separated_prefix" in r.stdout
