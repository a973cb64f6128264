"""Property-based fuzzing (hypothesis) of every public RPC of a running mesh, and of the HTTP front.

    python -m bench.fuzz [--examples N] [--json PATH]     # N cases per target (default 2000)

Each target draws messages (random and adversarial: huge prompts and max_tokens, NaN/inf
sampling values, unknown enum values and token ids, empty fields, random bytes as the whole
message, invalid UTF-8 in string fields), sends them with a deadline, and checks the property:

  - the call ends with OK or with a bad-input status (BAD_INPUT_CODES) carrying a message that
    says what to fix; never UNKNOWN/INTERNAL, never a hang (DEADLINE_EXCEEDED fails the case);
  - an OK stream is whole: it ends with a finish reason and no more tokens than asked for;
  - after each target's batch the mesh still serves a known request with the known output.

`pytest tests/integration/test_fuzz.py` runs the same targets with a few hundred cases each.
"""

import argparse
import collections
import json
import pathlib
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.common import progress
from pdmesh.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, kv_transfer_pb2, kv_transfer_pb2_grpc, prefill_pb2,
                       prefill_pb2_grpc, router_pb2, router_pb2_grpc, worker_state_pb2, worker_state_pb2_grpc)
from services.common.server import MAX_MESSAGE_BYTES

BAD_INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
                   grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
CALL_TIMEOUT_S = 30.0
VOCAB_SIZE = 262_144
# The client may send more than the server accepts, so oversize messages reach the server.
CLIENT_OPTIONS = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES),
                  ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES)]
KNOWN_PROMPT = [2, 651, 6037, 529, 7001, 563]

RPCS = {  # full method name -> the request type (for raw-bytes cases)
    "/pdmesh.v1.RouterService/Generate": (router_pb2.GenerateRequest, "stream"),
    "/pdmesh.v1.PrefillService/Prefill": (prefill_pb2.PrefillRequest, "unary"),
    "/pdmesh.v1.DecodeService/Decode": (decode_pb2.DecodeRequest, "stream"),
    "/pdmesh.v1.KvTransferService/GetTransferMetadata": (kv_transfer_pb2.GetTransferMetadataRequest, "unary"),
    "/pdmesh.v1.KvTransferService/PullKv": (kv_transfer_pb2.PullKvRequest, "stream"),
    "/pdmesh.v1.KvTransferService/ReleaseKv": (kv_transfer_pb2.ReleaseKvRequest, "unary"),
    "/pdmesh.v1.WorkerStateService/StreamState": (worker_state_pb2.StreamStateRequest, "stream"),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest, "unary"),
}
_ROUTER_RPCS = ("/pdmesh.v1.RouterService/Generate", "/grpc.health.v1.Health/Check")
_PREFILL_RPCS = ("/pdmesh.v1.PrefillService/Prefill", "/pdmesh.v1.KvTransferService/GetTransferMetadata",
                 "/pdmesh.v1.KvTransferService/PullKv", "/pdmesh.v1.KvTransferService/ReleaseKv",
                 "/pdmesh.v1.WorkerStateService/StreamState")
_DECODE_RPCS = ("/pdmesh.v1.DecodeService/Decode", "/pdmesh.v1.WorkerStateService/StreamState")


class FuzzFailure(AssertionError):
    pass


def check_status(exc: grpc.RpcError, what: str) -> grpc.StatusCode:
    """A failed call must say what was wrong with the input."""
    code, details = exc.code(), exc.details()
    if code not in BAD_INPUT_CODES:
        raise FuzzFailure(f"{what}: {code.name} ({details!r}); bad input must get one of "
                          f"{sorted(c.name for c in BAD_INPUT_CODES)}")
    if not details:
        raise FuzzFailure(f"{what}: {code.name} without a message")
    return code


# ---- strategies --------------------------------------------------------------------------------

def floats32() -> st.SearchStrategy:
    return st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0]))


