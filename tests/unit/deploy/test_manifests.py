"""deploy/ renders with kustomize, validates against the Kubernetes 1.32 schemas offline, and agrees
with itself and with the code: ports, names, selectors, probes, resources, discovery flags, the
placement profile, drain timing."""

import argparse
import os
import re
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from services.common.worker_config import (
    WorkerConfig,
    add_worker_flags,
    worker_config_from_args,
)
from services.router.config import RouterConfig
from services.router.main import parse_config
from services.router.placement.runner import load_profile
from tests.unit.deploy.rendered import (
    DEPLOY,
    KUSTOMIZATIONS,
    OVERLAYS,
    ROOT,
    container,
    env_of,
    named,
    of_kind,
    pdmesh_deployments,
    render,
    selects,
)

KUBERNETES_VERSIONS = ("1.32", "1.37")  # the version we target, and the newest the validator knows
PRE_STOP_SLEEP_S = 5
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1": {"PodMonitor"}}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(directory, version):
    objects = render(directory)
    assert objects, f"deploy/{directory} rendered nothing"
    for obj in objects:
        if obj["kind"] in CUSTOM_RESOURCES.get(obj["apiVersion"], ()):
            continue  # not in the core schemas: test_pod_monitor_scrapes_the_metrics_port checks it
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"deploy/{directory}: {obj['kind']} {obj['metadata']['name']}: {exc.message} "
                        f"at {'/'.join(map(str, exc.path))}")


@pytest.fixture(params=OVERLAYS)
def overlay(request):
    return render(request.param)


def test_every_deployment_has_probes_resources_and_runs_as_non_root(overlay):
    for deployment in of_kind(overlay, "Deployment"):
        name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{name}/{c['name']} needs both probes"
            for side in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(side, {})), f"{name}/{c['name']} {side}"
            security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, name
            assert c["securityContext"].get("allowPrivilegeEscalation") is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert not c["image"].endswith(":latest") and ":" in c["image"], f"{name}: pin the image tag"


def test_pdmesh_probes_use_grpc_health_or_the_router_http_front(overlay):
    for component, deployment in pdmesh_deployments(overlay).items():
        c = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            spec = c[probe]
            if component == "router":
                assert spec["httpGet"]["port"] == "http" and spec["httpGet"]["path"] in ("/ready", "/health")
            else:
                assert spec["grpc"]["port"] == ports["grpc"], f"{component} {probe} must probe its gRPC port"


def test_pods_outlive_the_drain(overlay):
    drain = max(RouterConfig((), ("x:1",)).drain_grace_s, WorkerConfig("decode", "w").drain_grace_s)
    for component, deployment in pdmesh_deployments(overlay).items():
        pod = deployment["spec"]["template"]["spec"]
        sleep = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep == ["sleep", str(PRE_STOP_SLEEP_S)]
        assert pod["terminationGracePeriodSeconds"] >= PRE_STOP_SLEEP_S + drain, component


