"""Rendering deploy/ with kustomize, and looking things up in what it renders.

Rendering uses `kubectl kustomize` (kustomize built into kubectl; kubectl is part of this machine
image, see the environment notes), fully offline. Without kubectl the tests that need a render skip
and say how to get it; the checks that read the source files still run.
"""

import functools
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("overlays/cpu-dev", "overlays/gpu")
KUSTOMIZATIONS = ("base", "namespace", "observability", "observability/prometheus-operator", "autoscaling", *OVERLAYS)


@functools.cache
def render(directory: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: install it (Debian/Ubuntu: the `kubectl` package) to render deploy/")
    done = subprocess.run([kubectl, "kustomize", str(DEPLOY / directory)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"kustomize build deploy/{directory} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def of_kind(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects, kind: str, name: str) -> dict:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pdmesh_deployments(objects) -> dict[str, dict]:
    """component (router/prefill/decode) -> Deployment."""
    return {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for d in of_kind(objects, "Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "pdmesh"}


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def env_of(c: dict, pod_values: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet would build it: valueFrom fields come from
    pod_values (by fieldPath), $(VAR) expands to variables defined *earlier* in the list."""
    pod_values = pod_values or {"metadata.name": "pod-0", "metadata.namespace": "pdmesh", "status.podIP": "10.0.0.7"}
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "valueFrom" in var:
            env[var["name"]] = pod_values[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