@st.composite
def sampling_params(draw) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams()
    if draw(st.booleans()):
        p.temperature = draw(floats32())
    if draw(st.booleans()):
        p.top_p = draw(floats32())
    if draw(st.booleans()):
        p.seed = draw(st.integers(0, 2**64 - 1))
    return p


def token_ids(valid: bool = False) -> st.SearchStrategy:
    small = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=40)
    if valid:
        return small
    return st.one_of(small, st.lists(st.integers(0, 2**32 - 1), max_size=40),
                     st.integers(0, 20_000).map(lambda n: [5] * n))  # up to far past the context


def max_tokens() -> st.SearchStrategy:
    return st.one_of(st.integers(1, 4), st.integers(-2**31, 2**31 - 1))


def priorities() -> st.SearchStrategy:
    return st.one_of(st.sampled_from([0, 1, 2]), st.integers(-2**31, 2**31 - 1))


def names() -> st.SearchStrategy:
    return st.one_of(st.text(max_size=40), st.integers(0, 100_000).map(lambda n: "r" * n))


@st.composite
def generate_requests(draw) -> router_pb2.GenerateRequest:
    r = router_pb2.GenerateRequest(max_tokens=draw(max_tokens()), priority=draw(priorities()),
                                   tenant_id=draw(names()), request_id=draw(names()), ignore_eos=draw(st.booleans()))
    r.sampling.CopyFrom(draw(sampling_params()))
    prompt = draw(st.sampled_from(["text", "big_text", "ids", "none"]))
    if prompt == "text":
        r.text = draw(st.text(max_size=200))
    elif prompt == "big_text":
        r.text = draw(st.text(min_size=1, max_size=8)) * draw(st.integers(1, 20_000))
    elif prompt == "ids":
        r.token_ids.ids.extend(draw(token_ids()))
    return r


@st.composite
def prefill_requests(draw) -> prefill_pb2.PrefillRequest:
    r = prefill_pb2.PrefillRequest(request_id=draw(names()), prompt_token_ids=draw(token_ids()),
                                   priority=draw(priorities()))
    r.sampling.CopyFrom(draw(sampling_params()))
    return r


@st.composite
def kv_layouts(draw) -> common_pb2.KvLayout:
    return common_pb2.KvLayout(
        wire_version=draw(st.integers(0, 2**32 - 1)), block_size=draw(st.integers(0, 2**32 - 1)),
        num_layers=draw(st.integers(0, 64)), num_kv_heads=draw(st.integers(0, 64)), head_dim=draw(st.integers(0, 512)),
        dtype=draw(st.sampled_from(["", "float32", "bfloat16", "float16", "int7"])), model_id=draw(st.text(max_size=20)),
        compat_hash=draw(st.text(max_size=20)))


@st.composite
def kv_handles(draw) -> common_pb2.KvHandle:
    n = draw(st.integers(0, 6))
    return common_pb2.KvHandle(
        worker_id=draw(st.text(max_size=10)), transfer_address=draw(st.sampled_from(["", "127.0.0.1:1", "nowhere:x"])),
        lease_id=draw(st.text(max_size=10)), block_ids=draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)),
        num_tokens=draw(st.integers(0, 2**32 - 1)), layout=draw(kv_layouts()),
        block_checksums=draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n + 1)),
        lease_expires_unix_ms=draw(st.integers(-2**63, 2**63 - 1)), transports=draw(st.lists(st.sampled_from(
            ["grpc", "nixl", "carrier-pigeon"]), max_size=3)))


@st.composite
def decode_requests(draw) -> decode_pb2.DecodeRequest:
    r = decode_pb2.DecodeRequest(request_id=draw(names()), prompt_token_ids=draw(token_ids()),
                                 first_token_id=draw(st.integers(0, 2**32 - 1)), max_tokens=draw(max_tokens()),
                                 priority=draw(priorities()), ignore_eos=draw(st.booleans()),
                                 resume_token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=5)))
    r.sampling.CopyFrom(draw(sampling_params()))
    if draw(st.booleans()):
        r.kv_handle.CopyFrom(draw(kv_handles()))
    return r


