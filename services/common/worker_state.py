"""WorkerStateService: a worker's KV events and load reports, streamed to every subscriber.

A new subscriber first receives a snapshot (all currently cached block hashes as one
BlocksStored), then every KV event in engine order, and a load report at least every interval.
So a router that restarts rebuilds its whole view from the workers.
"""

import asyncio
import time
from typing import NamedTuple

from pdmesh.v1 import worker_state_pb2 as ws_pb2
from pdmesh.v1 import worker_state_pb2_grpc as ws_grpc

_ROLES = {"prefill": ws_pb2.WORKER_ROLE_PREFILL, "decode": ws_pb2.WORKER_ROLE_DECODE}


class WorkerSnapshot(NamedTuple):
    """What the engine thread publishes after each step (read without touching the engine)."""

    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    queued_prefill_tokens: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    max_running: int = 0
    steps: int = 0
    prompt_only_steps: int = 0
    step_cost: tuple[float, float, float] | None = None  # (fixed, per sequence, per token) s


STEP_COST_REFRESH_S = 1.0  # the step cost fit is solved for the snapshot at most this often


def snapshot_of(engine, step_cost: tuple[float, float, float] | None = None) -> WorkerSnapshot:
    load, stats = engine.load(), engine.stats
    return WorkerSnapshot(load.waiting, load.running, load.kv_blocks_used, load.kv_blocks_total,
                          load.queued_prefill_tokens, stats.prompt_tokens_computed, stats.prompt_tokens_cached,
                          stats.generated_tokens, load.max_running, stats.steps,
                          stats.prompt_only_steps, step_cost)


class WorkerStateHub:
    """Fans engine-thread updates out to asyncio subscribers."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._subscribers: set[asyncio.Queue] = set()
        self.snapshot = WorkerSnapshot()
        self.closed = False
        self._step_cost_at = 0.0

    def publish_from_engine_thread(self, engine) -> None:
        """Called by the engine thread after each step."""
        step_cost, now = self.snapshot.step_cost, time.monotonic()
        if now - self._step_cost_at >= STEP_COST_REFRESH_S:
            # the last answer stays while the fit has none (a run of steps all one size)
            step_cost, self._step_cost_at = engine.step_cost() or step_cost, now
        self.snapshot = snapshot_of(engine, step_cost)
        events = engine.drain_kv_events()
        if events:
            self._loop.call_soon_threadsafe(self._fan_out, events)

    def _fan_out(self, events) -> None:
        for q in self._subscribers:
            q.put_nowait(events)

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        if self.closed:
            q.put_nowait(None)
        self._subscribers.add(q)
        return q

    def close(self) -> None:
        """Ends every subscription (a draining worker stops advertising itself)."""
        self.closed = True
        for q in self._subscribers:
            q.put_nowait(None)

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)


class WorkerStateServicer(ws_grpc.WorkerStateServiceServicer):
    def __init__(self, worker_id: str, role: str, hub: WorkerStateHub, runner, block_size: int,
                 default_interval_ms: int = 500):
        self._worker_id, self._role = worker_id, _ROLES[role]
        self._hub, self._runner, self._block_size = hub, runner, block_size
        self._default_interval_ms = default_interval_ms

    async def StreamState(self, request, context):
        interval = (request.load_report_interval_ms or self._default_interval_ms) / 1000
        events = self._hub.subscribe()
        try:
            cached = await self._runner.call(lambda engine: engine.cached_block_hashes())
            yield self._message(kv_events=ws_pb2.KvEventBatch(events=[
                ws_pb2.KvEvent(cleared=ws_pb2.AllBlocksCleared()),
                ws_pb2.KvEvent(stored=ws_pb2.BlocksStored(block_hashes=list(cached), block_size=self._block_size))]))
            yield self._load_message()
            next_report = time.monotonic() + interval
            while True:
                try:
                    batch = await asyncio.wait_for(events.get(), timeout=max(0.0, next_report - time.monotonic()))
                except asyncio.TimeoutError:
                    batch = []
                if batch is None:
                    return  # the worker is draining
                if batch:
                    yield self._message(kv_events=ws_pb2.KvEventBatch(events=[self._event(e) for e in batch]))
                if time.monotonic() >= next_report:  # load reports keep flowing under a storm of events
                    yield self._load_message()
                    next_report = time.monotonic() + interval
        finally:
            self._hub.unsubscribe(events)

    def _message(self, **update) -> ws_pb2.StreamStateResponse:
        return ws_pb2.StreamStateResponse(worker_id=self._worker_id, role=self._role, **update)

    def _load_message(self) -> ws_pb2.StreamStateResponse:
        s = self._hub.snapshot
        return self._message(load_report=ws_pb2.LoadReport(
            waiting_sequences=s.waiting, running_sequences=s.running, kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total, queued_prefill_tokens=s.queued_prefill_tokens,
            timestamp_unix_ms=int(time.time() * 1000), prompt_tokens_computed_total=s.prompt_tokens_computed,
            generated_tokens_total=s.generated_tokens, prompt_tokens_cached_total=s.prompt_tokens_cached,
            max_running_sequences=s.max_running))

    def _event(self, event) -> ws_pb2.KvEvent:
        if event.kind == "stored":
            return ws_pb2.KvEvent(stored=ws_pb2.BlocksStored(block_hashes=list(event.block_hashes),
                                                             block_size=self._block_size))
        if event.kind == "removed":
            return ws_pb2.KvEvent(removed=ws_pb2.BlocksRemoved(block_hashes=list(event.block_hashes)))
        return ws_pb2.KvEvent(cleared=ws_pb2.AllBlocksCleared())
