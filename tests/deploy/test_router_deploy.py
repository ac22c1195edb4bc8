"""The scale-out deployment files, validated offline: the compose file of N replicas behind
sglang-router, the router's Dockerfile, the Kubernetes router and Inference Extension manifests,
Prometheus' router config and the router dashboard.

Every router command line (compose and Kubernetes) is parsed by the installed sglang-router's own
argument parser; the worker URLs, Prometheus targets, ports, label selectors and image tags are
checked against each other and against the kvserve Deployment and metric names; the core kinds
are validated against the API schemas bundled with `kubernetes-validate`.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_compose_k8s import DEFAULT_PORT, ENV_NAMES, K8S_VERSION, duration_s, host_mounts
from tests.deploy.test_dockerfile import hadolint, instructions
from tests.deploy.test_prometheus import GAUGES, SERIES_NAMES, needs_promtool, promtool

launch_router = pytest.importorskip("sglang_router.launch_router")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.router.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus-router.yml"
ROUTER_DOCKERFILE = DEPLOY / "router" / "Dockerfile"
K8S_ROUTER = DEPLOY / "k8s" / "router"
K8S_GATEWAY = DEPLOY / "k8s" / "inference-gateway"
ROUTER_DASHBOARD = DEPLOY / "grafana" / "router.json"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def docs(directory: Path) -> dict[str, dict]:
    """file stem -> the single document in it (kustomization included)."""
    out = {}
    for path in sorted(directory.glob("*.yaml")):
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        out[path.stem] = doc
    return out


def pinned_router_version() -> str:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [d for d in dev if d.startswith("sglang-router==")]
    return pin.split("==")[1]


def kvserve_pod() -> tuple[dict, dict]:
    """(pod labels, container) of deploy/k8s/deployment.yaml."""
    template = load(DEPLOY / "k8s" / "deployment.yaml")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return template["metadata"]["labels"], container


# ---------------------------------------------------------------------------------- compose --

@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


def replicas(compose: dict) -> list[str]:
    return sorted(n for n in compose["services"] if re.fullmatch(r"kvserve-\d+", n))


def router_args(compose: dict):
    return launch_router.parse_router_args(compose["services"]["router"]["command"])


def test_replicas_share_one_definition(compose):
    names = replicas(compose)
    assert len(names) >= 2
    first = compose["services"][names[0]]
    assert all(compose["services"][n] == first for n in names)
    env = first["environment"]
    assert not set(env) - ENV_NAMES - {"OMP_NUM_THREADS"}, "not kvserve serve options"
    assert "KVSERVE_VARIANTS" not in env  # one variant: the router sends a prefix to one model
    assert int(env["OMP_NUM_THREADS"]) == float(first["cpus"])
    assert duration_s(first["stop_grace_period"]) > float(env["KVSERVE_SHUTDOWN_TIMEOUT"])
    assert (COMPOSE.parent / first["build"]["context"] / first["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"


def test_router_routes_to_every_replica_cache_aware(compose):
    args = router_args(compose)
    port = int(compose["services"][replicas(compose)[0]]["environment"]["KVSERVE_PORT"])
    assert port == DEFAULT_PORT
    assert sorted(args.worker_urls) == [f"http://{n}:{port}" for n in replicas(compose)]
    assert args.policy == "cache_aware" and args.host == "0.0.0.0"
    published = {int(p.split(":")[1]) for p in compose["services"]["router"]["ports"]}
    assert args.port in published
    for name in replicas(compose):  # the router starts once the replicas' health checks pass
        assert compose["services"]["router"]["depends_on"][name]["condition"] == "service_healthy"


def test_router_image_is_built_from_the_pinned_router(compose):
    build = compose["services"]["router"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() / "Dockerfile" == ROUTER_DOCKERFILE
    version = pinned_router_version()
    assert compose["services"]["router"]["image"].endswith(":" + version)
    args = dict(r.split("=", 1) for w, r in instructions(ROUTER_DOCKERFILE.read_text()) if w == "ARG")
    assert args["SGLANG_ROUTER_VERSION"] == version


def test_prometheus_scrapes_the_router_and_every_replica(compose):
    prometheus = compose["services"]["prometheus"]
    config_path = next(a for a in prometheus["command"] if a.startswith("--config.file=")).split("=", 1)[1]
    host_dir = host_mounts(prometheus)[str(Path(config_path).parent)]
    assert host_dir / Path(config_path).name == PROMETHEUS
    config = load(PROMETHEUS)
    assert all((host_dir / f).exists() for f in config["rule_files"])
    jobs = {j["job_name"]: [t for c in j["static_configs"] for t in c["targets"]] for j in config["scrape_configs"]}
    port = int(compose["services"][replicas(compose)[0]]["environment"]["KVSERVE_PORT"])
    assert sorted(jobs["kvserve"]) == [f"{n}:{port}" for n in replicas(compose)]  # job the alerts select
    assert jobs["sglang-router"] == [f"router:{router_args(compose).prometheus_port}"]


def test_grafana_mounts_both_dashboards(compose):
    mounts = host_mounts(compose["services"]["grafana"])
    assert {p.name for c, p in mounts.items() if c.startswith("/var/lib/grafana/dashboards")} == {"kvserve.json", "router.json"}
    assert all(p.exists() for p in mounts.values())


def test_router_dockerfile_is_hadolint_clean_and_non_root():
    assert hadolint(ROUTER_DOCKERFILE) == []
    steps = instructions(ROUTER_DOCKERFILE.read_text())
    assert [r for w, r in steps if w == "USER"] == ["10001:10001"]
    (entry,) = [json.loads(r) for w, r in steps if w == "ENTRYPOINT"]
    assert entry == ["python", "-m", "sglang_router.launch_router"]
    (cmd,) = [json.loads(r) for w, r in steps if w == "CMD"]
    assert launch_router.parse_router_args(cmd).policy == "cache_aware"


@needs_promtool
def test_promtool_checks_the_router_config():
    result = promtool("check", "config", PROMETHEUS.name)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------- kubernetes --

@pytest.fixture(scope="module")
def router_k8s() -> dict[str, dict]:
    return docs(K8S_ROUTER)


@pytest.fixture(scope="module")
def gateway_k8s() -> dict[str, dict]:
    return docs(K8S_GATEWAY)


@pytest.mark.parametrize("directory", [K8S_ROUTER, K8S_GATEWAY])
def test_kustomizations_build_on_the_base_and_list_every_file(directory):
    manifests = docs(directory)
    kustomization = manifests.pop("kustomization")
    assert kustomization["resources"][0] == "../"
    assert set(kustomization["resources"][1:]) == {f"{stem}.yaml" for stem in manifests}


@pytest.mark.parametrize("stem", ["serviceaccount", "role", "rolebinding", "deployment", "service"])
def test_router_core_kinds_validate(router_k8s, stem):
    assert kubernetes_validate.validate(router_k8s[stem], K8S_VERSION, strict=True)


@pytest.mark.parametrize("stem", ["epp-serviceaccount", "epp-role", "epp-rolebinding", "epp-deployment", "epp-service"])
def test_gateway_core_kinds_validate(gateway_k8s, stem):
    assert kubernetes_validate.validate(gateway_k8s[stem], K8S_VERSION, strict=True)


def test_router_discovers_the_kvserve_pods(router_k8s):
    (container,) = router_k8s["deployment"]["spec"]["template"]["spec"]["containers"]
    args = launch_router.parse_router_args(container["args"])
    labels, kvserve = kvserve_pod()
    assert args.service_discovery and args.policy == "cache_aware"
    assert args.selector and args.selector.items() <= labels.items()
    (port,) = kvserve["ports"]
    assert args.service_discovery_port == port["containerPort"] == DEFAULT_PORT
    assert args.service_discovery_namespace == "$(POD_NAMESPACE)"
    assert {e["name"] for e in container["env"]} >= {"POD_NAMESPACE"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["metrics"]) == (args.port, args.prometheus_port)
    assert container["image"] == f"kvserve-sglang-router:{pinned_router_version()}"


def test_router_may_watch_pods_in_its_namespace(router_k8s):
    pod = router_k8s["deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == router_k8s["serviceaccount"]["metadata"]["name"]
    binding = router_k8s["rolebinding"]
    assert binding["roleRef"]["name"] == router_k8s["role"]["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == [pod["serviceAccountName"]]
    (rule,) = router_k8s["role"]["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])


def test_router_service_and_monitor_reach_the_router(router_k8s):
    template = router_k8s["deployment"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    names = {p["name"] for p in container["ports"]}
    service = router_k8s["service"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == names
    monitor = router_k8s["servicemonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}


def test_inference_pool_selects_the_kvserve_pods_and_names_the_picker(gateway_k8s):
    pool = gateway_k8s["inferencepool"]
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    labels, kvserve = kvserve_pod()
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [kvserve["ports"][0]["containerPort"]]
    picker, service = pool["spec"]["endpointPickerRef"], gateway_k8s["epp-service"]
    assert picker["name"] == service["metadata"]["name"]
    assert picker["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    (backend,) = gateway_k8s["httproute"]["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])


def test_endpoint_picker_reads_kvserve_metric_names(gateway_k8s):
    (container,) = gateway_k8s["epp-deployment"]["spec"]["template"]["spec"]["containers"]
    flags = dict(a[2:].split("=", 1) for a in container["args"])
    assert flags["pool-name"] == gateway_k8s["inferencepool"]["metadata"]["name"]
    metrics = {flags[f] for f in ("total-queued-requests-metric", "total-running-requests-metric",
                                  "kv-cache-usage-percentage-metric")}
    assert metrics == {"kvserve_num_requests_waiting", "kvserve_num_requests_running", "kvserve_kv_cache_usage_ratio"}
    assert metrics <= GAUGES  # gauges of the metric contract...
    source = (ROOT / "service" / "metrics.py").read_text()
    assert all(f'"{m}"' in source for m in metrics)  # ...that service/metrics.py creates


# -------------------------------------------------------------------------------- dashboards --

def panel_exprs(path: Path) -> list[tuple[str, str]]:
    board = json.loads(path.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def test_router_dashboard_queries_only_router_metrics():
    exprs = panel_exprs(ROUTER_DASHBOARD)
    assert exprs
    for title, expr in exprs:
        assert re.findall(r"\bsmg_[a-z_]+", expr), f"{title}: no router metric in {expr!r}"
        assert not re.findall(r"\bkvserve_[a-z_]+", expr), f"{title}: kvserve's metrics are on the kvserve dashboard"
        assert "$__rate_interval" in expr or "[" not in expr


def test_kvserve_dashboard_has_the_per_replica_view():
    exprs = panel_exprs(DEPLOY / "grafana" / "kvserve.json")
    per_replica = [e for _, e in exprs if "by (instance)" in e]
    used = {n for e in per_replica for n in re.findall(r"\bkvserve_[a-z_]+", e)}
    assert {"kvserve_prefix_cache_hits_total", "kvserve_prefix_cache_queries_total",
            "kvserve_num_requests_running", "kvserve_num_requests_waiting"} <= used <= SERIES_NAMES


@needs_promtool
def test_router_dashboard_expressions_parse(tmp_path):
    rules = [{"record": f"router:query_{i}", "expr": e.replace("$__rate_interval", "1m")}
             for i, (_, e) in enumerate(panel_exprs(ROUTER_DASHBOARD))]
    (tmp_path / "router_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "r", "rules": rules}]}))
    result = promtool("check", "rules", "router_rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