def _string_field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2]) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def invalid_utf8() -> st.SearchStrategy:
    """Bytes that are not UTF-8 (a lone continuation byte, an overlong form, a surrogate, 0xff)."""
    bad = st.sampled_from([b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"\xfe\xff"])
    return st.tuples(st.binary(max_size=8), bad, st.binary(max_size=8)).map(lambda t: b"".join(t))


def raw_messages() -> st.SearchStrategy:
    """(method, bytes): random bytes, or a string field (field 1 of every request is a string
    except StreamState's) carrying invalid UTF-8 next to valid fields."""
    method = st.sampled_from(sorted(RPCS))
    random_bytes = st.tuples(method, st.binary(max_size=300))
    bad_strings = st.tuples(method, st.tuples(st.sampled_from([1, 6, 7]), invalid_utf8()).map(
        lambda t: _string_field(*t) + b"\x20\x02"))  # + max_tokens=2 (field 4 of GenerateRequest)
    return st.one_of(random_bytes, bad_strings)


def json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=30))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


@st.composite
def http_bodies(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    kind = draw(st.sampled_from(["shaped", "shaped", "any_json", "bytes"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=200))
    if kind == "any_json":
        return path, json.dumps(draw(json_values())).encode()
    body = {"model": draw(st.sampled_from(["gemma-3-270m", "tiny", "", None, 7]))}
    if path.endswith("chat/completions"):
        message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", 3]),
                                         "content": st.one_of(st.text(max_size=40), json_values())})
        body["messages"] = draw(st.one_of(st.lists(message, max_size=3), json_values()))
    else:
        body["prompt"] = draw(st.one_of(st.text(max_size=60), st.lists(st.integers(-5, 2**33), max_size=10),
                                        json_values()))
    optional = {"max_tokens": st.one_of(st.integers(1, 3), st.integers(-2**40, 2**40), json_values()),
                "temperature": st.one_of(st.floats(allow_nan=True), json_values()),
                "top_p": st.floats(allow_nan=True), "seed": st.integers(-2**70, 2**70),
                "stream": st.one_of(st.booleans(), json_values()), "stop": json_values(), "n": st.integers(-1, 3),
                "ignore_eos": st.booleans(), "stream_options": json_values(), "logprobs": json_values()}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if "max_tokens" not in body:
        body["max_tokens"] = 2
    return path, json.dumps(body).encode()  # NaN/Infinity are written as such: Python's json accepts them


# ---- the mesh under test -----------------------------------------------------------------------

class MeshClients:
    """Channels to the router and to one prefill and one decode worker of a running mesh."""

    def __init__(self, router: str, prefill: str, decode: str, http: str = "", credentials=None, metadata=()):
        make = (lambda a: grpc.secure_channel(a, credentials, options=CLIENT_OPTIONS)) if credentials else \
            (lambda a: grpc.insecure_channel(a, options=CLIENT_OPTIONS))
        self.channels = {"router": make(router), "prefill": make(prefill), "decode": make(decode)}
        self.http, self.metadata = http, tuple(metadata)
        self.router = router_pb2_grpc.RouterServiceStub(self.channels["router"])
        self.prefill = prefill_pb2_grpc.PrefillServiceStub(self.channels["prefill"])
        self.decode = decode_pb2_grpc.DecodeServiceStub(self.channels["decode"])
        self.kv = kv_transfer_pb2_grpc.KvTransferServiceStub(self.channels["prefill"])
        self.health = health_pb2_grpc.HealthStub(self.channels["router"])
        self.expected = None
        self.outcomes: collections.Counter = collections.Counter()  # (what, status name) -> cases

    @classmethod
    def of_mesh(cls, mesh, **kwargs) -> "MeshClients":
        worker = lambda role: mesh.workers(role)[0].info["address"]  # noqa: E731
        return cls(mesh.router_address, worker("prefill"), worker("decode"), mesh.http_address, **kwargs)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()

    def channel_for(self, method: str) -> list[grpc.Channel]:
        roles = [r for r, methods in (("router", _ROUTER_RPCS), ("prefill", _PREFILL_RPCS), ("decode", _DECODE_RPCS))
                 if method in methods]
        return [self.channels[r] for r in roles]

    # -- the known request, checked after every batch
    def known_output(self) -> list[int]:
        request = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=KNOWN_PROMPT), max_tokens=6,
                                             ignore_eos=True)
        return [t for m in self.router.Generate(request, timeout=CALL_TIMEOUT_S, metadata=self.metadata)
                for t in m.token_ids]

    def still_serves(self) -> None:
        output = self.known_output()
        if self.expected is None:
            self.expected = output
        if output != self.expected or len(output) != 6:
            raise FuzzFailure(f"after the batch the known request returned {output}, expected {self.expected}")


