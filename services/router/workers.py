"""The router's view of its workers, rebuilt from their state streams.

For each configured worker address the router keeps a channel and one StreamState subscription.
A worker is healthy while its stream is up; when the stream breaks the worker is marked
unhealthy at once, its entries leave the prefix index, and the subscription is retried with
exponential backoff. Each stream starts with a snapshot, so a restarted router (or a
reconnected worker) rebuilds the same index from the workers alone.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc

from pdmesh.v1 import decode_pb2_grpc, prefill_pb2_grpc, worker_state_pb2, worker_state_pb2_grpc
from services.common.server import CHANNEL_OPTIONS
from services.common.tls import TlsConfig, aio_channel
from services.router.decode_session import DecodeSession
from services.router.placement.base import LoadView, WorkerView, with_router_counts
from services.router.placement.table import WorkerTable
from services.router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)
# gRPC's own reconnect backoff grows to 120 s over a long outage: a worker restarted on the same
# address could stay unseen that long. Cap it near the state-stream retry backoff below.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                      ("grpc.max_reconnect_backoff_ms", 2000)]
# A worker that stops answering without closing its connections (a frozen process, a node cut off
# the network) is found by HTTP/2 pings: one every 10 s, the connection dropped when a ping goes
# unanswered for 5 s. Its decode session and state stream then fail (UNAVAILABLE): requests in
# flight fail over and placement stops choosing it, instead of waiting on TCP for many minutes.
_KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                      ("grpc.http2.ping_timeout_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1),
                      ("grpc.http2.max_pings_without_data", 0)]
_ROLE_NAMES = {worker_state_pb2.WORKER_ROLE_PREFILL: "prefill", worker_state_pb2.WORKER_ROLE_DECODE: "decode"}


@dataclass
class WorkerEndpoint:
    address: str
    role: str
    channel: grpc.aio.Channel
    worker_id: str = ""
    healthy: bool = False
    load: LoadView = LoadView()
    last_seen: float = 0.0

    inflight: int = 0
    inflight_tokens: int = 0
    finished_since_report: int = 0
    removed: bool = False  # no longer followed (its placed requests may still be running)

    def __post_init__(self) -> None:
        self.prefill_stub = prefill_pb2_grpc.PrefillServiceStub(self.channel)
        self.decode_session = DecodeSession(decode_pb2_grpc.DecodeServiceStub(self.channel), self.address)

    @property
    def key(self) -> str:
        """The id placement knows this worker by (its address until it has said its id)."""
        return self.worker_id or self.address

    def view(self) -> WorkerView:
        load = with_router_counts(self.load, self.inflight, self.inflight_tokens, self.finished_since_report)
        return WorkerView(self.key, self.address, self.role, self.healthy, load)


class WorkerRegistry:
    """Endpoints come from the constructor's lists and, while running, from `add`/`remove` (driven by
    services.router.discovery.follow). Each endpoint has one follow task and one channel.

    `table` holds every endpoint's view as columns, the form placement reads: each change to an
    endpoint (load report, health, this router's placements) rewrites its row at once."""

    def __init__(self, prefill_addresses: list[str], decode_addresses: list[str], max_backoff_s: float = 2.0,
                 remove_grace_s: float = 30.0, tls: TlsConfig | None = None):
        self._tls = tls  # every worker channel is mutual TLS when set
        self._max_backoff_s = max_backoff_s
        self._remove_grace_s = remove_grace_s
        self._endpoints = [WorkerEndpoint(a, "prefill", self._channel(a)) for a in prefill_addresses]
        self._endpoints += [WorkerEndpoint(a, "decode", self._channel(a)) for a in decode_addresses]
        self._by_key = {e.key: e for e in self._endpoints}
        self.table = WorkerTable.of(e.view() for e in self._endpoints)
        self._tasks: dict[str, asyncio.Task] = {}
        self._closing: set[asyncio.Task] = set()
        self._started = False
        self.changed = asyncio.Event()
        self._listeners: list = []  # called (no arguments) on every load change, placement included
        self.index = PrefixIndex()
        self.block_size = 16  # learned from the workers' BlocksStored events

    def start(self) -> None:
        self._started = True
        for endpoint in self._endpoints:
            self._tasks[endpoint.address] = asyncio.create_task(self._follow(endpoint))

    async def close(self) -> None:
        tasks = [*self._tasks.values(), *self._closing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(e.channel.close() for e in self._endpoints), return_exceptions=True)

    def addresses(self) -> set[str]:
        return {e.address for e in self._endpoints}

    def add(self, role: str, address: str) -> None:
        """Start following a worker at address (no-op if already known)."""
        if address in self.addresses():
            return
        endpoint = WorkerEndpoint(address, role, self._channel(address))
        self._endpoints.append(endpoint)
        self._by_key[endpoint.key] = endpoint
        if self._started:
            self._tasks[address] = asyncio.create_task(self._follow(endpoint))
        log.info("following %s worker at %s", role, address)
        self._notify(endpoint)

    def remove(self, address: str) -> None:
        """Stop following the worker at address: placement no longer sees it and its prefix-index
        entries go at once. Requests already placed on it keep finding its stubs; its channel closes
        once they end (or after remove_grace_s, when they fail with CANCELLED)."""
        endpoint = next((e for e in self._endpoints if e.address == address), None)
        if endpoint is None:
            return
        self._endpoints.remove(endpoint)
        endpoint.removed = True
        task = self._tasks.pop(address, None)
        if task is not None:
            task.cancel()
        self._mark_down(endpoint)
        self.table.remove(endpoint.key)
        endpoint.decode_session.close_when_idle()
        closing = asyncio.create_task(endpoint.channel.close(grace=self._remove_grace_s))
        self._closing.add(closing)
        closing.add_done_callback(lambda task: self._forget(endpoint, task))
        log.info("stopped following %s worker %s at %s", endpoint.role, endpoint.key, address)

    def _forget(self, endpoint: WorkerEndpoint, closing: asyncio.Task) -> None:
        """A removed endpoint stays reachable by id (for requests already placed on it) until its
        channel has closed."""
        self._closing.discard(closing)
        if self._by_key.get(endpoint.key) is endpoint:
            del self._by_key[endpoint.key]

    def _channel(self, address: str) -> grpc.aio.Channel:
        return aio_channel(address, self._tls, [*CHANNEL_OPTIONS, *_RECONNECT_OPTIONS, *_KEEPALIVE_OPTIONS])

    def views(self) -> list[WorkerView]:
        return self.table.views()

    def add_listener(self, callback) -> None:
        """Calls callback() whenever a load report, a worker's health or this router's placements change."""
        self._listeners.append(callback)

    def _owns(self, endpoint: WorkerEndpoint) -> bool:
        """Whether placement knows endpoint's worker id by this endpoint: a worker whose id moved to
        another address leaves the old endpoint behind (followed until removed), and that one must
        not overwrite the live worker's row or clear its prefix entries when it fails."""
        return self._by_key.get(endpoint.key) is endpoint

    def _notify(self, endpoint: WorkerEndpoint) -> None:
        """endpoint changed: rewrite its row (if it owns it), then wake whoever waits for load changes."""
        if not endpoint.removed and self._owns(endpoint):
            self.table.put(endpoint.view())
        self.changed.set()
        for callback in self._listeners:
            callback()

    def endpoint(self, worker_id: str) -> WorkerEndpoint:
        return self._by_key[worker_id]

    def prefill_stub(self, worker_id: str) -> prefill_pb2_grpc.PrefillServiceStub:
        return self._by_key[worker_id].prefill_stub

    def decode_session(self, worker_id: str) -> DecodeSession:
        return self._by_key[worker_id].decode_session

    @contextlib.contextmanager
    def track(self, worker_id: str, prompt_tokens: int):
        """Counts a request as in flight on worker_id while the block runs."""
        endpoint = self.endpoint(worker_id)
        endpoint.inflight += 1
        endpoint.inflight_tokens += prompt_tokens
        self._notify(endpoint)
        try:
            yield
        finally:
            endpoint.inflight -= 1
            endpoint.inflight_tokens -= prompt_tokens
            endpoint.finished_since_report += 1
            self._notify(endpoint)

    def has_healthy(self, role: str) -> bool:
        return any(e.healthy and e.role == role for e in self._endpoints)

    async def _follow(self, endpoint: WorkerEndpoint) -> None:
        backoff = 0.05
        stub = worker_state_pb2_grpc.WorkerStateServiceStub(endpoint.channel)
        while True:
            try:
                async for update in stub.StreamState(worker_state_pb2.StreamStateRequest(load_report_interval_ms=200)):
                    self._apply(endpoint, update)
                    backoff = 0.05
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if endpoint.healthy:
                    log.warning("lost %s worker %s (%s): %s", endpoint.role, endpoint.address, exc.code().name,
                                exc.details())
            self._mark_down(endpoint)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    def _apply(self, endpoint: WorkerEndpoint, update: worker_state_pb2.StreamStateResponse) -> None:
        if not endpoint.healthy:
            log.info("%s worker %s up at %s", _ROLE_NAMES.get(update.role, "?"), update.worker_id, endpoint.address)
        if endpoint.worker_id != update.worker_id:  # first contact, or another worker took the address
            if endpoint.worker_id:
                self.index.cleared(endpoint.worker_id)
            self._by_key.pop(endpoint.key, None)
            old_key, endpoint.worker_id = endpoint.key, update.worker_id
            self._by_key[endpoint.key] = endpoint
            self.table.rename(old_key, endpoint.view())
        endpoint.healthy, endpoint.last_seen = True, time.monotonic()
        kind = update.WhichOneof("update")
        if kind == "load_report":
            r = update.load_report
            endpoint.load = LoadView(r.waiting_sequences, r.running_sequences, r.kv_blocks_used, r.kv_blocks_total,
                                     r.queued_prefill_tokens, max_running=r.max_running_sequences)
            endpoint.finished_since_report = 0
        elif kind == "kv_events":
            for event in update.kv_events.events:
                which = event.WhichOneof("event")
                if which == "stored":
                    self.block_size = event.stored.block_size or self.block_size
                    self.index.stored(update.worker_id, event.stored.block_hashes)
                elif which == "removed":
                    self.index.removed(update.worker_id, event.removed.block_hashes)
                else:
                    self.index.cleared(update.worker_id)
        self._notify(endpoint)

    def _mark_down(self, endpoint: WorkerEndpoint) -> None:
        endpoint.healthy = False
        if endpoint.worker_id and self._owns(endpoint):
            self.index.cleared(endpoint.worker_id)
        self._notify(endpoint)

