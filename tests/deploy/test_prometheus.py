"""Prometheus config, alert rules and dashboard queries, checked with promtool.

promtool comes from Debian's `prometheus` package (`apt-get install -y prometheus`); these tests
are skipped, with that reason, only when no promtool can be found. Besides `check config`,
`check rules` and `test rules`, they make sure the rule unit tests can fail (each alert replaced
by one that always fires must break them), that every alert is tested both ways, and that every
expression of the Grafana dashboard parses and names only metrics of the kvserve contract.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvserve.json"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
# Skipped without promtool, except under CI (CI=true; .ci/run installs it), where they must run.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool not found: install it with `apt-get install -y prometheus`")

# The metric contract shared with service/metrics.py (histograms also have _bucket/_sum/_count).
GAUGES = {
    "kvserve_kv_cache_bytes_per_token", "kvserve_kv_cache_bytes_per_block",
    "kvserve_kv_cache_block_size_tokens", "kvserve_kv_cache_blocks", "kvserve_kv_cache_num_blocks",
    "kvserve_kv_cache_capacity_tokens", "kvserve_kv_cache_stored_tokens", "kvserve_kv_cache_empty_slots",
    "kvserve_kv_cache_usage_ratio", "kvserve_kv_cache_memory_bytes", "kvserve_num_requests_running",
    "kvserve_num_requests_waiting", "kvserve_engine_alive", "kvserve_model_info",
}
COUNTERS = {
    "kvserve_http_requests_total",
    "kvserve_requests_finished_total", "kvserve_requests_rejected_total", "kvserve_prompt_tokens_total",
    "kvserve_generation_tokens_total", "kvserve_preemptions_total", "kvserve_prefix_cache_queries_total",
    "kvserve_prefix_cache_hits_total",
}
HISTOGRAMS = {
    "kvserve_time_to_first_token_seconds", "kvserve_inter_token_latency_seconds",
    "kvserve_e2e_request_latency_seconds", "kvserve_request_queue_time_seconds",
    "kvserve_request_prompt_tokens", "kvserve_request_generation_tokens",
    "kvserve_step_duration_seconds", "kvserve_step_batch_tokens", "kvserve_step_batch_seqs",
    "kvserve_http_request_duration_seconds",
}
HTTP_METRICS = ("kvserve_http_requests_total", "kvserve_http_request_duration_seconds")  # by route: no variant
SERIES_NAMES = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None, "promtool not found: install it with `apt-get install -y prometheus`"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules(path: Path = PROM_DIR / "alerts.yml") -> list[dict]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(board["panels"]) for t in p.get("targets", [])]


def grafana_to_promql(expr: str, variant: str = ".+", rate_interval: str = "1m", model: str = ".+") -> str:
    """What Grafana sends to Prometheus: template variables substituted."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$variant", variant).replace("$model", model)
    assert "$" not in out, f"unknown Grafana variable left in {expr!r}"
    return out


@needs_promtool
def test_promtool_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize("alert", [r["alert"] for r in alert_rules()])
def test_rule_unit_tests_fail_when_an_alert_always_fires(alert, tmp_path):
    # The unit tests must pin each rule's expression: replacing it by one that fires for
    # every kvserve series of the test input breaks them.
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = '{__name__=~"kvserve_.+|up"}'
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups))
    shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0, f"the unit tests still pass with {alert} always firing"
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    # A target is (instance, variant); every test case must contain a target that fires and
    # one that must not.
    def target(labels: dict) -> tuple:
        return labels.get("instance"), labels.get("variant")

    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    for case in tests:
        targets = {target(dict(re.findall(r'(\w+)="([^"]*)"', s["series"]))) for s in case["input_series"]}
        for check in case["alert_rule_test"]:
            expected = {target(a["exp_labels"]) for a in check.get("exp_alerts", [])}
            if expected:
                fired.add(check["alertname"])
                assert targets - expected, \
                    f"{check['alertname']}: no input series that must not fire (test {case['name']!r})"
    assert fired == {r["alert"] for r in alert_rules()}


def test_alerts_have_severity_summary_and_a_duration():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_alerts_and_dashboard_use_only_contract_metrics():
    exprs = [r["expr"] for r in alert_rules()] + [e for _, e in dashboard_exprs()]
    used = {name for e in exprs for name in re.findall(r"\bkvserve_[a-z0-9_]+", e)}
    assert used, "no kvserve metric referenced"
    # `kvserve_requests_(finished|rejected)_total` appears as a regex: expand it.
    used = {n for n in used if not n.endswith("_")} | {"kvserve_requests_finished_total",
                                                       "kvserve_requests_rejected_total"}
    assert used <= SERIES_NAMES, f"not in the metric contract: {sorted(used - SERIES_NAMES)}"


@needs_promtool
def test_dashboard_expressions_parse(tmp_path):
    # Each query as a recording rule: `promtool check rules` parses PromQL without a server.
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
             for i, (_, e) in enumerate(dashboard_exprs())]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    result = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


@needs_promtool
def test_a_broken_query_fails_the_parse_check(tmp_path):
    rule = {"record": "dashboard:broken", "expr": grafana_to_promql("sum by (variant) (rate(x[$__rate_interval])")}
    (tmp_path / "r.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [rule]}]}))
    assert promtool("check", "rules", "r.yml", cwd=tmp_path).returncode != 0


def test_dashboard_filters_every_selector_by_model_and_variant_and_uses_rate_interval():
    for title, expr in dashboard_exprs():
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), f"{title}: fixed range window in {expr!r}"
        for name, selector in re.findall(r"\b(kvserve_[a-z0-9_]+)(\{[^}]*\})?", expr):
            assert 'model_name=~"$model"' in selector, f"{title}: selector without the model filter in {expr!r}"
            if not name.startswith(HTTP_METRICS):
                assert 'variant=~"$variant"' in selector, f"{title}: selector without the variant filter in {expr!r}"


def test_dashboard_has_the_variant_variable():
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    variant, model = variables["variant"], variables["model"]
    assert variant["type"] == "query" and variant["multi"] and variant["includeAll"]
    # several deployments in one Prometheus: pick the model, then its variants
    assert model["query"]["query"] == "label_values(kvserve_model_info, model_name)"
    assert variant["query"]["query"] == 'label_values(kvserve_model_info{model_name=~"$model"}, variant)'
    assert list(variables).index("model") < list(variables).index("variant")
    assert variables["datasource"]["type"] == "datasource"


def test_dashboard_covers_the_contract():
    text = " ".join(e for _, e in dashboard_exprs())
    # Everything a user should see; bytes_per_block is bytes per token x block size, shown
    # through its two factors.
    required = (GAUGES - {"kvserve_kv_cache_bytes_per_block"}) | COUNTERS | HISTOGRAMS
    missing = sorted(m for m in required if m not in text)
    assert not missing, f"metrics without a panel: {missing}"
    titles = " | ".join(t.lower() for t, _ in dashboard_exprs())
    for topic in ("bytes per token", "capacity", "usage", "blocks", "fragmentation", "time to first token",
                  "inter-token", "end-to-end", "tokens per second", "running / waiting", "rejected",
                  "finished", "preemptions", "prefix cache hit rate", "step duration", "batch size", "http"):
        assert topic in titles, f"no panel about {topic!r}"


def test_dashboard_panels_are_well_formed():
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