def _whole_stream(messages, max_tokens: int, what: str) -> None:
    if not messages or messages[-1].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
        raise FuzzFailure(f"{what}: OK stream without a finish reason")
    produced = sum(len(m.token_ids) for m in messages)
    if produced > max_tokens:
        raise FuzzFailure(f"{what}: {produced} tokens for max_tokens={max_tokens}")


def _call(c: MeshClients, what: str, fn: Callable):
    try:
        result = fn()
    except grpc.RpcError as exc:
        c.outcomes[what, check_status(exc, what).name] += 1
        return None
    c.outcomes[what, "OK"] += 1
    return result


# ---- targets: one property each ----------------------------------------------------------------

def check_generate(c: MeshClients, request: router_pb2.GenerateRequest) -> None:
    messages = _call(c, "Generate", lambda: list(c.router.Generate(request, timeout=CALL_TIMEOUT_S,
                                                                metadata=c.metadata)))
    if messages is not None:
        _whole_stream(messages, request.max_tokens, "Generate")


def check_prefill(c: MeshClients, request: prefill_pb2.PrefillRequest) -> None:
    reply = _call(c, "Prefill", lambda: c.prefill.Prefill(request, timeout=CALL_TIMEOUT_S))
    if reply is not None:  # give the lent blocks back at once
        if not c.kv.ReleaseKv(kv_transfer_pb2.ReleaseKvRequest(lease_id=reply.kv_handle.lease_id),
                              timeout=CALL_TIMEOUT_S).released:
            raise FuzzFailure("Prefill: the lease it returned could not be released")


def check_decode(c: MeshClients, request: decode_pb2.DecodeRequest) -> None:
    messages = _call(c, "Decode", lambda: list(c.decode.Decode(request, timeout=CALL_TIMEOUT_S)))
    if messages is not None:
        _whole_stream(messages, request.max_tokens, "Decode")


def check_kv_transfer(c: MeshClients, case) -> None:
    kind, value = case
    if kind == "metadata":
        _call(c, "GetTransferMetadata", lambda: c.kv.GetTransferMetadata(
            kv_transfer_pb2.GetTransferMetadataRequest(layout=value), timeout=CALL_TIMEOUT_S))
    elif kind == "pull":
        lease, chunk = value
        _call(c, "PullKv", lambda: list(c.kv.PullKv(kv_transfer_pb2.PullKvRequest(lease_id=lease, chunk_bytes=chunk),
                                                  timeout=CALL_TIMEOUT_S)))
    else:
        reply = _call(c, "ReleaseKv", lambda: c.kv.ReleaseKv(kv_transfer_pb2.ReleaseKvRequest(lease_id=value),
                                                           timeout=CALL_TIMEOUT_S))
        if reply is not None and reply.released:
            raise FuzzFailure(f"ReleaseKv released a lease nobody was given: {value!r}")


