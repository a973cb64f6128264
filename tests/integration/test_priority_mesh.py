"""Priority classes through a real mesh: with one batch slot on the decode worker, an interactive
request preempts a running batch request, finishes first, and the batch request's tokens are
exactly those of an uninterrupted run."""

import threading

import grpc
import pytest

from pdmesh.launcher import MeshSpec, start_mesh
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

BATCH_PROMPT = [2] + list(range(3000, 3040))
LIVE_PROMPT = [2] + list(range(4000, 4012))


@pytest.fixture(scope="module")
def one_slot_mesh(tmp_path_factory):
    spec = MeshSpec(num_prefill=0, num_decode=1, router_port=0, model="tiny", kv_transports="grpc", num_blocks=128,
                    torch_threads=1, max_model_len=512, metrics=False, extra_env=(("PDMESH_MAX_NUM_SEQS", "1"),))
    mesh = start_mesh(spec, str(tmp_path_factory.mktemp("priority")), progress=lambda *_: None)
    channel = grpc.insecure_channel(mesh.router_address)
    mesh.stub = router_pb2_grpc.RouterServiceStub(channel)
    yield mesh
    channel.close()
    mesh.stop()


def request(prompt, max_tokens, priority):
    return router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=prompt), max_tokens=max_tokens,
                                      priority=priority, ignore_eos=True)


def tokens_of(messages):
    return [t for m in messages for t in m.token_ids]


def test_interactive_preempts_running_batch_without_changing_its_tokens(one_slot_mesh):
    stub = one_slot_mesh.stub
    alone = tokens_of(stub.Generate(request(BATCH_PROMPT, 200, common_pb2.PRIORITY_CLASS_BATCH), timeout=120))
    batch_tokens, events, started = [], [], threading.Event()

    def run_batch():
        for message in stub.Generate(request(BATCH_PROMPT, 200, common_pb2.PRIORITY_CLASS_BATCH), timeout=120):
            batch_tokens.extend(message.token_ids)
            if len(batch_tokens) >= 10:
                started.set()
        events.append("batch done")

    thread = threading.Thread(target=run_batch)
    thread.start()
    assert started.wait(60), "the batch request did not start streaming"
    live = list(stub.Generate(request(LIVE_PROMPT, 8, common_pb2.PRIORITY_CLASS_INTERACTIVE), timeout=60))
    events.append("interactive done")
    thread.join(120)
    assert len(tokens_of(live)) == 8
    assert events == ["interactive done", "batch done"], "the interactive request waited for the batch one"
    assert batch_tokens == alone, "the preempted batch request must produce exactly its uninterrupted tokens"
