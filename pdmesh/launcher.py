"""Starts a local mesh — N prefill workers, M decode workers and a router, each its own process —
and stops it. Used by `pdmesh up`, the end-to-end tests and the benchmarks.

Workers bind port 0 and report their port through a ready file; the router is started once every
worker is ready and reports its own port the same way (it waits until it sees both pools).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent


def vllm_python() -> str:
    """The interpreter of vLLM workers: PDMESH_VLLM_PYTHON, else the venv `make setup-vllm` builds."""
    return os.environ.get("PDMESH_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))


@dataclass(frozen=True)
class MeshSpec:
    num_prefill: int = 1
    num_decode: int = 1
    router_port: int = 50051
    http_port: int | None = 0  # the router's OpenAI-compatible HTTP front: 0 = any free port, None = off
    model: str = "gemma-3-270m"
    kv_transports: str = "nixl,grpc"
    profile: str = "prefix_aware"
    num_blocks: int = 1024
    torch_threads: int = 2
    max_model_len: int = 4096
    extra_env: tuple[tuple[str, str], ...] = ()
    startup_timeout_s: float = 300.0
    # OTLP/gRPC endpoint every service exports traces to ("" = tracing off).
    otlp_endpoint: str = ""
    # Serve Prometheus /metrics from every process on a free port (reported in its ready file).
    metrics: bool = True
    # Mutual TLS between every process: a directory made by `pdmesh certs` ("" = plaintext).
    tls_dir: str = ""
    # The router's API keys file (key -> tenant; services/router/auth.py). "" = no keys.
    api_keys_file: str = ""
    # The router's batch job store (SQLite); "" = batch.sqlite3 in the run directory.
    batch_db: str = ""
    # Engine of the decode / prefill workers ("builtin" or "vllm") and the Python that runs them
    # ("" = this one; vLLM workers need the vLLM venv, see scripts/setup_vllm.sh).
    decode_engine: str = "builtin"
    decode_python: str = ""
    prefill_engine: str = "builtin"
    prefill_python: str = ""

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("need at least one decode worker and a non-negative number of prefill workers")

    def engine_of(self, role: str) -> tuple[str, str]:
        """(engine, python executable) of a worker of this role."""
        engine, python = (self.decode_engine, self.decode_python) if role == "decode" else \
            (self.prefill_engine, self.prefill_python)
        return engine, (python if engine != "builtin" else "") or sys.executable


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    ready_file: pathlib.Path
    log_file: pathlib.Path
    info: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # how it was started (restart() reuses them)
    env: dict = field(default_factory=dict)
    python: str = sys.executable


@dataclass
class Mesh:
    spec: MeshSpec
    run_dir: pathlib.Path
    processes: list[Process]
    router_address: str = ""
    http_address: str = ""  # "http://host:port" of the OpenAI-compatible front ("" when off)

    def workers(self, role: str) -> list[Process]:
        return [p for p in self.processes if p.info.get("role") == role]

    def process(self, name: str) -> Process:
        """The process named name ("router", "decode-0", ...); KeyError naming the ones there are."""
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(f"no process {name!r} in the mesh; it has {[p.name for p in self.processes]}")

    def stop(self, grace_s: float = 15.0) -> None:
        for p in reversed(self.processes):  # router first, so nothing new reaches the workers
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.processes:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def start_mesh(spec: MeshSpec, run_dir: str | None = None, progress=print) -> Mesh:
    run = pathlib.Path(run_dir or tempfile.mkdtemp(prefix="pdmesh-run-"))
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **dict(spec.extra_env)}
    mesh = Mesh(spec, run, [])
    metrics = ["--metrics-port", "0"] if spec.metrics else []
    try:
        common = ["--model", spec.model, "--num-blocks", str(spec.num_blocks), "--kv-transports", spec.kv_transports,
                  "--torch-threads", str(spec.torch_threads), "--max-model-len", str(spec.max_model_len), *metrics]
        for role, count in (("prefill", spec.num_prefill), ("decode", spec.num_decode)):
            for i in range(count):
                name = f"{role}-{i}"
                args = ["-m", f"services.{role}", "--worker-id", name, *common]
                engine, python = spec.engine_of(role)
                if engine != "builtin":
                    args += ["--engine", engine]
                mesh.processes.append(_spawn(name, args, run, _service_env(env, spec, role, name), python))
        _wait_ready(mesh.processes, spec.startup_timeout_s, progress)
        address = lambda role: ",".join(p.info["address"] for p in mesh.processes if p.info["role"] == role)  # noqa
        router = _spawn("router", ["-m", "services.router", "--port", str(spec.router_port), "--prefill",
                                   address("prefill"), "--decode", address("decode"), "--profile", spec.profile,
                                   "--max-model-len", str(spec.max_model_len), "--served-model-name", spec.model,
                                   "--http-port", "off" if spec.http_port is None else str(spec.http_port),
                                   *metrics, *(["--api-keys-file", spec.api_keys_file] if spec.api_keys_file else []),
                                   "--batch-db", spec.batch_db or str(run / "batch.sqlite3")],
                        run, _service_env(env, spec, "router", "router"))
        mesh.processes.append(router)
        _wait_ready([router], spec.startup_timeout_s, progress)
        mesh.router_address = router.info["address"]
        mesh.http_address = router.info.get("http_address", "")
        return mesh
    except BaseException:
        mesh.stop(grace_s=5)
        raise


def tls_env(tls_dir: str) -> dict:
    """The variables that put a service on mutual TLS with the certificates `pdmesh certs` made."""
    tls = pathlib.Path(tls_dir).resolve()
    return {"PDMESH_TLS_CERT": str(tls / "mesh.pem"), "PDMESH_TLS_KEY": str(tls / "mesh.key"),
            "PDMESH_TLS_CA": str(tls / "ca.pem")}


def _service_env(env: dict, spec: MeshSpec, role: str, name: str) -> dict:
    """The standard OpenTelemetry variables for one service (tracing only with an endpoint), and
    the TLS ones with a tls_dir."""
    if spec.tls_dir:
        env = {**env, **tls_env(spec.tls_dir)}
    if not spec.otlp_endpoint:
        return env
    return {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": spec.otlp_endpoint, "OTEL_SERVICE_NAME": f"pdmesh-{role}",
            "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={name}",
            # Export within half a second (the SDK default is 5 s) so a local trace shows up at once.
            "OTEL_BSP_SCHEDULE_DELAY": env.get("OTEL_BSP_SCHEDULE_DELAY", "500")}


def _spawn(name: str, args: list[str], run: pathlib.Path, env: dict, python: str = sys.executable) -> Process:
    ready, log = run / f"{name}.ready.json", run / f"{name}.log"
    ready.unlink(missing_ok=True)
    with open(log, "w") as log_out:
        popen = subprocess.Popen([python, *args, "--ready-file", str(ready)], cwd=ROOT, env=env,
                                 stdout=log_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Process(name, popen, ready, log, args=args, env=env, python=python)


def restart(mesh: Mesh, process: Process, timeout_s: float = 120.0) -> Process:
    """Starts a dead worker again with the same id on the same port (the router reconnects to the
    address by itself) and puts the new process in its place in mesh.processes."""
    if process.popen.poll() is None:
        raise RuntimeError(f"{process.name} is still running")
    args = [*process.args, "--port", str(process.info["port"])]  # the last --port wins
    fresh = _spawn(process.name, args, mesh.run_dir, process.env, process.python)
    _wait_ready([fresh], timeout_s, lambda *_: None)
    mesh.processes[mesh.processes.index(process)] = fresh
    return fresh


def _wait_ready(processes: list[Process], timeout_s: float, progress) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(processes)
    while pending:
        for p in list(pending):
            if p.ready_file.exists():
                p.info = json.loads(p.ready_file.read_text())
                progress(f"  {p.name:<10} ready at {p.info['address']}")
                pending.remove(p)
            elif p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with code {p.popen.returncode} before it was ready; "
                                   f"last log lines:\n{_tail(p.log_file)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f}s: {[p.name for p in pending]}")
        time.sleep(0.1)


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