def kv_transfer_cases() -> st.SearchStrategy:
    return st.one_of(st.tuples(st.just("metadata"), kv_layouts()),
                     st.tuples(st.just("pull"), st.tuples(st.text(max_size=40), st.integers(0, 2**32 - 1))),
                     st.tuples(st.just("release"), st.text(max_size=40)))


def check_stream_state(c: MeshClients, case) -> None:
    role, interval_ms = case
    stub = worker_state_pb2_grpc.WorkerStateServiceStub(c.channels[role])
    stream = stub.StreamState(worker_state_pb2.StreamStateRequest(load_report_interval_ms=interval_ms),
                              timeout=CALL_TIMEOUT_S)
    try:
        first = _call(c, "StreamState", lambda: next(stream))
    finally:
        stream.cancel()
    if first is not None and first.WhichOneof("update") != "kv_events":
        raise FuzzFailure("StreamState did not start with a KV snapshot")


def check_health(c: MeshClients, service: str) -> None:
    reply = _call(c, "Health.Check", lambda: c.health.Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=CALL_TIMEOUT_S))
    if reply is not None and reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise FuzzFailure(f"Health.Check({service!r}) answered {reply.status}")


def check_raw(c: MeshClients, case) -> None:
    method, payload = case
    _, shape = RPCS[method]
    for channel in c.channel_for(method):
        call = (channel.unary_stream if shape == "stream" else channel.unary_unary)(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        metadata = c.metadata if method.startswith("/pdmesh.v1.RouterService") else ()
        if shape == "stream":
            stream = call(payload, timeout=CALL_TIMEOUT_S, metadata=metadata)
            try:  # StreamState never ends by itself: its first message is enough
                _call(c, f"{method} (raw)", lambda: next(stream, None) if "StreamState" in method else list(stream))
            finally:
                stream.cancel()
        else:
            _call(c, f"{method} (raw)", lambda: call(payload, timeout=CALL_TIMEOUT_S, metadata=metadata))


def check_http(c: MeshClients, case) -> None:
    import httpx

    path, body = case
    headers = {"content-type": "application/json", **dict(c.metadata)}
    with httpx.Client(base_url=c.http, timeout=CALL_TIMEOUT_S) as client:
        with client.stream("POST", path, content=body, headers=headers) as response:
            text = response.read().decode(errors="replace")
    if response.status_code >= 500:
        raise FuzzFailure(f"POST {path} {body[:200]!r}: HTTP {response.status_code} {text[:300]}")
    if response.status_code != 200:
        error = json.loads(text).get("error", {})
        if not error.get("message"):
            raise FuzzFailure(f"POST {path}: HTTP {response.status_code} without an error message: {text[:300]}")
    elif "data: {\"error\"" in text and "internal" in text.lower():
        raise FuzzFailure(f"POST {path}: stream ended with an internal error: {text[-300:]}")


class Target(NamedTuple):
    name: str
    strategy: st.SearchStrategy
    check: Callable
    weight: float = 1.0  # share of --examples (valid-looking cases run the model; keep them fewer)


TARGETS = [
    Target("router.Generate", generate_requests(), check_generate),
    Target("prefill.Prefill", prefill_requests(), check_prefill, 0.5),
    Target("decode.Decode", decode_requests(), check_decode, 0.5),
    Target("kv_transfer", kv_transfer_cases(), check_kv_transfer),
    Target("worker_state.StreamState", st.tuples(st.sampled_from(["prefill", "decode"]), st.integers(0, 2**32 - 1)),
           check_stream_state, 0.1),
    Target("health.Check", st.text(max_size=60), check_health, 0.2),
    Target("raw_bytes", raw_messages(), check_raw),
    Target("http_front", http_bodies(), check_http, 0.5),
]


def run_target(clients: MeshClients, target: Target, examples: int, seed: int | None = None) -> int:
    """Runs `examples` cases of one target, then checks the mesh still serves; returns cases run."""
    ran = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(target.strategy)
    def fuzz(case):
        ran.append(1)
        target.check(clients, case)

    if seed is not None:
        fuzz = __import__("hypothesis").seed(seed)(fuzz)
    fuzz()
    clients.still_serves()
    return len(ran)


# ---- adversarial cases that are not worth drawing at random -----------------------------------

def oversize_cases() -> list[tuple[str, bytes, set]]:
    """(name, GenerateRequest bytes, acceptable codes): over and just under the 64 MiB limit."""
    header = lambda n: b"\x12" + _varint(n + len(_varint(n)) + 1) + b"\x0a" + _varint(n)  # noqa: E731 token_ids.ids
    over = MAX_MESSAGE_BYTES + 1024
    under = MAX_MESSAGE_BYTES - 1024
    huge_text = router_pb2.GenerateRequest(text="All work and no play. " * 400_000, max_tokens=2).SerializeToString()
    huge_ids = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[5] * 1_000_000)).SerializeToString()
    return [("huge_text_8MiB", huge_text, {grpc.StatusCode.INVALID_ARGUMENT}),
            ("huge_token_ids_1M", huge_ids, {grpc.StatusCode.INVALID_ARGUMENT}),
            ("over_64MiB", header(over) + b"\x05" * over, {grpc.StatusCode.RESOURCE_EXHAUSTED}),
            ("just_under_64MiB", header(under) + b"\x05" * under, {grpc.StatusCode.INVALID_ARGUMENT})]


