"""The container images, checked without a Docker engine (none runs here): what they COPY exists and
is in the build context, the pins agree with the repository, the runtime is non-root and has the
model baked in, the code they copy runs on its own, and the entry point starts each service."""

import fnmatch
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.unit.deploy.rendered import DEPLOY, ROOT, pdmesh_deployments, render

DOCKERFILES = ("deploy/docker/Dockerfile", "deploy/docker/Dockerfile.gpu")
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / path).read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued RUN
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages(path: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in instructions(path):
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, args))
    return result


def dockerignored(relative: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "re-include patterns are not understood by this check"
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.replace("**/", "*")) for prefix in prefixes for pattern in patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    copies = [args for op, args in instructions(dockerfile) if op == "COPY" and "--from=" not in args]
    assert copies
    for args in copies:
        *sources, _destination = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such path in the repository"
            assert not dockerignored(source), f"{dockerfile}: COPY {source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_multi_stage_runtime_runs_as_a_non_root_user(dockerfile):
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 3, "deps, model and runtime stages"
    runtime = all_stages[-1]
    users = [args for op, args in runtime if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), f"{dockerfile}: USER must be a numeric uid"
    uid = int(users[-1].split(":")[0])
    assert any(op == "RUN" and f"--uid {uid}" in args for op, args in runtime), "the uid should exist in /etc/passwd"
    pods = pdmesh_deployments(render("overlays/cpu-dev")).values()
    assert {d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for d in pods} == {uid}
    assert not any(op == "RUN" and "pip install" in args for op, args in runtime), "no build tools in the runtime"


def test_cpu_image_is_slim_and_has_the_model_baked_in():
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text)
    runtime = stages("deploy/docker/Dockerfile")[-1]
    cache = dict(a.split("=", 1) for op, args in runtime if op == "ENV" for a in args.split() if "=" in a)
    assert cache["PDMESH_CACHE_DIR"] == "/opt/pdmesh/cache"
    assert ("COPY", "--from=model /opt/pdmesh/cache /opt/pdmesh/cache") in runtime
    model = next(s for s in stages("deploy/docker/Dockerfile") if s[0][1].endswith(" AS model"))
    assert any(op == "RUN" and "PDMESH_CACHE_DIR=/opt/pdmesh/cache python -m engine.weights --prepare" in args
               for op, args in model)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_pins_agree_with_the_repository(dockerfile):
    text = (ROOT / dockerfile).read_text()
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    nixl_pin = re.search(r"nixl-cu12==(\S+)", (ROOT / "scripts/setup.sh").read_text()).group(1)
    assert f"torch=={torch_pin}" in text and f"nixl-cu12=={nixl_pin}" in text
    assert "-r /tmp/requirements.txt" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_exposed_ports_cover_the_manifests(dockerfile):
    exposed = {int(p) for op, args in instructions(dockerfile) if op == "EXPOSE" for p in args.split()}
    pods = pdmesh_deployments(render("overlays/cpu-dev")).values()
    wanted = {p["containerPort"] for d in pods for c in d["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert wanted <= exposed


def test_the_copied_code_runs_on_its_own(tmp_path):
    """Only what the runtime stage copies (plus the venv): every service imports and parses flags."""
    runtime = stages("deploy/docker/Dockerfile")[-1]
    for op, args in runtime:
        if op == "COPY" and "--from=" not in args and "--chmod" not in args:
            source, _ = args.split()
            if source.endswith("/"):
                shutil.copytree(ROOT / source, tmp_path / source, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for service in ("router", "prefill", "decode"):
        done = subprocess.run([sys.executable, "-m", f"services.{service}", "--help"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"pdmesh-{service}" in done.stdout


@pytest.mark.parametrize("service", ["router", "prefill", "decode"])
def test_entrypoint_starts_the_named_service(service):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["sh", str(ENTRYPOINT), service, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"usage: pdmesh-{service}" in done.stdout


def test_entrypoint_runs_other_commands_and_is_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
    done = subprocess.run(["sh", str(ENTRYPOINT), "echo", "hello"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert (done.returncode, done.stdout) == (0, "hello\n")


def test_dockerignore_keeps_the_context_small():
    for heavy in (".git", ".venv", ".cache", "tests", "bench"):
        assert dockerignored(heavy), f".dockerignore should exclude {heavy}"
    assert not dockerignored("deploy/docker/entrypoint.sh")
    assert DEPLOY.exists()