def test_services_select_a_deployment_and_target_its_named_ports(overlay):
    for service in of_kind(overlay, "Service"):
        selector = service["spec"]["selector"]
        matches = [d for d in of_kind(overlay, "Deployment")
                   if selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} Deployments"
        ports = {p["name"]: p["containerPort"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: no container port {port['targetPort']}"
            assert ports[port["targetPort"]] == port["port"], f"{service['metadata']['name']}: {port['name']}"


def test_deployment_selectors_and_pdbs_match_their_pods(overlay):
    deployments = of_kind(overlay, "Deployment")
    for d in deployments:
        assert selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
    for component in ("router", "prefill", "decode"):
        pdb = named(overlay, "PodDisruptionBudget", f"pdmesh-{component}")
        matches = [d for d in deployments if selects(pdb["spec"]["selector"]["matchLabels"],
                                                     d["spec"]["template"]["metadata"]["labels"])]
        assert [d["metadata"]["name"] for d in matches] == [f"pdmesh-{component}"]


def test_every_env_reference_is_defined_earlier(overlay):
    for deployment in of_kind(overlay, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            names = [v["name"] for v in c.get("env", [])]
            assert len(names) == len(set(names)), f"{deployment['metadata']['name']}: duplicate env {names}"
            for value in env_of(c).values():
                assert "$(" not in value, f"{deployment['metadata']['name']}: {value} refers to a later or unknown var"


def test_workers_parse_their_environment_and_listen_where_the_manifests_say(overlay):
    for component in ("prefill", "decode"):
        c = container(pdmesh_deployments(overlay)[component])
        parser = argparse.ArgumentParser()
        with mock.patch.dict(os.environ, env_of(c), clear=True):
            add_worker_flags(parser)
            config = worker_config_from_args(component, parser.parse_args([]))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert config.port == ports["grpc"] and config.host == "0.0.0.0"
        assert config.advertise_host == "10.0.0.7", "workers must advertise their pod IP (status.podIP)"
        assert config.worker_id == "pod-0", "worker ids should be pod names"
        assert int(env_of(c)["PDMESH_METRICS_PORT"]) == ports["metrics"]
        assert c["args"] == [component]


def router_config(overlay) -> RouterConfig:
    c = container(pdmesh_deployments(overlay)["router"])
    with mock.patch.dict(os.environ, env_of(c), clear=True):
        return parse_config([])


def test_router_discovery_names_headless_services_that_exist(overlay):
    config = router_config(overlay)
    assert config.discovery == "kubernetes" and config.namespace == "pdmesh"
    workers = pdmesh_deployments(overlay)
    for role, selector in (("prefill", config.prefill_selector), ("decode", config.decode_selector)):
        key, _, service_name = selector.partition("=")
        assert key == "kubernetes.io/service-name", selector
        service = named(overlay, "Service", service_name)
        assert service["spec"]["clusterIP"] == "None", f"{service_name} must be headless"
        assert selects(service["spec"]["selector"], workers[role]["spec"]["template"]["metadata"]["labels"])
        port = [p for p in service["spec"]["ports"] if p["name"] == config.endpoint_port_name]
        worker_port = {p["name"]: p["containerPort"] for p in container(workers[role])["ports"]}["grpc"]
        assert port and port[0]["port"] == worker_port, f"{service_name} has no {config.endpoint_port_name} port"


def test_the_dns_alternative_in_the_router_manifest_names_real_services():
    """The commented PDMESH_*_DNS values in base/router.yaml must stay true to the Services."""
    text = (DEPLOY / "base" / "router.yaml").read_text()
    objects = render("base")
    for role in ("prefill", "decode"):
        target = re.search(rf"PDMESH_{role.upper()}_DNS=([\w.-]+):(\d+)", text)
        assert target, f"router.yaml should show PDMESH_{role.upper()}_DNS"
        service = named(objects, "Service", target.group(1))
        assert int(target.group(2)) in [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]


def test_router_may_watch_endpointslices(overlay):
    router = pdmesh_deployments(overlay)["router"]["spec"]["template"]["spec"]
    account = router["serviceAccountName"]
    named(overlay, "ServiceAccount", account)
    bindings = [b for b in of_kind(overlay, "RoleBinding")
                if {"kind": "ServiceAccount", "name": account} in [{k: s[k] for k in ("kind", "name")}
                                                                   for s in b["subjects"]]]
    rules = [r for b in bindings for r in named(overlay, "Role", b["roleRef"]["name"])["rules"]]
    assert any("discovery.k8s.io" in r["apiGroups"] and "endpointslices" in r["resources"]
               and {"list", "watch"} <= set(r["verbs"]) for r in rules)


def test_placement_profile_configmap_parses_and_is_mounted_where_the_router_reads_it(overlay, tmp_path):
    config = router_config(overlay)
    router = pdmesh_deployments(overlay)["router"]["spec"]["template"]["spec"]
    mount = next(m for m in router["containers"][0]["volumeMounts"] if config.profile.startswith(m["mountPath"]))
    volume = next(v for v in router["volumes"] if v["name"] == mount["name"])
    config_map = named(overlay, "ConfigMap", volume["configMap"]["name"])
    key = os.path.relpath(config.profile, mount["mountPath"])
    (tmp_path / key).write_text(config_map["data"][key])
    profile = load_profile(str(tmp_path / key))
    assert profile.name == "prefix_aware"


def test_placement_profile_copy_equals_the_default_profile():
    """kustomize reads files only below its directory, so base/ keeps a copy; it must not drift."""
    copy = (DEPLOY / "base" / "placement" / "profile.yaml").read_text()
    assert copy == (ROOT / "services/router/placement/profiles/prefix_aware.yaml").read_text(), (
        "deploy/base/placement/profile.yaml differs from services/router/placement/profiles/prefix_aware.yaml: "
        "copy the profile over (cp services/router/placement/profiles/prefix_aware.yaml "
        "deploy/base/placement/profile.yaml)")


def test_telemetry_points_at_the_collector_and_the_collector_at_jaeger(overlay):
    for deployment in pdmesh_deployments(overlay).values():
        env = env_of(container(deployment))
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
        service = named(overlay, "Service", host)
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        assert env["OTEL_SERVICE_NAME"] == deployment["metadata"]["name"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        metrics_port = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}["metrics"]
        assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == metrics_port
    collector = yaml.safe_load(named(overlay, "ConfigMap", next(
        v["configMap"]["name"] for v in named(overlay, "Deployment", "pdmesh-otel-collector")["spec"]["template"]
        ["spec"]["volumes"]))["data"]["config.yaml"])
    host, port = collector["exporters"]["otlp/jaeger"]["endpoint"].split(":")
    assert int(port) in [p["port"] for p in named(overlay, "Service", host)["spec"]["ports"]]
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]


def test_pod_monitor_scrapes_the_metrics_port():
    (monitor,) = render("observability/prometheus-operator")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["metadata"]["namespace"] == "pdmesh"
    pods = pdmesh_deployments(render("overlays/cpu-dev")).values()
    assert all(selects(monitor["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
               for d in pods)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_hpas_scale_real_deployments_on_metrics_the_adapter_publishes():
    hpas = of_kind(render("autoscaling"), "HorizontalPodAutoscaler")
    workers = pdmesh_deployments(render("overlays/cpu-dev"))
    adapter = yaml.safe_load((DEPLOY / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    published = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {workers[r]["metadata"]["name"]
                                                                   for r in ("prefill", "decode")}
    for hpa in hpas:
        for metric in hpa["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in published, metric


def test_gpu_overlay_gives_workers_a_gpu_and_ucx_settings():
    workers = pdmesh_deployments(render("overlays/gpu"))
    for role in ("prefill", "decode"):
        c = container(workers[role])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        env = env_of(c)
        assert "rc" in env["UCX_TLS"].split(",") and "cuda_ipc" in env["UCX_TLS"].split(",")
        assert env["PDMESH_KV_TRANSPORTS"].startswith("nixl")
    assert "nvidia.com/gpu" not in str(container(workers["router"])["resources"])


def test_grafana_dashboard_is_wired_once_it_exists():
    dashboard = DEPLOY / "observability" / "grafana-dashboard.json"
    kustomization = yaml.safe_load((DEPLOY / "observability" / "kustomization.yaml").read_text())
    generated = [f for g in kustomization.get("configMapGenerator", []) for f in g.get("files", [])]
    if dashboard.exists():
        assert any(f.endswith("=grafana-dashboard.json") for f in generated), (
            "deploy/observability/grafana-dashboard.json exists: uncomment its configMapGenerator entry in "
            "deploy/observability/kustomization.yaml")
    else:
        assert not any("grafana-dashboard.json" in f for f in generated)