def check_oversize(c: MeshClients) -> list[str]:
    """Sends each oversize case to the router (each must be refused within 10 s); one line per case."""
    lines = []
    call = c.channels["router"].unary_stream("/pdmesh.v1.RouterService/Generate", request_serializer=lambda b: b,
                                            response_deserializer=router_pb2.GenerateResponse.FromString)
    for name, payload, codes in oversize_cases():
        start = time.perf_counter()
        try:
            list(call(payload, timeout=120, metadata=c.metadata))
            raise FuzzFailure(f"{name}: accepted")
        except grpc.RpcError as exc:
            if exc.code() not in codes or not exc.details():
                raise FuzzFailure(f"{name}: {exc.code().name} ({exc.details()!r}), expected {[x.name for x in codes]}")
            took = time.perf_counter() - start
            if took > 10:
                raise FuzzFailure(f"{name}: took {took:.1f}s to refuse")
            lines.append(f"{name}: {exc.code().name} in {took:.2f}s: {exc.details()[:80]}")
    return lines


# ---- command line ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    from pdmesh.launcher import MeshSpec, start_mesh

    p = argparse.ArgumentParser(prog="bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=2000, help="cases per target (weighted; default 2000)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    p.add_argument("--json", default=None, help="write the case counts here")
    args = p.parse_args(argv)
    spec = MeshSpec(num_prefill=1, num_decode=1, router_port=0, model="tiny", profile="round_robin",
                    kv_transports="grpc", num_blocks=256, torch_threads=1, max_model_len=512)
    print("starting a tiny-model mesh ...", flush=True)
    mesh = start_mesh(spec)
    clients = MeshClients.of_mesh(mesh)
    results, start = {}, time.perf_counter()
    try:
        clients.still_serves()
        for target in TARGETS:
            n = max(1, int(args.examples * target.weight))
            t0 = time.perf_counter()
            results[target.name] = run_target(clients, target, n, args.seed if args.seed is not None else
                                              int(time.time()))
            progress(f"{target.name:<26} {results[target.name]:>6} cases in {time.perf_counter() - t0:6.1f}s: ok")
        for line in check_oversize(clients):
            print(f"  {line}", flush=True)
        clients.still_serves()
    finally:
        clients.close()
        mesh.stop()
    total = sum(results.values())
    print(f"{total} cases, {time.perf_counter() - start:.0f}s, no crash, no bad status, mesh still serving")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"fuzz_cases": total, "per_target": results}, indent=2))


if __name__ == "__main__":
    main()
