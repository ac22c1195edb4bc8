"""docker-compose and Kubernetes manifests, validated offline.

Compose: the YAML parses, and service names, ports and mounted paths agree with
deploy/prometheus/prometheus.yml and the Grafana provisioning. Kubernetes: the core kinds are
validated against the API schemas bundled with `kubernetes-validate`; the custom resources
(ServiceMonitor, PrometheusRule, KEDA ScaledObject) are checked for their required fields; the
PrometheusRule carries exactly the groups of alerts.yml; probes, ports and the grace period agree
with the `kvserve serve` defaults.
"""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"  # a version kubernetes-validate bundles schemas for



def serve_parser():
    """The real `kvserve serve` parser, without environment overrides."""
    import argparse

    from service.cli import build_parser
    parser = build_parser(environ={})
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["serve"]


SERVE = serve_parser()
DEFAULT_PORT = SERVE.get_default("port")
DEFAULT_SHUTDOWN_TIMEOUT_S = SERVE.get_default("shutdown_timeout")
# Every option's KVSERVE_* variable (the CLI contract: upper case, dashes as underscores).
ENV_NAMES = {"KVSERVE_" + o[2:].upper().replace("-", "_")
             for a in SERVE._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_cli_defaults_are_the_documented_ones():
    # the values the Dockerfile, compose file and manifests were written against
    assert (DEFAULT_PORT, DEFAULT_SHUTDOWN_TIMEOUT_S) == (8000, 30.0)
    assert {"KVSERVE_API_KEY", "KVSERVE_KV_CACHE_MEMORY", "KVSERVE_VARIANTS", "KVSERVE_PORT"} <= ENV_NAMES


def load(path: Path):
    return yaml.safe_load(path.read_text())


def duration_s(text: str) -> float:
    """'40s', '1m30s', '2m' -> seconds (the Go/compose duration subset used here)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"unexpected duration {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# ---------------------------------------------------------------------------------- compose --

@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE_DIR / "docker-compose.yml")


@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return load(DEPLOY / "prometheus" / "prometheus.yml")


def host_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (resolved from the compose directory) for bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def test_compose_services(compose):
    assert set(compose["services"]) == {"kvserve", "prometheus", "grafana"}
    build = compose["services"]["kvserve"]["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"


def test_compose_env_names_are_cli_options(compose):
    env = compose["services"]["kvserve"]["environment"]
    unknown = set(env) - ENV_NAMES - {"OMP_NUM_THREADS"}
    assert not unknown, f"not kvserve serve options: {unknown}"


def test_compose_threads_match_the_cpu_limit(compose):
    kvserve = compose["services"]["kvserve"]
    assert int(kvserve["environment"]["OMP_NUM_THREADS"]) == float(kvserve["cpus"])


def test_prometheus_scrapes_the_kvserve_service_every_5s(compose, prometheus_config):
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "kvserve"]
    assert duration_s(job["scrape_interval"]) == 5
    assert duration_s(job["scrape_timeout"]) < 5
    (target,) = [t for c in job["static_configs"] for t in c["targets"]]
    host, port = target.split(":")
    kvserve = compose["services"][host]  # the target is the compose service name
    container_port = int(kvserve["environment"].get("KVSERVE_PORT", DEFAULT_PORT))
    assert int(port) == container_port == DEFAULT_PORT
    published = {int(p.split(":")[1]) for p in kvserve["ports"]}
    assert container_port in published


def test_prometheus_mounts_its_config_and_rules(compose, prometheus_config):
    prometheus = compose["services"]["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    mounts = host_mounts(prometheus)
    container_dir = str(Path(config_path).parent)
    assert container_dir in mounts, f"{container_dir} is not mounted"
    host_dir = mounts[container_dir]
    assert (host_dir / Path(config_path).name).exists()
    for rule_file in prometheus_config["rule_files"]:
        assert (host_dir / rule_file).exists(), rule_file


def test_grafana_is_provisioned(compose):
    grafana = compose["services"]["grafana"]
    mounts = host_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasource,) = [d for f in sorted((provisioning / "datasources").glob("*.yml")) for d in load(f)["datasources"]]
    assert datasource["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host == "prometheus" and host in compose["services"]
    assert int(port) in {int(p.split(":")[1]) for p in compose["services"]["prometheus"]["ports"]}
    assert duration_s(datasource["jsonData"]["timeInterval"]) == 5  # = scrape interval
    (provider,) = [p for f in sorted((provisioning / "dashboards").glob("*.yml")) for p in load(f)["providers"]]
    dashboards_dir = provider["options"]["path"]
    mounted = [c for c in mounts if str(Path(c).parent) == dashboards_dir]
    assert [mounts[c] for c in mounted] == [DEPLOY / "grafana" / "kvserve.json"]


def test_compose_stop_grace_exceeds_shutdown_timeout(compose):
    kvserve = compose["services"]["kvserve"]
    timeout = float(kvserve["environment"].get("KVSERVE_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S))
    assert duration_s(kvserve["stop_grace_period"]) > timeout


# ------------------------------------------------------------------------------- kubernetes --

@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    """file stem -> the single document in it."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        docs[path.stem] = doc
    return docs


@pytest.fixture(scope="module")
def container(k8s) -> dict:
    (c,) = k8s["deployment"]["spec"]["template"]["spec"]["containers"]  # one engine per pod
    return c


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


CORE = ["deployment", "service", "secret", "pdb", "hpa", "prometheus-adapter-rules"]


@pytest.mark.parametrize("stem", CORE)
def test_core_kinds_validate(k8s, stem):
    assert kubernetes_validate.validate(k8s[stem], K8S_VERSION, strict=True)


def test_validation_catches_mistakes(k8s):
    import copy
    broken = copy.deepcopy(k8s["deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_existing_files(k8s):
    kustomization = k8s["kustomization"]
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert all((K8S / f).exists() for f in listed)
    optional = {"secret.yaml", "keda-scaledobject.yaml", "prometheus-adapter-rules.yaml"}
    everything = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == everything - optional
    (image,) = kustomization["images"]
    container = k8s["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == image["name"]


def test_probes_hit_health_on_the_http_port(k8s, container):
    (port,) = container["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == int(env_of(container)["KVSERVE_PORT"]["value"]) == DEFAULT_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] == "http", probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "too little time to load the model"


def test_grace_period_exceeds_drain(k8s, container):
    spec = k8s["deployment"]["spec"]["template"]["spec"]
    env = env_of(container)
    shutdown = float(env["KVSERVE_SHUTDOWN_TIMEOUT"]["value"]) if "KVSERVE_SHUTDOWN_TIMEOUT" in env \
        else DEFAULT_SHUTDOWN_TIMEOUT_S
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert spec["terminationGracePeriodSeconds"] > shutdown + pre_stop_s


def test_pod_is_non_root_with_resources(k8s, container):
    pod = k8s["deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_user = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
                       if line.startswith("USER ")][-1]
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user.split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_env_names_are_cli_options(container):
    unknown = set(env_of(container)) - ENV_NAMES - {"OMP_NUM_THREADS"}
    assert not unknown, f"not kvserve serve options: {unknown}"


def test_threads_follow_the_cpu_limit(container):
    # the downward API gives the container's own CPU limit, rounded up to whole CPUs
    ref = env_of(container)["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"]


def test_no_fixed_replicas_beside_the_autoscaler_and_pods_spread(k8s):
    spec = k8s["deployment"]["spec"]
    assert "replicas" not in spec, "a fixed count would reset the HPA's scale on every apply"
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["maxSkew"] == 1
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_api_key_comes_from_the_example_secret(k8s, container):
    ref = env_of(container)["KVSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = k8s["secret"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})


def test_selectors_match_the_pods(k8s):
    pod_labels = k8s["deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [k8s["deployment"]["spec"]["selector"]["matchLabels"], k8s["service"]["spec"]["selector"],
                 k8s["pdb"]["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()


def test_service_has_the_named_http_port(k8s, container):
    (port,) = k8s["service"]["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"


def scale_target(doc: dict) -> str:
    ref = doc["spec"]["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment"
    return ref["name"]


def test_hpa_scales_on_requests_in_flight_from_the_adapter(k8s):
    hpa = k8s["hpa"]
    assert scale_target(hpa) == k8s["deployment"]["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name == "kvserve_requests_in_flight"
    adapter = yaml.safe_load(k8s["prometheus-adapter-rules"]["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert "kvserve_num_requests_running" in rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], "kvserve_num_requests_running") and rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    assert "<<.Series>>" in query and "<<.LabelMatchers>>" in query and "kvserve_num_requests_waiting" in query


def test_hpa_and_keda_share_the_target(k8s):
    hpa_target = float(k8s["hpa"]["spec"]["metrics"][0]["pods"]["target"]["averageValue"])
    (trigger,) = k8s["keda-scaledobject"]["spec"]["triggers"]
    assert float(trigger["metadata"]["threshold"]) == hpa_target
    assert trigger["metricType"] == "AverageValue"


def test_keda_scaled_object(k8s):
    scaled = k8s["keda-scaledobject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["metadata"]["name"]
    assert scale_target(scaled) == k8s["deployment"]["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) > 0
    assert "kvserve_num_requests_running" in meta["query"] and "kvserve_num_requests_waiting" in meta["query"]
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_service_monitor_scrapes_the_http_port(k8s):
    monitor = k8s["servicemonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= k8s["service"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in k8s["service"]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # the alert rules select job="kvserve": the operator names the job after the Service
    assert k8s["service"]["metadata"]["name"] == "kvserve"


def test_prometheus_rule_equals_alerts_yml(k8s):
    rule = k8s["prometheusrule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"]
    assert rule["spec"]["groups"] == load(DEPLOY / "prometheus" / "alerts.yml")["groups"]
